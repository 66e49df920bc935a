package tests

import (
	"strings"
	"testing"
	"time"
)

// policyWarnings returns the warnings the status page shows for the
// running config's policies.
func policyWarnings(t *testing.T, p *caddyProc) []string {
	t.Helper()
	var st struct {
		Policies []struct {
			Warnings []string `json:"warnings"`
		} `json:"policies"`
	}
	obsGetJSON(t, p.Admin+"/affinity/", &st)
	var out []string
	for _, pol := range st.Policies {
		out = append(out, pol.Warnings...)
	}
	return out
}

// expectTold checks that Caddy logged a warning containing what exactly
// once and that the status page shows it.
func expectTold(t *testing.T, p *caddyProc, what string) {
	t.Helper()
	if n := p.logLines(0, `"level":"warn"`, what); n != 1 {
		t.Errorf("caddy %s logged %q %d times, want once", p.name, what, n)
	}
	if ws := policyWarnings(t, p); !strings.Contains(strings.Join(ws, "\n"), what) {
		t.Errorf("caddy %s's status page does not show %q: %q", p.name, what, ws)
	}
}

// TestForeignPinsAreTold: two instances with no `secret` and storage of
// their own each generate a secret and reject each other's pins, which
// breaks the sessions that cross (the README documents it). Each instance
// now tells it once, with the fix, in its log and on its status page.
func TestForeignPinsAreTold(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	cfg := proxyConfig{Upstreams: addrsOf(bs), Policy: "key cookie " + appCookie}
	a := launchCaddy(t, "A", cfg) // each its own storage folder
	b := launchCaddy(t, "B", cfg)
	a.waitReady(t)
	b.waitReady(t)
	// At a steady pace over about 4 s, as users come: one burst is not
	// told (a single client replaying a pin).
	clients, s := newClients(t, 100), newStats()
	for round := range 10 {
		forEach(clients, 50, func(c *client) {
			s.record(c, c.visit([]*caddyProc{a, b}[round%2].URL))
		})
		time.Sleep(400 * time.Millisecond)
	}
	t.Logf("no secret, separate storage, 100 clients alternating A,B x 10: %s", s)
	for _, p := range []*caddyProc{a, b} {
		expectTold(t, p, "pin cookies signed with another secret keep coming")
	}
	t.Logf("FIGURES | two instances, no secret, separate storage | %d requests | %d broken | told: A %d, B %d |",
		s.requests, s.broken, len(policyWarnings(t, a)), len(policyWarnings(t, b)))
}

// TestSilentMisconfigurationsAreTold: a weight list longer than the
// upstream list, and a key that no request carries (a wrong cookie name),
// are each told once in the log and on the status page.
func TestSilentMisconfigurationsAreTold(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "told", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie Session_ID\nkey cookie " + appCookie + "\nweights 1 1 1 2",
	})
	expectClean(t, "100 clients x 11", visitAll(newClients(t, 100), p.URL, 11, 50))
	expectTold(t, p, "weights lists 4 weights for 3 upstreams")
	expectTold(t, p, "key cookie Session_ID appeared in none of the first 1000 requests")
	if ws := policyWarnings(t, p); len(ws) != 2 {
		t.Errorf("status page warnings: %q, want 2", ws)
	}
}

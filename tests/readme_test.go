package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// readmeCaddyfile returns the first caddyfile block of README.md: the
// Caddyfile its first screen gives for three app instances.
func readmeCaddyfile(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)```caddyfile\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no caddyfile block")
	}
	return string(m[1])
}

// TestReadmeCaddyfile runs the README's first-screen Caddyfile, as
// written, against three real in-memory-session workers (their cookie
// JSESSIONID, one of the platform cookies the policy reads by default):
// fresh clients spread over all three workers and each keeps its worker.
// Only the addresses change: the site's :8080 and the upstreams'
// 127.0.0.1:9001-9003 become free ports, and the harness's global options
// (admin port, storage in a temp dir) are put in front.
func TestReadmeCaddyfile(t *testing.T) {
	needCaddy(t)
	body := readmeCaddyfile(t)
	for _, want := range []string{":8080 {", "127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003", "lb_policy affinity", "health_interval"} {
		if !strings.Contains(body, want) {
			t.Fatalf("the README's Caddyfile lost %q; this test substitutes it:\n%s", want, body)
		}
	}
	bs := startCookieBackends(t, 3, "JSESSIONID")
	p := startCaddySite(t, "readme", func(sitePort, adminPort int, storage string) string {
		site := strings.Replace(body, ":8080 {", fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1", sitePort), 1)
		site = strings.Replace(site, "127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003", strings.Join(addrsOf(bs), " "), 1)
		return globalOptions(adminPort, storage, "") + site
	})

	const nClients, nVisits = 30, 5
	clients := newClients(t, nClients)
	s := visitAll(clients, p.URL, nVisits, 10)
	expectClean(t, "the README's Caddyfile, 30 clients x 5 visits", s)
	spread := sessionsByWorker(clients)
	t.Logf("sessions per worker: %v", spread)
	for _, b := range bs {
		if spread[b.name] == 0 {
			t.Errorf("no session on worker %s: %v; the README says new sessions spread", b.name, spread)
		}
	}
	for _, c := range clients {
		if c.visits != nVisits {
			t.Errorf("client %d ended at visit %d on %s, want %d (trail %v): its session did not stick", c.id, c.visits, c.worker, nVisits, c.trail)
		}
	}
}

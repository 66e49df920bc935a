package tests

import (
	"os"
	"path/filepath"
	"testing"
)

// alternate makes every client visit the instances in turn (A, B, A, B...)
// n times, conc clients at a time. The instances listen on different
// ports of 127.0.0.1, so one cookie jar serves both: the browser of a
// user behind DNS round robin.
func alternate(clients []*client, instances []*caddyProc, n, conc int) *stats {
	s := newStats()
	forEach(clients, conc, func(c *client) {
		for i := range n {
			s.record(c, c.visit(instances[i%len(instances)].URL))
		}
	})
	return s
}

// TestTwoInstancesAlternate: two Caddy processes with the same upstreams;
// each browser alternates between them. They must agree on every
// session's worker: by a shared `secret`, or, with no secret, by the
// secret generated once in the storage they share.
func TestTwoInstancesAlternate(t *testing.T) {
	needCaddy(t)
	const nClients, nVisits = 100, 10

	t.Run("same secret", func(t *testing.T) {
		bs := startBackends(t, 3)
		cfg := proxyConfig{
			Upstreams: addrsOf(bs),
			Policy:    "key cookie " + appCookie + "\nsecret correct-horse-battery-staple",
		}
		a := launchCaddy(t, "A", cfg) // each its own storage folder
		b := launchCaddy(t, "B", cfg)
		a.waitReady(t)
		b.waitReady(t)
		s := alternate(newClients(t, nClients), []*caddyProc{a, b}, nVisits, 50)
		expectClean(t, "100 clients alternating A,B x 10", s)
	})

	t.Run("shared storage, no secret", func(t *testing.T) {
		bs := startBackends(t, 3)
		storage := t.TempDir()
		cfg := proxyConfig{
			Upstreams: addrsOf(bs),
			Policy:    "key cookie " + appCookie,
			Storage:   storage,
		}
		// Started together: both may try to generate the secret at once.
		a := launchCaddy(t, "A", cfg)
		b := launchCaddy(t, "B", cfg)
		a.waitReady(t)
		b.waitReady(t)
		if _, err := os.Stat(filepath.Join(storage, "caddy-affinity", "pin-secret")); err != nil {
			t.Logf("note: no generated secret at caddy-affinity/pin-secret in the shared storage (%v)", err)
		}
		s := alternate(newClients(t, nClients), []*caddyProc{a, b}, nVisits, 50)
		expectClean(t, "100 clients alternating A,B x 10", s)
	})

	// The control: instances that do not share a secret reject each
	// other's pins, so a new session (placed at random) breaks whenever
	// the other instance's ring places its key elsewhere. If nothing broke
	// here, the two subtests above would prove nothing.
	t.Run("different secrets (control)", func(t *testing.T) {
		bs := startBackends(t, 3)
		cfgA := proxyConfig{Upstreams: addrsOf(bs), Policy: "key cookie " + appCookie + "\nsecret one-secret"}
		cfgB := proxyConfig{Upstreams: addrsOf(bs), Policy: "key cookie " + appCookie + "\nsecret another-secret"}
		a := launchCaddy(t, "A", cfgA)
		b := launchCaddy(t, "B", cfgB)
		a.waitReady(t)
		b.waitReady(t)
		s := alternate(newClients(t, nClients), []*caddyProc{a, b}, 4, 50)
		t.Logf("different secrets, 100 clients alternating A,B x 4: %s", s)
		if s.failed != 0 {
			t.Errorf("%d requests failed; samples:%s", s.failed, s.samplesText())
		}
		if s.broken == 0 {
			t.Errorf("no session broke although the instances do not share a secret: either pins signed with another secret are accepted, or the alternation does not reach both instances")
		}
	})
}

package tests

import (
	"fmt"
	"testing"
)

// rotationPolicy is a pin-only policy (no key: the pin alone keeps a
// session, so a pin an instance rejects breaks the session, as a new
// session is placed by its connection) with the given secret line.
func rotationPolicy(secret string) string { return "secret " + secret }

// duringReload alternates the clients between the instances n times while
// p is reloaded with cfg, then once more after: the rotation happens
// mid-run, with requests in flight.
func duringReload(t *testing.T, clients []*client, instances []*caddyProc, p *caddyProc, cfg proxyConfig, n int) *stats {
	t.Helper()
	done := make(chan *stats)
	go func() { done <- alternate(clients, instances, n, 50) }()
	p.reload(t, cfg)
	s := <-done
	after := alternate(clients, instances, 2, 50)
	s.merge(after)
	return s
}

// merge adds o's counts to s (for expectClean's verdict and log line).
func (s *stats) merge(o *stats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests += o.requests
	s.ok += o.ok
	s.news += o.news
	s.broken += o.broken
	s.restarts += o.restarts
	s.failed += o.failed
	s.status5xx += o.status5xx
	s.moved += o.moved
	for k, v := range o.perWorker {
		s.perWorker[k] += v
	}
	for k, v := range o.newPerWorker {
		s.newPerWorker[k] += v
	}
	s.samples = append(s.samples, o.samples...)
}

// TestSecretRotation rotates the pin secret of two instances while every
// client alternates between them, by the README's procedure: first
// every instance accepts the new secret (`secret old new`), then every
// instance issues it (`secret new old`), then the old one is dropped
// (`secret new`). No session may break at any step. The control shows
// why the first step is needed: an instance that issues a secret the
// other does not know yet breaks sessions.
func TestSecretRotation(t *testing.T) {
	needCaddy(t)
	const nClients = 100
	const oldS, newS = "old-secret-0123456789abcdef", "new-secret-0123456789abcdef"

	t.Run("accept, issue, drop", func(t *testing.T) {
		bs := startBackends(t, 3)
		cfg := func(secret string) proxyConfig {
			return proxyConfig{Upstreams: addrsOf(bs), Policy: rotationPolicy(secret)}
		}
		a := launchCaddy(t, "A", cfg(oldS))
		b := launchCaddy(t, "B", cfg(oldS))
		a.waitReady(t)
		b.waitReady(t)
		both := []*caddyProc{a, b}
		clients := newClients(t, nClients)
		expectClean(t, "secret old on both", alternate(clients, both, 4, 50))
		for _, step := range []struct {
			inst   *caddyProc
			secret string
		}{
			{a, oldS + " " + newS}, {b, oldS + " " + newS}, // accept new
			{a, newS + " " + oldS}, {b, newS + " " + oldS}, // issue new
			{a, newS}, {b, newS}, // drop old
		} {
			s := duringReload(t, clients, both, step.inst, cfg(step.secret), 4)
			expectClean(t, fmt.Sprintf("%s reloaded with `secret %s`", step.inst.name, step.secret), s)
		}
		// Every session is still the one it started as: none restarted.
		if by := sessionsByWorker(clients); len(by) < 2 {
			t.Errorf("sessions on %v: the pins did not spread the sessions, the test proves little", by)
		}
	})

	t.Run("issuing before the other accepts (control)", func(t *testing.T) {
		bs := startBackends(t, 3)
		cfg := func(secret string) proxyConfig {
			return proxyConfig{Upstreams: addrsOf(bs), Policy: rotationPolicy(secret)}
		}
		a := launchCaddy(t, "A", cfg(oldS))
		b := launchCaddy(t, "B", cfg(oldS))
		a.waitReady(t)
		b.waitReady(t)
		both := []*caddyProc{a, b}
		clients := newClients(t, nClients)
		expectClean(t, "secret old on both", alternate(clients, both, 4, 50))
		a.reload(t, cfg(newS+" "+oldS))
		s := alternate(clients, both, 4, 50)
		t.Logf("A issues the new secret, B knows only the old one: %s", s)
		if s.failed != 0 {
			t.Errorf("%d requests failed; samples:%s", s.failed, s.samplesText())
		}
		if s.broken == 0 {
			t.Error("no session broke although B rejects A's new pins: the subtest above would prove nothing")
		}
	})
}

package tests

import (
	"fmt"
	"io"
	"testing"
)

// Two sites in front of different workers, both keyed on the client IP
// with no pin cookie: a visit to site B must not overwrite the session
// table entries of site A's sessions (the table is process-wide; each
// proxy has its own namespace in it, derived from where it sits in the
// config, so that a reload keeps it). Before, one request to site B moved
// 137 of 200 site-A sessions that were not on their ring owner.
func TestSitesDoNotShareSessionEntries(t *testing.T) {
	needCaddy(t)
	const nClients = 120
	bsA, bsB := startBackends(t, 3), startBackends(t, 3)
	siteB := freePort(t)
	policy := "key client_ip\npin_cookie off"
	cfg := proxyConfig{
		Upstreams: addrsOf(bsA),
		Policy:    policy,
		Extra: fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s %s %s {
		lb_policy affinity {
			key client_ip
			pin_cookie off
		}
	}
}
`, siteB, bsB[0].addr, bsB[1].addr, bsB[2].addr),
	}
	p := startCaddy(t, "scopes", cfg)

	// Site A's sessions start while worker A is in maintenance, so that a
	// third of them are not on their ring owner: only their entries keep
	// them where they are.
	obsSetState(t, p, bsA[0].addr, "maintenance")
	clients := newClients(t, nClients)
	expectClean(t, "site A, first visits", visitAll(clients, p.URL, 1, 20))
	obsSetState(t, p, bsA[0].addr, "up")

	// Every client visits site B once, from its own address, without
	// site A's cookies.
	forEach(clients, 20, func(c *client) {
		resp, err := c.raw.Get(fmt.Sprintf("http://127.0.0.1:%d/", siteB))
		if err != nil {
			t.Errorf("site B: %v", err)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	})
	s := visitAll(clients, p.URL, 2, 20)
	expectClean(t, "site A after visits to site B", s)
	if s.moved != 0 {
		t.Fatalf("%d site-A sessions moved after their clients visited site B", s.moved)
	}

	// A reload keeps each site's namespace.
	p.reload(t, cfg)
	s = visitAll(clients, p.URL, 2, 20)
	expectClean(t, "site A after a reload", s)
	if s.moved != 0 {
		t.Fatalf("%d site-A sessions moved after a reload", s.moved)
	}
}

package tests

import (
	"strings"
	"testing"
)

// TestManyClientsStick: 300 browsers, 10 visits each, 50 at a time,
// through one Caddy in front of three workers: no session ever breaks,
// no request fails, and new sessions are spread over every worker.
func TestManyClientsStick(t *testing.T) {
	needCaddy(t)
	const nClients, nVisits, conc = 300, 10, 50
	bs := startBackends(t, 3)
	p := startCaddy(t, "sticky", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie,
	})

	// The pin cookie a new session gets.
	probe := newClient(t)
	res := probe.visit(p.URL)
	if res.failed() {
		t.Fatalf("first visit: %s", res)
	}
	var pinHeader string
	for _, v := range res.Header.Values("Set-Cookie") {
		if strings.HasPrefix(v, pinCookie+"=") {
			pinHeader = v
		}
	}
	if pinHeader == "" {
		t.Errorf("a new session got no %s pin cookie; Set-Cookie: %q", pinCookie, res.Header.Values("Set-Cookie"))
	} else {
		t.Logf("pin cookie: %s", pinHeader)
		lower := strings.ToLower(pinHeader)
		for _, attr := range []string{"httponly", "path=/", "samesite=lax"} {
			if !strings.Contains(lower, attr) {
				t.Errorf("pin cookie %q lacks %s", pinHeader, attr)
			}
		}
		if strings.Contains(lower, "secure") {
			t.Errorf("pin cookie %q is Secure on a plain-HTTP request: the browser would never send it back", pinHeader)
		}
	}

	clients := newClients(t, nClients)
	s := visitAll(clients, p.URL, nVisits, conc)
	expectClean(t, "300 clients x 10 visits", s)
	if s.requests != nClients*nVisits {
		t.Errorf("made %d requests, want %d", s.requests, nClients*nVisits)
	}
	if s.moved != 0 {
		t.Errorf("%d visits landed on another worker than the session's previous one", s.moved)
	}
	for _, c := range clients {
		if c.visits != nVisits {
			t.Errorf("%s ended at %d visits, want %d", c, c.visits, nVisits)
			break
		}
	}

	min := nClients * 15 / 100
	for _, b := range bs {
		n := s.newPerWorker[b.name]
		t.Logf("worker %s: %d new sessions (%.1f%%), its store holds %d sessions, %d requests",
			b.name, n, 100*float64(n)/nClients, b.w.Sessions(), b.w.Requests())
		if n < min {
			t.Errorf("worker %s got %d of %d new sessions, want at least %d (15%%)", b.name, n, nClients, min)
		}
	}
}

package tests

import "testing"

// An upstream listed twice (weighting by repetition; DNS and SRV answers
// repeat addresses too) is one ring member of twice the weight. Before,
// the ring build failed on every request: 3000 errors of 3000.
func TestDuplicateUpstreamServes(t *testing.T) {
	needCaddy(t)
	const nClients, nVisits, conc = 300, 10, 50
	bs := startBackends(t, 3)
	ups := addrsOf(bs)
	p := startCaddy(t, "duplicates", proxyConfig{
		Upstreams: []string{ups[0], ups[0], ups[1], ups[2]},
		Policy:    "key cookie " + appCookie,
	})
	clients := newClients(t, nClients)
	s := visitAll(clients, p.URL, nVisits, conc)
	expectClean(t, "300 clients x 10 visits, one upstream listed twice", s)
	if s.requests != nClients*nVisits {
		t.Errorf("made %d requests, want %d", s.requests, nClients*nVisits)
	}
	// The repeated worker has half the weight: about 150 of 300 sessions.
	byWorker := sessionsByWorker(clients)
	t.Logf("sessions by worker: %v", byWorker)
	if n := byWorker[bs[0].name]; n < 110 || n > 190 {
		t.Errorf("the worker listed twice has %d of %d sessions, want about half: %v", n, nClients, byWorker)
	}
}

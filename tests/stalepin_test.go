package tests

import (
	"net/http"
	"net/url"
	"testing"
	"time"
)

// TestStalePinStartsNoSessionOnDrainingWorker is the acceptance scenario
// of "Hardening" item 2: a pin kept by a browser whose app session has
// ended must not start a new session on a worker that takes none.
//
// 48 browsers get their sessions on worker A (B and C drain meanwhile, so
// that every session lands on A), then end them as a browser does: they
// keep the pin cookie, lose the app cookie, and stay idle past
// session_ttl (2s here). 24 other browsers keep theirs live, visiting
// every half second. Then A drains. The ended sessions' browsers come
// back with their old pins: their new sessions must land elsewhere (0 on
// A), and the live ones must stay on A (0 broken). Before pins carried
// their issue time, all 48 came back to A.
//
// With the app's cookie as a key, the live sessions' table entries keep
// them on A too; with the pin alone, only their refreshed pins do.
func TestStalePinStartsNoSessionOnDrainingWorker(t *testing.T) {
	needCaddy(t)
	for _, tc := range []struct{ name, policy string }{
		{"key cookie", keyPolicy + "\nsession_ttl 2s"},
		{"pin only", "session_ttl 2s"},
	} {
		t.Run(tc.name, func(t *testing.T) { stalePinScenario(t, tc.policy) })
	}
}

func stalePinScenario(t *testing.T, policy string) {
	bs := startBackends(t, 3)
	a, b, c := bs[0], bs[1], bs[2]
	p := startCaddy(t, "stalepin", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    policy,
	})
	p.setState(t, b.addr, "draining")
	p.setState(t, c.addr, "draining")
	ended, live := newClients(t, 48), newClients(t, 24)
	all := append(append([]*client(nil), ended...), live...)
	expectClean(t, "sessions on A (B and C draining)", visitAll(all, p.URL, 2, 24))
	if n := len(clientsOn(all, a.name)); n != len(all) {
		t.Fatalf("%d of %d sessions on A, want all: %s", n, len(all), sortedMap(sessionsByWorker(all)))
	}
	p.setState(t, b.addr, "up")
	p.setState(t, c.addr, "up")

	// The ended sessions: the app cookie goes (as it does when the app's
	// session ends or the browser drops it), the pin stays.
	u, _ := url.Parse(p.URL + "/")
	for _, cl := range ended {
		if _, ok := cl.cookie(p.URL, pinCookie); !ok {
			t.Fatalf("%s has no pin cookie", cl)
		}
		cl.jar.SetCookies(u, []*http.Cookie{{Name: appCookie, Value: "x", Path: "/", MaxAge: -1}})
	}
	pinsBefore := map[*client]string{}
	for _, cl := range live {
		pinsBefore[cl], _ = cl.cookie(p.URL, pinCookie)
	}
	// Idle past session_ttl (2s) and the pin's refresh interval (1s) and
	// clock slack (2s): 6s. The live sessions go on meanwhile.
	keep := newStats()
	for deadline := time.Now().Add(6 * time.Second); time.Now().Before(deadline); {
		forEach(live, 24, func(cl *client) { keep.record(cl, cl.visit(p.URL)) })
		time.Sleep(500 * time.Millisecond)
	}
	expectClean(t, "live sessions while the others idle", keep)
	// A live session's pin is re-issued with a fresh time as it ages.
	for _, cl := range live {
		if v, _ := cl.cookie(p.URL, pinCookie); v == pinsBefore[cl] {
			t.Errorf("a live session's pin was not refreshed in 6s (session_ttl 2s): %s", cl)
			break
		}
	}

	p.setState(t, a.addr, "draining")
	back := newStats()
	forEach(ended, 24, func(cl *client) { back.record(cl, cl.visit(p.URL)) })
	stay := visitAll(live, p.URL, 2, 24)
	t.Logf("ended sessions back with their old pins: %s", back)
	if back.failed != 0 {
		t.Errorf("%d of the ended sessions' requests failed: %s", back.failed, back.samplesText())
	}
	if n := back.perWorker[a.name]; n != 0 {
		t.Errorf("%d of %d browsers with an ended session started a new one on draining A, want 0", n, len(ended))
	}
	for _, cl := range ended {
		if cl.visits != 1 {
			t.Errorf("an ended session did not start anew: %s", cl)
			break
		}
	}
	// The new sessions got pins naming their new workers, and stay there.
	expectClean(t, "the ended sessions' new sessions", visitAll(ended, p.URL, 2, 24))
	expectClean(t, "live sessions after A drains", stay)
	if n := stay.perWorker[a.name]; n != 2*len(live) {
		t.Errorf("live sessions made %d visits on A, want all %d: %s", n, 2*len(live), stay)
	}
}

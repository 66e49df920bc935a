package tests

import (
	"strings"
	"testing"
	"time"
)

// `store local`: the session table outlives the process. In learn mode
// (pin_cookie off, the app's own cookie as the key, affinity_learn) the
// table is all that keeps a session on the worker that holds it in
// memory, so a restart that forgets it breaks about 2/3 of the sessions
// (an unknown id is placed by its hash on one of three workers).

// storePolicy is the learn-mode policy with the given store line.
func storePolicy(store string) string {
	return "key cookie " + expressCookie + "\npin_cookie off\n" + store
}

const logRestored = "restored the session table from storage"

// TestStoreLocalRestart: 100 clients × 10 visits in learn mode, the
// instance restarted twice mid-run (SIGTERM, then `caddy stop`): no
// session breaks. The control runs the same with `store memory`, and a
// crash (SIGKILL) after the periodic write loses nothing either.
func TestStoreLocalRestart(t *testing.T) {
	needCaddy(t)
	const nClients, conc = 100, 25

	// run visits in rounds, with restart between them, and returns the
	// summed figures.
	run := func(t *testing.T, store string, restart func(t *testing.T, p *caddyProc)) (requests, broken, failed int, p *caddyProc) {
		bs := startCookieBackends(t, 3, expressCookie)
		p = startCaddySite(t, "store", learnSite(addrsOf(bs), "affinity_learn", storePolicy(store)))
		clients := newClients(t, nClients)
		for i, n := range []int{4, 3, 3} {
			if i > 0 {
				restart(t, p)
			}
			s := visitAll(clients, p.URL, n, conc)
			t.Logf("round %d (%d visits each): %s", i+1, n, s)
			if s.broken > 0 {
				t.Logf("round %d samples:%s", i+1, s.samplesText())
			}
			requests += s.requests
			broken += s.broken
			failed += s.failed
		}
		return requests, broken, failed, p
	}
	ways := []string{"SIGTERM", "caddy stop"}

	t.Run("local", func(t *testing.T) {
		n := 0
		requests, broken, failed, p := run(t, "store local", func(t *testing.T, p *caddyProc) {
			p.stopNow(t, ways[n%2])
			n++
			p.startAgain(t)
		})
		t.Logf("store local, %d clients x 10 visits, restarted twice: %d requests, %d broken, %d failed", nClients, requests, broken, failed)
		if broken != 0 || failed != 0 || requests != nClients*10 {
			t.Errorf("%d requests (want %d), %d broken, %d failed: want none", requests, nClients*10, broken, failed)
		}
		if got := strings.Count(p.out.String(), logRestored); got != 2 {
			t.Errorf("%q logged %d times, want 2 (once per restart)", logRestored, got)
		}
	})

	t.Run("crash", func(t *testing.T) {
		// A SIGKILL writes nothing: what the periodic write (every
		// second here) saved is what comes back.
		requests, broken, failed, _ := run(t, "store local {\n\tinterval 1s\n}", func(t *testing.T, p *caddyProc) {
			time.Sleep(2500 * time.Millisecond)
			_ = p.run.cmd.Process.Kill()
			<-p.run.exited
			p.startAgain(t)
		})
		t.Logf("store local (interval 1s), SIGKILLed twice: %d requests, %d broken, %d failed", requests, broken, failed)
		if broken != 0 || failed != 0 {
			t.Errorf("%d broken, %d failed: want none", broken, failed)
		}
	})

	t.Run("memory", func(t *testing.T) {
		requests, broken, failed, _ := run(t, "store memory", func(t *testing.T, p *caddyProc) {
			p.stopNow(t, "SIGTERM")
			p.startAgain(t)
		})
		t.Logf("control, store memory, restarted twice: %d requests, %d broken, %d failed", requests, broken, failed)
		if broken < nClients/3 {
			t.Errorf("store memory: only %d sessions broke across two restarts; the run does not show what the store keeps", broken)
		}
	})
}

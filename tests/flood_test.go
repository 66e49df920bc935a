package tests

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
)

// TestFewRequestSessionsEvictNoEstablishedSession: with pin_cookie off,
// the session table alone keeps sessions on their workers. An attacker
// opens 6,000 sessions of two requests each (4.7 × max_sessions 2560)
// against 300 established sessions; afterwards every established
// session still reaches its worker. (Before: 252 of 900 later visits
// broke, because a session's second request established it, and the
// attacker's established entries pushed out the real ones.)
func TestFewRequestSessionsEvictNoEstablishedSession(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddySite(t, "flood2", learnSite(addrsOf(bs), "affinity_learn",
		"key cookie "+appCookie+"\npin_cookie off\nmax_sessions 2560"))
	real := newClients(t, 300)
	expectClean(t, "300 sessions x 3", visitAll(real, p.URL, 3, 50))
	if t.Failed() {
		t.FailNow()
	}

	// The attacker: one client address, a fresh random app cookie per
	// session, two requests each (the second with the id the app issued).
	attacker := newClient(t)
	var sessions, requests, failed atomic.Int64
	var wg sync.WaitGroup
	work := make(chan int)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				first := attacker.visitWith(p.URL, fmt.Sprintf("%s=%016x%016x", appCookie, rand.Uint64(), rand.Uint64()), nil)
				requests.Add(1)
				if first.failed() {
					failed.Add(1)
					continue
				}
				var id string
				for _, c := range (&http.Response{Header: first.Header}).Cookies() {
					if c.Name == appCookie {
						id = c.Value
					}
				}
				if id == "" {
					failed.Add(1)
					continue
				}
				if r := attacker.visitWith(p.URL, appCookie+"="+id, nil); r.failed() {
					failed.Add(1)
				}
				requests.Add(1)
				sessions.Add(1)
			}
		}()
	}
	for i := range 6000 {
		work <- i
	}
	close(work)
	wg.Wait()
	if failed.Load() != 0 {
		t.Errorf("%d attacker requests failed", failed.Load())
	}

	after := visitAll(real, p.URL, 3, 50)
	t.Logf("FIGURES | pin_cookie off, max_sessions 2560, 300 established sessions | attacker: %d sessions of two requests (%d requests) | later visits: %d, broken %d, failed %d |",
		sessions.Load(), requests.Load(), after.requests, after.broken, after.failed)
	expectClean(t, "the 300 established sessions after the attack (x 3)", after)
}

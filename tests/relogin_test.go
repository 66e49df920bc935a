package tests

import (
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"
)

// TestDrainFinishesWithReLogins: browsers keep logging out and in again
// (the app's cookie goes, the pin stays, the next visit starts a new app
// session) while their worker drains. A pin names its session, not only
// its worker: a new session behind an old pin is placed as new, so the
// draining worker's sessions end and `drained` turns true. (Before, the
// pin carried every new session of those browsers to the draining
// worker, and it never drained while they came back.)
func TestDrainFinishesWithReLogins(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "relogin", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie + "\nsession_ttl 3s",
	})
	clients := newClients(t, 90)
	expectClean(t, "90 browsers x 2", visitAll(clients, p.URL, 2, 30))
	victim := backendNamed(bs, busiest(clients))
	onVictim := clientsOn(clients, victim.name)
	t.Logf("sessions per worker: %s; draining %s", sortedMap(sessionsByWorker(clients)), victim.name)
	p.setState(t, victim.addr, "draining")

	u, _ := url.Parse(p.URL + "/")
	logOut := func(c *client) {
		c.jar.SetCookies(u, []*http.Cookie{{Name: appCookie, Value: "x", Path: "/", MaxAge: -1}})
	}
	// Every browser visits every 300ms and logs out after every third
	// visit, for at most 20s or until the victim is drained.
	s := newStats()
	newOnVictim := 0
	start := time.Now()
	drainedAfter := time.Duration(0)
	for round := 1; time.Since(start) < 20*time.Second; round++ {
		forEach(clients, 30, func(c *client) {
			before := c.visits
			r := c.visit(p.URL)
			s.record(c, r)
			if r.Worker == victim.name && r.Visits == 1 && before != 0 {
				s.mu.Lock()
				newOnVictim++
				s.mu.Unlock()
			}
			if round%3 == 0 {
				logOut(c)
			}
		})
		if m := p.affinity(t); m[victim.addr].Drained {
			drainedAfter = time.Since(start)
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Logf("log-out/log-in load while %s drains: %s", victim.name, s)
	t.Logf("FIGURES | log-out/log-in browsers, %s draining, session_ttl 3s | %d browsers (%d on it) | %d requests | new sessions on the draining worker: %d | drained after: %s |",
		victim.name, len(clients), len(onVictim), s.requests, newOnVictim, drainedAfterText(drainedAfter))
	if s.failed != 0 {
		t.Errorf("%d requests failed: %s", s.failed, s.samplesText())
	}
	if newOnVictim != 0 {
		t.Errorf("%d new app sessions started on the draining worker %s behind old pins", newOnVictim, victim.name)
	}
	if drainedAfter == 0 {
		t.Errorf("%s never turned drained in 20s of log-out/log-in load: %s", victim.name, p.affinity(t)[victim.addr])
	}
}

func drainedAfterText(d time.Duration) string {
	if d == 0 {
		return "never (20s)"
	}
	return fmt.Sprint(d.Round(100 * time.Millisecond))
}

package tests

// The drain probe across config reloads, through a real Caddy binary.

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// reloadWatch polls GET /affinity/upstreams every 100 ms for one
// upstream, and sends new clients (one visit each, a new session each)
// every 25 ms, until stopped: what a reload does to a drained upstream,
// as an operator and as new users see it.
type reloadWatch struct {
	states map[string]int // samples by state ("error" when the admin API failed)
	polled int
	newOn  map[string]int // new sessions by worker
	failed int            // visits that failed
	seen   []string       // the state samples in order, for the failure message

	quit chan struct{}
	wg   sync.WaitGroup
}

func watchReload(admin, base, dial string, clients []*client) *reloadWatch {
	w := &reloadWatch{states: map[string]int{}, newOn: map[string]int{}, quit: make(chan struct{})}
	var mu sync.Mutex
	w.wg.Add(2)
	go func() {
		defer w.wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			state := "error"
			if m, err := fetchAffinity(admin); err == nil {
				state = m[dial].State
			}
			mu.Lock()
			w.states[state]++
			w.polled++
			w.seen = append(w.seen, state)
			mu.Unlock()
			select {
			case <-w.quit:
				return
			case <-tick.C:
			}
		}
	}()
	go func() {
		defer w.wg.Done()
		var next atomic.Int64
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.quit:
				return
			case <-tick.C:
			}
			i := int(next.Add(1)) - 1
			if i >= len(clients) {
				continue // out of fresh clients: the window was longer than planned
			}
			r := clients[i].visit(base)
			mu.Lock()
			if r.failed() {
				w.failed++
			} else {
				w.newOn[r.Worker]++
			}
			mu.Unlock()
		}
	}()
	return w
}

func (w *reloadWatch) stop() {
	close(w.quit)
	w.wg.Wait()
}

func (w *reloadWatch) String() string {
	var keys []string
	for k := range w.newOn {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, w.newOn[k]))
	}
	return fmt.Sprintf("%d polls %v; new sessions %s (%d failed)", w.polled, w.states, strings.Join(parts, " "), w.failed)
}

// TestProbeDrainHoldsAcrossReload: a worker whose probe path asks to be
// drained stays draining through config reloads. A reload cleans up the
// old config (whose probe goes, and with it the last prober of the
// worker) before the farm's next look starts the new config's probe, up
// to a second later, which needs `passes` drain answers to drain again:
// the prober's drain must outlive it by a grace, or the worker is up
// and takes new sessions in between. Then, reloaded without the probe,
// the worker stays draining for the grace (max(3 × interval, 5s)) and
// is then up: nobody would undo the probe's drain otherwise.
func TestProbeDrainHoldsAcrossReload(t *testing.T) {
	needCaddy(t)
	bs := startCtlBackends(t, 3, "/drain-status")
	// interval 1s: without the grace, the worker would be up from the
	// old probe's end to the new one's second drain answer, 1 to 2 s, so
	// that 100 ms polls cannot miss it.
	const probe = "probe /drain-status {\ninterval 1s\npasses 2\n}"
	cfg := proxyConfig{Upstreams: ctlAddrs(bs), Policy: keyPolicy + "\nsession_ttl 20m\n" + probe}
	p := startCaddy(t, "probe-reload", cfg)
	victim := bs[1]
	victim.drain.Store(true)
	took := waitUntil(t, "the probe drains B", 10*time.Second, 50*time.Millisecond, func() (bool, string) {
		u := p.affinity(t)[victim.addr]
		return u.State == "draining" && u.SetBy == "probe", u.String()
	})
	t.Logf("B draining (set_by probe) %s after its probe path answered 503", took.Round(time.Millisecond))

	var requests, failed, clients int
	for i, ttl := range []string{"21m", "22m"} {
		fresh := newClients(t, 200)
		w := watchReload(p.Admin, p.URL, victim.addr, fresh)
		time.Sleep(300 * time.Millisecond) // a few samples before the reload
		// The session_ttl changes so that Caddy does not skip the reload
		// as the same config; the probe is the same.
		cfg.Policy = keyPolicy + "\nsession_ttl " + ttl + "\n" + probe
		p.reload(t, cfg)
		// The farm's next look (≤ 1 s), then passes × interval (2 s)
		// for the new probe to drain again, and a margin.
		time.Sleep(3500 * time.Millisecond)
		w.stop()
		t.Logf("reload %d: B %s", i+1, w)
		requests += w.failed + sum(w.newOn)
		failed += w.failed
		clients += sum(w.newOn) + w.failed
		if n := w.polled - w.states["draining"]; n != 0 {
			t.Errorf("reload %d: B was not draining in %d of %d polls (100 ms apart): %v; in order: %s",
				i+1, n, w.polled, w.states, strings.Join(w.seen, " "))
		}
		if w.polled < 30 {
			t.Errorf("reload %d: only %d polls", i+1, w.polled)
		}
		if n := w.newOn[victim.name]; n != 0 {
			t.Errorf("reload %d: %d new sessions landed on B, which asked to be drained", i+1, n)
		}
		if w.failed != 0 {
			t.Errorf("reload %d: %d visits failed", i+1, w.failed)
		}
	}
	if u := p.affinity(t)[victim.addr]; u.State != "draining" || u.SetBy != "probe" {
		t.Errorf("after the reloads: %s, want draining set by the probe", u)
	}

	// Reloaded without the probe: the drain holds for the grace, then
	// nobody is left to undo it but the grace's timer.
	cfg.Policy = keyPolicy + "\nsession_ttl 23m"
	p.reload(t, cfg)
	reloaded := time.Now()
	time.Sleep(3 * time.Second)
	if u := p.affinity(t)[victim.addr]; u.State != "draining" {
		t.Errorf("3 s after the probe was removed: %s, want still draining (grace 5 s)", u)
	}
	waitUntil(t, "B up once the removed probe's grace is over", 10*time.Second, 100*time.Millisecond, func() (bool, string) {
		u := p.affinity(t)[victim.addr]
		return u.State == "up", u.String()
	})
	t.Logf("B up %s after the reload that removed the probe (grace 5 s)", time.Since(reloaded).Round(100*time.Millisecond))
	logFigures(t, figures{event: "2 reloads while the probe drains B", clients: clients, requests: requests, failed: failed})
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

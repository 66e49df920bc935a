package tests

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Learning the app's own session cookie (affinity_learn) and bounded
// loads (balance_factor), against the real binary and demoapp workers
// whose cookie is express-session's connect.sid. The site block needs a
// directive outside reverse_proxy, which proxyConfig does not render, so
// these tests write their own Caddyfile (learnSite) and start Caddy with
// startCaddySite.

// expressCookie is the session cookie name of express-session.
const expressCookie = "connect.sid"

// learnSite renders a Caddyfile whose site block has the given lines
// (e.g. affinity_learn) next to a reverse_proxy with the affinity policy
// body policy, and the harness's health checks and retries.
func learnSite(upstreams []string, siteLines, policy string) func(sitePort, adminPort int, storage string) string {
	return func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
%s	reverse_proxy %s {
		lb_policy affinity {
%s		}
		lb_retries 2
		lb_try_duration 3s
		health_uri /healthz
		health_interval %s
		health_timeout 1s
		fail_duration 10s
	}
}
`, sitePort, indent(siteLines, "\t"), strings.Join(upstreams, " "),
			indent(policy, "\t\t\t"), healthInterval)
	}
}

// startCaddySite is startCaddy for a Caddyfile rendered by render: it
// starts `caddy run`, waits until the site answers /healthz, and starts
// again on other ports if one was taken meanwhile. The process is stopped
// on cleanup and its output logged if the test failed.
func startCaddySite(t *testing.T, name string, render func(sitePort, adminPort int, storage string) string) *caddyProc {
	t.Helper()
	needCaddy(t)
	dir := t.TempDir()
	storage := filepath.Join(dir, "storage")
	p := &caddyProc{name: name, File: filepath.Join(dir, "Caddyfile"), dir: dir, out: new(syncBuffer),
		render: func(sitePort, adminPort int) string { return render(sitePort, adminPort, storage) }}
	p.spawn(t)
	p.stopOnCleanup(t)
	p.waitReady(t)
	return p
}

// TestLearnedAppCookieKeepsSessions is the acceptance run of
// affinity_learn: pin_cookie off, the app's own cookie as the only key,
// 300 browsers x 10 visits: no session ever breaks. Without the learner
// the same setup breaks sessions (the app's new cookie is placed on the
// ring, mostly elsewhere than the worker that created it).
func TestLearnedAppCookieKeepsSessions(t *testing.T) {
	needCaddy(t)
	const nClients, nVisits, conc = 300, 10, 50
	bs := startCookieBackends(t, 3, expressCookie)
	policy := "key cookie " + expressCookie + "\npin_cookie off"
	p := startCaddySite(t, "learn", learnSite(addrsOf(bs), "affinity_learn", policy))

	clients := newClients(t, nClients)
	s := visitAll(clients, p.URL, nVisits, conc)
	expectClean(t, "affinity_learn, 300 clients x 10 visits", s)
	if s.requests != nClients*nVisits || s.moved != 0 {
		t.Errorf("%d requests (want %d), %d moved", s.requests, nClients*nVisits, s.moved)
	}
	for _, c := range clients[:5] {
		if _, ok := c.cookie(p.URL, pinCookie); ok {
			t.Errorf("pin_cookie off, yet %s holds a pin cookie", c)
		}
		if _, ok := c.cookie(p.URL, expressCookie); !ok {
			t.Errorf("%s has no %s cookie", c, expressCookie)
		}
	}
	for _, b := range bs {
		n := s.newPerWorker[b.name]
		t.Logf("worker %s: %d new sessions, its store holds %d sessions", b.name, n, b.w.Sessions())
		if n < nClients*15/100 {
			t.Errorf("worker %s got %d of %d new sessions, want at least 15%%", b.name, n, nClients)
		}
	}

	// The control: the same without affinity_learn.
	bs2 := startCookieBackends(t, 3, expressCookie)
	p2 := startCaddySite(t, "nolearn", learnSite(addrsOf(bs2), "", policy))
	control := visitAll(newClients(t, 60), p2.URL, 3, 20)
	t.Logf("control without affinity_learn, 60 clients x 3 visits: %s", control)
	if control.broken == 0 {
		t.Error("without affinity_learn no session broke: the run above does not show learning")
	}
}

// TestBalanceFactorLive places 3000 new sessions (first visits, at 8 at a
// time) with balance_factor 1.05 and learning: the workers' own session
// stores end up within 1.06 of the mean.
func TestBalanceFactorLive(t *testing.T) {
	needCaddy(t)
	const n, conc = 3000, 8
	bs := startCookieBackends(t, 3, expressCookie)
	p := startCaddySite(t, "balance", learnSite(addrsOf(bs), "affinity_learn",
		"key cookie "+expressCookie+"\npin_cookie off\nbalance_factor 1.05"))

	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	defer hc.CloseIdleConnections()
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	next := make(chan struct{})
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				resp, err := hc.Get(p.URL + "/")
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					mu.Lock()
					failed++
					mu.Unlock()
				}
			}
		}()
	}
	for range n {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	if failed != 0 {
		t.Fatalf("%d of %d first visits failed", failed, n)
	}
	total, most := 0, 0
	var per []string
	for _, b := range bs {
		s := b.w.Sessions()
		total += s
		most = max(most, s)
		per = append(per, fmt.Sprintf("%s:%d", b.name, s))
	}
	ratio := float64(most) / (float64(total) / 3)
	t.Logf("balance_factor 1.05, %d new sessions: per worker %s, max/mean %.4f", n, strings.Join(per, " "), ratio)
	if total != n || ratio > 1.06 {
		t.Errorf("%d sessions in the workers (want %d), max/mean %.4f (want at most 1.06)", total, n, ratio)
	}
}

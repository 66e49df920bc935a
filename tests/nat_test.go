package tests

import (
	"net"
	"net/http"
	"net/http/cookiejar"
	"sync"
	"testing"
	"time"
)

// Users behind one address (NAT, a corporate proxy), with the client IP as
// a fallback key next to the app's cookie, affinity_learn and
// balance_factor 1.05: 3000 new sessions spread with max/mean <= 1.06.
// Before, the address pinned every first request, and all 3000 landed on
// one worker (max/mean 3.0).
func TestOneAddressManySessionsSpread(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddySite(t, "nat", learnSite(addrsOf(bs), "affinity_learn",
		"key cookie "+appCookie+"\nkey client_ip\nbalance_factor 1.05\npin_cookie off"))
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 77)}, Timeout: 5 * time.Second}
	tr := &http.Transport{Proxy: nil, DialContext: dialer.DialContext, MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	const sessions, conc = 3000, 16
	var mu sync.Mutex
	perWorker := map[string]int{}
	broken := 0
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				jar, _ := cookiejar.New(nil)
				hc := &http.Client{Transport: tr, Jar: jar, Timeout: 10 * time.Second}
				first := readVisit(hc.Get(p.URL + "/"))
				second := readVisit(hc.Get(p.URL + "/")) // the learned cookie keeps it
				mu.Lock()
				if first.failed() || second.failed() || second.Worker != first.Worker || second.Visits != 2 {
					broken++
				} else {
					perWorker[first.Worker]++
				}
				mu.Unlock()
			}
		}()
	}
	for i := range sessions {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	most := 0
	for _, n := range perWorker {
		most = max(most, n)
	}
	ratio := float64(most) / (float64(sessions) / 3)
	t.Logf("FIGURES one address, %d sessions: per worker %v, max/mean %.3f, broken %d", sessions, perWorker, ratio, broken)
	if broken != 0 || len(perWorker) != 3 || ratio > 1.06 {
		t.Fatalf("sessions behind one address: %v, max/mean %.3f (want <= 1.06), broken %d", perWorker, ratio, broken)
	}
}

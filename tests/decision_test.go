package tests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The decision of each request is in the request vars, so an access log
// shows why it went where it went: {http.vars.affinity.decision},
// {http.vars.affinity.upstream} and {http.vars.affinity.key} with
// log_append, and the same in a response header with header_down.
func TestDecisionInAccessLog(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	logFile := filepath.Join(t.TempDir(), "access.log")
	site := fmt.Sprintf(`log {
	output file %s
	format json
}
log_append affinity_decision {http.vars.affinity.decision}
log_append affinity_upstream {http.vars.affinity.upstream}
log_append affinity_key {http.vars.affinity.key}`, logFile)
	p := startCaddySite(t, "decision-log", learnSite(addrsOf(bs), site, "key cookie "+appCookie))

	c := newClient(t)
	first, second := c.visit(p.URL), c.visit(p.URL)
	if first.failed() || second.failed() {
		t.Fatalf("visits: %s, %s", first, second)
	}
	home := backendNamed(bs, first.Worker)
	home.kill()
	third := c.visit(p.URL) // its worker is down: the retry fails over
	if third.failed() || third.Worker == first.Worker {
		t.Fatalf("after the kill: %s", third)
	}

	type entry struct {
		URI      string `json:"uri"`
		Decision string `json:"affinity_decision"`
		Upstream string `json:"affinity_upstream"`
		Key      string `json:"affinity_key"`
	}
	var got []entry
	obsEventually(t, "three logged visits", 5*time.Second, func() (bool, string) {
		got = nil
		f, err := os.Open(logFile)
		if err != nil {
			return false, err.Error()
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var line struct {
				Request struct {
					URI string `json:"uri"`
				} `json:"request"`
				entry
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Request.URI == "/" {
				got = append(got, line.entry)
			}
		}
		return len(got) == 3, fmt.Sprintf("%+v", got)
	})
	want := []entry{
		{Decision: "placed", Upstream: home.addr, Key: ""},                 // no app cookie yet
		{Decision: "pin", Upstream: home.addr, Key: "cookie " + appCookie}, // the pin, and the app's cookie
		{Decision: "failover", Upstream: backendNamed(bs, third.Worker).addr, Key: "cookie " + appCookie},
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("visit %d logged %+v, want %+v", i+1, got[i], want[i])
		}
	}
}

// A request with no session key and no pin is placed by its connection:
// the parallel first requests of one HTTP/2 connection land on one
// upstream (a page's first assets must not start sessions on several
// workers), while connections spread.
func TestFirstRequestsOfOneConnectionLandTogether(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddySite(t, "h2c", func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "servers {\n\tprotocols h1 h2c\n}") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		lb_policy affinity {
			key cookie %s
		}
		health_uri /healthz
		health_interval %s
	}
}
`, sitePort, strings.Join(addrsOf(bs), " "), appCookie, healthInterval)
	})
	workers := map[string]int{}
	for conn := range 24 {
		tr := &http.Transport{Proxy: nil, Protocols: new(http.Protocols)}
		tr.Protocols.SetUnencryptedHTTP2(true) // h2c with prior knowledge: one connection
		hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		var wg sync.WaitGroup
		res := make([]visitResult, 4)
		for i := range res {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := hc.Get(p.URL + "/")
				if err == nil && resp.ProtoMajor != 2 {
					t.Errorf("request spoke HTTP/%d, want h2c", resp.ProtoMajor)
				}
				res[i] = readVisit(resp, err)
			}()
		}
		wg.Wait()
		tr.CloseIdleConnections()
		for _, r := range res {
			if r.failed() {
				t.Fatalf("connection %d: %s", conn, r)
			}
			if r.Worker != res[0].Worker {
				t.Fatalf("connection %d: its first requests reached %s and %s", conn, res[0].Worker, r.Worker)
			}
		}
		workers[res[0].Worker]++
	}
	if len(workers) < 2 {
		t.Fatalf("24 connections all landed on %v: connections should spread", workers)
	}
	t.Logf("connections per worker: %v", workers)
}

package tests

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Busy is not down: a session whose worker is at max_requests (Caddy's
// unhealthy_request_count) has this one request served elsewhere, and
// stays on its worker. Before, it failed over for good: its next request,
// with the worker free again, went to the other worker, where its
// in-memory session does not exist.
func TestBusyWorkerKeepsItsSessions(t *testing.T) {
	needCaddy(t)
	hold := make(chan struct{})
	held := make(chan struct{}, 1)
	var names []string
	var dials []string
	for _, name := range []string{"A", "B"} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/hold" {
				held <- struct{}{}
				<-hold
			}
			fmt.Fprint(w, name)
		})}
		go func() { _ = srv.Serve(l) }()
		t.Cleanup(func() { _ = srv.Close() })
		names, dials = append(names, name), append(dials, l.Addr().String())
	}
	released := false
	release := func() {
		if !released {
			released = true
			close(hold)
		}
	}
	t.Cleanup(release)
	p := startCaddySite(t, "busy", func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		lb_policy affinity {
			key header X-Sid
			pin_cookie off
		}
		unhealthy_request_count 1
	}
}
`, sitePort, strings.Join(dials, " "))
	})
	hc := &http.Client{Timeout: 10 * time.Second}
	get := func(path, sid string) (string, int) {
		req, _ := http.NewRequest(http.MethodGet, p.URL+path, nil)
		req.Header.Set("X-Sid", sid)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), resp.StatusCode
	}
	// A session that lives on A.
	sid := ""
	for i := range 50 {
		if w, _ := get("/", fmt.Sprint("s", i)); w == "A" {
			sid = fmt.Sprint("s", i)
			break
		}
	}
	if sid == "" {
		t.Fatal("no session landed on A")
	}
	// A long request of the session keeps A at its max_requests.
	done := make(chan string, 1)
	go func() {
		w, _ := get("/hold", sid)
		done <- w
	}()
	select {
	case <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("the long request never reached A")
	}
	if w, code := get("/", sid); code != 200 || w != "B" {
		t.Fatalf("while A is busy: %d from %q, want 200 from B (this once)", code, w)
	}
	release()
	if w := <-done; w != "A" {
		t.Fatalf("the long request was answered by %q", w)
	}
	for range 5 {
		if w, _ := get("/", sid); w != "A" {
			t.Fatalf("after A was busy, the session went to %q: busy moved it for good", w)
		}
	}
}

package demoapp

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"strings"
	"testing"
	"time"
)

// newClient returns a client with its own cookie jar, i.e. a new browser.
func newClient(t *testing.T) *http.Client {
	t.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Jar: jar, Timeout: 5 * time.Second}
}

// visit makes one visit and decodes the reply.
func visit(t *testing.T, c *http.Client, addr string) visitReply {
	t.Helper()
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	var r visitReply
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestWorkerSessions(t *testing.T) {
	w := NewWorker("A", "")
	if err := w.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer w.Kill()
	addr := w.Addr()
	if !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Fatalf("Addr() = %q", addr)
	}

	c := newClient(t)
	var first visitReply
	for want := 1; want <= 3; want++ {
		r := visit(t, c, addr)
		if r.Worker != "A" || r.Visits != want {
			t.Fatalf("visit %d: got %+v", want, r)
		}
		if want == 1 {
			first = r
			if len(r.Session) != 8 {
				t.Fatalf("session id %q: want 8 hex digits", r.Session)
			}
		} else if r.Session != first.Session {
			t.Fatalf("session id changed from %q to %q", first.Session, r.Session)
		}
	}
	if cs := c.Jar.Cookies(mustURL(t, "http://"+addr+"/")); len(cs) != 1 || cs[0].Name != DefaultCookieName {
		t.Fatalf("cookies %v: want one %s", cs, DefaultCookieName)
	}

	// Another browser has its own session.
	if r := visit(t, newClient(t), addr); r.Visits != 1 || r.Session == first.Session {
		t.Fatalf("fresh client: got %+v", r)
	}
	if n := w.Sessions(); n != 2 {
		t.Fatalf("Sessions() = %d, want 2", n)
	}

	// Health checks answer and do not count as visits.
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Fatalf("/healthz: %d %q", resp.StatusCode, body)
	}
	if n := w.Requests(); n != 4 {
		t.Fatalf("Requests() = %d, want 4", n)
	}

	// A restart in place loses every session: the same cookie starts over.
	w.Kill()
	if w.Sessions() != 0 {
		t.Fatalf("Sessions() = %d after Kill", w.Sessions())
	}
	if _, err := c.Get("http://" + addr + "/"); err == nil {
		t.Fatal("a killed worker answered")
	}
	if err := w.Start(addr); err != nil {
		t.Fatal(err)
	}
	if r := visit(t, c, addr); r.Visits != 1 || r.Session == first.Session {
		t.Fatalf("after restart: got %+v, want a new session at 1", r)
	}
	if err := w.Start(addr); err == nil {
		t.Fatal("Start on a running worker succeeded")
	}
}

func TestWorkerCookieNameAndHTML(t *testing.T) {
	w := NewWorker("B", "ASP.NET_SessionId")
	if err := w.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer w.Kill()
	req, _ := http.NewRequest("GET", "http://"+w.Addr()+"/some/page", nil)
	req.Header.Set("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("Content-Type %q", resp.Header.Get("Content-Type"))
	}
	if !strings.Contains(string(body), "<b>B</b>") || !strings.Contains(string(body), "restart it at 1") {
		t.Fatalf("page:\n%s", body)
	}
	cs := resp.Cookies()
	if len(cs) != 1 || cs[0].Name != "ASP.NET_SessionId" || cs[0].MaxAge != 0 || !cs[0].Expires.IsZero() {
		t.Fatalf("Set-Cookie %v: want one non-persistent ASP.NET_SessionId", cs)
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

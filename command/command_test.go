package command

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/caddy-affinity/caddy-affinity/demoapp"
)

func defaultDemoOptions() demoOptions {
	return demoOptions{
		Listen:    "127.0.0.1:8080",
		Admin:     "127.0.0.1:2019",
		Control:   "127.0.0.1:8081",
		Cookie:    "JSESSIONID",
		Workers:   3,
		FirstPort: 9001,
	}
}

func TestDemoCaddyfileAdapts(t *testing.T) {
	o := defaultDemoOptions()
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	cfg, err := o.caddyfile(o.workerAddrs(), "/tmp/caddy-affinity-demo-test")
	if err != nil {
		t.Fatal(err)
	}
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	out, warnings, err := adapter.Adapt(cfg, map[string]any{"filename": "demo.Caddyfile"})
	if err != nil {
		t.Fatalf("adapt: %v\n%s", err, cfg)
	}
	for _, w := range warnings {
		t.Errorf("warning: %s", w.String())
	}
	js := string(out)
	for _, want := range []string{
		`"dial":"127.0.0.1:9001"`,
		`"dial":"127.0.0.1:9002"`,
		`"dial":"127.0.0.1:9003"`,
		`"policy":"affinity"`,
		`"JSESSIONID"`,
		`"listen":["127.0.0.1:8080"]`,
		`"listen":"127.0.0.1:2019"`,
		`"root":"/tmp/caddy-affinity-demo-test"`,
	} {
		if !strings.Contains(js, want) {
			t.Errorf("adapted config lacks %s:\n%s", want, js)
		}
	}
	if strings.Contains(js, "client_ip") {
		t.Errorf("the demo keys on the client IP: new sessions from one machine would all land on one worker:\n%s", js)
	}
	if strings.Contains(js, "9004") {
		t.Errorf("a fourth upstream in a 3-worker config:\n%s", js)
	}
	if !json.Valid(out) {
		t.Fatal("adapted config is not JSON")
	}
}

func TestDemoOptionsCheck(t *testing.T) {
	bad := map[string]func(*demoOptions){
		"no workers":     func(o *demoOptions) { o.Workers = 0 },
		"port overflow":  func(o *demoOptions) { o.FirstPort = 65535 },
		"cookie space":   func(o *demoOptions) { o.Cookie = "a b" },
		"cookie brace":   func(o *demoOptions) { o.Cookie = "{x}" },
		"cookie comment": func(o *demoOptions) { o.Cookie = "#x" },
		"listen no port": func(o *demoOptions) { o.Listen = "127.0.0.1" },
		"admin garbage":  func(o *demoOptions) { o.Admin = "x" },
	}
	for name, spoil := range bad {
		o := defaultDemoOptions()
		spoil(&o)
		if err := o.check(); err == nil {
			t.Errorf("%s: accepted %+v", name, o)
		}
	}
	o := defaultDemoOptions()
	o.Listen = ":8080"
	cfg, err := o.caddyfile(o.workerAddrs(), "/tmp/x")
	if err != nil || strings.Contains(string(cfg), "bind") {
		t.Errorf(":8080 renders a bind line or fails (%v):\n%s", err, cfg)
	}
}

func TestDemoControl(t *testing.T) {
	w := demoapp.NewWorker("A", "")
	if err := w.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	d := &demo{workers: []*demoapp.Worker{w}, healthy: func(string) (bool, bool) { return true, true }}
	defer d.stopWorkers()
	srv := httptest.NewServer(d.controlHandler())
	defer srv.Close()

	do := func(method, path string, headers ...string) int {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		for i := 0; i+1 < len(headers); i += 2 {
			if headers[i] == "Host" {
				req.Host = headers[i+1]
				continue
			}
			req.Header.Set(headers[i], headers[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	get := func(path string) int { return do(http.MethodGet, path) }
	post := func(path string) int { return do(http.MethodPost, path) }
	// A link or a cross-site form on any web page must not reach the switch.
	if c := get("/__demo/kill/A"); c != http.StatusMethodNotAllowed || !w.Running() {
		t.Fatalf("kill by GET: %d, running %v", c, w.Running())
	}
	if c := do(http.MethodPost, "/__demo/kill/A", "Origin", "https://evil.example"); c != http.StatusForbidden || !w.Running() {
		t.Fatalf("cross-site kill: %d, running %v", c, w.Running())
	}
	if c := do(http.MethodPost, "/__demo/kill/A", "Sec-Fetch-Site", "cross-site"); c != http.StatusForbidden || !w.Running() {
		t.Fatalf("cross-site kill (Sec-Fetch-Site): %d, running %v", c, w.Running())
	}
	// DNS rebinding: a foreign name resolving to 127.0.0.1, the page's
	// own origin, and a browser saying same-origin.
	if c := do(http.MethodPost, "/__demo/kill/A", "Host", "evil.example:8081", "Origin", "http://evil.example:8081", "Sec-Fetch-Site", "same-origin"); c != http.StatusForbidden || !w.Running() {
		t.Fatalf("kill through a rebound name: %d, running %v", c, w.Running())
	}
	if c := do(http.MethodPost, "/__demo/kill/A", "Host", "localhost.evil.example"); c != http.StatusForbidden || !w.Running() {
		t.Fatalf("kill with a foreign Host: %d, running %v", c, w.Running())
	}
	if c := post("/__demo/kill/a"); c != 200 || w.Running() {
		t.Fatalf("kill: %d, running %v", c, w.Running())
	}
	if c := post("/__demo/kill/A"); c != http.StatusConflict {
		t.Fatalf("second kill: %d", c)
	}
	if c := post("/__demo/start/A"); c != 200 || !w.Running() {
		t.Fatalf("start: %d, running %v", c, w.Running())
	}
	if c := post("/__demo/start/Z"); c != http.StatusNotFound {
		t.Fatalf("start of an unknown worker: %d", c)
	}
	if c := get("/__demo/"); c != 200 {
		t.Fatalf("list: %d", c)
	}
}

func TestDrainProgressOnlyOnATerminal(t *testing.T) {
	var buf strings.Builder
	p := newDrainProgress(&buf, "127.0.0.1:9002")
	p.update(3)
	p.clear()
	if buf.Len() != 0 || p.tty {
		t.Fatalf("progress written to a pipe: %q", buf.String())
	}
	p.tty = true
	p.update(3)
	if s := buf.String(); !strings.Contains(s, "3 live sessions left, waited 0s") || !strings.HasPrefix(s, "\r") {
		t.Fatalf("progress on a terminal: %q", s)
	}
	p.clear()
	if !strings.HasSuffix(buf.String(), "\r\033[K") {
		t.Fatalf("progress line not cleared: %q", buf.String())
	}
}

func TestCookieHeader(t *testing.T) {
	if cs := cookieHeader("Cookie: a=1; caddy_affinity=xyz"); len(cs) != 2 || cs[1].Value != "xyz" {
		t.Fatalf("header: %v", cs)
	}
	for _, key := range []string{"hw6hNbNK", "abc==", "=x"} {
		if cs := cookieHeader(key); cs != nil && key != "abc==" {
			t.Errorf("%q read as a cookie header: %v", key, cs)
		}
	}
}

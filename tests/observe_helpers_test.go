package tests

// Helpers of the observability tests (metrics_test.go, operator_test.go,
// cli_test.go, browser_test.go): plain admin API calls with chosen
// headers, Prometheus scrapes, and the admin origins a browser needs.
// They are prefixed obs so as not to collide with the other tests'
// helpers in this package.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// obsClient never goes through an environment proxy and keeps no
// connection, so that an admin server replaced by a reload is not reached
// through a stale one.
var obsClient = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
}

// obsDo sends one request with the given headers ("Name: value" each)
// and returns the status and the body.
func obsDo(t *testing.T, method, url string, body []byte, headers ...string) (int, http.Header, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		if strings.EqualFold(k, "Host") {
			req.Host = strings.TrimSpace(v) // the client ignores a Host header
			continue
		}
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	resp, err := obsClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, b
}

// obsGetJSON GETs url, expects 200 and decodes the JSON into out.
func obsGetJSON(t *testing.T, url string, out any) {
	t.Helper()
	status, _, body := obsDo(t, http.MethodGet, url, nil)
	if status != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", url, status, body)
	}
	if err := json.Unmarshal(body, out); err != nil {
		t.Fatalf("GET %s: %v: %s", url, err, body)
	}
}

// obsUpstreams returns GET /affinity/upstreams by dial address.
func obsUpstreams(t *testing.T, p *caddyProc) map[string]affinityUpstream {
	t.Helper()
	var list []affinityUpstream
	obsGetJSON(t, p.Admin+"/affinity/upstreams", &list)
	m := make(map[string]affinityUpstream, len(list))
	for _, u := range list {
		m[u.Upstream] = u
	}
	return m
}

// obsSetState POSTs a lifecycle state as a script would (no Origin).
func obsSetState(t *testing.T, p *caddyProc, dial, state string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"upstream": dial, "state": state})
	status, _, resp := obsDo(t, http.MethodPost, p.Admin+"/affinity/upstreams/state", body, "Content-Type: application/json")
	if status != http.StatusOK {
		t.Fatalf("POST state %s %s: status %d: %s", dial, state, status, resp)
	}
}

// obsEventually polls cond every 100ms for at most max.
func obsEventually(t *testing.T, what string, max time.Duration, cond func() (bool, string)) {
	t.Helper()
	start := time.Now()
	for {
		ok, seen := cond()
		if ok {
			t.Logf("%s after %s", what, time.Since(start).Round(10*time.Millisecond))
			return
		}
		if time.Since(start) > max {
			t.Fatalf("%s: not within %s; last seen: %s", what, max, seen)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// Prometheus.

// obsMetrics is one scrape: the value of every series, by its name and
// labels as exposed ("name" or `name{a="x",b="y"}`), and the names that
// have HELP and TYPE lines.
type obsMetrics struct {
	series map[string]float64
	typed  map[string]string
}

// obsScrape GETs /metrics from the admin listener.
func obsScrape(t *testing.T, p *caddyProc) obsMetrics {
	t.Helper()
	status, _, body := obsDo(t, http.MethodGet, p.Admin+"/metrics", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /metrics: status %d: %s", status, body)
	}
	m := obsMetrics{series: map[string]float64{}, typed: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			m.typed[name] = typ
			continue
		}
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		m.series[line[:i]] = v
	}
	return m
}

// sum adds the values of the series called name whose labels contain
// every one of labels (`upstream="127.0.0.1:9001"`), and reports whether
// there was any.
func (m obsMetrics) sum(name string, labels ...string) (float64, bool) {
	total, found := 0.0, false
	for series, v := range m.series {
		n, ls, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(ls, l)
		}
		if all {
			total += v
			found = true
		}
	}
	return total, found
}

// get is sum for tests that need the series to exist.
func (m obsMetrics) get(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	v, ok := m.sum(name, labels...)
	if !ok {
		t.Fatalf("no series %s%v on /metrics", name, labels)
	}
	return v
}

// ---------------------------------------------------------------------
// Browsers and the admin origin check.

// Headers a browser sends when the user types the admin URL: no Origin,
// no Referer, but Sec-Fetch-* (loopback is a potentially trustworthy
// origin, so browsers send them over plain HTTP too). Caddy's admin API
// checks the origin of every request with Sec-Fetch-Mode and finds none.
var obsTypedURL = []string{
	"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
	"Sec-Fetch-Mode: navigate",
	"Sec-Fetch-Site: none",
	"Sec-Fetch-Dest: document",
	"Sec-Fetch-User: ?1",
}

// obsAllowBrowsers reloads p's config with the admin origins the README
// recommends for the status page, the way an operator would: the
// Caddyfile gets an origins line and is POSTed to /load. It returns the
// reloaded Caddyfile.
func obsAllowBrowsers(t *testing.T, p *caddyProc) string {
	t.Helper()
	hostPort := strings.TrimPrefix(p.Admin, "http://")
	port := hostPort[strings.LastIndexByte(hostPort, ':')+1:]
	old := "\tadmin " + hostPort + "\n"
	if !strings.Contains(p.Config, old) {
		t.Fatalf("no %q line in the Caddyfile:\n%s", old, p.Config)
	}
	cfg := strings.Replace(p.Config, old, fmt.Sprintf("\tadmin %s {\n\t\torigins %s localhost:%s \"\"\n\t}\n", hostPort, hostPort, port), 1)
	status, _, body := obsDo(t, http.MethodPost, p.Admin+"/load", []byte(cfg), "Content-Type: text/caddyfile")
	if status != http.StatusOK {
		t.Fatalf("POST /load with admin origins: status %d: %s\n%s", status, body, cfg)
	}
	// The admin server is replaced after the answer: wait for the new one.
	obsEventually(t, "admin API lets a typed URL in", 10*time.Second, func() (bool, string) {
		req, _ := http.NewRequest(http.MethodGet, p.Admin+"/affinity/", nil)
		for _, h := range obsTypedURL {
			k, v, _ := strings.Cut(h, ":")
			req.Header.Set(k, strings.TrimSpace(v))
		}
		resp, err := obsClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == http.StatusOK, fmt.Sprintf("%d %.200s", resp.StatusCode, b)
	})
	return cfg
}

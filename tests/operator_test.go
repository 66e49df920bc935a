package tests

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// obsLookup is GET /affinity/lookup's answer.
type obsLookup struct {
	Policies []struct {
		Server    string  `json:"server"`
		Handler   string  `json:"handler"`
		Key       string  `json:"key"`
		Upstream  *string `json:"upstream"`
		Decision  string  `json:"decision"`
		Reason    string  `json:"reason"`
		RingOwner string  `json:"ring_owner"`
		Session   *struct {
			Upstream  string `json:"upstream"`
			ExpiresIn int64  `json:"expires_in_seconds"`
		} `json:"session"`
		Walk []struct {
			Upstream string `json:"upstream"`
			Skipped  string `json:"skipped"`
			Chosen   bool   `json:"chosen"`
		} `json:"walk"`
		Error string `json:"error"`
	} `json:"policies"`
}

// lookupKey asks where a key goes; the config has one policy.
func lookupKey(t *testing.T, p *caddyProc, query string) (decision, upstream string, l obsLookup) {
	t.Helper()
	obsGetJSON(t, p.Admin+"/affinity/lookup?"+query, &l)
	if len(l.Policies) != 1 {
		t.Fatalf("lookup %s: %d policies, want 1", query, len(l.Policies))
	}
	pl := l.Policies[0]
	if pl.Error != "" {
		t.Fatalf("lookup %s: %s", query, pl.Error)
	}
	if pl.Upstream != nil {
		upstream = *pl.Upstream
	}
	t.Logf("lookup %s: %s -> %q: %s", query, pl.Decision, upstream, pl.Reason)
	return pl.Decision, upstream, l
}

// TestLookup: GET /affinity/lookup tells where a session goes and why,
// and a request then goes there.
func TestLookup(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "lookup", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie,
	})

	c := newClient(t)
	var r visitResult
	for range 2 {
		if r = c.visit(p.URL); r.failed() {
			t.Fatalf("visit: %s", r)
		}
	}
	home := backendNamed(bs, r.Worker).addr
	sid, ok := c.cookie(p.URL, appCookie)
	if !ok {
		t.Fatal("no app session cookie")
	}
	q := "key=" + url.QueryEscape(sid)

	// A returning session: the table has it.
	dec, up, l := lookupKey(t, p, q)
	if dec != "session_table" || up != home {
		t.Fatalf("returning session: %s -> %s, want session_table -> %s", dec, up, home)
	}
	if pl := l.Policies[0]; pl.Key != "cookie "+appCookie || pl.Session == nil || pl.Session.Upstream != home ||
		pl.Session.ExpiresIn < 1100 || !strings.HasPrefix(pl.Handler, "/config/apps/http/servers/") {
		t.Errorf("lookup details: %+v", pl)
	}
	if dec2, up2, _ := lookupKey(t, p, q+"&source=cookie&name="+appCookie); dec2 != dec || up2 != up {
		t.Errorf("with source and name: %s -> %s", dec2, up2)
	}

	// Its pin cookie says the same.
	pin, ok := c.cookie(p.URL, pinCookie)
	if !ok {
		t.Fatal("no pin cookie")
	}
	if dec, up, _ := lookupKey(t, p, "source=pin&key="+url.QueryEscape(pin)); dec != "pin_cookie" || up != home {
		t.Errorf("pin: %s -> %s, want pin_cookie -> %s", dec, up, home)
	}

	// Draining keeps it; a new key whose ring owner is draining walks on.
	obsSetState(t, p, home, "draining")
	if dec, up, _ := lookupKey(t, p, q); dec != "session_table" || up != home {
		t.Errorf("session on a draining upstream: %s -> %s", dec, up)
	}
	found := false
	for i := 0; i < 60 && !found; i++ {
		dec, up, l := lookupKey(t, p, fmt.Sprintf("key=never-seen-%d", i))
		pl := l.Policies[0]
		if pl.RingOwner != home {
			continue
		}
		found = true
		if dec != "ring" || up == home || len(pl.Walk) < 2 || pl.Walk[0].Upstream != home || pl.Walk[0].Skipped != "draining" || !pl.Walk[len(pl.Walk)-1].Chosen {
			t.Errorf("new key owned by the draining upstream: %s -> %s, walk %+v", dec, up, pl.Walk)
		}
	}
	if !found {
		t.Errorf("no key of 60 is owned by %s", home)
	}

	// Maintenance: the lookup says where it fails over, and the next
	// request goes there.
	obsSetState(t, p, home, "maintenance")
	dec, to, _ := lookupKey(t, p, q)
	if dec != "failover" || to == "" || to == home {
		t.Fatalf("session on an upstream in maintenance: %s -> %s", dec, to)
	}
	// Without the pin (the lookup is for a request with the key alone).
	r = c.visitWith(p.URL, appCookie+"="+sid, nil)
	if r.failed() || backendNamed(bs, r.Worker).addr != to {
		t.Fatalf("after maintenance the session went to %s (%s), the lookup said %s", r.Worker, r, to)
	}
	if dec, up, _ := lookupKey(t, p, q); dec != "session_table" || up != to {
		t.Errorf("after the failover: %s -> %s, want session_table -> %s", dec, up, to)
	}
	obsSetState(t, p, home, "up")

	// A worker that is down: walked past as down.
	victim := bs[0]
	if victim.addr == to {
		victim = bs[1]
	}
	victim.kill()
	obsEventually(t, "lookup sees "+victim.name+" down", 5*time.Second, func() (bool, string) {
		for i := range 60 {
			var l obsLookup
			obsGetJSON(t, p.Admin+fmt.Sprintf("/affinity/lookup?key=k%d", i), &l)
			pl := l.Policies[0]
			if pl.RingOwner == victim.addr {
				return len(pl.Walk) > 1 && strings.HasPrefix(pl.Walk[0].Skipped, "down"), fmt.Sprintf("%+v", pl.Walk)
			}
		}
		return false, "no key owned by " + victim.addr
	})

	// Errors are JSON with a message.
	for query, want := range map[string]string{
		"":                         "missing key",
		"key=x&source=pin&name=y":  "takes no name",
		"key=x&source=header":      "reads no key",
		"key=x&source=client_ip":   "reads no key",
		"key=a%3Bb&source=cookie":  "cannot contain",
		"key=x&source=query&name=": "reads no key",
	} {
		status, _, body := obsDo(t, http.MethodGet, p.Admin+"/affinity/lookup?"+query, nil)
		if !strings.Contains(string(body), want) || (status != http.StatusBadRequest && status != http.StatusOK) {
			t.Errorf("lookup?%s: %d %s, want %q", query, status, body, want)
		}
	}
}

// obsStatus is GET /affinity/'s JSON.
type obsStatus struct {
	Upstreams []struct {
		affinityUpstream
		Share      *float64 `json:"share"`
		Configured bool     `json:"configured"`
	} `json:"upstreams"`
	Policies []struct {
		Keys      []string `json:"keys"`
		Upstreams []struct {
			Upstream string  `json:"upstream"`
			Weight   int     `json:"weight"`
			Share    float64 `json:"share"`
		} `json:"upstreams"`
	} `json:"policies"`
	Failovers []struct {
		From, To, Reason string
		Count            int
	} `json:"failovers"`
	FailoversTotal uint64 `json:"failovers_total"`
	SessionTable   *struct {
		Entries int `json:"entries"`
	} `json:"session_table"`
}

// TestStatusPageAPI: GET /affinity/ as JSON and as HTML, the failover
// log, and what Caddy's admin origin check means for a browser.
func TestStatusPageAPI(t *testing.T) {
	needCaddy(t)
	bs := startBackends(t, 3)
	p := startCaddy(t, "status", proxyConfig{
		Upstreams: addrsOf(bs),
		Policy:    "key cookie " + appCookie + "\nweights 2 1 1",
	})
	clients := newClients(t, 20)
	expectClean(t, "visits", visitAll(clients, p.URL, 2, 10))

	var st obsStatus
	obsGetJSON(t, p.Admin+"/affinity/", &st)
	if len(st.Upstreams) != 3 || len(st.Policies) != 1 || st.SessionTable == nil || st.SessionTable.Entries < 20 {
		t.Fatalf("status: %+v", st)
	}
	total := 0.0
	for _, u := range st.Upstreams {
		if u.Share == nil || !u.Configured {
			t.Fatalf("upstream %s: share %v configured %v", u.Upstream, u.Share, u.Configured)
		}
		want := 0.25
		if u.Upstream == bs[0].addr {
			want = 0.5 // weights 2 1 1
		}
		if math.Abs(*u.Share-want) > 0.01 {
			t.Errorf("%s: ring share %.4f, want %.2f", u.Upstream, *u.Share, want)
		}
		total += *u.Share
	}
	if math.Abs(total-1) > 1e-9 {
		t.Errorf("shares add up to %v", total)
	}
	if w := st.Policies[0].Upstreams[0]; w.Weight != 2 || w.Upstream != bs[0].addr {
		t.Errorf("policy upstreams: %+v", st.Policies[0].Upstreams)
	}

	// A failover shows in the log, merged with the rest of its burst.
	victim := busiest(clients)
	vb := backendNamed(bs, victim)
	obsSetState(t, p, vb.addr, "maintenance")
	n := sessionsByWorker(clients)[victim]
	expectVisits := visitAll(clients, p.URL, 1, 10)
	if expectVisits.failed != 0 {
		t.Fatalf("visits after maintenance: %s", expectVisits)
	}
	obsGetJSON(t, p.Admin+"/affinity/", &st)
	moved := 0
	for _, f := range st.Failovers {
		if f.From != vb.addr || f.Reason != "maintenance" {
			t.Errorf("failover event %+v", f)
		}
		moved += f.Count
	}
	if moved != n || st.FailoversTotal < uint64(n) || len(st.Failovers) > 2 {
		t.Errorf("failover log: %d failovers in %d events (total %d) for %d sessions on %s", moved, len(st.Failovers), st.FailoversTotal, n, victim)
	}
	obsSetState(t, p, vb.addr, "up")

	// HTML for browsers, with a row and buttons per upstream.
	status, h, body := obsDo(t, http.MethodGet, p.Admin+"/affinity/", nil, "Accept: text/html")
	page := string(body)
	if status != http.StatusOK || !strings.HasPrefix(h.Get("Content-Type"), "text/html") {
		t.Fatalf("HTML page: %d %s", status, h.Get("Content-Type"))
	}
	for _, b := range bs {
		if !strings.Contains(page, fmt.Sprintf(`<tr data-upstream="%s" data-state="up">`, b.addr)) {
			t.Errorf("page has no row for %s", b.addr)
		}
	}
	if strings.Count(page, `data-action="draining"`) != 3 || !strings.Contains(page, "maintenance") {
		t.Errorf("page lacks the buttons or the failover")
	}
	if status, _, _ := obsDo(t, http.MethodGet, p.Admin+"/affinity/nope", nil); status != http.StatusNotFound {
		t.Errorf("GET /affinity/nope: %d", status)
	}

	// Caddy's admin origin check, as a browser meets it. A typed URL
	// carries Sec-Fetch-* but no Origin or Referer: refused by default.
	status, _, body = obsDo(t, http.MethodGet, p.Admin+"/affinity/", nil, obsTypedURL...)
	if status != http.StatusForbidden || !strings.Contains(string(body), "not allowed to access from origin ''") {
		t.Errorf("typed URL with the default admin config: %d %s (if Caddy now lets it in, update the README)", status, body)
	}
	// The page's own requests carry its origin (POST) or its URL as
	// Referer (GET), which the default config accepts.
	self := p.Admin
	state, _ := json.Marshal(map[string]string{"upstream": bs[1].addr, "state": "draining"})
	if status, _, body := obsDo(t, http.MethodPost, p.Admin+"/affinity/upstreams/state", state,
		"Content-Type: application/json", "Origin: "+self, "Sec-Fetch-Mode: cors", "Sec-Fetch-Site: same-origin"); status != http.StatusOK {
		t.Errorf("same-origin POST: %d %s", status, body)
	}
	if status, _, body := obsDo(t, http.MethodGet, p.Admin+"/affinity/", nil,
		"Accept: application/json", "Referer: "+self+"/affinity/", "Sec-Fetch-Mode: cors", "Sec-Fetch-Site: same-origin"); status != http.StatusOK {
		t.Errorf("same-origin GET: %d %s", status, body)
	}
	// A cross-site write is refused.
	if status, _, _ := obsDo(t, http.MethodPost, p.Admin+"/affinity/upstreams/state", state,
		"Content-Type: application/json", "Origin: http://evil.example", "Sec-Fetch-Mode: cors", "Sec-Fetch-Site: cross-site"); status != http.StatusForbidden {
		t.Errorf("cross-site POST: %d, want 403", status)
	}
	// With the README's origins line, the typed URL works too, and
	// cross-site writes are still refused.
	obsAllowBrowsers(t, p)
	if status, _, _ := obsDo(t, http.MethodPost, p.Admin+"/affinity/upstreams/state", state,
		"Content-Type: application/json", "Origin: http://evil.example", "Sec-Fetch-Mode: cors", "Sec-Fetch-Site: cross-site"); status != http.StatusForbidden {
		t.Errorf("cross-site POST with origins \"\": %d, want 403", status)
	}
	if status, _, _ := obsDo(t, http.MethodGet, p.Admin+"/affinity/", nil, "Host: evil.example"); status != http.StatusForbidden {
		t.Errorf("DNS-rebinding Host with origins \"\": %d, want 403", status)
	}
	// The reload kept the state and the sessions.
	if u := obsUpstreams(t, p)[bs[1].addr]; u.State != "draining" {
		t.Errorf("after the reload %s is %s", bs[1].addr, u.State)
	}
	expectClean(t, "visits after the reload", visitAll(clients, p.URL, 1, 10))
}

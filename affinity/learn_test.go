package affinity

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// fakeApp stands for the upstreams behind the proxy: given the upstream
// the policy chose and the request, it writes the response headers (the
// app's Set-Cookie, Location) and the status.
type fakeApp func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request)

// proxyThrough serves r the way a Caddy route `affinity_learn` then
// `reverse_proxy` would: the learner wraps the writer, the policy
// selects (attempts times, as Caddy's retries do), the chosen upstream's
// response goes out through the learner. It returns the upstream that
// answered.
func proxyThrough(t testing.TB, p *Policy, pool reverseproxy.UpstreamPool, r *http.Request, attempts int, app fakeApp) (*reverseproxy.Upstream, *httptest.ResponseRecorder) {
	t.Helper()
	w := httptest.NewRecorder()
	var up *reverseproxy.Upstream
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		for range attempts {
			up = p.Select(pool, r, w)
		}
		if up == nil {
			return caddyhttp.Error(http.StatusBadGateway, nil)
		}
		app(up, w, r)
		return nil
	})
	if err := (Learn{}).ServeHTTP(w, r, next); err != nil {
		t.Fatalf("serving: %v", err)
	}
	return up, w
}

// issuing returns an app that issues a session cookie called name (among
// other cookies) to every request that does not carry one, and counts on
// the upstream that created each id.
func issuing(name string, created map[string]*reverseproxy.Upstream) fakeApp {
	n := 0
	return func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
		if _, ok := keys.CookieValue(r.Header, name); !ok {
			n++
			id := fmt.Sprintf("id-%d-%s", n, up.Dial)
			created[id] = up
			h := w.Header()
			h.Add("Set-Cookie", "theme=dark; Path=/; Max-Age=31536000")
			h.Add("Set-Cookie", name+"="+id+"; Path=/; HttpOnly; SameSite=Lax")
			h.Add("Set-Cookie", "csrf=zzz; Path=/; Secure")
		}
		w.WriteHeader(http.StatusOK)
	}
}

func TestLearnFollowsTheAppCookieWithoutPin(t *testing.T) {
	pool := testPool(t, 3)
	for _, learn := range []bool{true, false} {
		p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "connect.sid"}}, DisablePinCookie: true})
		created := map[string]*reverseproxy.Upstream{}
		app := issuing("connect.sid", created)
		broken := 0
		for c := 0; c < 300; c++ {
			var first *reverseproxy.Upstream
			if learn {
				first, _ = proxyThrough(t, p, pool, newRequest(), 1, app)
			} else {
				// The same flow without the learner: the app's cookie
				// is never seen by the policy before it comes back.
				w := httptest.NewRecorder()
				first = p.Select(pool, newRequest(), w)
				app(first, w, newRequest())
			}
			var id string
			for k, up := range created {
				if up == first && strings.HasPrefix(k, fmt.Sprintf("id-%d-", c+1)) {
					id = k
				}
			}
			if id == "" {
				t.Fatalf("session %d: the app issued no id", c)
			}
			for v := 0; v < 3; v++ {
				if got := p.Select(pool, newRequest("theme=dark", "connect.sid="+id), nil); got != first {
					broken++
					break
				}
			}
		}
		if learn && broken != 0 {
			t.Fatalf("with affinity_learn, %d of 300 sessions left the worker that created them", broken)
		}
		if !learn && broken == 0 {
			t.Fatal("without affinity_learn no session broke: the test does not test learning")
		}
		t.Logf("learn=%v: %d of 300 sessions broken", learn, broken)
	}
}

func TestLearnReplacedAndDeletedIDs(t *testing.T) {
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true})
	pool := testPool(t, 3)
	now := sessions.Now()

	// The app rotates the session id on every request (as some do on each
	// privilege change): each new id must lead to the same worker, and the
	// old one is retired.
	rotate := func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
		old, _ := keys.CookieValue(r.Header, "sid")
		w.Header().Add("Set-Cookie", "sid="+old+"-r; Path=/; HttpOnly")
		w.WriteHeader(http.StatusOK)
	}
	home, _ := proxyThrough(t, p, pool, newRequest("sid=s0"), 1, rotate)
	id := "s0"
	for i := 0; i < 20; i++ {
		up, _ := proxyThrough(t, p, pool, newRequest("sid="+id), 1, rotate)
		if up != home {
			t.Fatalf("rotation %d: id %q went to %s, want %s", i, id, up.Dial, home.Dial)
		}
		old := id
		id += "-r"
		if _, ok := p.table.Get(sessionIDHash(id), now, 0); !ok {
			t.Fatalf("rotation %d: new id %q not recorded", i, id)
		}
		if _, ok := p.table.Get(sessionIDHash(old), now+sessions.RetireGrace+2, 0); ok {
			t.Fatalf("rotation %d: old id %q outlives its grace", i, old)
		}
	}
	// Rotations do not inflate the live count: old ids are retired, not
	// counted twice, once their grace is over.
	p.table.Sweep(now + sessions.RetireGrace + 2)
	if n := p.table.LiveCount(healthcheck.Get(home.Dial).ID); n != 1 {
		t.Errorf("after 20 rotations and a sweep, %s counts %d live sessions, want 1", home.Dial, n)
	}

	// Logging out: the app deletes its cookie, the id is forgotten.
	logout := func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", "sid=; Path=/; Max-Age=0")
		w.WriteHeader(http.StatusOK)
	}
	proxyThrough(t, p, pool, newRequest("sid="+id), 1, logout)
	if _, ok := p.table.Get(sessionIDHash(id), now, 0); ok {
		t.Fatal("a deleted session cookie is still in the table")
	}
}

func TestLearnTheUpstreamThatAnswered(t *testing.T) {
	// The first attempt fails (Caddy calls Select again): the id the
	// second upstream issued must be recorded for the second upstream.
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true})
	pool := testPool(t, 3)
	created := map[string]*reverseproxy.Upstream{}
	app := issuing("sid", created)
	for i := 0; i < 30; i++ {
		up, _ := proxyThrough(t, p, pool, newRequest(), 2, app)
		for id, by := range created {
			if got := p.Select(pool, newRequest("sid="+id), nil); got != by {
				t.Fatalf("id %s issued by %s went to %s", id, by.Dial, got.Dial)
			}
		}
		if len(created) != i+1 || created[fmt.Sprintf("id-%d-%s", i+1, up.Dial)] != up {
			t.Fatalf("attempt bookkeeping: %v", created)
		}
	}
}

func TestLearnFromLocationAndJSESSIONID(t *testing.T) {
	pool := testPool(t, 3)

	// ASP.NET cookieless: the first response redirects into the URL
	// that carries the new session id.
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "aspnet_cookieless"}}, DisablePinCookie: true})
	for i := 0; i < 50; i++ {
		id := fmt.Sprintf("lit3py55t21z5v55vlm%05d", i)
		first, _ := proxyThrough(t, p, pool, newRequest(), 1, func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Location", "http://example.com/app/(S("+id+"))/default.aspx?x=1")
			w.WriteHeader(http.StatusFound)
		})
		r := httptest.NewRequest(http.MethodGet, "http://example.com/app/(S("+id+"))/default.aspx", nil)
		if got := p.Select(pool, r, nil); got != first {
			t.Fatalf("cookieless session %d went to %s, created on %s", i, got.Dial, first.Dial)
		}
	}

	// Tomcat: the first response sets JSESSIONID and rewrites URLs with
	// ;jsessionid=; a client without cookies comes back with the latter.
	p = newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "path_param", Name: "jsessionid"}}, DisablePinCookie: true})
	for i := 0; i < 50; i++ {
		id := fmt.Sprintf("0A1B2C3D%04d", i)
		first, _ := proxyThrough(t, p, pool, newRequest(), 1, func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
			w.Header().Add("Set-Cookie", "JSESSIONID="+id+"; Path=/shop; HttpOnly")
			w.WriteHeader(http.StatusOK)
		})
		r := httptest.NewRequest(http.MethodGet, "http://example.com/shop/cart;jsessionid="+id+"?item=1", nil)
		if got := p.Select(pool, r, nil); got != first {
			t.Fatalf("jsessionid session %d went to %s, created on %s", i, got.Dial, first.Dial)
		}
	}
}

// Mono's System.Web (and ASP.NET 1.x) redirect a new cookieless session
// to a URL whose whole segment is the id, `/(37F197D4325DAC58DC804F4A)/`,
// in an absolute Location (Mono's Response.Redirect makes it absolute) or
// a path. The learner records the id on the worker that issued it; the
// session's next requests, with the id in the path or in the cookie
// ASP.NET_SessionId, go to that worker. Without learning, about two
// sessions in three would go to another of the three workers.
func TestLearnCookielessOldFormFromLocation(t *testing.T) {
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "aspnet_cookieless"}, {From: "cookie", Name: "ASP.NET_SessionId"}}, DisablePinCookie: true})
	locations := []string{
		"http://127.0.0.1:8080/(%s)/Default.aspx",
		"https://example.com/app/(%s)/Default.aspx?x=1#f",
		"/app/(%s)/Default.aspx",
		"//example.com/(%s)/",
	}
	for i := 0; i < 60; i++ {
		id := fmt.Sprintf("37F197D4325DAC58DC80%04X", i)
		loc := fmt.Sprintf(locations[i%len(locations)], id)
		first, _ := proxyThrough(t, p, pool, newRequest(), 1, func(up *reverseproxy.Upstream, w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Location", loc)
			w.WriteHeader(http.StatusFound)
		})
		byPath := httptest.NewRequest(http.MethodGet, "http://example.com/app/("+id+")/Default.aspx", nil)
		if got := p.Select(pool, byPath, nil); got != first {
			t.Fatalf("session %d (Location %q) went to %s, created on %s", i, loc, got.Dial, first.Dial)
		}
		if got := p.Select(pool, newRequest("ASP.NET_SessionId="+id), nil); got != first {
			t.Fatalf("session %d with the id in a cookie went to %s, created on %s", i, got.Dial, first.Dial)
		}
	}
}

func TestLearnWriterPassesThrough(t *testing.T) {
	// The learner's writer keeps what Caddy's reverse_proxy needs of a
	// writer: Flush and Hijack through http.ResponseController, and a
	// header learned even when the handler only writes a body.
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true})
	pool := testPool(t, 2)
	var mu sync.Mutex
	chosen := map[string]*reverseproxy.Upstream{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{}))
		_ = (Learn{}).ServeHTTP(w, r, caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			up := p.Select(pool, r, w)
			mu.Lock()
			chosen[r.URL.Path] = up
			mu.Unlock()
			rc := http.NewResponseController(w)
			switch r.URL.Path {
			case "/flush":
				w.Header().Set("Set-Cookie", "sid=flushed")
				if err := rc.Flush(); err != nil {
					t.Errorf("flush: %v", err)
				}
				_, _ = io.WriteString(w, "ok")
			case "/hijack":
				w.Header().Set("Set-Cookie", "sid=hijacked")
				w.WriteHeader(http.StatusSwitchingProtocols)
				conn, brw, err := rc.Hijack()
				if err != nil {
					t.Errorf("hijack: %v", err)
					return nil
				}
				_, _ = brw.WriteString("hello")
				_ = brw.Flush()
				_ = conn.Close()
			default:
				w.Header().Set("Set-Cookie", "sid=written")
				_, _ = io.WriteString(w, "body")
			}
			return nil
		}))
	}))
	defer srv.Close()

	for _, path := range []string{"/flush", "/plain"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	conn, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(conn, "GET /hijack HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("hijack: status %d", resp.StatusCode)
	}
	mu.Lock()
	defer mu.Unlock()
	for path, id := range map[string]string{"/flush": "flushed", "/plain": "written", "/hijack": "hijacked"} {
		got, ok := p.table.Get(sessionIDHash(id), sessions.Now(), 0)
		if !ok {
			t.Errorf("%s: id %q was not learned", path, id)
		} else if want := healthcheck.Get(chosen[path].Dial).ID; got != want {
			t.Errorf("%s: id %q learned for upstream %d, want %d", path, id, got, want)
		}
	}
}

func TestSelectWithLearnerDoesNotAllocate(t *testing.T) {
	pool := testPool(t, 16)
	p := newTestPolicy(t, &Policy{
		Keys:         []keys.Source{{From: "cookie", Name: "JSESSIONID"}, {From: "path_param", Name: "jsessionid"}},
		TomcatRoutes: map[string]string{"node1": pool[3].Dial},
	})
	w := httptest.NewRecorder()
	p.Select(pool, newRequest("JSESSIONID=zzz.node9"), w)
	pin := pinFrom(t, w, DefaultPinCookie)
	r := newRequest("a=1", "JSESSIONID=zzz.node9", pin)
	vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	lw := &learnWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, r: r}
	vars[learnVar] = lw
	allocs := testing.AllocsPerRun(200, func() {
		delete(vars, triedVar)
		if p.Select(pool, r, w) == nil {
			t.Fatal("nil")
		}
	})
	if allocs != 0 {
		t.Fatalf("pinned path with a learner allocated %.1f times per request", allocs)
	}
	if lw.policy != p {
		t.Fatal("Select did not tell the learner")
	}
}

func TestLearnCaddyfile(t *testing.T) {
	adapt := func(body string) ([]byte, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(body), map[string]any{"filename": "Caddyfile"})
		return out, err
	}
	out, err := adapt(`:8080 {
	reverse_proxy 127.0.0.1:9001 127.0.0.1:9002 {
		lb_policy affinity {
			key cookie connect.sid
			pin_cookie off
		}
	}
	affinity_learn
}`)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []json.RawMessage `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, srv := range cfg.Apps.HTTP.Servers {
		for _, route := range srv.Routes {
			for _, h := range route.Handle {
				var name struct {
					Handler string `json:"handler"`
				}
				_ = json.Unmarshal(h, &name)
				order = append(order, name.Handler)
			}
		}
	}
	if strings.Join(order, ",") != "affinity_learn,reverse_proxy" {
		t.Fatalf("handlers in order %v, want affinity_learn before reverse_proxy; config %s", order, out)
	}

	for bad, line := range map[string]string{"affinity_learn extra": "Caddyfile:2", "affinity_learn {\n\t\tx\n\t}": "Caddyfile:3"} {
		_, err := adapt(":8080 {\n\t" + bad + "\n\treverse_proxy 127.0.0.1:9001\n}")
		if err == nil || !strings.Contains(err.Error(), line) {
			t.Errorf("%q: error %v, want one naming %s", bad, err, line)
		}
	}
}

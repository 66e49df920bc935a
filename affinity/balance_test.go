package affinity

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-affinity/caddy-affinity/hashring"
	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// counterValue reads a counter.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func TestAliasesAreFollowedOnlyAsTheFirstKey(t *testing.T) {
	tb := sessions.NewTable(1000)
	tb.Put(1, 3|sessions.AliasBit, 100, 60)
	if _, ok := tb.Follow(1, 100, 60, false); ok {
		t.Fatal("an alias was followed for a later key")
	}
	if up, ok := tb.Follow(1, 110, 0, true); !ok || up != 3 {
		t.Fatalf("alias for a first key: %d, %v", up, ok)
	}
	tb.Put(2, 4, 100, 60)
	if up, ok := tb.Follow(2, 100, 60, false); !ok || up != 4 {
		t.Fatalf("main entry for a later key: %d, %v", up, ok)
	}
}

// natRequest is a request from one shared address with an app cookie,
// through affinity_learn when learning.
func natRequest(learning bool, cookies ...string) *http.Request {
	r := newRequest(cookies...)
	r.RemoteAddr = "203.0.113.7:40000"
	if learning {
		vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		vars[learnVar] = &learnWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: httptest.NewRecorder()}, r: r}
	}
	return r
}

func TestSessionsBehindOneAddressSpread(t *testing.T) {
	// `key cookie` then `key client_ip`, with affinity_learn: thousands of
	// users behind one NAT address, each with their own app cookie, spread
	// over the upstreams as if they had addresses of their own, and each
	// stays.
	for _, pinOff := range []bool{false, true} {
		t.Run(fmt.Sprintf("pin_cookie_off=%v", pinOff), func(t *testing.T) {
			pool := testPool(t, 3)
			p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip"}}, DisablePinCookie: pinOff})
			const n = 3000
			counts := map[*reverseproxy.Upstream]int{}
			homes := make([]*reverseproxy.Upstream, n)
			for i := range homes {
				homes[i] = p.Select(pool, natRequest(true, fmt.Sprintf("sid=nat-%d", i)), httptest.NewRecorder())
				counts[homes[i]]++
			}
			for _, u := range pool {
				if c := counts[u]; math.Abs(float64(c)-n/3) > 0.1*n/3 {
					t.Errorf("%s got %d of %d sessions from one address, want %d ± 10%%", u.Dial, c, n, n/3)
				}
			}
			t.Logf("sessions per upstream: %d %d %d", counts[pool[0]], counts[pool[1]], counts[pool[2]])
			for i := 0; i < n; i += 7 {
				for _, learning := range []bool{true, false} {
					if got := p.Select(pool, natRequest(learning, fmt.Sprintf("sid=nat-%d", i)), nil); got != homes[i] {
						t.Fatalf("session %d moved from %s to %s", i, homes[i].Dial, got.Dial)
					}
				}
			}
			// A request from the address without a cookie still follows
			// the address (the client IP is its first key).
			if p.Select(pool, natRequest(true), nil) == nil {
				t.Fatal("no upstream")
			}
		})
	}
}

func TestUnknownCookieFollowsTheAddressWithoutLearning(t *testing.T) {
	// Without affinity_learn, a new app cookie is how a session goes on
	// after its first response or a failover (the app issues one), so it
	// follows the address's entry: behind one NAT address, every new app
	// cookie goes where the address's last session went. This is the
	// trade-off affinity_learn removes.
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}, {From: "client_ip"}}, DisablePinCookie: true})
	first := p.Select(pool, natRequest(false, "sid=nat-first"), nil)
	for i := 0; i < 300; i++ {
		if got := p.Select(pool, natRequest(false, fmt.Sprintf("sid=nat-%d", i)), nil); got != first {
			t.Fatalf("without learning, new cookie %d left the address's upstream %s for %s", i, first.Dial, got.Dial)
		}
	}
	// Whatever its first key, a request whose first key is not one the
	// learner records (a header) follows aliases as before.
	q := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "header", Name: "X-Session"}, {From: "client_ip"}}, DisablePinCookie: true})
	r := natRequest(true)
	r.Header.Set("X-Session", "h-first")
	home := q.Select(pool, r, nil)
	for i := 0; i < 100; i++ {
		r := natRequest(true)
		r.Header.Set("X-Session", fmt.Sprintf("h-%d", i))
		if got := q.Select(pool, r, nil); got != home {
			t.Fatalf("header key %d did not follow the address", i)
		}
	}
}

// liveCounts returns the live sessions of each upstream of pool.
func liveCounts(p *Policy, pool reverseproxy.UpstreamPool) []int64 {
	out := make([]int64, len(pool))
	for i, u := range pool {
		out[i] = p.table.LiveCount(healthcheck.Get(u.Dial).ID)
	}
	return out
}

// maxOverMean returns max/mean of counts weighed by weights.
func maxOverMean(counts []int64, weights []int) float64 {
	var total, wsum float64
	for i, c := range counts {
		total += float64(c)
		wsum += float64(weights[i])
	}
	worst := 0.0
	for i, c := range counts {
		worst = max(worst, float64(c)/(total*float64(weights[i])/wsum))
	}
	return worst
}

func TestBalanceFactorBoundsNewSessions(t *testing.T) {
	// Acceptance: balance_factor 1.05, 3000 new sessions over three
	// upstreams: max/mean of live sessions at most 1.06.
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true, BalanceFactor: 1.05})
	before := counterValue(metrics.overloadSkip)
	for i := 0; i < 3000; i++ {
		if p.Select(pool, newRequest(fmt.Sprintf("sid=bal-%d", i)), nil) == nil {
			t.Fatal("no upstream")
		}
	}
	counts := liveCounts(p, pool)
	ratio := maxOverMean(counts, []int{1, 1, 1})
	t.Logf("balance_factor 1.05, 3000 sessions: live %v, max/mean %.4f, overload_skip +%.0f",
		counts, ratio, counterValue(metrics.overloadSkip)-before)
	if ratio > 1.06 {
		t.Errorf("max/mean %.4f > 1.06", ratio)
	}
	if counts[0]+counts[1]+counts[2] != 3000 {
		t.Errorf("live counts %v do not add up to 3000 sessions", counts)
	}
}

// keysOwnedBy returns n cookie values whose ring owner is pool[owner]:
// a key stream as skewed as it gets.
func keysOwnedBy(t *testing.T, pool reverseproxy.UpstreamPool, weights []int, owner, n int) []string {
	members := make([]hashring.Member, len(pool))
	for i, u := range pool {
		w := 1
		if i < len(weights) {
			w = weights[i]
		}
		members[i] = hashring.Member{Name: u.Dial, Weight: w}
	}
	ring, err := hashring.New(members)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for i := 0; len(out) < n; i++ {
		v := fmt.Sprintf("hot-%d", i)
		if ring.Lookup(sessionIDHash(v)) == owner {
			out = append(out, v)
		}
	}
	return out
}

func TestBalanceFactorUnderSkewedKeys(t *testing.T) {
	// Every new session's key belongs to upstream 0 on the ring, and
	// established sessions keep coming back (hot keys) in between: the
	// bound keeps max/mean of live sessions within ceil(c × mean) at every
	// step, the established sessions never move, and overload_skip counts.
	const c, n = 1.25, 3000
	pool := testPool(t, 3)
	ids := keysOwnedBy(t, pool, nil, 0, n+100)
	ids, control := ids[:n], ids[n:]

	plain := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true})
	for _, k := range control {
		if got := plain.Select(pool, newRequest("sid="+k), nil); got != pool[0] {
			t.Fatalf("without balance_factor key %s went to %s, not its ring owner", k, got.Dial)
		}
		plain.table.Remove(sessionIDHash(k)) // the table is process-wide
	}

	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true, BalanceFactor: c})
	before := counterValue(metrics.overloadSkip)
	homes := map[string]*reverseproxy.Upstream{}
	rng := rand.New(rand.NewPCG(1, 1))
	worst := 0.0
	for i, k := range ids {
		homes[k] = p.Select(pool, newRequest("sid="+k), nil)
		for range 2 { // two returning sessions per new one
			old := ids[rng.IntN(i+1)]
			if got := p.Select(pool, newRequest("sid="+old), nil); got != homes[old] {
				t.Fatalf("established session %s moved from %s to %s because of load", old, homes[old].Dial, got.Dial)
			}
		}
		counts := liveCounts(p, pool)
		total := counts[0] + counts[1] + counts[2]
		if i >= 100 {
			worst = max(worst, maxOverMean(counts, []int{1, 1, 1}))
		}
		for j, cnt := range counts {
			if limit := math.Ceil(c * float64(total) / 3); float64(cnt) > limit {
				t.Fatalf("after %d sessions upstream %d holds %d > ceil(%.2f × mean) = %.0f", total, j, cnt, c, limit)
			}
		}
	}
	counts := liveCounts(p, pool)
	final := maxOverMean(counts, []int{1, 1, 1})
	skips := counterValue(metrics.overloadSkip) - before
	t.Logf("balance_factor %.2f, %d sessions all owned by one upstream: live %v, max/mean %.4f (worst after 100 sessions %.4f), overload_skip +%.0f",
		c, n, counts, final, worst, skips)
	if final > c+0.001 {
		t.Errorf("max/mean %.4f > %.2f", final, c)
	}
	if skips == 0 {
		t.Error("overload_skip was not counted")
	}
}

func TestBalanceFactorWithWeights(t *testing.T) {
	// Bounded loads respect weights: shares stay within the factor of
	// their weighted share even for a key stream that all hashes to the
	// lightest upstream, and weight 0 still takes nothing.
	pool := testPool(t, 4)
	weights := []int{1, 2, 3, 0}
	ids := keysOwnedBy(t, pool, weights, 0, 6000)
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true, BalanceFactor: 1.05, Weights: weights})
	for _, k := range ids {
		p.Select(pool, newRequest("sid="+k), nil)
	}
	counts := liveCounts(p, pool)
	if counts[3] != 0 {
		t.Fatalf("weight 0 upstream holds %d sessions", counts[3])
	}
	ratio := maxOverMean(counts[:3], weights[:3])
	t.Logf("weights 1 2 3 0, balance_factor 1.05, ids all owned by the weight-1 upstream: live %v, max/(weighted mean) %.4f", counts, ratio)
	if ratio > 1.06 {
		t.Errorf("max over weighted mean %.4f > 1.06", ratio)
	}
}

func TestWeightsProportionalOverTenThousandSessions(t *testing.T) {
	// Weights through Select, without balance_factor: over 10000 keyed
	// sessions each upstream's share is within 5% of its weight's share.
	pool := testPool(t, 4)
	weights := []int{1, 2, 3, 4}
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, DisablePinCookie: true, Weights: weights})
	const n = 10000
	counts := map[*reverseproxy.Upstream]int{}
	for i := 0; i < n; i++ {
		counts[p.Select(pool, newRequest(fmt.Sprintf("sid=w-%d", i)), nil)]++
	}
	var report []string
	for i, u := range pool {
		want := float64(n) * float64(weights[i]) / 10
		got := float64(counts[u])
		report = append(report, fmt.Sprintf("w%d: %d (%.1f%%)", weights[i], counts[u], 100*(got-want)/want))
		if math.Abs(got-want) > 0.05*want {
			t.Errorf("weight %d: %d sessions, want %.0f ± 5%%", weights[i], counts[u], want)
		}
	}
	t.Logf("10000 sessions: %s", strings.Join(report, ", "))
}

func TestTomcatRoutes(t *testing.T) {
	pool := testPool(t, 3)
	p := newTestPolicy(t, &Policy{
		Keys:         []keys.Source{{From: "cookie", Name: "JSESSIONID"}, {From: "path_param", Name: "jsessionid"}},
		TomcatRoutes: map[string]string{"node1": pool[0].Dial, "node2": pool[1].Dial, "gone": "10.9.9.9:80"},
	})
	// The route wins over the ring, the table and a pin naming another
	// upstream, whose pin is then replaced.
	var pinOther string
	for attempt := 0; pinOther == "" && attempt < 1000; attempt++ {
		w := httptest.NewRecorder()
		if p.Select(pool, newRequest(fmt.Sprintf("JSESSIONID=X%d", attempt)), w) != pool[1] {
			pinOther = pinFrom(t, w, DefaultPinCookie)
		}
	}
	if pinOther == "" {
		t.Fatal("no session placed off pool[1]")
	}
	for i := 0; i < 20; i++ {
		id := fmt.Sprintf("0A1B2C%02d.node2", i)
		w := httptest.NewRecorder()
		if got := p.Select(pool, newRequest("JSESSIONID="+id, pinOther), w); got != pool[1] {
			t.Fatalf("route node2 went to %s", got.Dial)
		}
		if pin := pinFrom(t, w, DefaultPinCookie); pin == "" || pin == pinOther {
			t.Fatalf("route over another upstream's pin: pin %q not replaced", pin)
		}
		r := httptest.NewRequest(http.MethodGet, "http://example.com/shop;jsessionid="+strings.Replace(id, "node2", "node1", 1)+"?x=1", nil)
		r = r.WithContext(newRequest().Context())
		if got := p.Select(pool, r, nil); got != pool[0] {
			t.Fatalf("path route node1 went to %s", got.Dial)
		}
	}
	// The cookie comes first among the keys.
	r := httptest.NewRequest(http.MethodGet, "http://example.com/a;jsessionid=Z.node1", nil)
	r.Header.Set("Cookie", "JSESSIONID=Z.node2")
	if got := p.Select(pool, r, nil); got != pool[1] {
		t.Fatalf("cookie route node2 and path route node1: went to %s, want the cookie's", got.Dial)
	}
	// Unknown routes, and routes to upstreams not in the pool, are
	// placed like any session, and stay.
	for _, id := range []string{"Q.node9", "Q.gone", "Q", "Q."} {
		first := p.Select(pool, newRequest("JSESSIONID="+id), nil)
		if first == nil || p.Select(pool, newRequest("JSESSIONID="+id), nil) != first {
			t.Fatalf("id %q: not placed or not kept", id)
		}
	}
	// A routed upstream that may not serve: the session fails over.
	setState(t, pool[1].Dial, healthcheck.Maintenance)
	if got := p.Select(pool, newRequest("JSESSIONID=M.node2"), nil); got == nil || got == pool[1] {
		t.Fatalf("route to an upstream in maintenance went to %v", got)
	}
	// Draining keeps its routed sessions.
	setState(t, pool[0].Dial, healthcheck.Draining)
	if got := p.Select(pool, newRequest("JSESSIONID=D.node1"), nil); got != pool[0] {
		t.Fatalf("route to a draining upstream went to %v", got)
	}
}

func TestCookielessSessionsArePlacedAndKept(t *testing.T) {
	// aspnet_cookieless and the ASP.NET cookie are one key: a session
	// that goes from URL to cookie keeps its upstream.
	pool := testPool(t, 5)
	p := newTestPolicy(t, &Policy{Keys: []keys.Source{{From: "aspnet_cookieless"}, {From: "cookie", Name: "ASP.NET_SessionId"}}, DisablePinCookie: true})
	for i := 0; i < 200; i++ {
		id := fmt.Sprintf("lit3py55t21z5v55vlm%05d", i)
		r := httptest.NewRequest(http.MethodGet, "http://example.com/app/(S("+id+"))/default.aspx", nil)
		r = r.WithContext(newRequest().Context())
		first := p.Select(pool, r, nil)
		if got := p.Select(pool, newRequest("ASP.NET_SessionId="+id), nil); got != first {
			t.Fatalf("session %s by URL on %s, by cookie on %s", id, first.Dial, got.Dial)
		}
	}
}

func TestNewOptionsCaddyfile(t *testing.T) {
	p, err := parse(`affinity {
		key cookie JSESSIONID
		key path_param jsessionid
		key aspnet_cookieless
		balance_factor 1.25
		tomcat_route node1 10.0.0.1:8080
		tomcat_route node2 10.0.0.2:8080
	}`)
	if err != nil {
		t.Fatal(err)
	}
	if p.BalanceFactor != 1.25 || len(p.Keys) != 3 || p.Keys[1].From != "path_param" || p.Keys[1].Name != "jsessionid" ||
		p.Keys[2].From != "aspnet_cookieless" || p.TomcatRoutes["node2"] != "10.0.0.2:8080" || len(p.TomcatRoutes) != 2 {
		t.Fatalf("parsed %+v", p)
	}
	for _, tc := range []struct{ input, want string }{
		{"affinity {\n key cookie a\n balance_factor 1\n}", "balance_factor: 1 is not more than 1"},
		{"affinity {\n key cookie a\n balance_factor x\n}", `balance_factor: "x"`},
		{"affinity {\n key cookie a\n balance_factor +Inf\n}", "balance_factor: +Inf is not"},
		{"affinity {\n key none\n balance_factor 1.25\n}", "Testfile:3"},
		{"affinity {\n key none\n key cookie a\n}", "key none (no_default_keys) goes with no other key line"},
		{"affinity {\n key cookie a\n key none\n}", "key none (no_default_keys) goes with no other key line"},
		{"affinity {\n key client_ip\n tomcat_route a 1.2.3.4:80\n}", "Testfile:3"},
		{"affinity {\n key cookie a\n tomcat_route a\n}", "tomcat_route: need a route and an upstream"},
		{"affinity {\n key cookie a\n tomcat_route a b\n tomcat_route a c\n}", `route "a" given twice`},
		{"affinity {\n key path_param\n}", "key path_param: need exactly one name"},
		{"affinity {\n key path_param a/b\n}", "has a '/'"},
		{"affinity {\n key aspnet_cookieless x\n}", "takes no arguments"},
	} {
		_, err := parse(tc.input)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "Testfile:") {
			t.Errorf("%q: error %v, want one saying %q and naming the line", tc.input, err, tc.want)
		}
	}
	// Validate catches what JSON can say.
	for _, tc := range []struct {
		p    *Policy
		want string
	}{
		{&Policy{PinCookie: "x", SessionTTL: 1e9, BalanceFactor: 0.5, Keys: []keys.Source{{From: "cookie", Name: "a"}}}, "more than 1"},
		{&Policy{PinCookie: "x", SessionTTL: 1e9, BalanceFactor: math.NaN(), Keys: []keys.Source{{From: "cookie", Name: "a"}}}, "more than 1"},
		{&Policy{PinCookie: "x", SessionTTL: 1e9, BalanceFactor: 2, NoDefaultKeys: true}, "needs a key"},
		{&Policy{PinCookie: "x", SessionTTL: 1e9, BalanceFactor: 101, Keys: []keys.Source{{From: "cookie", Name: "a"}}}, "at most 100"},
		{&Policy{PinCookie: "x", SessionTTL: 1e9, TomcatRoutes: map[string]string{"a": "b"}, Keys: []keys.Source{{From: "header", Name: "a"}}}, "tomcat_route needs"},
		{&Policy{PinCookie: "x", SessionTTL: 1e9, TomcatRoutes: map[string]string{"a": ""}, Keys: []keys.Source{{From: "cookie", Name: "a"}}}, "must both be given"},
	} {
		if err := tc.p.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want %q", tc.p, err, tc.want)
		}
	}
}

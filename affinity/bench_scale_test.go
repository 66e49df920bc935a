package affinity

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
)

// Scale benchmarks for BENCHMARKS.md: how a selection grows with the
// number of upstreams beyond BenchmarkSelect's 3, 16 and 64, and how the
// session table's operations grow with the number of sessions it holds.
//
//	go test -run '^$' -bench 'SelectScale|SelectSessions|SelectPinnedEvery|TableScale|TableBytes|TableChurn' -benchmem ./affinity/

// BenchmarkSelectScale is BenchmarkSelect at N = 256 and 1000, for the
// paths whose cost may depend on N.
func BenchmarkSelectScale(b *testing.B) {
	for _, n := range []int{256, 1000} {
		pool := testPool(b, n)

		aff := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
		pin := issuedCookie(b, aff, pool, benchRequest("sid=0123456789abcdef0123456789abcdef"), DefaultPinCookie)
		cookie := provisioned(b, &reverseproxy.CookieHashSelection{Name: "lb", Secret: "bench"})
		lb := issuedCookie(b, cookie, pool, benchRequest(""), "lb")

		b.Run(fmt.Sprintf("affinity/pinned/N=%d", n), func(b *testing.B) {
			benchSelect(b, aff, pool, benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef; "+pin))
		})
		b.Run(fmt.Sprintf("cookie/pinned/N=%d", n), func(b *testing.B) {
			benchSelect(b, cookie, pool, benchRequest("theme=dark; "+lb))
		})
		b.Run(fmt.Sprintf("affinity/new/N=%d", n), func(b *testing.B) {
			benchSelect(b, aff, pool, benchRequest("theme=dark"))
		})
		affIP := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "client_ip"}}, DisablePinCookie: true})
		b.Run(fmt.Sprintf("affinity_client_ip/N=%d", n), func(b *testing.B) {
			benchSelect(b, affIP, pool, benchRequest(""))
		})
		b.Run(fmt.Sprintf("client_ip_hash/N=%d", n), func(b *testing.B) {
			benchSelect(b, provisioned(b, &reverseproxy.ClientIPHashSelection{}), pool, benchRequest(""))
		})
		b.Run(fmt.Sprintf("round_robin/N=%d", n), func(b *testing.B) {
			benchSelect(b, provisioned(b, &reverseproxy.RoundRobinSelection{}), pool, benchRequest(""))
		})
	}
}

// BenchmarkSelectSessions is the pinned path of BenchmarkSelect (N = 16)
// with 1k, 100k and 1M live sessions taking turns, each with its own app
// cookie, so that the session table's memory is visited as a busy server
// visits it rather than one hot entry.
func BenchmarkSelectSessions(b *testing.B) {
	const n = 16
	pool := testPool(b, n)
	aff := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}, MaxSessions: 4_000_000})
	for _, sessions := range []int{1_000, 100_000, 1_000_000} {
		// Place every session once (as its first request would) and
		// keep the Cookie header of its next requests: the app's cookie
		// and the pin it was given.
		r := benchRequest("x")
		vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		w := &discardWriter{h: make(map[string][]string)}
		cookies := make([]string, sessions)
		rng := rand.New(rand.NewPCG(uint64(sessions), 3))
		for i := range cookies {
			sid := fmt.Sprintf("%016x%016x", rng.Uint64(), rng.Uint64())
			r.Header["Cookie"][0] = "theme=dark; sid=" + sid
			delete(vars, triedVar)
			clear(w.h)
			if aff.Select(pool, r, w) == nil {
				b.Fatal("no upstream")
			}
			pin := ""
			for _, v := range w.h["Set-Cookie"] {
				if c, err := http.ParseSetCookie(v); err == nil && c.Name == DefaultPinCookie {
					pin = c.Name + "=" + c.Value
				}
			}
			if pin == "" {
				b.Fatal("no pin issued")
			}
			cookies[i] = "theme=dark; sid=" + sid + "; " + pin
		}
		b.Run(fmt.Sprintf("affinity/pinned/N=%d/sessions=%d", n, sessions), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				r.Header["Cookie"][0] = cookies[i]
				delete(vars, triedVar)
				clear(w.h)
				if aff.Select(pool, r, w) == nil {
					b.Fatal("no upstream")
				}
				if i++; i == sessions {
					i = 0
				}
			}
		})
	}
}

// BenchmarkSelectPinnedEvery is the pinned path with the returning
// sessions spread over every upstream in turn. Caddy's cookie policy
// compares the cookie with the HMAC of each upstream in pool order until
// one matches, so its cost depends on which upstream the session is on:
// BenchmarkSelect's cookie/pinned measures one upstream, drawn at random
// when the benchmark starts, and so varies from run to run between 1 and
// N HMACs. Here each of the N upstreams takes its turn, which gives the
// average a server sees.
func BenchmarkSelectPinnedEvery(b *testing.B) {
	for _, n := range []int{3, 16, 64} {
		pool := testPool(b, n)

		// affinity: one session placed on each upstream, with its pin.
		aff := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
		affReqs := make([]*http.Request, n)
		w := &discardWriter{h: make(map[string][]string)}
		for i, found := 0, 0; found < n; i++ {
			if i > 1000*n {
				b.Fatalf("no session placed on some of the %d upstreams", n)
			}
			cookies := fmt.Sprintf("theme=dark; sid=%032x", i)
			clear(w.h)
			up := aff.Select(pool, benchRequest(cookies), w)
			k := poolIndex(pool, up)
			if k < 0 || affReqs[k] != nil {
				continue
			}
			for _, v := range w.h["Set-Cookie"] {
				if c, err := http.ParseSetCookie(v); err == nil && c.Name == DefaultPinCookie {
					affReqs[k] = benchRequest(cookies + "; " + c.Name + "=" + c.Value)
					found++
				}
			}
		}

		// cookie: Caddy's cookie value for each upstream.
		cookie := provisioned(b, &reverseproxy.CookieHashSelection{Name: "lb", Secret: "bench"})
		cookieReqs := make([]*http.Request, n)
		for k, up := range pool {
			mac := hmac.New(sha256.New, []byte("bench"))
			mac.Write([]byte(up.Dial))
			cookieReqs[k] = benchRequest("theme=dark; lb=" + hex.EncodeToString(mac.Sum(nil)))
		}

		b.Run(fmt.Sprintf("affinity/N=%d", n), func(b *testing.B) {
			benchSelectEach(b, aff, pool, affReqs)
		})
		b.Run(fmt.Sprintf("cookie/N=%d", n), func(b *testing.B) {
			benchSelectEach(b, cookie, pool, cookieReqs)
		})
	}
}

// benchSelectEach is benchSelect over several requests in turn; request
// k must be served by pool[k].
func benchSelectEach(b *testing.B, sel reverseproxy.Selector, pool reverseproxy.UpstreamPool, reqs []*http.Request) {
	vars := make([]map[string]any, len(reqs))
	for k, r := range reqs {
		vars[k] = r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	}
	w := &discardWriter{h: make(http.Header)}
	b.ReportAllocs()
	k := 0
	for b.Loop() {
		delete(vars[k], triedVar)
		clear(w.h)
		if up := sel.Select(pool, reqs[k], w); up != pool[k] {
			b.Fatalf("request %d: got %v, want upstream %d", k, up, k)
		}
		if k++; k == len(reqs) {
			k = 0
		}
	}
}

func poolIndex(pool reverseproxy.UpstreamPool, up *reverseproxy.Upstream) int {
	for k := range pool {
		if pool[k] == up {
			return k
		}
	}
	return -1
}

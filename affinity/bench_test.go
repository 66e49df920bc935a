package affinity

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"

	"github.com/caddy-affinity/caddy-affinity/affinity/keys"
	"github.com/caddy-affinity/caddy-affinity/affinity/pin"
	"github.com/caddy-affinity/caddy-affinity/affinity/sessions"
)

// The benchmarks put affinity side by side with Caddy's own policies in
// one run, at N = 3, 16 and 64 upstreams:
//
//	go test -run '^$' -bench . -benchmem ./affinity/ | tee new.txt
//	benchstat new.txt
//
// "pinned" is a returning session (valid pin cookie, or for Caddy's
// cookie policy its own valid cookie); "new" is a request with no cookie.

var benchSizes = []int{3, 16, 64}

// benchRequest is a request as Caddy's server passes it: vars with the
// client IP, a few unrelated cookies before ours.
// benchSID is the app cookie of the benchmarks' pinned requests.
const benchSID = "sid=0123456789abcdef0123456789abcdef"

func benchRequest(cookies string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://example.com/app?x=1", nil)
	r.RemoteAddr = "198.51.100.23:40000"
	r.Header.Set("X-Session", "0123456789abcdef0123456789abcdef")
	if cookies != "" {
		r.Header.Set("Cookie", cookies)
	}
	vars := map[string]any{caddyhttp.ClientIPVarKey: "198.51.100.23"}
	return r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, vars))
}

type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) WriteHeader(int)             {}

func benchSelect(b *testing.B, sel reverseproxy.Selector, pool reverseproxy.UpstreamPool, r *http.Request) {
	vars := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	w := &discardWriter{h: make(http.Header)}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		delete(vars, triedVar)
		clear(w.h)
		if sel.Select(pool, r, w) == nil {
			b.Fatal("no upstream")
		}
	}
}

func provisioned[T caddy.Module](b *testing.B, m T) T {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	b.Cleanup(cancel)
	if p, ok := any(m).(caddy.Provisioner); ok {
		if err := p.Provision(ctx); err != nil {
			b.Fatal(err)
		}
	}
	return m
}

// issuedCookie runs one selection of a new session and returns the
// "name=value" of the cookie called name that it set.
func issuedCookie(b *testing.B, sel reverseproxy.Selector, pool reverseproxy.UpstreamPool, r *http.Request, name string) string {
	b.Helper()
	rec := httptest.NewRecorder()
	sel.Select(pool, r, rec)
	for _, c := range rec.Result().Cookies() {
		if c.Name == name {
			return c.Name + "=" + c.Value
		}
	}
	b.Fatalf("no %s cookie issued", name)
	return ""
}

func BenchmarkSelect(b *testing.B) {
	for _, n := range benchSizes {
		pool := testPool(b, n)

		aff := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
		// A returning session: the app's cookie plus our pin.
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
		b.Run(fmt.Sprintf("cookie/new/N=%d", n), func(b *testing.B) {
			benchSelect(b, cookie, pool, benchRequest("theme=dark"))
		})
		// affinity keyed on the client IP with no cookie at all, the
		// like-for-like comparison with client_ip_hash.
		affIP := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "client_ip"}}, DisablePinCookie: true})
		b.Run(fmt.Sprintf("affinity_client_ip/N=%d", n), func(b *testing.B) {
			benchSelect(b, affIP, pool, benchRequest(""))
		})
		b.Run(fmt.Sprintf("client_ip_hash/N=%d", n), func(b *testing.B) {
			benchSelect(b, provisioned(b, &reverseproxy.ClientIPHashSelection{}), pool, benchRequest(""))
		})
		b.Run(fmt.Sprintf("header/N=%d", n), func(b *testing.B) {
			benchSelect(b, provisioned(b, &reverseproxy.HeaderHashSelection{Field: "X-Session"}), pool, benchRequest(""))
		})
		b.Run(fmt.Sprintf("round_robin/N=%d", n), func(b *testing.B) {
			benchSelect(b, provisioned(b, &reverseproxy.RoundRobinSelection{}), pool, benchRequest(""))
		})
	}
}

// BenchmarkTableMemory reports the bytes the session table holds per live
// session, at 100k and 1M sessions.
func BenchmarkTableMemory(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				before := heapInUse()
				// Room for every session: the bound is split over
				// shards and would round a bound of exactly n down.
				tb := sessions.NewTable(2 * n)
				for k := 0; k < n; k++ {
					tb.Put(uint64(k)*0x9E3779B97F4A7C15, uint32(k%16), 0, 1200)
				}
				after := heapInUse()
				b.ReportMetric(float64(after-before)/float64(n), "B/session")
				if tb.Len() != n {
					b.Fatalf("table holds %d of %d", tb.Len(), n)
				}
			}
		})
	}
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// BenchmarkPinDraining is the pinned path where the pin's time is
// checked (its upstream drains: one HMAC), and a stale pin there (placed
// as a new session, a new pin issued).
func BenchmarkPinDraining(b *testing.B) {
	pool := testPool(b, 16)
	aff := newTestPolicy(b, &Policy{Keys: []keys.Source{{From: "cookie", Name: "sid"}}})
	ps := aff.poolState(pool)
	operate(b, pool[3].Dial, healthcheck.Draining)
	b.Run("live/N=16", func(b *testing.B) {
		pin := pinBoundTo(aff, pool, 3, 0, benchSID)
		benchSelect(b, aff, pool, benchRequest("theme=dark; sid=0123456789abcdef0123456789abcdef; "+pin))
	})
	b.Run("stale/N=16", func(b *testing.B) {
		pin := aff.PinCookie + "=" + ps.pins.Value(3, sessions.Now()-pin.Lifetime(aff.ttl)-5)
		benchSelect(b, aff, pool, benchRequest("theme=dark; "+pin))
	})
}

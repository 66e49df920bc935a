package affinity

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"

	"github.com/caddy-affinity/caddy-affinity/internal/testredis"
)

// inProcessAddrs returns a free loopback address for an in-process
// Caddy's listener and the dial address of a backend that answers 200,
// stopped at the end of the test.
func inProcessAddrs(t *testing.T) (listen, dial string) {
	t.Helper()
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	t.Cleanup(backend.Close)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen = l.Addr().String()
	l.Close()
	return listen, strings.TrimPrefix(backend.URL, "http://")
}

// moduleGoroutines counts the goroutines running this module's code.
func moduleGoroutines() int {
	var b strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, "testing.tRunner") {
			continue // a test itself
		}
		if strings.Contains(g, "caddy-affinity/affinity.") || strings.Contains(g, "caddy-affinity/affinity/sessions.") ||
			strings.Contains(g, "caddy-affinity/healthcheck.") || strings.Contains(g, "redis/go-redis") {
			n++
		}
	}
	return n
}

// settledGoroutines waits until the count stops changing.
func settledGoroutines() int {
	n := moduleGoroutines()
	for range 50 {
		time.Sleep(20 * time.Millisecond)
		runtime.Gosched()
		if m := moduleGoroutines(); m == n {
			return n
		} else {
			n = m
		}
	}
	return n
}

// The farm owns the module's background work: across reloads of a real
// Caddy config (a proxy with a drain probe and a storage syncer) the
// module runs the same goroutines, no more, and a stop ends them all.
func TestBackgroundWorkAcrossReloads(t *testing.T) {
	testBackgroundWork(t, "", 4)
}

// Under store redis the farm owns the Redis client: one, shared by the
// policies that name it and kept across reloads (its subscriber and the
// client's own goroutines), and gone when Caddy stops.
func TestBackgroundWorkAcrossReloadsStoreRedis(t *testing.T) {
	rd := testredis.Start(t)
	testBackgroundWork(t, fmt.Sprintf(`,"store":{"kind":"redis","address":%q}`, rd.Addr), 0)
}

// testBackgroundWork loads a config whose policy has the given store
// option, reloads it 10 times, and stops it: the module's goroutines
// after the first load (want of them, if not 0) stay as they are, and
// none is left after the stop.
func testBackgroundWork(t *testing.T, store string, want int) {
	if n := settledGoroutines(); n != 0 {
		t.Fatalf("%d module goroutines before Caddy starts", n)
	}
	listen, dial := inProcessAddrs(t)
	config := func(ttl int) []byte {
		return []byte(fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
"storage":{"module":"file_system","root":%q},
"apps":{"http":{"servers":{"s":{"listen":[%q],"named_routes":{"app":{"handle":[
{"handler":"reverse_proxy","upstreams":[{"dial":%q}],"load_balancing":{"selection_policy":
{"policy":"affinity","secret":"s","session_ttl":"%ds","probe":{"path":"/drain","interval":"50ms"}%s}}}]}},
"routes":[{"handle":[{"handler":"invoke","name":"app"}]}]}}}}}`, t.TempDir(), listen, dial, ttl, store))
	}
	if err := caddy.Load(config(60), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	time.Sleep(1500 * time.Millisecond) // the farm's first look starts the probe
	first := settledGoroutines()
	// farm loop + store local's writer + storage syncer + one prober
	if want != 0 && first != want {
		t.Fatalf("%d module goroutines after the first load, want %d (farm, store writer, syncer, prober)", first, want)
	}
	t.Logf("%d module goroutines after the first load", first)
	for i := range 10 {
		if err := caddy.Load(config(61+i), true); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	if n := settledGoroutines(); n != first {
		t.Fatalf("%d module goroutines after 10 reloads, %d after the first load", n, first)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if n := settledGoroutines(); n != 0 {
		var b strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
		t.Fatalf("%d module goroutines after Caddy stopped:\n%s", n, b.String())
	}
}

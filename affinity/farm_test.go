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

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
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
	stopAfterReloads(t, first, 10)
}

// stopAfterReloads checks that the module runs as many goroutines after
// the reloads as after the first load, stops Caddy, and checks that none
// is left.
func stopAfterReloads(t *testing.T, first, reloads int) {
	t.Helper()
	time.Sleep(1500 * time.Millisecond)
	if n := settledGoroutines(); n != first {
		t.Fatalf("%d module goroutines after %d reloads, %d after the first load", n, reloads, first)
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

// With every feature on (store local, a storage syncer, a drain probe
// that drains its upstream, balance_factor, slow_start, hold, tomcat
// routes, two proxies), goroutines stay flat across reloads, among them
// reloads that change the probe (its prober is replaced, and the old
// one's undrain waits for its grace on a timer); a stop ends every
// goroutine and leaves no pending undrain: the farm runs it.
func TestBackgroundWorkEveryFeatureAcrossReloads(t *testing.T) {
	if n := settledGoroutines(); n != 0 {
		t.Fatalf("%d module goroutines before Caddy starts", n)
	}
	draining := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/drain") {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	t.Cleanup(draining.Close)
	drainDial := strings.TrimPrefix(draining.URL, "http://")
	listen, dial := inProcessAddrs(t)
	listen2, _ := inProcessAddrs(t)
	storage := t.TempDir()
	config := func(i int) []byte {
		policy := fmt.Sprintf(`{"policy":"affinity","secret":"s","session_ttl":"%ds",
"keys":[{"from":"cookie","name":"JSESSIONID"}],"balance_factor":1.5,"slow_start":"10s","hold":"2s",
"tomcat_routes":{"n1":%q},"store":{"kind":"local","interval":"1s"},
"probe":{"path":"/drain%d","interval":"50ms","passes":1}}`, 60+i, dial, i%2)
		proxy := fmt.Sprintf(`{"handler":"reverse_proxy","upstreams":[{"dial":%q},{"dial":%q}],
"load_balancing":{"try_duration":"3s","selection_policy":%s}}`, dial, drainDial, policy)
		return []byte(fmt.Sprintf(`{"admin":{"disabled":true,"config":{"persist":false}},
"storage":{"module":"file_system","root":%q},
"apps":{"http":{"servers":{
"a":{"listen":[%q],"routes":[{"handle":[%s]}]},
"b":{"listen":[%q],"routes":[{"handle":[%s]}]}}}}}`, storage, listen, proxy, listen2, proxy))
	}
	if err := caddy.Load(config(0), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	time.Sleep(1500 * time.Millisecond)
	first := settledGoroutines()
	if got := healthcheckState(drainDial); got != "draining" {
		t.Fatalf("the probe did not drain %s: %s", drainDial, got)
	}
	for i := 1; i <= 6; i++ {
		if err := caddy.Load(config(i), true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	stopAfterReloads(t, first, 6)
	if n := healthcheck.PendingUndrains(); n != 0 {
		t.Fatalf("%d undrain timers outlive the farm", n)
	}
	if got := healthcheckState(drainDial); got != "up" {
		t.Fatalf("%s stays %s though no probe runs any more", drainDial, got)
	}
}

func healthcheckState(dial string) string { return healthcheck.Get(dial).State().String() }

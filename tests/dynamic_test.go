package tests

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/caddy-affinity/caddy-affinity/demoapp"
)

// Dynamic upstreams through the binary: Caddy's `dynamic a` asks a DNS
// server this test runs in process (on a free 127.0.0.1 UDP port, given
// to Caddy with `resolvers`), so that a name resolves to several loopback
// workers without touching /etc/hosts, which is shared with CI.

// dnsName is the name the test's DNS server answers.
const dnsName = "workers.affinity.test."

// dnsServer answers A queries for dnsName with its current addresses
// (and AAAA queries with none); anything else is NXDOMAIN.
type dnsServer struct {
	conn    net.PacketConn
	mu      sync.Mutex
	addrs   []net.IP
	queries atomic.Int64
}

func startDNS(t *testing.T, addrs ...net.IP) *dnsServer {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dnsServer{conn: conn, addrs: addrs}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			if out := s.answer(buf[:n]); out != nil {
				_, _ = conn.WriteTo(out, from)
			}
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	return s
}

func (s *dnsServer) addr() string { return s.conn.LocalAddr().String() }

// set replaces the addresses the name resolves to.
func (s *dnsServer) set(addrs ...net.IP) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addrs = addrs
}

func (s *dnsServer) answer(query []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	s.queries.Add(1)
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	if !strings.EqualFold(q.Name.String(), dnsName) {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	_ = b.StartQuestions()
	_ = b.Question(q)
	_ = b.StartAnswers()
	if rh.RCode == dnsmessage.RCodeSuccess && q.Type == dnsmessage.TypeA {
		s.mu.Lock()
		for _, ip := range s.addrs {
			var a dnsmessage.AResource
			copy(a.A[:], ip.To4())
			_ = b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 1}, a)
		}
		s.mu.Unlock()
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// startDynamicBackends starts n demoapp workers named A, B, C... on
// 127.0.9.1, 127.0.9.2... all on one port (what `dynamic a` dials).
func startDynamicBackends(t *testing.T, n int) ([]*backend, string) {
	t.Helper()
	for attempt := 0; attempt < 20; attempt++ {
		port := freePort(t)
		bs := make([]*backend, 0, n)
		ok := true
		for i := 0; i < n; i++ {
			name := string(rune('A' + i))
			w := demoapp.NewWorker(name, appCookie)
			addr := fmt.Sprintf("127.0.9.%d:%d", i+1, port)
			if err := w.Start(addr); err != nil {
				ok = false
				break
			}
			b := &backend{name: name, addr: w.Addr(), w: w, up: true}
			bs = append(bs, b)
			t.Cleanup(b.kill)
		}
		if ok {
			return bs, fmt.Sprint(port)
		}
		for _, b := range bs {
			b.kill()
		}
	}
	t.Fatal("no port free on 127.0.9.1-n")
	return nil, ""
}

func ipsOf(bs []*backend) []net.IP {
	out := make([]net.IP, len(bs))
	for i, b := range bs {
		host, _, _ := net.SplitHostPort(b.addr)
		out[i] = net.ParseIP(host)
	}
	return out
}

// dynamicSite renders a site whose reverse_proxy takes its upstreams from
// `dynamic a` against the test's DNS server (refreshed every second),
// with lb_retries and no passive health checks (fail_duration unset), and
// Caddy's active health check lines, which do nothing there.
func dynamicSite(dns *dnsServer, port, policy string) func(sitePort, adminPort int, storage string) string {
	return dynamicSiteWith(dns, port, "", policy)
}

// dynamicSiteWith is dynamicSite with siteLines (e.g. affinity_learn)
// before the reverse_proxy.
func dynamicSiteWith(dns *dnsServer, port, siteLines, policy string) func(sitePort, adminPort int, storage string) string {
	return func(sitePort, adminPort int, storage string) string {
		return globalOptions(adminPort, storage, "") + fmt.Sprintf(`
http://127.0.0.1:%d {
	bind 127.0.0.1
%s	reverse_proxy {
		dynamic a %s %s {
			resolvers %s
			refresh 1s
			versions ipv4
		}
		lb_policy affinity {
%s		}
		lb_retries 2
		lb_try_duration 3s
		health_uri /healthz
		health_interval %s
		health_timeout 1s
	}
}
`, sitePort, indent(siteLines, "\t"), strings.TrimSuffix(dnsName, "."), port, dns.addr(), indent(policy, "\t\t\t"), healthInterval)
	}
}

// logLines counts Caddy's log lines that contain every one of parts,
// from byte offset from of its output on.
func (p *caddyProc) logLines(from int, parts ...string) int {
	out := p.out.String()
	if from > len(out) {
		from = len(out)
	}
	n := 0
next:
	for _, line := range strings.Split(out[from:], "\n") {
		for _, part := range parts {
			if !strings.Contains(line, part) {
				continue next
			}
		}
		n++
	}
	return n
}

// TestDynamicUpstreamDiesUnderLoad: a worker of a `dynamic a` farm dies
// while the name still resolves to it. The affinity probe takes it out
// within its interval × fails; after that no request tries it (no
// failover "by failing"), no request fails (lb_retries), its sessions
// move once each and no other session moves. health_uri, which Caddy
// never runs on dynamic upstreams, is told once with the fix.
func TestDynamicUpstreamDiesUnderLoad(t *testing.T) {
	needCaddy(t)
	bs, port := startDynamicBackends(t, 3)
	dns := startDNS(t, ipsOf(bs)...)
	p := startCaddySite(t, "dynamic", dynamicSite(dns, port,
		"key cookie "+appCookie+"\nprobe /healthz {\n\tinterval 300ms\n\ttimeout 300ms\n\tfails 2\n}"))
	clients := newClients(t, 150)
	expectClean(t, "before the kill (150 clients x 3)", visitAll(clients, p.URL, 3, 50))
	if t.Failed() {
		t.FailNow()
	}
	owner := ownerMap(clients)
	victim := backendNamed(bs, busiest(clients))
	t.Logf("sessions per worker: %s; killing %s (%s), still in DNS", sortedMap(sessionsByWorker(clients)), victim.name, victim.addr)

	// Under load: new browsers keep arriving while the probe notices.
	stopArrivals := make(chan struct{})
	arrivals := newStats()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stopArrivals:
				return
			case <-time.After(40 * time.Millisecond):
			}
			c := newClient(t)
			arrivals.record(c, c.visit(p.URL))
		}
	}()
	killedAt := len(p.out.String())
	victim.kill()
	start := time.Now()
	// Not a fatal wait: without the take-out the test goes on after 3s,
	// to measure what the load meets then.
	for p.logLines(killedAt, "does not answer the probe", victim.addr) == 0 && time.Since(start) < 3*time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	took := time.Since(start)
	if p.logLines(killedAt, "does not answer the probe", victim.addr) == 0 {
		t.Errorf("the probe did not take the dead worker out within %s", took.Round(10*time.Millisecond))
	}
	t.Logf("taken out %s after the kill (probe interval 300ms, timeout 300ms, fails 2)", took.Round(10*time.Millisecond))
	// Requests already on their way to the dead worker when it was taken
	// out fail over when their attempt fails, which is logged after the
	// take-out: what counts is what starts after them.
	time.Sleep(300 * time.Millisecond)
	outAt := len(p.out.String())
	time.Sleep(200 * time.Millisecond) // a few arrivals after the take-out

	s := visitAll(clients, p.URL, 5, 50)
	close(stopArrivals)
	wg.Wait()
	checkFailover(t, "after the kill (150 clients x 5)", clients, owner, victim.name, 5, s)
	t.Logf("new browsers during and after the kill: %s", arrivals)
	if arrivals.failed != 0 || arrivals.perWorker[victim.name] != 0 {
		t.Errorf("new browsers: %d failed, %d served by the dead worker", arrivals.failed, arrivals.perWorker[victim.name])
	}
	byFailing := func(from int) int {
		return p.logLines(from, `"msg":"session failed over"`, `"from":"`+victim.addr+`"`, "this request's attempt on it failed")
	}
	before, after := byFailing(killedAt)-byFailing(outAt), byFailing(outAt)
	t.Logf("FIGURES | dynamic a, worker killed, still in DNS | requests that tried the dead worker: %d before the take-out (%s) and the 300ms after it, %d later (%s of load) | failed %d |",
		before, took.Round(10*time.Millisecond), after, time.Since(start).Round(100*time.Millisecond)-took.Round(100*time.Millisecond), s.failed+arrivals.failed)
	if after != 0 {
		t.Errorf("%d requests tried the dead worker after the probe took it out, want 0", after)
	}

	if n := p.logLines(0, "health_uri (Caddy's active health checks) does nothing on dynamic upstreams"); n != 1 {
		t.Errorf("health_uri on dynamic upstreams logged %d times, want once", n)
	}
	var st struct {
		Policies []struct {
			Warnings []string `json:"warnings"`
		} `json:"policies"`
	}
	obsGetJSON(t, p.Admin+"/affinity/", &st)
	if len(st.Policies) != 1 || !strings.Contains(strings.Join(st.Policies[0].Warnings, "\n"), "the affinity probe (/healthz) already does this") {
		t.Errorf("status page warnings: %+v", st.Policies)
	}
}

package healthcheck

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
)

// drainServer answers the probe: normally 200, "drain" from request
// drainFrom on (0: never) while draining is set.
type drainServer struct {
	*httptest.Server
	requests atomic.Int64
	drain    atomic.Bool
	// drainAfter: answer drain once more than this many requests came in.
	drainAfter atomic.Int64
	header     string // if set, drain is signalled by this header with a 200
	path       atomic.Value
}

func newDrainServer(t *testing.T, header string) *drainServer {
	t.Helper()
	s := &drainServer{header: header}
	s.drainAfter.Store(-1)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := s.requests.Add(1)
		s.path.Store(r.URL.RequestURI())
		draining := s.drain.Load() || (s.drainAfter.Load() >= 0 && n > s.drainAfter.Load())
		switch {
		case draining && s.header != "":
			w.Header().Set(s.header, "Drain")
		case draining:
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *drainServer) dial() string { return s.Listener.Addr().String() }

func fastProbe() *Probe {
	return &Probe{
		Path:     "/drain-status?x=1",
		Interval: caddy.Duration(15 * time.Millisecond),
		Timeout:  caddy.Duration(500 * time.Millisecond),
		Passes:   2,
		// The production grace (at least 5s) would make every test that
		// stops a probe wait that long.
		undrainGrace: testGrace,
	}
}

// testGrace is fastProbe's undrain grace: a few intervals, short enough
// to wait for, long enough to tell "undone after the grace" from "at once".
const testGrace = 300 * time.Millisecond

func (in *testInstance) startProbe(t *testing.T, p *Probe, dials ...string) func() {
	t.Helper()
	stop := p.start(context.Background(), in.reg, dials, in.reg.logger())
	t.Cleanup(stop)
	return stop
}

func findProber(reg *registry, dial string) (found *prober) {
	probers.Range(func(key, v any) bool {
		if k := key.(proberKey); k.reg == reg && k.dial == dial {
			found = v.(*prober)
		}
		return found == nil
	})
	return found
}

// countProbers returns how many probers run for reg.
func countProbers(reg *registry) int {
	n := 0
	probers.Range(func(key, _ any) bool {
		if key.(proberKey).reg == reg {
			n++
		}
		return true
	})
	return n
}

// The probe drains an upstream after Passes consecutive drain answers,
// and brings it back after Passes consecutive normal ones.
func TestProbeDrainsAndUndrains(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	const normalAnswers = 3
	srv.drainAfter.Store(normalAnswers)
	u := in.reg.get(srv.dial())
	var atDrain int64
	in.startProbe(t, fastProbe(), srv.dial())

	waitFor(t, 3*time.Second, "drained by the probe", func() bool {
		if u.State() == Draining {
			atDrain = srv.requests.Load()
			return true
		}
		return false
	})
	if atDrain < normalAnswers+2 {
		t.Errorf("drained after %d requests; the first drain answer was request %d, so Passes=2 needs at least %d",
			atDrain, normalAnswers+1, normalAnswers+2)
	}
	if u.setter() != setByProbe {
		t.Errorf("set by %q, want probe", u.setter())
	}
	if got, _ := srv.path.Load().(string); got != "/drain-status?x=1" {
		t.Errorf("probed %q", got)
	}

	srv.drainAfter.Store(-1)
	waitFor(t, 3*time.Second, "back up", func() bool { return u.State() == Up })
	in.waitLastChange(t, u.Dial, "probe")
	changes := in.stateChanges(u.Dial)
	if len(changes) != 2 || changes[0]["reason"] != "probe" || changes[0]["new_state"] != "draining" ||
		changes[1]["reason"] != "probe" || changes[1]["new_state"] != "up" {
		t.Errorf("logged %v", changes)
	}
}

// One drain answer among normal ones is not enough.
func TestProbeNeedsConsecutiveAnswers(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusServiceUnavailable) // every other answer
		}
	}))
	defer srv.Close()
	dial := srv.Listener.Addr().String()
	in.startProbe(t, fastProbe(), dial)
	waitFor(t, 3*time.Second, "10 probes", func() bool { return n.Load() >= 10 })
	if s := in.reg.lookup(dial).State(); s != Up {
		t.Errorf("alternating answers drained it: %s", s)
	}
}

func TestProbeDrainHeader(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "X-Drain")
	p := fastProbe()
	p.DrainHeader = "x-drain"
	p.DrainStatus = -1
	u := in.reg.get(srv.dial())
	in.startProbe(t, p, srv.dial())
	srv.drain.Store(true)
	waitFor(t, 3*time.Second, "drained by header", func() bool { return u.State() == Draining })
	srv.drain.Store(false)
	waitFor(t, 3*time.Second, "back up", func() bool { return u.State() == Up })
}

// The probe never overrides an operator's draining or maintenance; an
// operator's "up" hands the upstream back to the probe.
func TestProbeDoesNotOverrideOperator(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	u := in.reg.get(srv.dial())
	in.reg.operate(u, Maintenance)
	srv.drain.Store(true)
	in.startProbe(t, fastProbe(), srv.dial())
	waitFor(t, 3*time.Second, "8 drain answers", func() bool { return srv.requests.Load() >= 8 })
	if u.State() != Maintenance {
		t.Fatalf("probe changed maintenance to %s", u.State())
	}

	in.reg.operate(u, Draining)
	srv.drain.Store(false)
	start := srv.requests.Load()
	waitFor(t, 3*time.Second, "8 normal answers", func() bool { return srv.requests.Load() >= start+8 })
	if u.State() != Draining || u.setter() != setByOperator {
		t.Fatalf("probe undid an operator's draining: %s by %q", u.State(), u.setter())
	}

	in.reg.operate(u, Up)
	srv.drain.Store(true)
	waitFor(t, 3*time.Second, "drained again after the operator's up", func() bool { return u.State() == Draining })
	if u.setter() != setByProbe {
		t.Errorf("set by %q", u.setter())
	}
	// An operator draining an upstream the probe drained takes it over.
	in.reg.operate(u, Draining)
	srv.drain.Store(false)
	start = srv.requests.Load()
	waitFor(t, 3*time.Second, "8 normal answers", func() bool { return srv.requests.Load() >= start+8 })
	if u.State() != Draining {
		t.Errorf("probe undid a drain the operator took over: %s", u.State())
	}
}

// No answer changes nothing; it is logged once per streak.
func TestProbeFailuresKeepState(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dial := l.Addr().String()
	l.Close()             // connection refused from now on
	u := in.reg.get(dial) // up, set by nobody
	in.startProbe(t, fastProbe(), dial)
	pr := findProber(in.reg, dial)
	if pr == nil {
		t.Fatal("no prober")
	}
	waitFor(t, 3*time.Second, "6 failures", func() bool { return pr.failures.Load() >= 6 })
	if u.State() != Up {
		t.Errorf("failures changed the state to %s", u.State())
	}
	warns := in.logs.FilterMessageSnippet("drain probe gets no usable answer").All()
	if len(warns) != 1 {
		t.Fatalf("logged %d warnings for one streak, want 1", len(warns))
	}
	if warns[0].ContextMap()["upstream"] != dial {
		t.Errorf("warning %v", warns[0].ContextMap())
	}

	// Other status codes are no answer either, and break a drain streak.
	srv := newDrainServer(t, "")
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
	})
	in.startProbe(t, fastProbe(), srv.dial())
	waitFor(t, 3*time.Second, "500s counted as failures", func() bool {
		p := findProber(in.reg, srv.dial())
		return p != nil && p.failures.Load() >= 3
	})
	if s := in.reg.lookup(srv.dial()).State(); s != Up {
		t.Errorf("500s changed the state to %s", s)
	}
}

// The same dial probed with the same configuration by two policies (or by
// the old and new config during a reload) has one prober; the last stop
// ends it and undoes the probe's drain after the grace.
func TestProbeShared(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	u := in.reg.get(srv.dial())
	stop1 := in.startProbe(t, fastProbe(), srv.dial(), srv.dial())
	stop2 := in.startProbe(t, fastProbe(), srv.dial())
	pr := findProber(in.reg, srv.dial())
	n := countProbers(in.reg)
	refs, _ := probers.References(pr.key)
	if n != 1 || refs != 2 {
		t.Fatalf("%d probers with %d refs, want 1 with 2", n, refs)
	}
	srv.drain.Store(true)
	waitFor(t, 3*time.Second, "drained", func() bool { return u.State() == Draining })
	stop1()
	stop1()
	if findProber(in.reg, srv.dial()) != pr || u.State() != Draining {
		t.Fatal("first stop ended the shared prober")
	}
	stopped := time.Now()
	stop2()
	if findProber(in.reg, srv.dial()) != nil {
		t.Fatal("prober left after the last stop")
	}
	waitFor(t, 3*time.Second, "probe's drain undone after the probe went away", func() bool { return u.State() == Up })
	if took := time.Since(stopped); took < testGrace {
		t.Errorf("drain undone %s after the last stop, before the grace (%s)", took, testGrace)
	}
	in.waitLastChange(t, u.Dial, "probe stopped")
	settled := srv.requests.Load()
	time.Sleep(60 * time.Millisecond)
	if srv.requests.Load() > settled+1 {
		t.Error("still probing after stop")
	}

	// A different configuration is a different prober.
	other := fastProbe()
	other.Passes = 3
	in.startProbe(t, fastProbe(), srv.dial())
	in.startProbe(t, other, srv.dial())
	if n := countProbers(in.reg); n != 2 {
		t.Errorf("%d probers for two configurations", n)
	}
}

func TestProbeStopsWithContext(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	ctx, cancel := context.WithCancel(context.Background())
	stop := fastProbe().start(ctx, in.reg, []string{srv.dial()}, zap.NewNop())
	defer stop()
	cancel()
	waitFor(t, 2*time.Second, "prober gone", func() bool { return findProber(in.reg, srv.dial()) == nil })
}

func TestProbeDefaults(t *testing.T) {
	p := (&Probe{Path: "/x", DrainHeader: "x-drain"}).withDefaults()
	if time.Duration(p.Interval) != 2*time.Second || time.Duration(p.Timeout) != time.Second ||
		p.Passes != 2 || p.Fails != 2 || p.DrainStatus != 503 || p.DrainHeader != "X-Drain" {
		t.Errorf("defaults: %+v", p)
	}
}

func TestProbeUnixSocketAndBadDial(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	sock := t.TempDir() + "/app.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Skip("no unix sockets:", err)
	}
	var draining atomic.Bool
	draining.Store(true)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.WriteHeader(503)
		}
	}), ReadHeaderTimeout: time.Second}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()
	dial := "unix/" + sock
	u := in.reg.get(dial)
	in.startProbe(t, fastProbe(), dial, "no-port.example", "udp/10.0.0.1:53", "{http.upstream}:80")
	waitFor(t, 3*time.Second, "unix socket upstream drained", func() bool { return u.State() == Draining })
	if n := in.logs.FilterMessage("cannot probe upstream").Len(); n != 3 {
		t.Errorf("%d bad dials logged, want 3", n)
	}
}

func TestProbeCaddyfile(t *testing.T) {
	parse := func(input string) (*Probe, error) {
		d := caddyfile.NewTestDispenser(input)
		d.Next() // on "probe"
		p := new(Probe)
		return p, p.UnmarshalCaddyfile(d)
	}
	p, err := parse(`probe {
		path /drain-status
		interval 500ms
		timeout 250ms
		passes 3
		fails 4
		drain_status 410
		drain_header X-Drain
	}`)
	if err != nil {
		t.Fatal(err)
	}
	want := Probe{Path: "/drain-status", Interval: caddy.Duration(500 * time.Millisecond), Timeout: caddy.Duration(250 * time.Millisecond),
		Passes: 3, Fails: 4, DrainStatus: 410, DrainHeader: "X-Drain"}
	if !reflect.DeepEqual(*p, want) {
		t.Errorf("got %+v, want %+v", *p, want)
	}
	if err := p.Validate(); err != nil {
		t.Error(err)
	}

	p, err = parse(`probe /healthz`)
	if err != nil || p.Path != "/healthz" {
		t.Errorf("path on the line: %+v %v", p, err)
	}
	p, err = parse("probe /healthz {\n drain_status off\n drain_header X-Drain\n}")
	if err != nil || p.DrainStatus != -1 {
		t.Errorf("drain_status off: %+v %v", p, err)
	}

	for _, tc := range []struct{ input, want string }{
		{"probe", "path is required"},
		{"probe {\n interval 1s\n}", "path is required"},
		{"probe healthz", `path "healthz" must start with /`},
		{"probe /a /b", "at most one argument"},
		{"probe /a {\n path /b\n}", "path given twice"},
		{"probe {\n path /a\n path /b\n}", "path specified more than once"},
		{"probe {\n path /a\n interval soon\n}", `interval: invalid duration "soon"`},
		{"probe {\n path /a\n timeout 0s\n}", "timeout must be positive"},
		{"probe {\n path /a\n interval\n}", "interval takes exactly one value, got 0"},
		{"probe {\n path /a\n passes 1 2\n}", "passes takes exactly one value, got 2"},
		{"probe {\n path /a\n passes 0\n}", `passes: "0" is not a whole number >= 1`},
		{"probe {\n path /a\n fails x\n}", `fails: "x" is not a whole number >= 1`},
		{"probe {\n path /a\n drain_status 99\n}", `drain_status: "99" is not an HTTP status code`},
		{"probe {\n path /a\n drain_header X:Drain\n}", `drain_header: "X:Drain" is not a valid header name`},
		{"probe {\n path /a\n drain_status off\n}", "drain_header is needed"},
		{"probe {\n path /a\n port 9000\n}", `unrecognized option "port"`},
	} {
		_, err := parse(tc.input)
		if err == nil {
			t.Errorf("%q: no error, want %q", tc.input, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "Testfile:") {
			t.Errorf("%q: error %q, want %q and the line", tc.input, err, tc.want)
		}
	}
	// The line named is the offending one.
	_, err = parse("probe {\n path /a\n\n passes zero\n}")
	if err == nil || !strings.Contains(err.Error(), "Testfile:4") {
		t.Errorf("error %v does not name line 4", err)
	}
}

// Inside an affinity block, the policy's parser hands over on the probe
// token and carries on after the probe's block.
func TestProbeCaddyfileInsidePolicyBlock(t *testing.T) {
	d := caddyfile.NewTestDispenser(`affinity {
		session_ttl 10m
		probe /ready {
			passes 4
		}
		max_sessions 10
	}`)
	d.Next()
	var opts []string
	var p Probe
	for d.NextBlock(0) {
		opts = append(opts, d.Val())
		if d.Val() == "probe" {
			if err := p.UnmarshalCaddyfile(d); err != nil {
				t.Fatal(err)
			}
			continue
		}
		d.RemainingArgs()
	}
	if strings.Join(opts, ",") != "session_ttl,probe,max_sessions" || p.Path != "/ready" || p.Passes != 4 {
		t.Errorf("options %v, probe %+v", opts, p)
	}
}

func TestProbeValidate(t *testing.T) {
	for _, tc := range []struct {
		p    Probe
		want string
	}{
		{Probe{}, "path is required"},
		{Probe{Path: "x"}, "must start with /"},
		{Probe{Path: "/x", Interval: -1}, "interval must be positive"},
		{Probe{Path: "/x", Passes: -1}, "passes must be >= 1"},
		{Probe{Path: "/x", DrainStatus: 42}, "not an HTTP status code"},
		{Probe{Path: "/x", DrainStatus: -1}, "drain_header is needed"},
		{Probe{Path: "/x", DrainHeader: "a b"}, "not a valid header name"},
	} {
		err := tc.p.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.p, err, tc.want)
		}
	}
	if err := (&Probe{Path: "/x"}).Validate(); err != nil {
		t.Error(err)
	}
}

// A reload stops the old config's prober before the farm's next look
// starts the new config's (up to a second later), and quick reloads may
// do so again before the first grace is over. The drain the probe set
// holds across every gap, never Up, whether the new prober has the same
// configuration or not; it is undone only once no prober has watched
// the dial for a whole grace. The test ends each grace itself (see
// graceTimers): with sleeps a fraction of a grace apart, a loaded
// machine stretched a gap past the grace.
func TestProbeRestartWithinGraceKeepsDrain(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	srv.drain.Store(true)
	graces := newGraceTimers(t)
	probe := func(passes int) *Probe {
		p := fastProbe()
		p.Passes = passes
		p.undrainAfter = graces.afterFunc
		return p
	}
	u := in.reg.get(srv.dial())
	stop := in.startProbe(t, probe(2), srv.dial())
	waitFor(t, 3*time.Second, "drained", func() bool { return u.State() == Draining })

	// Sample the state every millisecond from here on.
	var notDraining atomic.Int64
	quit, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-quit:
				return
			default:
			}
			if u.State() != Draining {
				notDraining.Add(1)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	endSampling := func() int64 {
		close(quit)
		<-sampled
		return notDraining.Load()
	}
	stillDraining := func(when string) {
		t.Helper()
		if s := u.State(); s != Draining {
			t.Fatalf("%s: %s, want still draining", when, s)
		}
	}

	// Stop, restart within the grace, stop again; the first stop's grace
	// ends while no prober runs: its undrain must not fire. Then restart
	// with another configuration (a reload that changed the probe: another
	// prober) before the second stop's grace ends.
	stop()
	first := graces.started(t, 1)
	stop = in.startProbe(t, probe(2), srv.dial())
	time.Sleep(testGrace / 6) // the restarted prober probes
	stop()
	second := graces.started(t, 2)
	graces.end(first)
	stillDraining("the first stop's grace over, no prober running")
	stop = in.startProbe(t, probe(3), srv.dial())
	graces.end(second)
	stillDraining("the second stop's grace over, the new prober running")
	time.Sleep(2 * testGrace) // the new prober probes
	if n := endSampling(); n != 0 {
		t.Fatalf("the upstream was not draining in %d samples (1 ms apart) across the restarts", n)
	}
	if c := in.stateChanges(u.Dial); len(c) != 1 || c[0]["new_state"] != "draining" {
		t.Fatalf("state changes %v, want only the first drain", c)
	}
	if u.setter() != setByProbe {
		t.Fatalf("set by %q", u.setter())
	}

	// The new prober took the drain over: normal answers undo it, as
	// they would have with the first prober.
	srv.drain.Store(false)
	waitFor(t, 3*time.Second, "undrained by the new prober's normal answers", func() bool { return u.State() == Up })
	in.waitLastChange(t, u.Dial, "probe")

	// Stopped for good: the drain holds for the grace, then is undone.
	srv.drain.Store(true)
	waitFor(t, 3*time.Second, "drained again", func() bool { return u.State() == Draining })
	stop()
	last := graces.started(t, 3)
	time.Sleep(testGrace / 2)
	stillDraining("half a grace after the last stop")
	graces.end(last)
	if s := u.State(); s != Up {
		t.Fatalf("%s once the grace after the last stop is over, want up", s)
	}
	in.waitLastChange(t, u.Dial, "probe stopped")
	watchers.mu.Lock()
	n, pending := watchers.n[watchKey{in.reg, u.Dial}], watchers.pending[watchKey{in.reg, u.Dial}]
	watchers.mu.Unlock()
	if n != 0 || pending != nil {
		t.Errorf("left behind: %d watchers, pending undrain %v", n, pending != nil)
	}
}

// graceTimers stands in for time.AfterFunc in Probe.undrainAfter: the
// timers it starts do not fire by themselves (they are real timers, a
// day long, so that the code's Stop has its real effect); end fires one,
// as its grace ending would, unless the code stopped it.
type graceTimers struct {
	mu     sync.Mutex
	timers []graceTimer
}

type graceTimer struct {
	d time.Duration
	t *time.Timer
	f func()
}

func newGraceTimers(t *testing.T) *graceTimers {
	g := new(graceTimers)
	t.Cleanup(func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, gt := range g.timers {
			gt.t.Stop()
		}
	})
	return g
}

// afterFunc is called under watchers.mu: it must not take it.
func (g *graceTimers) afterFunc(d time.Duration, f func()) *time.Timer {
	g.mu.Lock()
	defer g.mu.Unlock()
	gt := graceTimer{d: d, t: time.AfterFunc(24*time.Hour, func() {}), f: f}
	g.timers = append(g.timers, gt)
	return gt.t
}

// started checks that n undrain timers were started, the last one for
// the probe's grace, and returns it.
func (g *graceTimers) started(t *testing.T, n int) graceTimer {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.timers) != n {
		t.Fatalf("%d undrain timers started, want %d", len(g.timers), n)
	}
	gt := g.timers[n-1]
	if gt.d != testGrace {
		t.Fatalf("undrain timer of %s, want the grace %s", gt.d, testGrace)
	}
	return gt
}

// end ends a timer's grace: it fires unless it was stopped.
func (g *graceTimers) end(gt graceTimer) {
	if gt.t.Stop() {
		gt.f()
	}
}

// An upstream that was not drained by the probe leaves no timer behind
// when its prober stops: nothing to undo.
func TestProbeStopWithoutDrainLeavesNoTimer(t *testing.T) {
	t.Parallel()
	in := newInstance(t, "a")
	srv := newDrainServer(t, "")
	stop := in.startProbe(t, fastProbe(), srv.dial())
	waitFor(t, 3*time.Second, "2 answers", func() bool { return srv.requests.Load() >= 2 })
	stop()
	k := watchKey{in.reg, srv.dial()}
	watchers.mu.Lock()
	n, pending := watchers.n[k], watchers.pending[k]
	watchers.mu.Unlock()
	if n != 0 || pending != nil {
		t.Errorf("%d watchers, pending undrain %v", n, pending != nil)
	}
}

func TestProbeGrace(t *testing.T) {
	for _, tc := range []struct {
		interval time.Duration
		want     time.Duration
	}{
		{0, 6 * time.Second}, // default interval 2s
		{time.Second, 5 * time.Second},
		{250 * time.Millisecond, 5 * time.Second},
		{10 * time.Second, 30 * time.Second},
	} {
		p := (&Probe{Path: "/x", Interval: caddy.Duration(tc.interval)}).withDefaults()
		if got := p.grace(); got != tc.want {
			t.Errorf("interval %s: grace %s, want %s", tc.interval, got, tc.want)
		}
	}
}

// tlsDrainServer is a TLS upstream whose probe path answers 503 while
// drain is set; it records the SNI name of the last request.
type tlsDrainServer struct {
	*httptest.Server
	drain    atomic.Bool
	requests atomic.Int64
	sni      atomic.Value
	caFile   string // its certificate, as a PEM file
}

func newTLSDrainServer(t *testing.T) *tlsDrainServer {
	t.Helper()
	s := &tlsDrainServer{}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		if r.TLS != nil {
			s.sni.Store(r.TLS.ServerName)
		}
		if s.drain.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	// The failing cases' handshake errors are expected, not test output.
	s.Config.ErrorLog = log.New(io.Discard, "", 0)
	s.StartTLS()
	t.Cleanup(s.Close)
	s.caFile = filepath.Join(t.TempDir(), "upstream-ca.pem")
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw})
	if err := os.WriteFile(s.caFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

// The probe reaches TLS upstreams: with tls it speaks HTTPS, verifying
// the certificate against the dial's host or tls_server_name (sent as
// SNI) and the trusted CA files, or not at all with skip verify. A
// handshake that fails is no answer: the state stays, the failure is
// logged.
func TestProbeTLS(t *testing.T) {
	t.Parallel()
	srv := newTLSDrainServer(t)
	srv.drain.Store(true)
	dial := srv.Listener.Addr().String() // 127.0.0.1:port, an IP SAN of the certificate
	// The process reads the system roots once, at their first use: under
	// -race on a loaded machine that took longer than fastProbe's timeout,
	// and the "system roots" probe failed on the timeout instead of on
	// the certificate. Read them before any probe.
	_, _ = x509.SystemCertPool()

	withTLS := func(f func(p *Probe)) *Probe {
		p := fastProbe()
		p.TLS = true
		f(p)
		if err := p.Validate(); err != nil {
			t.Fatal(err)
		}
		return p
	}
	drains := []struct {
		name, sni string
		p         *Probe
	}{
		{"skip verify", "", withTLS(func(p *Probe) { p.TLSInsecureSkipVerify = true })},
		{"trusted CA, dial's IP", "", withTLS(func(p *Probe) { p.TLSTrustedCACerts = []string{srv.caFile} })},
		{"trusted CA, server name", "example.com", withTLS(func(p *Probe) {
			p.TLSTrustedCACerts = []string{srv.caFile}
			p.TLSServerName = "example.com" // the httptest certificate's DNS name
		})},
		{"skip verify, server name", "example.com", withTLS(func(p *Probe) {
			p.TLSInsecureSkipVerify = true
			p.TLSServerName = "example.com"
		})},
	}
	for _, tc := range drains {
		in := newInstance(t, tc.name) // a registry of its own: the same dial, probed anew
		u := in.reg.get(dial)
		stop := in.startProbe(t, tc.p, dial)
		waitFor(t, 3*time.Second, tc.name+": drained over TLS", func() bool { return u.State() == Draining })
		stop()
		if got, _ := srv.sni.Load().(string); got != tc.sni {
			t.Errorf("%s: SNI %q, want %q", tc.name, got, tc.sni)
		}
	}

	fails := []struct {
		name, want string
		p          *Probe
	}{
		{"plain HTTP", "status 400", fastProbe()}, // Go's TLS server answers 400 to plain HTTP
		{"system roots", "certificate", withTLS(func(*Probe) {})},
		{"wrong server name", "not wrong.example", withTLS(func(p *Probe) {
			p.TLSTrustedCACerts = []string{srv.caFile}
			p.TLSServerName = "wrong.example"
		})},
	}
	for _, tc := range fails {
		in := newInstance(t, tc.name)
		u := in.reg.get(dial)
		in.startProbe(t, tc.p, dial)
		pr := findProber(in.reg, dial)
		if pr == nil {
			t.Fatalf("%s: no prober", tc.name)
		}
		waitFor(t, 3*time.Second, tc.name+": 4 failures", func() bool { return pr.failures.Load() >= 4 })
		if u.State() != Up || pr.answers.Load() != 0 {
			t.Errorf("%s: state %s after %d answers, want up and none", tc.name, u.State(), pr.answers.Load())
		}
		warns := in.logs.FilterMessageSnippet("drain probe gets no usable answer").All()
		if len(warns) != 1 || !strings.Contains(warns[0].ContextMap()["last"].(string), tc.want) {
			t.Errorf("%s: warnings %v, want one with %q", tc.name, warns, tc.want)
		}
	}
}

func TestProbeTLSCaddyfile(t *testing.T) {
	parse := func(input string) (*Probe, error) {
		d := caddyfile.NewTestDispenser(input)
		d.Next()
		p := new(Probe)
		return p, p.UnmarshalCaddyfile(d)
	}
	p, err := parse("probe /ready {\n tls_server_name app.internal\n tls_trusted_ca_certs /etc/ca1.pem /etc/ca2.pem\n tls\n}")
	want := Probe{Path: "/ready", TLS: true, TLSServerName: "app.internal", TLSTrustedCACerts: []string{"/etc/ca1.pem", "/etc/ca2.pem"}}
	if err != nil || !reflect.DeepEqual(*p, want) {
		t.Errorf("got %+v %v, want %+v", p, err, want)
	}
	p, err = parse("probe /ready {\n tls\n tls_insecure_skip_verify\n tls_server_name 10.0.0.7\n}")
	if err != nil || !p.TLS || !p.TLSInsecureSkipVerify || p.TLSServerName != "10.0.0.7" {
		t.Errorf("got %+v %v", p, err)
	}

	for _, tc := range []struct {
		input, want string
		line        int
	}{
		{"probe /a {\n tls on\n}", "tls takes no value, got 1", 2},
		{"probe /a {\n tls\n tls_insecure_skip_verify yes\n}", "tls_insecure_skip_verify takes no value", 3},
		{"probe /a {\n tls\n tls_server_name\n}", "tls_server_name takes exactly one value, got 0", 3},
		{"probe /a {\n tls\n tls_server_name a:443\n}", `tls_server_name: "a:443" is not a host name`, 3},
		{"probe /a {\n tls\n tls_trusted_ca_certs\n}", "tls_trusted_ca_certs takes one or more PEM files", 3},
		{"probe /a {\n tls\n tls\n}", "tls specified more than once", 3},
		// Bad combinations name the option at fault, wherever the block ends.
		{"probe /a {\n interval 1s\n tls_server_name x\n\n passes 3\n}", "tls_server_name: needs tls", 3},
		{"probe /a {\n tls_insecure_skip_verify\n passes 3\n}", "tls_insecure_skip_verify: needs tls", 2},
		{"probe /a {\n tls_trusted_ca_certs /ca.pem\n}", "tls_trusted_ca_certs: needs tls", 2},
		{"probe /a {\n tls\n tls_insecure_skip_verify\n interval 1s\n tls_trusted_ca_certs /ca.pem\n}",
			"tls_trusted_ca_certs: cannot be used with tls_insecure_skip_verify (line 3)", 5},
	} {
		_, err := parse(tc.input)
		if err == nil {
			t.Errorf("%q: no error, want %q", tc.input, tc.want)
			continue
		}
		at := "Testfile:" + strconv.Itoa(tc.line)
		if !strings.Contains(err.Error(), tc.want) || !strings.HasSuffix(err.Error(), at) {
			t.Errorf("%q: error %q, want %q at %s", tc.input, err, tc.want, at)
		}
	}
}

func TestProbeTLSValidate(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		p    Probe
		want string
	}{
		{Probe{Path: "/x", TLSServerName: "a"}, "need tls"},
		{Probe{Path: "/x", TLSInsecureSkipVerify: true}, "need tls"},
		{Probe{Path: "/x", TLSTrustedCACerts: []string{notPEM}}, "need tls"},
		{Probe{Path: "/x", TLS: true, TLSInsecureSkipVerify: true, TLSTrustedCACerts: []string{notPEM}}, "cannot be used with tls_insecure_skip_verify"},
		{Probe{Path: "/x", TLS: true, TLSServerName: "a b"}, "not a host name"},
		{Probe{Path: "/x", TLS: true, TLSTrustedCACerts: []string{filepath.Join(dir, "missing.pem")}}, "no such file"},
		{Probe{Path: "/x", TLS: true, TLSTrustedCACerts: []string{notPEM}}, "no PEM certificate in " + notPEM},
	} {
		err := tc.p.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.p, err, tc.want)
		}
	}
	if err := (&Probe{Path: "/x", TLS: true, TLSServerName: "app.internal", TLSInsecureSkipVerify: true}).Validate(); err != nil {
		t.Error(err)
	}
	// Different TLS settings are different probers.
	a, b := Probe{Path: "/x"}, Probe{Path: "/x", TLS: true}
	if a.key() == b.key() {
		t.Error("tls not in the prober key")
	}
}

// A dynamic upstream (StartDynamic) that stops answering is Down after
// Fails silent probes and serves again at its first answer; one that
// answers with an error status (a wrong probe path) is never taken out;
// a static one (Start) is never taken out either.
func TestProbeTakesSilentDynamicUpstreamDown(t *testing.T) {
	in := newInstance(t, "one")
	live := newDrainServer(t, "")
	dead := newDrainServer(t, "")
	wrongPath := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(wrongPath.Close)
	deadDial := dead.dial()
	p := fastProbe()
	p.Fails = 2
	dyn := *p
	dyn.takesDown = true
	in.startProbe(t, &dyn, live.dial(), deadDial, wrongPath.Listener.Addr().String())
	static := newDrainServer(t, "")
	staticDial := static.dial()
	in.startProbe(t, p, staticDial)
	waitFor(t, time.Second, "first answers", func() bool { return live.requests.Load() > 2 && dead.requests.Load() > 2 })

	dead.Close()
	static.Close()
	up := in.reg.get(deadDial)
	took := waitFor(t, 2*time.Second, "the silent dynamic upstream taken out", func() bool { return up.ForNew(nil) == Down })
	t.Logf("taken out %s after the worker died (interval 15ms, fails 2)", took)
	if v := up.ForPinned(nil); v != Down {
		t.Fatalf("pinned verdict %v, want down", v)
	}
	time.Sleep(100 * time.Millisecond) // many more probes
	for _, d := range []string{live.dial(), wrongPath.Listener.Addr().String(), staticDial} {
		if v := in.reg.get(d).ForNew(nil); v != Serves {
			t.Errorf("%s: verdict %v, want serves (answering, or not dynamic)", d, v)
		}
	}

	// Back on the same address: serves again.
	l, err := net.Listen("tcp", deadDial)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", deadDial, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}), ReadHeaderTimeout: time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	waitFor(t, 2*time.Second, "the dynamic upstream back in service", func() bool { return up.ForNew(nil) == Serves })
	if n := len(in.logs.FilterMessageSnippet("does not answer the probe: out of service").All()); n != 1 {
		t.Errorf("logged the take-out %d times, want once", n)
	}
}

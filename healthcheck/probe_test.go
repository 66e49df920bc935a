package healthcheck

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
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
	}
}

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
// ends it and undoes the probe's drain.
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
	stop2()
	if findProber(in.reg, srv.dial()) != nil {
		t.Fatal("prober left after the last stop")
	}
	if u.State() != Up {
		t.Errorf("probe's drain not undone when the probe went away: %s", u.State())
	}
	if c := in.stateChanges(u.Dial); c[len(c)-1]["reason"] != "probe stopped" {
		t.Errorf("logged %v", c[len(c)-1])
	}
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
	if *p != want {
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

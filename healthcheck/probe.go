package healthcheck

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"
)

// Probe defaults.
const (
	// DefaultProbeInterval is the default time between two probes.
	DefaultProbeInterval = caddy.Duration(2 * time.Second)
	// DefaultProbeTimeout is the default bound on one probe.
	DefaultProbeTimeout = caddy.Duration(time.Second)
	// DefaultProbePasses is the default number of consecutive answers
	// that change the state.
	DefaultProbePasses = 2
	// DefaultProbeFails is the default number of consecutive probes
	// without an answer after which the upstream is logged.
	DefaultProbeFails = 2
	// DefaultDrainStatus is the status code that means "drain me" unless
	// configured otherwise: 503 is what readiness endpoints (ASP.NET
	// Core health checks, Spring Boot, Kubernetes-style /readyz) answer
	// once the app has been told to shut down.
	DefaultDrainStatus = http.StatusServiceUnavailable
	// DrainHeaderValue is the value of DrainHeader that means "drain me".
	DrainHeaderValue = "drain"
	// minUndrainGrace is the least time a drain the probe set outlives the
	// last prober of its upstream (see prober.Destruct): a reload stops
	// the old config's probers before the farm's next look (up to a
	// second later) starts the new config's, and the drain must not lapse
	// in between.
	minUndrainGrace = 5 * time.Second
)

// Probe is a backend-signalled drain check, like HAProxy's agent-check:
// every Interval each upstream is asked GET http://<dial><Path> (https
// with TLS), and the upstream itself says whether it wants to be drained.
// After Passes consecutive "drain" answers an upstream in state up
// becomes draining (it keeps its pinned sessions and takes no new ones);
// after Passes consecutive normal (2xx) answers an upstream the probe
// drained is up again. The drain outlives the probe by a grace (see
// prober.Destruct), so that a config reload does not lift it.
//
// The probe never overrides an operator: a state set through the admin
// API (draining, maintenance) stays until an operator changes it, and
// after an operator sets "up" the probe may drain the upstream again if
// it keeps asking. An upstream that does not answer (connection error,
// timeout, other status codes) keeps its state: being down is for
// Caddy's own health checks, and the probe only logs it.
//
// The endpoint should not be Caddy's active health check URI if it
// answers DrainStatus, or Caddy would mark the upstream down (failing its
// sessions over) instead of letting it drain; use DrainHeader with a 200
// in that case.
type Probe struct {
	// Path is the path (and optional query) to GET on each upstream,
	// e.g. /drain-status. Required.
	Path string `json:"path,omitempty"`
	// Interval is the time between two probes of one upstream. Default 2s.
	Interval caddy.Duration `json:"interval,omitempty"`
	// Timeout bounds one probe. Default 1s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Passes is the number of consecutive answers needed to change the
	// state: "drain" answers to drain, normal ones to come back. Default 2.
	Passes int `json:"passes,omitempty"`
	// Fails is the number of consecutive probes without a usable answer
	// after which the upstream is logged as not answering (once per
	// streak); it changes no state. Default 2.
	Fails int `json:"fails,omitempty"`
	// DrainStatus is the response status code that means "drain me".
	// Default 503; -1 disables it (only DrainHeader is then looked at).
	DrainStatus int `json:"drain_status,omitempty"`
	// DrainHeader names a response header whose value "drain" (any case)
	// means "drain me", whatever the status code, e.g. X-Drain. Optional.
	DrainHeader string `json:"drain_header,omitempty"`

	// TLS probes over HTTPS, for upstreams that only speak TLS; the
	// certificate is verified against the dial's host (or TLSServerName)
	// and the system's roots (or TLSTrustedCACerts) unless
	// TLSInsecureSkipVerify. A failed handshake is no answer, like a
	// refused connection: it changes no state and is logged.
	TLS bool `json:"tls,omitempty"`
	// TLSInsecureSkipVerify accepts any certificate (self-signed ones).
	// Needs TLS; not with TLSTrustedCACerts.
	TLSInsecureSkipVerify bool `json:"tls_insecure_skip_verify,omitempty"`
	// TLSServerName is the name sent in SNI and checked against the
	// certificate instead of the dial's host (needed when upstreams are
	// dialled by IP address). Needs TLS.
	TLSServerName string `json:"tls_server_name,omitempty"`
	// TLSTrustedCACerts are PEM files of the CAs that sign the upstreams'
	// certificates, trusted instead of the system's roots (a private CA).
	// Needs TLS; not with TLSInsecureSkipVerify.
	TLSTrustedCACerts []string `json:"tls_trusted_ca_certs,omitempty"`

	// undrainGrace replaces the grace of prober.Destruct; tests only.
	undrainGrace time.Duration
}

// UnmarshalCaddyfile parses a probe from Caddyfile tokens; d is
// positioned on the `probe` token (inside the affinity block). Syntax:
//
//	probe [<path>] {
//		path         <path>
//		interval     <duration>
//		timeout      <duration>
//		passes       <n>
//		fails        <n>
//		drain_status <code>|off
//		drain_header <name>
//		tls
//		tls_insecure_skip_verify
//		tls_server_name <name>
//		tls_trusted_ca_certs <pem_file>...
//	}
//
// The path may be given on the probe line or in the block, not both; the
// block is optional when the path is on the line. The tls_* options need
// tls, and tls_insecure_skip_verify excludes tls_trusted_ca_certs.
// Errors name the file and line (of the option at fault, for a bad
// combination).
func (p *Probe) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		p.Path = d.Val()
		if err := checkProbePath(p.Path); err != nil {
			return d.Errf("probe: %v", err)
		}
		if d.NextArg() {
			return d.Errf("probe: takes at most one argument (the path), got another: %q", d.Val())
		}
	}
	pathOnLine := p.Path != ""
	// seen holds the line of each option given, so that a bad
	// combination found at the end of the block names the line at fault
	// (the options may come in any order).
	seen := make(map[string]int)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] != 0 {
			return d.Errf("probe: %s specified more than once", opt)
		}
		seen[opt] = d.Line()
		args := d.RemainingArgs()
		switch opt {
		case "tls", "tls_insecure_skip_verify":
			if len(args) != 0 {
				return d.Errf("probe: %s takes no value, got %d", opt, len(args))
			}
			if opt == "tls" {
				p.TLS = true
			} else {
				p.TLSInsecureSkipVerify = true
			}
			continue
		case "tls_trusted_ca_certs":
			if len(args) == 0 {
				return d.Errf("probe: %s takes one or more PEM files, got none", opt)
			}
			p.TLSTrustedCACerts = args
			continue
		}
		if len(args) != 1 {
			return d.Errf("probe: %s takes exactly one value, got %d", opt, len(args))
		}
		v := args[0]
		switch opt {
		case "path":
			if pathOnLine {
				return d.Errf("probe: path given twice (on the probe line and in the block)")
			}
			if err := checkProbePath(v); err != nil {
				return d.Errf("probe: %v", err)
			}
			p.Path = v
		case "interval", "timeout":
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("probe: %s: invalid duration %q: %v", opt, v, err)
			}
			if dur <= 0 {
				return d.Errf("probe: %s must be positive, got %q", opt, v)
			}
			if opt == "interval" {
				p.Interval = caddy.Duration(dur)
			} else {
				p.Timeout = caddy.Duration(dur)
			}
		case "passes", "fails":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return d.Errf("probe: %s: %q is not a whole number >= 1", opt, v)
			}
			if opt == "passes" {
				p.Passes = n
			} else {
				p.Fails = n
			}
		case "drain_status":
			if v == "off" {
				p.DrainStatus = -1
				break
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 100 || n > 599 {
				return d.Errf("probe: drain_status: %q is not an HTTP status code (100-599) or off", v)
			}
			p.DrainStatus = n
		case "drain_header":
			if !httpguts.ValidHeaderFieldName(v) {
				return d.Errf("probe: drain_header: %q is not a valid header name", v)
			}
			p.DrainHeader = v
		case "tls_server_name":
			if err := checkServerName(v); err != nil {
				return d.Errf("probe: tls_server_name: %v", err)
			}
			p.TLSServerName = v
		default:
			return d.Errf("probe: unrecognized option %q (want path, interval, timeout, passes, fails, drain_status, drain_header, "+
				"tls, tls_insecure_skip_verify, tls_server_name or tls_trusted_ca_certs)", opt)
		}
	}
	atLine := func(opt, format string, args ...any) error {
		return fmt.Errorf("probe: "+opt+": "+format+", at %s:%d", append(args, d.File(), seen[opt])...)
	}
	for _, opt := range []string{"tls_insecure_skip_verify", "tls_server_name", "tls_trusted_ca_certs"} {
		if seen[opt] != 0 && !p.TLS {
			return atLine(opt, "needs tls in the same probe block (without it the probe speaks plain HTTP)")
		}
	}
	if seen["tls_insecure_skip_verify"] != 0 && seen["tls_trusted_ca_certs"] != 0 {
		return atLine("tls_trusted_ca_certs", "cannot be used with tls_insecure_skip_verify (line %d), which trusts any certificate",
			seen["tls_insecure_skip_verify"])
	}
	if p.Path == "" {
		return d.Errf("probe: path is required (probe /drain-status, or path in the block)")
	}
	if p.DrainStatus == -1 && p.DrainHeader == "" {
		return d.Errf("probe: with drain_status off, drain_header is needed: nothing could signal a drain")
	}
	return nil
}

// Validate checks a probe configuration (from JSON; the Caddyfile parser
// checks as it goes).
func (p *Probe) Validate() error {
	if err := checkProbePath(p.Path); err != nil {
		return fmt.Errorf("probe: %v", err)
	}
	switch {
	case p.Interval < 0:
		return fmt.Errorf("probe: interval must be positive, got %s", time.Duration(p.Interval))
	case p.Timeout < 0:
		return fmt.Errorf("probe: timeout must be positive, got %s", time.Duration(p.Timeout))
	case p.Passes < 0:
		return fmt.Errorf("probe: passes must be >= 1, got %d", p.Passes)
	case p.Fails < 0:
		return fmt.Errorf("probe: fails must be >= 1, got %d", p.Fails)
	case p.DrainStatus != 0 && p.DrainStatus != -1 && (p.DrainStatus < 100 || p.DrainStatus > 599):
		return fmt.Errorf("probe: drain_status %d is not an HTTP status code (100-599), or -1 for off", p.DrainStatus)
	case p.DrainHeader != "" && !httpguts.ValidHeaderFieldName(p.DrainHeader):
		return fmt.Errorf("probe: drain_header %q is not a valid header name", p.DrainHeader)
	case p.DrainStatus == -1 && p.DrainHeader == "":
		return errors.New("probe: with drain_status off (-1), drain_header is needed: nothing could signal a drain")
	case !p.TLS && (p.TLSInsecureSkipVerify || p.TLSServerName != "" || len(p.TLSTrustedCACerts) > 0):
		return errors.New("probe: tls_insecure_skip_verify, tls_server_name and tls_trusted_ca_certs need tls (without it the probe speaks plain HTTP)")
	case p.TLSInsecureSkipVerify && len(p.TLSTrustedCACerts) > 0:
		return errors.New("probe: tls_trusted_ca_certs cannot be used with tls_insecure_skip_verify, which trusts any certificate")
	}
	if p.TLSServerName != "" {
		if err := checkServerName(p.TLSServerName); err != nil {
			return fmt.Errorf("probe: tls_server_name: %v", err)
		}
	}
	// The CA files are read here too, so that a missing or bad file fails
	// the config load instead of every probe.
	if _, err := p.rootCAs(); err != nil {
		return fmt.Errorf("probe: %v", err)
	}
	return nil
}

func checkServerName(s string) error {
	if net.ParseIP(s) != nil {
		return nil // an IP address is checked against the certificate's IP SANs
	}
	if s == "" || strings.ContainsAny(s, " \t\r\n/:{}") {
		return fmt.Errorf("%q is not a host name", s)
	}
	return nil
}

// rootCAs returns the pool of TLSTrustedCACerts, or nil (the system's
// roots) when there are none.
func (p *Probe) rootCAs() (*x509.CertPool, error) {
	if len(p.TLSTrustedCACerts) == 0 {
		return nil, nil
	}
	pool := x509.NewCertPool()
	for _, file := range p.TLSTrustedCACerts {
		pem, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("tls_trusted_ca_certs: %v", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls_trusted_ca_certs: no PEM certificate in %s", file)
		}
	}
	return pool, nil
}

func checkProbePath(s string) error {
	switch {
	case s == "":
		return errors.New("path is required")
	case !strings.HasPrefix(s, "/"):
		return fmt.Errorf("path %q must start with /", s)
	case strings.ContainsAny(s, " \t\r\n#"):
		return fmt.Errorf("path %q must not contain spaces or #", s)
	}
	return nil
}

// withDefaults returns p with defaults filled in.
func (p Probe) withDefaults() Probe {
	if p.Interval <= 0 {
		p.Interval = DefaultProbeInterval
	}
	if p.Timeout <= 0 {
		p.Timeout = DefaultProbeTimeout
	}
	if p.Passes <= 0 {
		p.Passes = DefaultProbePasses
	}
	if p.Fails <= 0 {
		p.Fails = DefaultProbeFails
	}
	if p.DrainStatus == 0 {
		p.DrainStatus = DefaultDrainStatus
	}
	if p.DrainHeader != "" {
		p.DrainHeader = textproto.CanonicalMIMEHeaderKey(p.DrainHeader)
	}
	return p
}

func (p Probe) key() string {
	return fmt.Sprintf("%s|%d|%d|%d|%d|%d|%s|%t|%t|%s|%q", p.Path, p.Interval, p.Timeout,
		p.Passes, p.Fails, p.DrainStatus, p.DrainHeader,
		p.TLS, p.TLSInsecureSkipVerify, p.TLSServerName, p.TLSTrustedCACerts)
}

// grace is how long a drain the probe set outlives the last prober of
// its upstream: a few intervals, and at least minUndrainGrace, so that a
// reload's new prober takes over the drain before it lapses.
func (p Probe) grace() time.Duration {
	if p.undrainGrace > 0 {
		return p.undrainGrace
	}
	return max(3*time.Duration(p.Interval), minUndrainGrace)
}

// Start probes every dial address until stop is called or ctx is done,
// whichever comes first; stop may be called more than once. A dial
// already probed with the same configuration (by another policy, or by
// the previous config during a reload) shares that prober and its
// counts. logger receives the probe's logs (the most recent Start's
// logger is used by a shared prober).
//
// Unix socket dials (unix/...) are probed over the socket; dials Caddy
// cannot parse are logged and skipped. Start does not validate p; call
// Validate at provision time.
func (p *Probe) Start(ctx context.Context, dials []string, logger *zap.Logger) (stop func()) {
	return p.start(ctx, defaultRegistry, dials, logger)
}

func (p *Probe) start(ctx context.Context, reg *registry, dials []string, logger *zap.Logger) func() {
	if logger == nil {
		logger = zap.NewNop()
	}
	cfg := p.withDefaults()
	var held []*prober
	seen := make(map[string]bool)
	for _, dial := range dials {
		if seen[dial] {
			continue
		}
		seen[dial] = true
		pr, err := acquireProber(reg, cfg, dial, logger)
		if err != nil {
			logger.Error("cannot probe upstream", zap.String("upstream", dial), zap.Error(err))
			continue
		}
		held = append(held, pr)
	}
	release := sync.OnceFunc(func() {
		for _, pr := range held {
			releaseProber(pr)
		}
	})
	stopAfter := context.AfterFunc(ctx, release)
	return func() {
		stopAfter()
		release()
	}
}

// probers holds the running probers, one per registry, dial and
// configuration. A dial probed alike by several policies, or by the old
// and the new config during a reload, shares one prober (and its counts);
// the last release stops it.
var probers = caddy.NewUsagePool()

type proberKey struct {
	reg  *registry
	dial string
	cfg  string
}

// prober probes one dial address with one configuration.
type prober struct {
	key    proberKey
	reg    *registry
	up     *Upstream
	cfg    Probe
	url    string
	client *http.Client
	logger atomic.Pointer[zap.Logger]

	cancel context.CancelFunc
	done   chan struct{}

	// counts, read by tests
	answers, drains, failures atomic.Int64
}

// watchKey is one dial address of one registry.
type watchKey struct {
	reg  *registry
	dial string
}

// watchers counts the live probers of each dial address (whatever their
// configuration), and holds the pending undrain of a dial that has none
// (see prober.Destruct). Its own lock, not a probers.Range: Range waits
// for a prober being constructed, and the constructor takes this lock.
var watchers struct {
	mu      sync.Mutex
	n       map[watchKey]int
	pending map[watchKey]*time.Timer
}

func init() {
	watchers.n = make(map[watchKey]int)
	watchers.pending = make(map[watchKey]*time.Timer)
}

// watch counts a new prober of k and cancels the undrain pending for k:
// the new prober takes over the drain the previous one set, and keeps it
// until it gets Passes normal answers itself.
func watch(k watchKey) {
	watchers.mu.Lock()
	defer watchers.mu.Unlock()
	watchers.n[k]++
	if t := watchers.pending[k]; t != nil {
		t.Stop() // if it already fired, it finds itself no longer pending
		delete(watchers.pending, k)
	}
}

// unwatch uncounts a stopped prober of u; if it was the last one and the
// probe had drained u, u is undrained after grace unless a prober for it
// starts in the meantime. A timer, not a goroutine: nothing runs (or
// counts as running) until it fires, and a new prober stops it.
func unwatch(k watchKey, u *Upstream, grace time.Duration) {
	watchers.mu.Lock()
	defer watchers.mu.Unlock()
	if watchers.n[k]--; watchers.n[k] > 0 {
		return
	}
	delete(watchers.n, k)
	if u.State() != Draining || u.setter() != setByProbe {
		return // no drain of the probe's to undo (only a prober could set one)
	}
	if t := watchers.pending[k]; t != nil {
		t.Stop()
	}
	var t *time.Timer
	t = time.AfterFunc(grace, func() {
		watchers.mu.Lock()
		defer watchers.mu.Unlock()
		if watchers.pending[k] != t {
			return // a prober started (and maybe stopped again) since
		}
		delete(watchers.pending, k)
		// Still under the lock, so that no prober starts between the
		// check and the undrain; probeUndrain takes only u.mu.
		k.reg.probeUndrain(u, reasonProbeStopped)
	})
	watchers.pending[k] = t
}

// RunPendingUndrains undoes now the drains that wait for their grace
// (see unwatch), and reports how many there were: the affinity farm,
// which owns the module's background work, calls it when it stops, so
// that no timer outlives it and no upstream stays drained by a probe
// nobody runs any more.
func RunPendingUndrains() int {
	watchers.mu.Lock()
	defer watchers.mu.Unlock()
	n := 0
	for k, t := range watchers.pending {
		if t.Stop() {
			n++
			k.reg.probeUndrain(k.reg.get(k.dial), reasonProbeStopped)
		}
		delete(watchers.pending, k)
	}
	return n
}

// PendingUndrains is how many drains wait for their grace to be undone.
func PendingUndrains() int {
	watchers.mu.Lock()
	defer watchers.mu.Unlock()
	return len(watchers.pending)
}

func acquireProber(reg *registry, cfg Probe, dial string, logger *zap.Logger) (*prober, error) {
	k := proberKey{reg: reg, dial: dial, cfg: cfg.key()}
	v, _, err := probers.LoadOrNew(k, func() (caddy.Destructor, error) {
		pr, err := newProber(reg, cfg, dial)
		if err != nil {
			return nil, err
		}
		watch(watchKey{reg, dial})
		pr.key = k
		pr.logger.Store(logger)
		ctx, cancel := context.WithCancel(context.Background())
		pr.cancel = cancel
		go pr.run(ctx)
		return pr, nil
	})
	if err != nil {
		return nil, err
	}
	pr := v.(*prober)
	pr.logger.Store(logger)
	return pr, nil
}

// releaseProber drops one reference; the last one stops the prober.
func releaseProber(pr *prober) { _, _ = probers.Delete(pr.key) }

// Destruct stops the prober. If no other prober watches the dial, the
// probe's drain is undone (nobody would ever undo it otherwise), but only
// after a grace of a few intervals (Probe.grace) and if no prober for the
// dial started meanwhile: a reload stops the old config's probers before
// the new config's start (at the farm's next look, up to a second
// later), and undoing the drain at once would hand new sessions to an
// upstream that asked for none until the new prober drained it again.
func (pr *prober) Destruct() error {
	pr.cancel()
	<-pr.done
	pr.client.CloseIdleConnections()
	unwatch(watchKey{pr.reg, pr.key.dial}, pr.up, pr.cfg.grace())
	return nil
}

func newProber(reg *registry, cfg Probe, dial string) (*prober, error) {
	na, err := caddy.ParseNetworkAddress(dial)
	if err != nil {
		return nil, fmt.Errorf("parsing dial address: %v", err)
	}
	tr := &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     2*time.Duration(cfg.Interval) + time.Second,
		DisableCompression:  true,
	}
	host := ""
	switch {
	case na.IsUnixNetwork():
		host = "localhost"
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, na.Network, na.Host)
		}
	case !strings.HasPrefix(na.Network, "tcp"):
		return nil, fmt.Errorf("dial address %q: network %s cannot be probed over HTTP", dial, na.Network)
	case na.StartPort == 0:
		return nil, fmt.Errorf("dial address %q has no port", dial)
	case na.PortRangeSize() > 1:
		return nil, fmt.Errorf("dial address %q is a port range", dial)
	case na.Host == "" || strings.ContainsAny(na.Host, " {}/"):
		return nil, fmt.Errorf("dial address %q has no usable host", dial)
	default:
		host = na.JoinHostPort(0)
	}
	scheme := "http"
	if cfg.TLS {
		scheme = "https"
		roots, err := cfg.rootCAs()
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = &tls.Config{
			ServerName:         cfg.TLSServerName, // "": the URL's host
			RootCAs:            roots,
			InsecureSkipVerify: cfg.TLSInsecureSkipVerify, //nolint:gosec // the operator asked for it
			MinVersion:         tls.VersionTLS12,
		}
	}
	probeURL := scheme + "://" + host + cfg.Path
	if _, err := url.Parse(probeURL); err != nil {
		return nil, fmt.Errorf("probe URL for %q: %v", dial, err)
	}
	return &prober{
		reg: reg,
		up:  reg.get(dial),
		cfg: cfg,
		url: probeURL,
		client: &http.Client{
			Transport: tr,
			Timeout:   time.Duration(cfg.Timeout),
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		done: make(chan struct{}),
	}, nil
}

type answer int

const (
	answerNone answer = iota // no usable answer
	answerDrain
	answerNormal
)

func (pr *prober) run(ctx context.Context) {
	defer close(pr.done)
	t := time.NewTicker(time.Duration(pr.cfg.Interval))
	defer t.Stop()
	var drains, normals, fails int
	for {
		a, detail := pr.check(ctx)
		if ctx.Err() != nil {
			return
		}
		log := pr.logger.Load()
		switch a {
		case answerDrain:
			pr.answers.Add(1)
			pr.drains.Add(1)
			drains, normals = drains+1, 0
		case answerNormal:
			pr.answers.Add(1)
			drains, normals = 0, normals+1
		default:
			pr.failures.Add(1)
			drains, normals = 0, 0
			fails++
			if fails == pr.cfg.Fails {
				log.Warn("drain probe gets no usable answer; state unchanged (Caddy's health checks decide whether the upstream is down)",
					zap.String("upstream", pr.up.Dial), zap.String("url", pr.url),
					zap.Int("consecutive_fails", fails), zap.String("last", detail))
			}
		}
		if a != answerNone {
			if fails >= pr.cfg.Fails {
				log.Info("drain probe answered again", zap.String("upstream", pr.up.Dial),
					zap.Int("after_fails", fails))
			}
			fails = 0
		}
		switch {
		case drains >= pr.cfg.Passes:
			pr.reg.probeDrain(pr.up)
		case normals >= pr.cfg.Passes:
			pr.reg.probeUndrain(pr.up, reasonProbe)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// check probes once and classifies the answer.
func (pr *prober) check(ctx context.Context) (answer, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, pr.url, nil)
	if err != nil {
		return answerNone, err.Error()
	}
	req.Header.Set("User-Agent", "caddy-affinity-probe")
	resp, err := pr.client.Do(req)
	if err != nil {
		return answerNone, err.Error()
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if pr.cfg.DrainHeader != "" &&
		strings.EqualFold(strings.TrimSpace(resp.Header.Get(pr.cfg.DrainHeader)), DrainHeaderValue) {
		return answerDrain, ""
	}
	if resp.StatusCode == pr.cfg.DrainStatus {
		return answerDrain, ""
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return answerNormal, ""
	}
	return answerNone, "status " + strconv.Itoa(resp.StatusCode)
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Probe)(nil)
	_ caddy.Destructor      = (*prober)(nil)
)

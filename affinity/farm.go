package affinity

import (
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/healthcheck"
)

// The farm watcher looks at the running config about once a second (from
// the session table's goroutine, and on demand from the admin API) and
// finds every reverse_proxy that uses this policy with its upstreams. The
// selection policy itself only ever sees its upstreams inside Select; the
// watcher is how the rest of the module learns them without a request:
//
//   - every upstream is registered with healthcheck, so the admin API
//     lists it and accepts a drain before the first request;
//   - Caddy's health verdict (Upstream.Healthy) is copied to healthcheck,
//     which the admin API, the status page and metrics read;
//   - an upstream that comes back (recovers, returns to up, or is added by
//     a reload) is marked, which starts its slow_start ramp;
//   - drain probes follow the current set of upstreams.

func init() {
	healthcheck.RegisterDiscoverer(watchFarm)
}

// troubleGap is the longest quiet time between two reports of trouble of
// one incident (see healthcheck.Upstream.NoteTrouble); the watcher looks
// every second.
const troubleGap = 3 * time.Second

// farm holds what the watcher saw last, per dial address.
var farm = struct {
	sync.Mutex
	// placeable is whether each known upstream could take new sessions
	// at the last look.
	placeable map[string]bool
	// looked is false until the first look, so that the upstreams of the
	// config the process starts with are not taken for new ones.
	looked bool
}{placeable: make(map[string]bool)}

// watchFarm looks at the running config once.
func watchFarm() {
	app, err := caddy.ActiveContext().AppIfConfigured("http")
	if err != nil || app == nil {
		return
	}
	httpApp, ok := app.(*caddyhttp.App)
	if !ok {
		return
	}
	now := time.Now()
	farm.Lock()
	defer farm.Unlock()
	for _, srv := range httpApp.Servers {
		walkRoutes(srv.Routes, now)
		if srv.Errors != nil {
			walkRoutes(srv.Errors.Routes, now)
		}
	}
	farm.looked = true
}

func walkRoutes(routes caddyhttp.RouteList, now time.Time) {
	for _, route := range routes {
		for _, h := range route.Handlers {
			switch h := h.(type) {
			case *reverseproxy.Handler:
				if h.LoadBalancing == nil {
					continue
				}
				if p, ok := h.LoadBalancing.SelectionPolicy.(*Policy); ok {
					p.observe(h.Upstreams, now)
				}
			case *caddyhttp.Subroute:
				walkRoutes(h.Routes, now)
				if h.Errors != nil {
					walkRoutes(h.Errors.Routes, now)
				}
			}
		}
	}
}

// observe records what one policy's static upstreams look like now.
// Called with farm locked.
func (p *Policy) observe(ups reverseproxy.UpstreamPool, now time.Time) {
	dials := make([]string, 0, len(ups))
	for _, u := range ups {
		rec := healthcheck.Get(u.Dial)
		healthy := u.Healthy()
		rec.SetHealthy(healthy)
		if !healthy {
			rec.NoteTrouble(now, troubleGap)
		}
		placeable := healthy && rec.State().AcceptsNew()
		was, known := farm.placeable[u.Dial]
		if (known && !was && placeable) || (!known && farm.looked && placeable) {
			rec.MarkBack(now)
		}
		farm.placeable[u.Dial] = placeable
		dials = append(dials, u.Dial)
	}
	p.followProbe(dials)
}

// followProbe (re)starts the drain probe when the policy's set of
// upstreams changed.
func (p *Policy) followProbe(dials []string) {
	if p.Probe == nil {
		return
	}
	key := strings.Join(dials, " ")
	p.probeMu.Lock()
	defer p.probeMu.Unlock()
	if p.probeClosed || key == p.probeDials {
		return
	}
	stop := p.Probe.Start(p.ctx, dials, p.logger)
	if p.probeStop != nil {
		p.probeStop()
	}
	p.probeStop, p.probeDials = stop, key
}

// stopProbe stops the policy's probe for good.
func (p *Policy) stopProbe() {
	p.probeMu.Lock()
	defer p.probeMu.Unlock()
	p.probeClosed = true
	if p.probeStop != nil {
		p.probeStop()
		p.probeStop = nil
	}
}

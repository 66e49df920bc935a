package affinity

import (
	"sort"
	"strconv"
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
	healthcheck.SetSessionCounter(func(id uint32) int64 {
		if st := currentTable(); st != nil {
			return st.liveCount(id)
		}
		return 0
	})
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
	now := time.Now()
	farm.Lock()
	defer farm.Unlock()
	if eachPolicy(func(s policySite) { s.Policy.observe(s.Handler.Upstreams, now) }) {
		farm.looked = true
	}
}

// policySite is one reverse_proxy handler of the running config whose
// selection policy is affinity, and where it sits in the config: what the
// admin endpoints (lookup, status page) need to name it to an operator.
type policySite struct {
	// Server is the HTTP server's name in the config ("srv0" for the
	// first Caddyfile server), Listen its listener addresses.
	Server string
	Listen []string
	// Hosts are the host matchers of the routes that lead to the
	// handler (the Caddyfile's site addresses), if any.
	Hosts []string
	// Path is the handler's place in the config as the admin API's
	// /config/ endpoint spells it, which tells apart several proxies of
	// one site.
	Path    string
	Handler *reverseproxy.Handler
	Policy  *Policy
}

// eachPolicy calls fn for every reverse_proxy handler of the running
// config that uses this policy, servers in name order and routes in
// config order, so that answers are stable. It reports whether there is
// a running http app at all. It only reads the provisioned config, so it
// needs no lock of its own.
func eachPolicy(fn func(policySite)) bool {
	app, err := caddy.ActiveContext().AppIfConfigured("http")
	if err != nil || app == nil {
		return false
	}
	httpApp, ok := app.(*caddyhttp.App)
	if !ok {
		return false
	}
	names := make([]string, 0, len(httpApp.Servers))
	for name := range httpApp.Servers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		srv := httpApp.Servers[name]
		w := routeWalker{server: name, listen: srv.Listen, fn: fn}
		base := "/config/apps/http/servers/" + name
		w.walk(srv.Routes, base+"/routes", nil)
		if srv.Errors != nil {
			w.walk(srv.Errors.Routes, base+"/errors/routes", nil)
		}
	}
	return true
}

// routeWalker walks one server's routes and subroutes.
type routeWalker struct {
	server string
	listen []string
	fn     func(policySite)
}

func (w routeWalker) walk(routes caddyhttp.RouteList, path string, hosts []string) {
	for ri, route := range routes {
		routeHosts := appendHosts(hosts, route.MatcherSets)
		for hi, h := range route.Handlers {
			switch h := h.(type) {
			case *reverseproxy.Handler:
				if h.LoadBalancing == nil {
					continue
				}
				if p, ok := h.LoadBalancing.SelectionPolicy.(*Policy); ok {
					w.fn(policySite{
						Server:  w.server,
						Listen:  w.listen,
						Hosts:   routeHosts,
						Path:    path + "/" + strconv.Itoa(ri) + "/handle/" + strconv.Itoa(hi),
						Handler: h,
						Policy:  p,
					})
				}
			case *caddyhttp.Subroute:
				sub := path + "/" + strconv.Itoa(ri) + "/handle/" + strconv.Itoa(hi)
				w.walk(h.Routes, sub+"/routes", routeHosts)
				if h.Errors != nil {
					w.walk(h.Errors.Routes, sub+"/errors/routes", routeHosts)
				}
			}
		}
	}
}

// appendHosts returns hosts plus the hosts of the route's host matchers.
// The result is a new slice when anything is added, so that sibling
// routes do not share (and overwrite) one backing array.
func appendHosts(hosts []string, sets caddyhttp.MatcherSets) []string {
	var add []string
	for _, set := range sets {
		for _, m := range set {
			switch m := m.(type) {
			case caddyhttp.MatchHost:
				add = append(add, m...)
			case *caddyhttp.MatchHost:
				add = append(add, *m...)
			}
		}
	}
	if len(add) == 0 {
		return hosts
	}
	return append(append(make([]string, 0, len(hosts)+len(add)), hosts...), add...)
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

// noteNewUpstreams starts the slow-start ramp of upstreams that a reload
// added, as soon as the new pool is first used, rather than at the
// watcher's next look (up to a second of full share). The upstreams of
// the config the process starts with are not new.
func noteNewUpstreams(pool reverseproxy.UpstreamPool) {
	now := time.Now()
	farm.Lock()
	defer farm.Unlock()
	if !farm.looked {
		return
	}
	for _, u := range pool {
		if _, known := farm.placeable[u.Dial]; !known {
			rec := healthcheck.Get(u.Dial)
			rec.MarkBack(now)
			farm.placeable[u.Dial] = rec.State().AcceptsNew()
		}
	}
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

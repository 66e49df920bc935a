package affinity

import (
	"net/url"
	"sort"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/intercept"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

// The config walker. The selection policy only ever sees its upstreams
// inside Select; walking the running config is how the rest of the module
// (the farm, the admin API) finds every reverse_proxy that uses the
// policy, with its upstreams, without waiting for a request.

// Site is one reverse_proxy handler of the running config whose selection
// policy is affinity, and where it sits in the config: what the admin
// endpoints need to name it to an operator.
type Site struct {
	// Server is the HTTP server's name in the config ("srv0" for the
	// first Caddyfile server), Listen its listener addresses.
	Server string   `json:"server"`
	Listen []string `json:"listen,omitempty"`
	// Hosts are the host matchers of the routes that lead to the
	// handler (the Caddyfile's site addresses), if any.
	Hosts []string `json:"hosts,omitempty"`
	// Path is the handler's place in the config as the admin API's
	// /config/ endpoint spells it, which tells apart several proxies of
	// one site.
	Path    string                `json:"handler"`
	Handler *reverseproxy.Handler `json:"-"`
	Policy  *Policy               `json:"-"`
}

// Sites returns every reverse_proxy handler of the running config that
// uses this policy, wherever Caddy can hold one: site routes, `route`,
// `handle` and other subroutes, error routes (`handle_errors`), named
// routes (`&(name)`, run by `invoke`), and the response routes of
// `handle_response` in reverse_proxy and intercept, nested at any depth.
// Servers come in name order, routes in config order, named routes in
// name order, so that answers are stable. It only reads the provisioned
// config, so it needs no lock of its own.
func Sites() []Site {
	sites, _ := runningSites()
	return sites
}

// runningSites is Sites, and whether an HTTP app runs at all.
func runningSites() ([]Site, bool) {
	app, err := caddy.ActiveContext().AppIfConfigured("http")
	if err != nil || app == nil {
		return nil, false
	}
	httpApp, ok := app.(*caddyhttp.App)
	if !ok {
		return nil, false
	}
	var sites []Site
	for _, name := range sortedKeys(httpApp.Servers) {
		srv := httpApp.Servers[name]
		w := routeWalker{server: name, listen: srv.Listen, sites: &sites}
		base := "/config/apps/http/servers/" + name
		w.routes(srv.Routes, base+"/routes", nil)
		if srv.Errors != nil {
			w.routes(srv.Errors.Routes, base+"/errors/routes", nil)
		}
		for _, rn := range sortedKeys(srv.NamedRoutes) {
			w.route(srv.NamedRoutes[rn], base+"/named_routes/"+url.PathEscape(rn), nil)
		}
	}
	return sites, true
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// routeWalker walks one server's routes, depth first.
type routeWalker struct {
	server string
	listen []string
	sites  *[]Site
}

func (w routeWalker) routes(routes caddyhttp.RouteList, path string, hosts []string) {
	for i := range routes {
		w.route(&routes[i], path+"/"+strconv.Itoa(i), hosts)
	}
}

func (w routeWalker) route(route *caddyhttp.Route, path string, hosts []string) {
	if route == nil {
		return
	}
	hosts = appendHosts(hosts, route.MatcherSets)
	for i, h := range route.Handlers {
		w.handler(h, path+"/handle/"+strconv.Itoa(i), hosts)
	}
}

func (w routeWalker) handler(h caddyhttp.MiddlewareHandler, path string, hosts []string) {
	switch h := h.(type) {
	case *reverseproxy.Handler:
		if h.LoadBalancing != nil {
			if p, ok := h.LoadBalancing.SelectionPolicy.(*Policy); ok {
				*w.sites = append(*w.sites, Site{Server: w.server, Listen: w.listen, Hosts: hosts, Path: path, Handler: h, Policy: p})
			}
		}
		w.responseRoutes(h.HandleResponse, path, hosts)
	case *caddyhttp.Subroute:
		w.routes(h.Routes, path+"/routes", hosts)
		if h.Errors != nil {
			w.routes(h.Errors.Routes, path+"/errors/routes", hosts)
		}
	case *intercept.Intercept:
		w.responseRoutes(h.HandleResponse, path, hosts)
	}
}

func (w routeWalker) responseRoutes(rhs []caddyhttp.ResponseHandler, path string, hosts []string) {
	for i := range rhs {
		w.routes(rhs[i].Routes, path+"/handle_response/"+strconv.Itoa(i)+"/routes", hosts)
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

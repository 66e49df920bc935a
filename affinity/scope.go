package affinity

import (
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

// The session table is process-wide (a reload hands it to the new config),
// so every policy keeps its entries in a namespace of its own: a key is
// XORed with the policy's scope before the table sees it. Without it, a
// request to one site overwrote another site's entries for the same key
// (the same client IP, or equal cookie values), moving sessions.
//
// The namespace is known at Provision (placeIdentity), so that what other
// instances publish through a shared store applies in the right
// namespace from the first moment, and a shared store keeps every site's
// entries apart: the store's namespace is the site without the
// listeners (the server's name, its hosts and its place among their
// proxies), the same on every instance of one Caddyfile whatever ports
// they listen on, and another for each site of one process.

// seedScope is the hash seed of scopes.
const seedScope = 5

// tableKey returns key in the policy's namespace.
func (p *Policy) tableKey(key uint64) uint64 { return p.sessions.Key(key) }

// namespaces returns the policy's scope in the table and its namespace
// in a shared store, from its Scope option or, failing that, from where
// Provision finds it in the config being loaded (0 and "" when it finds
// nothing: a policy outside any site, as in unit tests).
func (p *Policy) namespaces(ctx caddy.Context) (uint64, string) {
	if p.Scope != "" {
		return scopeHash("scope", p.Scope), "scope-" + strconv.FormatUint(scopeHash("scope", p.Scope), 16)
	}
	pl, ok := placeIdentity(ctx)
	if !ok {
		return 0, ""
	}
	return scopeHash("site", pl.table), "site-" + strconv.FormatUint(scopeHash("site", pl.shared), 16)
}

// resolveScope sets the scope of a policy that Provision could not place,
// once: where it sits in the running config. It looks again at most once
// per tick of the table clock.
func (p *Policy) resolveScope(now uint32) {
	if p.sessions == nil || p.sessions.Scope() != 0 || p.scopeTried.Load() == now || p.scopeTried.Swap(now) == now {
		return
	}
	if p.Scope != "" {
		p.sessions.SetScope(scopeHash("scope", p.Scope))
		return
	}
	if id, ok := siteIdentity(p); ok {
		p.sessions.SetScope(scopeHash("site", id))
	}
}

// siteIdentity names the place of policy p in the running config in a way
// that survives reloads which keep the site: the server's listeners, the
// hosts that lead to the proxy, and its place among the proxies with the
// same listeners and hosts.
func siteIdentity(p *Policy) (string, bool) {
	nth := map[string]int{}
	for _, s := range Sites() {
		id := identity(s.Listen, s.Hosts)
		nth[id]++
		if s.Policy == p {
			return id + "|" + strconv.Itoa(nth[id]), true
		}
	}
	return "", false
}

func identity(listen, hosts []string) string {
	listen = slices.Clone(listen)
	hosts = slices.Clone(hosts)
	slices.Sort(listen)
	slices.Sort(hosts)
	return strings.Join(listen, ",") + "|" + strings.Join(hosts, ",")
}

// place is a policy's place in the config being loaded: table is what
// siteIdentity says once the config runs; shared is the same without the
// listeners, with the server's name instead.
type place struct{ table, shared string }

// placeIdentity finds the policy being provisioned in the config being
// loaded. Caddy provisions a server's routes in order, each route's
// handlers at once when the route comes: the routes before the one being
// provisioned are complete (their proxies are counted as the config
// walker would), the route being provisioned is the first without
// handlers, and the modules between the HTTP app and the policy
// (subroutes, the reverse_proxy) say the way down to it.
func placeIdentity(ctx caddy.Context) (place, bool) {
	mods := ctx.Modules()
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if len(mods) < 2 || srv == nil {
		return place{}, false
	}
	app, ok := mods[0].(*caddyhttp.App)
	if !ok {
		return place{}, false
	}
	name := ""
	for n, s := range app.Servers {
		if s == srv {
			name = n
		}
	}
	var before []Site
	w := routeWalker{listen: srv.Listen, sites: &before}
	routes, hosts := srv.Routes, []string(nil)
	for _, m := range mods[1 : len(mods)-1] {
		i := slices.IndexFunc(routes, func(r caddyhttp.Route) bool { return r.Handlers == nil })
		if i < 0 {
			return place{}, false
		}
		w.routes(routes[:i], "", hosts)
		hosts = appendHosts(hosts, routes[i].MatcherSets)
		switch m := m.(type) {
		case *caddyhttp.Subroute:
			routes = m.Routes
		case *reverseproxy.Handler:
			routes = nil // a proxy within its handle_response: not placed here
		default:
			return place{}, false
		}
	}
	if _, ok := mods[len(mods)-2].(*reverseproxy.Handler); !ok {
		return place{}, false
	}
	id := identity(srv.Listen, hosts)
	nth := 1
	for _, s := range before {
		if identity(s.Listen, s.Hosts) == id {
			nth++
		}
	}
	shared := identity([]string{name}, hosts)
	return place{table: id + "|" + strconv.Itoa(nth), shared: shared + "|" + strconv.Itoa(nth)}, true
}

func scopeHash(kind, name string) uint64 {
	h := hashring.HashStringSeed(kind+"\x00"+name, seedScope)
	if h == 0 {
		h = 1 // zero means "not resolved"
	}
	return h
}

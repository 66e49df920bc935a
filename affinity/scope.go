package affinity

import (
	"slices"
	"strconv"
	"strings"

	"github.com/caddy-affinity/caddy-affinity/hashring"
)

// The session table is process-wide (a reload hands it to the new config),
// so every policy keeps its entries in a namespace of its own: a key is
// XORed with the policy's scope before the table sees it. Without it, a
// request to one site overwrote another site's entries for the same key
// (the same client IP, or equal cookie values), moving sessions.

// seedScope is the hash seed of scopes.
const seedScope = 5

// tableKey returns key in the policy's namespace.
func (p *Policy) tableKey(key uint64) uint64 { return key ^ p.scope.Load() }

// resolveScope sets the policy's scope, once: its Scope option if set,
// else where it sits in the running config. A policy not found there
// keeps the shared namespace (zero) and looks again at most once per tick
// of the table clock: outside a Caddy config (unit tests), or in the
// moment of a reload when Caddy has started the new config's servers but
// not yet made it the active config.
func (p *Policy) resolveScope(now uint32) {
	if p.scope.Load() != 0 || p.scopeTried.Load() == now || p.scopeTried.Swap(now) == now {
		return
	}
	if p.Scope != "" {
		p.scope.Store(scopeHash("scope", p.Scope))
		return
	}
	if id, ok := siteIdentity(p); ok {
		p.scope.Store(scopeHash("site", id))
	}
}

// siteIdentity names the place of policy p in the running config in a way
// that survives reloads which keep the site: the server's listeners, the
// hosts that lead to the proxy, and its place among the proxies with the
// same listeners and hosts.
func siteIdentity(p *Policy) (string, bool) {
	nth := map[string]int{}
	for _, s := range Sites() {
		listen := slices.Clone(s.Listen)
		hosts := slices.Clone(s.Hosts)
		slices.Sort(listen)
		slices.Sort(hosts)
		id := strings.Join(listen, ",") + "|" + strings.Join(hosts, ",")
		nth[id]++
		if s.Policy == p {
			return id + "|" + strconv.Itoa(nth[id]), true
		}
	}
	return "", false
}

func scopeHash(kind, name string) uint64 {
	h := hashring.HashStringSeed(kind+"\x00"+name, seedScope)
	if h == 0 {
		h = 1 // zero means "not resolved"
	}
	return h
}

// Package caddyaffinity registers the caddy-affinity modules with Caddy:
// the `affinity` load-balancing selection policy for reverse_proxy and
// the admin API that drives upstream lifecycle states.
//
// Import it for its side effects, as cmd/caddy does:
//
//	import _ "github.com/caddy-affinity/caddy-affinity"
package caddyaffinity

import (
	// The selection policy http.reverse_proxy.selection_policies.affinity.
	_ "github.com/caddy-affinity/caddy-affinity/affinity"
	// The `caddy affinity` command and its subcommands.
	_ "github.com/caddy-affinity/caddy-affinity/command"
)

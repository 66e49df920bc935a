// Package caddyaffinity registers the caddy-affinity modules with Caddy:
// the `affinity` load-balancing selection policy for reverse_proxy, its
// learner, the admin API and status page, and the `caddy affinity` command.
//
// Import it for its side effects, as cmd/caddy does:
//
//	import _ "github.com/caddy-affinity/caddy-affinity"
package caddyaffinity

import (
	// The selection policy http.reverse_proxy.selection_policies.affinity
	// and the handler http.handlers.affinity_learn.
	_ "github.com/caddy-affinity/caddy-affinity/affinity"
	// The admin API and status page, admin.api.affinity.
	_ "github.com/caddy-affinity/caddy-affinity/adminapi"
	// The `caddy affinity` command and its subcommands.
	_ "github.com/caddy-affinity/caddy-affinity/command"
)

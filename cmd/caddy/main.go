// Command caddy is a Caddy binary with the standard modules plus
// caddy-affinity. It is what xcaddy would build, made with plain
// `go build` so that it works offline (see caddy-build.sh).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-affinity/caddy-affinity"
)

func main() {
	caddycmd.Main()
}

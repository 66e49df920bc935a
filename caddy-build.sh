#!/usr/bin/env bash
# Builds a Caddy binary with the caddy-affinity module to ./caddy.
#
# Uses xcaddy when it is on PATH; otherwise `go build` of cmd/caddy, which
# is the same thing (caddycmd.Main + the standard modules + this module)
# with xcaddy's flags (-trimpath, stripped: -ldflags "-s -w") and needs
# nothing but Go and the module proxy. Users who build with xcaddy:
#   xcaddy build --with github.com/caddy-affinity/caddy-affinity
set -euo pipefail
cd "$(dirname "$0")"
out="${CADDY_OUT:-./caddy}"
if command -v xcaddy >/dev/null 2>&1 && [ -z "${AFFINITY_NO_XCADDY:-}" ]; then
	xcaddy build --output "$out" --with "github.com/caddy-affinity/caddy-affinity=$(pwd)"
else
	go build -trimpath -ldflags "-s -w" -o "$out" ./cmd/caddy
fi
size=$(wc -c <"$out")
echo "built $out: $((size / 1024 / 1024)) MiB ($size bytes), $("$out" version)"

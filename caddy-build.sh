#!/usr/bin/env bash
# Builds a Caddy binary with the caddy-affinity module to ./caddy.
#
# Uses xcaddy when it is on PATH; otherwise `go build` of cmd/caddy, which
# is the same thing (caddycmd.Main + the standard modules + this module)
# and needs nothing but Go and the module proxy.
set -euo pipefail
cd "$(dirname "$0")"
out="${CADDY_OUT:-./caddy}"
if command -v xcaddy >/dev/null 2>&1 && [ -z "${AFFINITY_NO_XCADDY:-}" ]; then
	xcaddy build --output "$out" --with "github.com/caddy-affinity/caddy-affinity=$(pwd)"
else
	go build -trimpath -o "$out" ./cmd/caddy
fi
echo "built $out: $("$out" version)"

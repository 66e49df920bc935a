#!/usr/bin/env bash
# The test command (README): formatting, vet, every test with the race
# detector (unit, fuzz seed corpora, integration against a real Caddy and
# real in-memory-session backends), and the binary build.
set -euo pipefail
cd "$(dirname "$0")"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi
go vet ./...
# go test shows a passing package's output only with -v, so the browser
# test's skip would go unseen: say it here.
if [ -z "${AFFINITY_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 &&
	! command -v google-chrome >/dev/null 2>&1 && ! command -v google-chrome-stable >/dev/null 2>&1 && ! command -v headless-shell >/dev/null 2>&1; then
	echo "!!! no Chromium: TestStatusPageInBrowser (tests/browser_test.go) will be SKIPPED." >&2
	echo "!!! Install it to test the status page in a browser (Debian: apt-get install -y --no-install-recommends chromium)." >&2
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
	echo "!!! no node/npm: TestSocketIOLongPolling (tests/socketio_test.go) will be SKIPPED." >&2
	echo "!!! Install Node.js 18+ and npm to test the Socket.IO recipe (Debian: apt-get install -y nodejs npm)." >&2
fi
# The Prometheus alert rules (alerts/): syntax, then their unit tests.
if command -v promtool >/dev/null 2>&1; then
	promtool check rules alerts/*.rules.yml
	promtool test rules alerts/*.test.yml
else
	echo "!!! no promtool: the alert rules in alerts/ are NOT checked or tested." >&2
	echo "!!! Install it to check them (Debian: apt-get install -y --no-install-recommends prometheus; .ci/run does)." >&2
fi
if ! command -v mono >/dev/null 2>&1 || ! command -v mcs >/dev/null 2>&1; then
	echo "!!! no Mono: TestMonoCookielessSessions (tests/mono_test.go) will be SKIPPED." >&2
	echo "!!! Install it to test cookieless sessions against Mono's System.Web (Debian: apt-get install -y --no-install-recommends mono-runtime mono-mcs libmono-system-web4.0-cil)." >&2
fi
if ! command -v redis-server >/dev/null 2>&1; then
	echo "!!! no redis-server: the store redis tests (affinity/store_redis_test.go, tests/store_redis_test.go) will be SKIPPED." >&2
	echo "!!! Install it to test the shared session store (Debian: apt-get install -y --no-install-recommends redis-server; .ci/run does)." >&2
fi
go test -race -count=1 -timeout 15m ./...
./caddy-build.sh

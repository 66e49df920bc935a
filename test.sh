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
go test -race -count=1 -timeout 15m ./...
./caddy-build.sh

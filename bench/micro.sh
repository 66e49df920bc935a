#!/usr/bin/env bash
# Micro benchmarks of ./affinity and ./hashring, summarised by benchstat
# and checked against the goals of BENCHMARKS.md. Not part of CI.
#
#   bash bench/micro.sh                      # 6 passes, every benchmark
#   MICRO_PASSES=1 MICRO_BENCHTIME=100ms bash bench/micro.sh   # smoke run
#
# It is `go test -run '^$' -bench . -benchmem -count 6 ./affinity/
# ./hashring/`, except that the 6 samples of each benchmark are taken in
# 6 passes over all of them (-count 1 each) rather than 6 in a row: on a
# shared machine, the two sides of every ratio then ran under the same
# load. (6, not 5: benchstat gives no confidence interval below 6
# samples.) The test binaries are built once, so that the passes all
# measure the same code.
#
# Settings (environment): MICRO_PASSES=6 MICRO_BENCHTIME=1s
# MICRO_BENCH=. (the -bench pattern) MICRO_OUT=bench/out/micro-<time>
# BENCHSTAT=golang.org/x/perf/cmd/benchstat@latest
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
passes=${MICRO_PASSES:-6}
benchtime=${MICRO_BENCHTIME:-1s}
pattern=${MICRO_BENCH:-.}
out=${MICRO_OUT:-$root/bench/out/micro-$(date -u +%Y%m%dT%H%M%SZ)}
benchstat=${BENCHSTAT:-golang.org/x/perf/cmd/benchstat@latest}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/affinity-micro.XXXXXX")
trap 'rm -rf "$work"' EXIT

pkgs=(affinity affinity/sessions hashring)
for p in "${pkgs[@]}"; do
	go test -c -o "$work/${p//\//-}.test" "./$p/"
done

{
	echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "machine: $(nproc) cores, $(uname -sr), $(go version | cut -d' ' -f3-)"
	echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "command: per pass, for each package: go test -run '^\$' -bench '$pattern' -benchmem -count 1 -benchtime $benchtime ./<pkg>/ ($passes passes)"
} | tee "$out/env.txt"

: >"$out/micro.txt"
for pass in $(seq "$passes"); do
	echo "== pass $pass/$passes"
	for p in "${pkgs[@]}"; do
		# A failing benchmark fails its package's binary after the others
		# ran: report it and go on.
		if ! (cd "$p" && "$work/${p//\//-}.test" -test.run '^$' -test.bench "$pattern" -test.benchmem \
			-test.count 1 -test.benchtime "$benchtime" -test.timeout 30m) >"$work/pass.txt" 2>&1; then
			echo "warning: $p pass $pass failed:" >&2
			grep -A3 -- '--- FAIL' "$work/pass.txt" >&2 || tail -5 "$work/pass.txt" >&2
		fi
		cat "$work/pass.txt" >>"$out/micro.txt"
		echo "$p: $(grep -c '^Benchmark' "$work/pass.txt" || true) results"
	done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/env.txt"

# The table's bound under a flood of random keys is a test, not a
# benchmark: run it too, so that the report says whether it holds.
if (cd affinity/sessions && "$work/affinity-sessions.test" -test.run '^TestTableIsBoundedUnderRandomKeyFlood$' -test.v -test.count 1) >"$out/flood.txt" 2>&1; then
	echo "flood test: PASS (TestTableIsBoundedUnderRandomKeyFlood)" | tee -a "$out/env.txt"
else
	echo "flood test: FAIL (TestTableIsBoundedUnderRandomKeyFlood), see $out/flood.txt" | tee -a "$out/env.txt"
fi

go run "$benchstat" "$out/micro.txt" >"$out/benchstat.txt"
go run ./bench/benchcheck "$out/micro.txt" | tee "$out/goals.md"
echo
echo "results in $out (micro.txt, benchstat.txt, goals.md)"

#!/usr/bin/env bash
# End-to-end benchmark: Caddy's reverse_proxy with lb_policy round_robin,
# cookie, client_ip_hash and affinity in front of in-memory-session
# upstreams, loaded by wrk with clients that keep their cookies. Loopback
# only; every load is bounded in time (wrk -d, under `timeout`) and in
# count (E2E_MAX_REQUESTS per measurement). Not part of CI.
#
#   bash bench/e2e.sh                  # 8 rounds x 5 s, N = 16 and 3 (~8 min)
#   E2E_SHORT=1 bash bench/e2e.sh      # 1 round x 3 s, a smoke run
#   bash bench/e2e.sh --report bench/out/e2e-<time>   # redo a run's report
#
# Each (N, policy) has its own Caddy process, started once. The policies
# are measured interleaved in many short rounds, A B C D, B C D A,
# C D A B, ... (rotated by one each round, so that no policy always goes
# first), each measurement after a short warm-up (a new wrk run, so new
# sessions), so that a neighbour's load on a shared machine falls on all
# of them alike; every figure is reported as a ratio to round_robin's
# measurement in the same round. Besides req/s and latency, the report
# gives Caddy's own CPU time per request (from /proc), a second view of
# what each policy costs.
#
# Settings (environment):
#   E2E_ROUNDS=8 E2E_DURATION=5 (seconds) E2E_WARMUP=1 (seconds)
#   E2E_SIZES="16 3"   upstream counts
#   E2E_POLICIES="round_robin cookie client_ip_hash affinity"
#   E2E_THREADS=2 E2E_CONNECTIONS=64   wrk threads and connections
#   E2E_SLOTS=250      sessions (cookie jars) per wrk thread
#   E2E_MAX_REQUESTS=5000000   bound on the requests of one measurement
#   E2E_OUT=bench/out/e2e-<time>   where results and logs go
#   CADDY=<path>       use this binary instead of building ./caddy
#   E2E_BASE=round_robin   the policy every ratio of the report is to
#
# The session stores, side by side (BENCHMARKS.md, "store redis"):
#   E2E_POLICIES="affinity_local affinity_redis" E2E_BASE=affinity_local \
#     E2E_SIZES=16 E2E_ROUNDS=8 E2E_DURATION=4 bash bench/e2e.sh
# affinity_local and affinity_redis are affinity with `store local` and
# `store redis` (a redis-server the script starts on a free loopback
# port, without persistence, stopped on exit); the Redis commands of each
# affinity_redis measurement go to OUT/redis.tsv, per new session.
#
# Needs Go and wrk; wrk is installed with apt-get when missing (as root,
# or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ -n "${E2E_SHORT:-}" ]; then
	: "${E2E_ROUNDS:=1}" "${E2E_DURATION:=3}" "${E2E_WARMUP:=1}"
fi
rounds=${E2E_ROUNDS:-8}
duration=${E2E_DURATION:-5}
warmup=${E2E_WARMUP:-1}
sizes=${E2E_SIZES:-16 3}
policies=${E2E_POLICIES:-round_robin cookie client_ip_hash affinity}
threads=${E2E_THREADS:-2}
connections=${E2E_CONNECTIONS:-64}
slots=${E2E_SLOTS:-250}
max_requests=${E2E_MAX_REQUESTS:-5000000}
out=${E2E_OUT:-$root/bench/out/e2e-$(date -u +%Y%m%dT%H%M%SZ)}

if [ $((slots * threads)) -lt $((2 * connections)) ]; then
	echo "E2E_SLOTS x E2E_THREADS must be at least twice E2E_CONNECTIONS (a session has one request in flight)" >&2
	exit 2
fi

# analyze OUT: the share of each policy's Select in Caddy's CPU, from the
# profiles of all rounds merged per (N, policy): the cum% of its Select
# function in `pprof -top -cum`. Writes OUT/select.tsv.
select_fn() {
	case $1 in
	round_robin) echo 'reverseproxy.\(\*RoundRobinSelection\).Select$' ;;
	cookie) echo 'reverseproxy.CookieHashSelection.Select$' ;;
	client_ip_hash) echo 'reverseproxy.ClientIPHashSelection.Select$' ;;
	random) echo 'reverseproxy.RandomSelection.Select$' ;;
	first) echo 'reverseproxy.FirstSelection.Select$' ;;
	affinity | affinity_local | affinity_redis) echo 'affinity.\(\*Policy\).Select$' ;;
	*) echo '^$' ;;
	esac
}
analyze() {
	local dir=$1 n policy total line cum cumpct
	echo "# N policy select_pct select_s total_s" >"$dir/select.tsv"
	for n in $(awk '!/^#/ { print $2 }' "$dir/results.tsv" | sort -rnu); do
		for policy in $(awk '!/^#/ { print $3 }' "$dir/results.tsv" | awk '!seen[$0]++'); do
			shopt -s nullglob
			local profs=("$dir/prof/n$n-$policy".r*.pprof)
			shopt -u nullglob
			[ ${#profs[@]} -gt 0 ] || continue
			# Go CPU profiles carry their symbols: no binary needed.
			go tool pprof -top -cum -unit=s -nodefraction=0 -nodecount=1000000 "${profs[@]}" \
				>"$dir/prof/n$n-$policy.top.txt" 2>/dev/null || true
			total=$(sed -n 's/.*Total samples = \([0-9.]*\)s.*/\1/p' "$dir/prof/n$n-$policy.top.txt" | head -1)
			line=$(grep -E "$(select_fn "$policy")" "$dir/prof/n$n-$policy.top.txt" | head -1 || true)
			if [ -n "$line" ]; then
				# flat flat% sum% cum cum% name
				read -r _ _ _ cum cumpct _ <<<"$line"
				echo "$n $policy ${cumpct%\%} ${cum%s} ${total:-0}" >>"$dir/select.tsv"
			else
				# In no sample (or inlined into its caller).
				echo "$n $policy 0 0 ${total:-0}" >>"$dir/select.tsv"
			fi
		done
	done
}

# bash bench/e2e.sh --report OUT: the report of an earlier run, again.
if [ "${1:-}" = "--report" ]; then
	e2e=$(mktemp "${TMPDIR:-/tmp}/affinity-e2e-report.XXXXXX")
	trap 'rm -f "$e2e"' EXIT
	go build -o "$e2e" ./bench/e2e
	analyze "$2"
	"$e2e" report "$2/results.tsv" "$2/select.tsv" | tee "$2/report.md"
	exit 0
fi

# --- tools -------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
	echo "== installing wrk"
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	$sudo apt-get update
	$sudo apt-get install -y -o DPkg::Lock::Timeout=300 wrk
fi

mkdir -p "$out/prof"
work=$(mktemp -d "${TMPDIR:-/tmp}/affinity-e2e.XXXXXX")
pids=()
cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -9 "$pid" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${CADDY:-}" ]; then
	cp "$CADDY" "$work/caddy"
else
	echo "== building ./caddy"
	./caddy-build.sh
	# A private copy: a rebuild of ./caddy during the run changes nothing.
	cp ./caddy "$work/caddy"
fi
go build -o "$work/e2e" ./bench/e2e
e2e=$work/e2e

# --- upstreams ---------------------------------------------------------
maxn=0
for n in $sizes; do
	[ "$n" -gt "$maxn" ] && maxn=$n
done
"$work/e2e" serve -n "$maxn" -addrs "$work/addrs" -lifetime 3h >"$out/upstreams.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
	[ -s "$work/addrs" ] && break
	sleep 0.1
done
read -r -a upstreams <"$work/addrs"
echo "== $maxn upstreams: ${upstreams[*]}"

# --- Redis, for affinity_redis ------------------------------------------
redis_port=""
if [[ " $policies " == *" affinity_redis "* ]]; then
	command -v redis-server >/dev/null 2>&1 || {
		echo "affinity_redis needs redis-server (apt-get install redis-server)" >&2
		exit 2
	}
	redis_port=$("$work/e2e" freeport)
	redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
		>"$out/redis.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do
		redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
		sleep 0.1
	done
	echo "== redis-server on 127.0.0.1:$redis_port ($(redis-server --version | cut -d' ' -f3))"
	echo "# round N commands new_sessions commands_per_session" >"$out/redis.tsv"
fi

# redis_commands: the commands Redis ran so far, from INFO commandstats,
# less those of the client itself (info) and of connection set-up.
redis_commands() {
	redis-cli -p "$redis_port" info commandstats | tr -d '\r' | awk -F'[:=,]' '
		/^cmdstat_/ && $1 !~ /^cmdstat_(info|ping|hello|client|command|select|auth)$/ { n += $3 }
		END { print n + 0 }'
}

# --- Caddy and one measurement -----------------------------------------
caddyfile() { # policy n port admin_port
	local policy=$1 n=$2 port=$3 admin=$4 lb
	case $policy in
	round_robin) lb="lb_policy round_robin" ;;
	cookie) lb="lb_policy cookie lb bench-secret" ;;
	client_ip_hash) lb="lb_policy client_ip_hash" ;;
	# Controls, not in the default list: random spreads like round_robin
	# but without its order; first sends everything to one upstream.
	random) lb="lb_policy random" ;;
	first) lb="lb_policy first" ;;
	affinity | affinity_local | affinity_redis)
		# As in Caddyfile.example: the app's cookie, then the client IP.
		local store=""
		case $policy in
		affinity_local) store="store local" ;;
		affinity_redis) store="store redis 127.0.0.1:$redis_port" ;;
		esac
		lb="lb_policy affinity {
			key cookie sid
			key client_ip
			secret bench-secret
			$store
		}"
		;;
	*)
		echo "unknown policy $policy" >&2
		return 1
		;;
	esac
	cat <<EOF
{
	# On loopback, for /debug/pprof only.
	admin 127.0.0.1:$admin
	auto_https off
	persist_config off
	storage file_system $work/storage
	grace_period 1s
	log {
		output discard
	}
	servers {
		trusted_proxies static 127.0.0.0/8
		client_ip_headers X-Forwarded-For
	}
}

http://127.0.0.1:$port {
	bind 127.0.0.1
	reverse_proxy ${upstreams[*]:0:$n} {
		$lb
	}
}
EOF
}

# cpu_ticks PID: user+system CPU time of a process so far, in clock ticks.
cpu_ticks() {
	awk '{ print $14 + $15 }' "/proc/$1/stat"
}

run_wrk() { # seconds url max_requests
	timeout $(($1 + 30)) wrk -t "$threads" -c "$connections" -d "${1}s" --timeout 5s \
		-s "$root/bench/e2e/session.lua" "$2" -- "$slots" "$3" "$threads"
}

results=$out/results.tsv
echo "# round N policy rps p50_us p99_us requests errors kept broken caddy_cpu_us_per_request" >"$results"
clk_tck=$(getconf CLK_TCK)

declare -A caddy_port caddy_pid caddy_admin

start_caddy() { # policy n
	local policy=$1 n=$2 port admin name
	port=$("$work/e2e" freeport)
	admin=$("$work/e2e" freeport)
	name="n$n-$policy"
	caddyfile "$policy" "$n" "$port" "$admin" >"$work/$name.Caddyfile"
	cp "$work/$name.Caddyfile" "$out/$name.Caddyfile"
	"$work/caddy" run --config "$work/$name.Caddyfile" --adapter caddyfile >"$out/$name.caddy.log" 2>&1 &
	pids+=($!)
	caddy_pid[$name]=$!
	caddy_port[$name]=$port
	caddy_admin[$name]=$admin
	if ! "$work/e2e" wait -url "http://127.0.0.1:$port/" -timeout 30s; then
		cat "$out/$name.caddy.log" >&2
		return 1
	fi
}

measure() { # round policy n
	local round=$1 policy=$2 n=$3 name cpid url line cpu0 cpu1 ppid
	name="n$n-$policy"
	cpid=${caddy_pid[$name]}
	url="http://127.0.0.1:${caddy_port[$name]}/"
	# A CPU profile of Caddy while wrk runs, for the share of Select.
	local prof="http://127.0.0.1:${caddy_admin[$name]}/debug/pprof/profile?seconds=$duration"
	name="r$round-$name"
	run_wrk "$warmup" "$url" "$max_requests" >"$out/$name.warmup.txt"
	local cmds0=0
	[ "$policy" != affinity_redis ] || cmds0=$(redis_commands)
	cpu0=$(cpu_ticks "$cpid")
	"$work/e2e" fetch -url "$prof" -out "$out/prof/n$n-$policy.r$round.pprof" &
	ppid=$!
	pids+=("$ppid")
	run_wrk "$duration" "$url" "$max_requests" >"$out/$name.wrk.txt"
	cpu1=$(cpu_ticks "$cpid")
	wait "$ppid" || echo "warning: no CPU profile for $name" >&2
	if ! line=$(grep '^E2E ' "$out/$name.wrk.txt"); then
		echo "no result from wrk for $name:" >&2
		cat "$out/$name.wrk.txt" >&2
		return 1
	fi
	# E2E requests=.. duration_us=.. rps=.. p50_us=.. p99_us=.. errors=.. kept=.. broken=.. new=.. cookies_set=..
	local -A f
	for kv in ${line#E2E }; do
		f[${kv%%=*}]=${kv#*=}
	done
	if [ "${f[requests]}" -ge "$max_requests" ]; then
		echo "warning: $name hit E2E_MAX_REQUESTS; its req/s is meaningless" >&2
	fi
	# Caddy's CPU time per request, in microseconds: less disturbed by
	# other load on the machine than req/s.
	local cpu
	cpu=$(awk -v t=$((cpu1 - cpu0)) -v hz="$clk_tck" -v r="${f[requests]}" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
	if [ "$policy" = affinity_redis ]; then
		# Redis commands per session: those of the measurement (its
		# sessions are new: a new wrk run) over its new sessions.
		local cmds=$(($(redis_commands) - cmds0))
		awk -v r="$round" -v n="$n" -v c="$cmds" -v s="${f[new]}" 'BEGIN {
			printf "%s %s %d %d %.2f\n", r, n, c, s, (s > 0 ? c / s : 0) }' >>"$out/redis.tsv"
	fi
	echo "$round $n $policy ${f[rps]} ${f[p50_us]} ${f[p99_us]} ${f[requests]} ${f[errors]} ${f[kept]} ${f[broken]} $cpu" >>"$results"
	awk -v r="r$round" -v n="$n" -v p="$policy" -v rps="${f[rps]}" -v p50="${f[p50_us]}" -v p99="${f[p99_us]}" \
		-v k="${f[kept]}" -v b="${f[broken]}" -v e="${f[errors]}" -v c="$cpu" 'BEGIN {
		printf "%-4s N=%-3s %-15s %7.0f req/s  p50 %6.2f ms  p99 %6.2f ms  caddy %6.1f µs CPU/req  kept %s broken %s errors %s\n",
			r, n, p, rps, p50 / 1000, p99 / 1000, c, k, b, e }'
}

{
	echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "machine: $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "caddy: $("$work/caddy" version)"
	echo "wrk: $(wrk -v 2>&1 | head -1)"
	[ -z "$redis_port" ] || echo "redis: $(redis-server --version)"
	echo "settings: rounds=$rounds duration=${duration}s warmup=${warmup}s sizes=($sizes) threads=$threads connections=$connections sessions=$((slots * threads))"
} | tee "$out/env.txt"

# One Caddy per (N, policy), all started before the first measurement and
# idle while the others are measured.
for n in $sizes; do
	for policy in $policies; do
		start_caddy "$policy" "$n"
	done
done
echo "== $(( ${#caddy_pid[@]} )) Caddy processes ready"

# Round r starts at the r-th policy (A B C D, B C D A, C D A B, ...), so
# that no policy always runs first or last in its round: a load on the
# machine that grows or shrinks within rounds then favours none of them.
read -r -a plist <<<"$policies"
for round in $(seq "$rounds"); do
	for n in $sizes; do
		for i in $(seq 0 $((${#plist[@]} - 1))); do
			measure "$round" "${plist[$(((round - 1 + i) % ${#plist[@]}))]}" "$n"
		done
	done
done

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/env.txt"

analyze "$out"
echo
"$e2e" report "$out/results.tsv" "$out/select.tsv" | tee "$out/report.md"
if [ -n "$redis_port" ]; then
	# Every command of the run by name (warm-ups and the farm's reads
	# of the cluster's counts, every second, included).
	redis-cli -p "$redis_port" info commandstats | tr -d '\r' >"$out/redis-commandstats.txt"
	echo
	awk '!/^#/ { c += $3; s += $4; printf "round %s N=%s: %d Redis commands for %d new sessions: %.2f per session\n", $1, $2, $3, $4, $5 }
		END { if (s > 0) printf "all rounds: %.2f Redis commands per session\n", c / s }' "$out/redis.tsv" | tee -a "$out/report.md"
fi
echo
echo "results in $out"

#!/usr/bin/env bash
# Side-by-side benchmark: a 3-member real etcd 3.4 and a 3-member Meridian, on 127.0.0.1, both driven
# by etcd's own benchmark tool (etcd/tools/benchmark) with the same command line.
#
#   bench/bench.sh                        # both servers, default totals (run as root the first time)
#   BENCH_TARGETS=etcd bench/bench.sh     # the reference only
#   BENCH_PUT_TOTAL_1=200 BENCH_PUT_TOTAL=2000 BENCH_RANGE_TOTAL=2000 bench/bench.sh   # quick run
#
# Environment (all optional):
#   BENCH_TARGETS      servers to measure, in order                  (default "etcd meridian")
#   BENCH_PUT_TOTAL_1  --total for put with 1 client                 (default 2000)
#   BENCH_PUT_TOTAL    --total for put with 16, 64 and 256 clients   (default 20000)
#   BENCH_RANGE_TOTAL  --total for each range and lease-keepalive workload (default 20000)
#   BENCH_WATCH_PUTS   puts driving the watch workloads              (default 2000)
#   BENCH_KEY_SPACE    --key-space-size for put: distinct keys       (default 100000)
#   BENCH_TOOL         a prebuilt etcd benchmark binary              (default target/etcd-benchmark/benchmark)
#   MERIDIAN_BIN       a prebuilt meridian binary; unset: this script runs `cargo build --release`
#
# CPU: the members' user + system time (from /proc, all three together) per 1,000 requests, beside
# throughput: on a shared machine it moves less than req/s does.
# Output: a markdown table on stdout (also target/bench/results.md); every raw benchmark output in
# target/bench/<server>-<workload>.txt and every server log in target/bench/<server>-m<i>.log.
#
# How the benchmark tool is built: Debian bookworm's golang-etcd-server-dev carries etcd 3.4.23 and every
# library tools/benchmark imports, but not tools/ itself; that source comes from Debian's source package
# (`apt-get source etcd`, which needs a deb-src entry). It is compiled in GOPATH mode, offline.
#
# Connections: --conns is clients/8 (at least 1) against all three members, so 256 clients share 32 gRPC
# connections, as in etcd's published benchmarks. Put writes random keys from a space of BENCH_KEY_SPACE.
# Servers run one after the other, never at the same time, so they do not compete for the CPUs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/bench
BENCH_TOOL=${BENCH_TOOL:-$TARGET_DIR/etcd-benchmark/benchmark}
TARGETS=${BENCH_TARGETS:-etcd meridian}
PUT_TOTAL_1=${BENCH_PUT_TOTAL_1:-2000}
PUT_TOTAL=${BENCH_PUT_TOTAL:-20000}
RANGE_TOTAL=${BENCH_RANGE_TOTAL:-20000}
WATCH_PUTS=${BENCH_WATCH_PUTS:-2000}
KEY_SPACE=${BENCH_KEY_SPACE:-100000}
KEY_SIZE=8
VAL_SIZE=256
MEMBERS=3
READY_TIMEOUT_S=30
RANGE_KEY=bench-range-key
# Workloads in table order: name, then the benchmark arguments after the global flags.
WORKLOADS=(put-c1 put-c16 put-c64 put-c256 range-l-c64 range-s-c64 watch-events watch-latency lease-keepalive-c64)

export DEBIAN_FRONTEND=noninteractive ETCDCTL_API=3

PIDS=()   # every server process this script started
TMP=$(mktemp -d "${TMPDIR:-/tmp}/meridian-bench.XXXXXX")

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Stops the processes this script started, by PID: SIGTERM, up to 10 s, then SIGKILL.
stop_pids() {
  local pid i
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$?
  if [ ${#PIDS[@]} -gt 0 ]; then stop_pids "${PIDS[@]}"; fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Installs the Debian packages that are missing; needs root only when something is missing.
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}: run as root or apt-get install them"
  log "apt-get install ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Builds etcd 3.4's tools/benchmark into $BENCH_TOOL unless it is already there.
build_benchmark() {
  [ -x "$BENCH_TOOL" ] && return 0
  log "building etcd's benchmark tool into $BENCH_TOOL"
  apt_install golang-go golang-etcd-server-dev dpkg-dev
  if ! grep -rqsE '^(Types: *deb-src|deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    [ "$(id -u)" -eq 0 ] || die "no deb-src entry for apt-get source: run as root once"
    printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
      > /etc/apt/sources.list.d/debian-src.sources
    apt-get update -qq -o Dir::Etc::sourcelist=/etc/apt/sources.list.d/debian-src.sources \
      -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >/dev/null
  fi
  local work=$TMP/benchmark-build src
  mkdir -p "$work"
  (cd "$work" && apt-get source --download-only -qq etcd >/dev/null && tar xzf etcd_3.4.*.orig.tar.gz)
  src=$(ls -d "$work"/etcd-3.4.*/ | head -1)
  mkdir -p "$work/gopath/src/go.etcd.io/etcd/tools" "$(dirname "$BENCH_TOOL")"
  cp -r "$src/tools/benchmark" "$work/gopath/src/go.etcd.io/etcd/tools/"
  (
    export GO111MODULE=off GOFLAGS= GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache"
    cd "$work/gopath/src/go.etcd.io/etcd/tools/benchmark" && go build -o "$BENCH_TOOL" .
  )
}

# Sets MERIDIAN_BIN, building the release binary when it is not given.
build_meridian() {
  if [ -z "${MERIDIAN_BIN:-}" ]; then
    log "cargo build --release --bin meridian"
    (cd "$ROOT" && cargo build --release --quiet --bin meridian)
    MERIDIAN_BIN=$TARGET_DIR/release/meridian
  fi
  [ -x "$MERIDIAN_BIN" ] || die "meridian binary $MERIDIAN_BIN is missing"
}

# Sets PORT to a free 127.0.0.1 port from 12000-14999 (below the kernel's ephemeral range, apart from
# the test harness's 15000-31999), never one this script handed out before. Not called in $(...):
# it must update the globals.
NEXT_PORT=$((12000 + ($$ * 7) % 2500))
USED_PORTS=" "
alloc_port() {
  local i port
  for ((i = 0; i < 3000; i++)); do
    port=$NEXT_PORT
    NEXT_PORT=$((12000 + (NEXT_PORT - 12000 + 1) % 3000))
    case $USED_PORTS in *" $port "*) continue ;; esac
    # A refused connection means nothing listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      USED_PORTS+="$port "
      PORT=$port
      return 0
    fi
  done
  die "no free port in 12000-14999"
}

# Succeeds when GET /health on 127.0.0.1:$1 answers 200 with a body containing "true".
healthy() {
  local resp
  resp=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET /health HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n" "$1" >&3
    cat <&3' _ "$1" 2>/dev/null) || return 1
  [[ $resp == "HTTP/1."?" 200"* && $resp == *true* ]]
}

# start_cluster SERVER CMD...: starts $MEMBERS members of CMD with etcd's flags, waits for every
# /health, and sets ENDPOINTS (comma-separated host:port) and CLUSTER_PIDS.
start_cluster() {
  local server=$1; shift
  local i cports=() pports=() initial="" deadline
  for ((i = 1; i <= MEMBERS; i++)); do
    alloc_port; cports+=("$PORT")
    alloc_port; pports+=("$PORT")
    initial+="${initial:+,}m$i=http://127.0.0.1:${pports[i-1]}"
  done
  CLUSTER_PIDS=()
  ENDPOINTS=""
  for ((i = 1; i <= MEMBERS; i++)); do
    local c=http://127.0.0.1:${cports[i-1]} p=http://127.0.0.1:${pports[i-1]}
    "$@" --name "m$i" --data-dir "$TMP/$server-m$i" \
      --listen-client-urls "$c" --advertise-client-urls "$c" \
      --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
      --initial-cluster "$initial" --initial-cluster-state new \
      --initial-cluster-token "bench-$server-$$" \
      >"$OUT/$server-m$i.log" 2>&1 &
    PIDS+=($!); CLUSTER_PIDS+=($!)
    ENDPOINTS+="${ENDPOINTS:+,}127.0.0.1:${cports[i-1]}"
  done
  deadline=$((SECONDS + READY_TIMEOUT_S))
  for ((i = 1; i <= MEMBERS; i++)); do
    until healthy "${cports[i-1]}"; do
      kill -0 "${CLUSTER_PIDS[i-1]}" 2>/dev/null || { tail -n 30 "$OUT/$server-m$i.log" >&2; die "$server m$i exited"; }
      ((SECONDS < deadline)) || { tail -n 30 "$OUT/$server-m$i.log" >&2; die "$server m$i not healthy after ${READY_TIMEOUT_S}s"; }
      sleep 0.1
    done
  done
  log "$server: $MEMBERS members healthy at $ENDPOINTS"
}

# workload_args WORKLOAD: prints the benchmark arguments for one workload, one per line.
workload_args() {
  local clients total
  case $1 in
    put-c*) clients=${1#put-c}; total=$PUT_TOTAL; [ "$clients" -eq 1 ] && total=$PUT_TOTAL_1
      printf '%s\n' "--clients=$clients" "--conns=$(( clients / 8 > 0 ? clients / 8 : 1 ))" put \
        "--key-size=$KEY_SIZE" "--val-size=$VAL_SIZE" "--key-space-size=$KEY_SPACE" "--total=$total" ;;
    range-[ls]-c*) clients=${1##*-c}
      printf '%s\n' "--clients=$clients" "--conns=$(( clients / 8 > 0 ? clients / 8 : 1 ))" range "$RANGE_KEY" \
        "--consistency=$(cut -d- -f2 <<<"$1")" "--total=$RANGE_TOTAL" ;;
    # 1,000 watchers (10 streams x 100) on 10 keys; 2,000 puts at 1,000/s: 200,000 events.
    # The tool's last summary is event delivery (events/s and delivery latency).
    watch-events)
      printf '%s\n' --clients=10 --conns=10 watch --streams=10 --watch-per-stream=100 \
        --put-total="$WATCH_PUTS" --put-rate=1000 --watched-key-total=10 ;;
    # One watcher; latency from a put's response to its event (req/s is just the put rate).
    watch-latency)
      printf '%s\n' --clients=1 --conns=1 watch-latency --put-rate=500 --total="$WATCH_PUTS" ;;
    lease-keepalive-c*) clients=${1##*-c}
      printf '%s\n' "--clients=$clients" "--conns=$(( clients / 8 > 0 ? clients / 8 : 1 ))" lease-keepalive \
        "--total=$RANGE_TOTAL" ;;
    *) die "unknown workload $1" ;;
  esac
}

declare -A RPS P99 CPU
TICK_MS=$(awk -v t="$(getconf CLK_TCK)" 'BEGIN { print 1000 / t }')

# cpu_ticks PID...: the user + system time of the processes so far, in clock ticks.
cpu_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$s"; }

# run_workloads SERVER: runs every workload against ENDPOINTS; raw output in $OUT/SERVER-WORKLOAD.txt.
# CPU[SERVER,WORKLOAD] is the members' CPU time (all three, user + system) per 1,000 requests, in ms
# (per 1,000 puts for the watch workloads).
run_workloads() {
  local server=$1 w raw args t0 t1 total
  ETCDCTL_API=3 etcdctl --endpoints="$ENDPOINTS" --command-timeout=10s \
    put "$RANGE_KEY" "$(head -c "$VAL_SIZE" /dev/zero | tr '\0' v)" >/dev/null
  for w in "${WORKLOADS[@]}"; do
    mapfile -t args < <(workload_args "$w")
    raw=$OUT/$server-$w.txt
    log "$server $w: benchmark ${args[*]}"
    t0=$(cpu_ticks "${CLUSTER_PIDS[@]}")
    "$BENCH_TOOL" --endpoints="$ENDPOINTS" "${args[@]}" >"$raw" 2>&1 \
      || { tail -n 20 "$raw" >&2; die "$server $w: benchmark failed (see $raw)"; }
    t1=$(cpu_ticks "${CLUSTER_PIDS[@]}")
    total=$(printf '%s\n' "${args[@]}" | sed -n 's/^--\(put-\)\{0,1\}total=//p' | head -n 1)
    CPU[$server,$w]=$(awk -v d=$((t1 - t0)) -v ms="$TICK_MS" -v n="$total" 'BEGIN { printf "%.1f", d * ms * 1000 / n }')
    # The last summary counts (watch prints creation first, then delivery).
    RPS[$server,$w]=$(awk '$1 == "Requests/sec:" { v = $2 } END { if (v != "") printf "%.0f", v }' "$raw")
    P99[$server,$w]=$(awk '$1 == "99%" && $2 == "in" { v = $3 } END { if (v != "") printf "%.2f", v * 1000 }' "$raw")
    [ -n "${RPS[$server,$w]}" ] || die "$server $w: no Requests/sec in $raw"
  done
}

# bench_server SERVER: starts the server's cluster, runs the workloads, stops it.
bench_server() {
  case $1 in
    etcd) start_cluster etcd etcd ;;
    meridian) start_cluster meridian "$MERIDIAN_BIN" node ;;
    *) die "unknown server $1 (etcd or meridian)" ;;
  esac
  run_workloads "$1"
  stop_pids "${CLUSTER_PIDS[@]}"
}

# ratio A B: B/A to two decimals, or "-" when either is missing.
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN { if (a == "" || b == "" || a + 0 == 0) print "-"; else printf "%.2f", b / a }'; }

print_table() {
  local w e m ep mp
  echo "| workload | etcd req/s | meridian req/s | ratio | etcd p99 | meridian p99 | p99 ratio | CPU ms / 1k req, etcd / meridian | CPU ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for w in "${WORKLOADS[@]}"; do
    e=${RPS[etcd,$w]:-}; m=${RPS[meridian,$w]:-}
    ep=${P99[etcd,$w]:+${P99[etcd,$w]} ms}; mp=${P99[meridian,$w]:+${P99[meridian,$w]} ms}
    printf '| %s | %s | %s | %s | %s | %s | %s | %s / %s | %s |\n' "$w" "${e:--}" "${m:--}" "$(ratio "$e" "$m")" \
      "${ep:--}" "${mp:--}" "$(ratio "${P99[etcd,$w]:-}" "${P99[meridian,$w]:-}")" \
      "${CPU[etcd,$w]:--}" "${CPU[meridian,$w]:--}" "$(ratio "${CPU[etcd,$w]:-}" "${CPU[meridian,$w]:-}")"
  done
}

main() {
  mkdir -p "$OUT"
  apt_install etcd-server etcd-client
  build_benchmark
  case " $TARGETS " in *" meridian "*) build_meridian ;; esac
  local server
  for server in $TARGETS; do bench_server "$server"; done
  { print_table; echo; echo "ratio = meridian / etcd; p99 is the 99th-percentile latency."; } | tee "$OUT/results.md"
  log "raw outputs in $OUT"
}

# Sourced by bench/mirror-bench.sh for its helpers; run directly for the KV benchmark.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi

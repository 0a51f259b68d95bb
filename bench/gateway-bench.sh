#!/usr/bin/env bash
# Gateway benchmark, in one run, with etcd's benchmark tool (64 clients):
#   cost:   put and serializable range through a gateway beside the same workload sent straight to
#           the members (a 3-member primary; the gateway in its region): throughput and p50/p99, and
#           one client's serializable range, where the extra hop is all the difference;
#   remote: a 3-member primary and a 1-member secondary with its mirror, BENCH_DELAY (25ms) each way
#           between the regions (`meridian delay-proxy`, userspace): serializable and linearizable
#           ranges through the secondary's gateway beside the same ranges sent across to the primary.
# Every figure is the median of BENCH_RUNS (3) runs. The cost table also gives the server CPU per
# request (user + system time of the members and the gateway, from /proc, over the run's requests):
# on a shared machine it moves less than throughput does. Prints markdown tables (also
# target/bench/gateway-results.md). Env: BENCH_RUNS, BENCH_GW_TOTAL (20000), BENCH_REMOTE_TOTAL
# (4000), BENCH_DELAY, MERIDIAN_BIN (else cargo build --release).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench.sh
source "$HERE/bench.sh"
RUNS=${BENCH_RUNS:-3}
GW_TOTAL=${BENCH_GW_TOTAL:-20000}
REMOTE_TOTAL=${BENCH_REMOTE_TOTAL:-4000}
DELAY=${BENCH_DELAY:-25ms}
declare -A RPS_RUNS P50_RUNS P99_RUNS CPU_RUNS
CPU_PIDS=()   # the servers whose CPU time bench_case counts (bench.sh's cpu_ticks)

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

# bench_case LABEL ENDPOINTS ARGS...: one run; appends its req/s, p50 and p99 (ms) to the label's runs.
bench_case() {
  local label=$1 eps=$2 raw t0 t1 total; shift 2
  raw=$OUT/gateway-$label-$(( $(wc -w <<<"${RPS_RUNS[$label]:-}") + 1 )).txt
  t0=$(cpu_ticks "${CPU_PIDS[@]}")
  "$BENCH_TOOL" --endpoints="$eps" "$@" >"$raw" 2>&1 || { tail -n 20 "$raw" >&2; die "$label: benchmark failed"; }
  t1=$(cpu_ticks "${CPU_PIDS[@]}")
  total=$(grep -o -- '--total=[0-9]*' <<<"$*" | cut -d= -f2)
  CPU_RUNS[$label]+=" $(awk -v d=$((t1 - t0)) -v ms="$TICK_MS" -v n="$total" 'BEGIN { printf "%.0f", d * ms * 1000 / n }')"
  RPS_RUNS[$label]+=" $(awk '$1 == "Requests/sec:" { v = $2 } END { printf "%.0f", v }' "$raw")"
  P50_RUNS[$label]+=" $(awk '$1 == "50%" && $2 == "in" { v = $3 } END { printf "%.3f", v * 1000 }' "$raw")"
  P99_RUNS[$label]+=" $(awk '$1 == "99%" && $2 == "in" { v = $3 } END { printf "%.3f", v * 1000 }' "$raw")"
}

# start_gateway NAME REGION UPSTREAM...: sets GW_EP.
start_gateway() {
  local name=$1 region=$2 args=() u deadline; shift 2
  for u in "$@"; do args+=(--upstream "$u"); done
  alloc_port
  "$MERIDIAN_BIN" gateway --name "$name" --region "$region" --listen-client-urls "http://127.0.0.1:$PORT" \
    "${args[@]}" >"$OUT/gateway-$name.log" 2>&1 &
  PIDS+=($!)
  GW_EP=127.0.0.1:$PORT
  deadline=$((SECONDS + READY_TIMEOUT_S))
  until healthy "$PORT"; do
    ((SECONDS < deadline)) || { tail -n 20 "$OUT/gateway-$name.log" >&2; die "gateway $name not ready"; }
    sleep 0.1
  done
}

row() {
  local a=$1 b=$2 ra rb pa pb qa qb cpu=
  ra=$(median <<<"${RPS_RUNS[$a]}"); rb=$(median <<<"${RPS_RUNS[$b]}")
  pa=$(median <<<"${P50_RUNS[$a]}"); pb=$(median <<<"${P50_RUNS[$b]}")
  qa=$(median <<<"${P99_RUNS[$a]}"); qb=$(median <<<"${P99_RUNS[$b]}")
  case ${4:-} in
    cpu) cpu=" $(median <<<"${CPU_RUNS[$a]}") / $(median <<<"${CPU_RUNS[$b]}") |" ;;
    -) cpu=" - |" ;;
  esac
  printf '| %s | %s | %s | %s | %s / %s ms | %s / %s ms | %s / %s |%s\n' "$3" "$ra" "$rb" "$(ratio "$ra" "$rb")" \
    "$pa" "$qa" "$pb" "$qb" "$(ratio "$pa" "$pb")" "$(ratio "$qa" "$qb")" "$cpu"
}

main_gateway() {
  mkdir -p "$OUT"
  apt_install etcd-server etcd-client
  build_benchmark
  build_meridian
  local c64=(--clients=64 --conns=8) run
  MEMBERS=3 start_cluster primary "$MERIDIAN_BIN" node --region us-east
  local primary_eps=$ENDPOINTS primary_pids=("${CLUSTER_PIDS[@]}")
  ETCDCTL_API=3 etcdctl --endpoints="$primary_eps" put "$RANGE_KEY" "$(head -c "$VAL_SIZE" /dev/zero | tr '\0' v)" >/dev/null

  # Cost: the same workload straight to the members and through a gateway in the same region.
  start_gateway gw-us us-east "us-east=$primary_eps"
  local gw_us=$GW_EP
  CPU_PIDS=("${primary_pids[@]}" "${PIDS[-1]}")
  for ((run = 1; run <= RUNS; run++)); do
    log "cost, run $run of $RUNS"
    bench_case put-direct "$primary_eps" "${c64[@]}" put --key-size="$KEY_SIZE" --val-size="$VAL_SIZE" \
      --key-space-size="$KEY_SPACE" --total="$GW_TOTAL"
    bench_case put-gateway "$gw_us" "${c64[@]}" put --key-size="$KEY_SIZE" --val-size="$VAL_SIZE" \
      --key-space-size="$KEY_SPACE" --total="$GW_TOTAL"
    bench_case range-s-direct "$primary_eps" "${c64[@]}" range "$RANGE_KEY" --consistency=s --total="$GW_TOTAL"
    bench_case range-s-gateway "$gw_us" "${c64[@]}" range "$RANGE_KEY" --consistency=s --total="$GW_TOTAL"
    bench_case range-s-c1-direct "$primary_eps" --clients=1 --conns=1 range "$RANGE_KEY" --consistency=s --total=2000
    bench_case range-s-c1-gateway "$gw_us" --clients=1 --conns=1 range "$RANGE_KEY" --consistency=s --total=2000
  done

  CPU_PIDS=()
  # Remote: a secondary region BENCH_DELAY away, its mirror and its gateway reaching the primary
  # through delaying relays, and clients in the secondary's region.
  local token=$TMP/mirror.token relays=() far_eps="" ep
  echo "bench-gateway-token" >"$token"
  for ep in ${primary_eps//,/ }; do
    alloc_port; relays+=(--route "127.0.0.1:$PORT=$ep"); far_eps+="${far_eps:+,}127.0.0.1:$PORT"
  done
  "$MERIDIAN_BIN" delay-proxy --delay "$DELAY" "${relays[@]}" >"$OUT/gateway-delay-proxy.log" 2>&1 &
  PIDS+=($!)
  sleep 0.5
  MEMBERS=1 start_cluster secondary "$MERIDIAN_BIN" node --region eu-west --initial-role secondary \
    --primary-region us-east --mirror-token-file "$token"
  local secondary_eps=$ENDPOINTS
  "$MERIDIAN_BIN" mirror --mirror-token-file "$token" --source "$far_eps" --target "$secondary_eps" \
    >"$OUT/gateway-mirror.log" 2>&1 &
  PIDS+=($!)
  start_gateway gw-eu eu-west "us-east=$far_eps" "eu-west=$secondary_eps"
  local gw_eu=$GW_EP
  sleep 3   # a few probes, so the RTT averages and the secondary's staleness are known
  for ((run = 1; run <= RUNS; run++)); do
    log "remote, run $run of $RUNS"
    bench_case remote-s-primary "$far_eps" "${c64[@]}" range "$RANGE_KEY" --consistency=s --total="$REMOTE_TOTAL"
    bench_case remote-s-gateway "$gw_eu" "${c64[@]}" range "$RANGE_KEY" --consistency=s --total="$REMOTE_TOTAL"
    bench_case remote-l-primary "$far_eps" "${c64[@]}" range "$RANGE_KEY" --consistency=l --total="$REMOTE_TOTAL"
    bench_case remote-l-gateway "$gw_eu" "${c64[@]}" range "$RANGE_KEY" --consistency=l --total="$REMOTE_TOTAL"
  done
  {
    echo "Gateway cost (a 3-member primary; 64 clients; median of $RUNS runs):"
    echo
    echo "| workload | direct req/s | gateway req/s | ratio | direct p50 / p99 | gateway p50 / p99 | p50 / p99 ratio | server CPU µs/req, direct / gateway |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    row put-direct put-gateway put-c64 cpu
    row range-s-direct range-s-gateway range-s-c64 cpu
    # One client's run is mostly idle time: its CPU is the members' ticks, not the reads'.
    row range-s-c1-direct range-s-c1-gateway "range-s-c1 (one client: the hop alone)" -
    echo
    echo "Reads in a region $DELAY away from the primary, each way (64 clients; median of $RUNS runs):"
    echo
    echo "| read | to the primary req/s | secondary's gateway req/s | ratio | primary p50 / p99 | gateway p50 / p99 | p50 / p99 ratio |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    row remote-s-primary remote-s-gateway "serializable (bounded 5s)"
    row remote-l-primary remote-l-gateway linearizable
  } | tee "$OUT/gateway-results.md"
  log "raw outputs in $OUT"
}

main_gateway "$@"

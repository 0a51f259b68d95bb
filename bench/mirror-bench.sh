#!/usr/bin/env bash
# Mirror benchmark beside etcdctl make-mirror, same machine, same run, same source (a 1-member
# etcd 3.4 with 100k keys of 256 bytes):
#   copy:  time until the destination holds every key (make-mirror into etcd; meridian mirror into a
#          Meridian secondary, which also keeps every revision);
#   lag:   probes while etcd's benchmark writes 2,000 puts/s into a fresh source (a separate etcd, so
#          the bulk copy's after-effects on the source, such as etcd's own snapshot at 100k entries,
#          do not land in the lag figures); lag runs from a probe's put returning to its event on
#          the destination.
# Prints a markdown table (also target/bench/mirror-results.md). Env: MIRROR_KEYS (100000),
# LAG_SECONDS (10), MERIDIAN_BIN (else cargo build --release).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench.sh
source "$HERE/bench.sh"
MEMBERS=1
KEYS=${MIRROR_KEYS:-100000}
LAG_SECONDS=${LAG_SECONDS:-10}
declare -A R

# Keys on EP (etcdctl 3.4 has no --count-only; a limited get still reports the full count).
count() { etcdctl --endpoints="$1" --command-timeout=30s get "" --from-key --limit=1 -w json 2>/dev/null \
  | grep -o '"count":[0-9]*' | cut -d: -f2 || true; }

# wait_count EP N: seconds (decimal) until EP holds at least N keys, polling every 50 ms.
wait_count() {
  local start=$EPOCHREALTIME n
  while :; do
    n=$(count "$1"); n=${n:-0}
    ((n >= $2)) && break
    sleep 0.05
  done
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'
}

# lag NAME SRC DST: probes SRC -> DST while etcd's benchmark writes 2,000 puts/s into SRC.
lag() {
  "$BENCH_TOOL" --endpoints="$2" --clients=16 --conns=4 put --rate=2000 --total=$((2000 * (LAG_SECONDS + 3))) \
    --key-size=8 --val-size=256 --key-space-size=100000 >"$OUT/mirror-$1-load.txt" 2>&1 &
  local load=$!
  read -r n p50 p99 max < <(LAG_DUMP="$OUT/mirror-$1-lags.txt" python3 "$HERE/lag_probe.py" "$2" "$3" "$LAG_SECONDS" 10)
  wait "$load" || true
  R[$1,lag_n]=$n; R[$1,p50]=$p50; R[$1,p99]=$p99; R[$1,max]=$max
}

main_mirror() {
  mkdir -p "$OUT"
  # The secondaries and the mirror share a token: Mirror.Apply needs it.
  TOKEN=$TMP/mirror.token
  echo "bench-mirror-token" >"$TOKEN"
  apt_install etcd-server etcd-client
  build_benchmark
  build_meridian

  start_cluster etcd-src etcd; SRC_EP=$ENDPOINTS
  log "loading $KEYS keys into the source"
  "$BENCH_TOOL" --endpoints="$SRC_EP" --clients=64 --conns=8 put --total="$KEYS" --key-space-size="$KEYS" \
    --sequential-keys --key-size=8 --val-size=256 >"$OUT/mirror-load.txt" 2>&1
  local keys lag_src lag_pids; keys=$(count "$SRC_EP")

  # etcdctl make-mirror into a fresh etcd.
  start_cluster etcd-dst etcd; DST_EP=$ENDPOINTS; local dst_pids=("${CLUSTER_PIDS[@]}")
  etcdctl make-mirror --endpoints="$SRC_EP" "$DST_EP" >"$OUT/make-mirror.log" 2>&1 &
  local mm=$!; PIDS+=("$mm")
  R[make,copy]=$(wait_count "$DST_EP" "$keys")
  log "make-mirror copied $keys keys in ${R[make,copy]}s"
  stop_pids "$mm" "${dst_pids[@]}"
  start_cluster etcd-lag-src etcd; lag_src=$ENDPOINTS; lag_pids=("${CLUSTER_PIDS[@]}")
  start_cluster etcd-lag-dst etcd; DST_EP=$ENDPOINTS; dst_pids=("${CLUSTER_PIDS[@]}")
  etcdctl make-mirror --endpoints="$lag_src" "$DST_EP" >"$OUT/make-mirror-lag.log" 2>&1 &
  mm=$!; PIDS+=("$mm")
  lag make "$lag_src" "$DST_EP"
  stop_pids "$mm" "${dst_pids[@]}" "${lag_pids[@]}"

  # meridian mirror into a fresh Meridian secondary.
  start_cluster meridian-dst "$MERIDIAN_BIN" node --region dr --initial-role secondary --primary-region src --mirror-token-file "$TOKEN"
  DST_EP=$ENDPOINTS; dst_pids=("${CLUSTER_PIDS[@]}")
  alloc_port; local mport=$PORT
  "$MERIDIAN_BIN" mirror --mirror-token-file "$TOKEN" --source "$SRC_EP" --target "$DST_EP" --listen-metrics "127.0.0.1:$mport" \
    >"$OUT/meridian-mirror.log" 2>&1 &
  local mr=$!; PIDS+=("$mr")
  R[meridian,copy]=$(wait_count "$DST_EP" "$keys")
  log "meridian mirror copied $keys keys (and every revision) in ${R[meridian,copy]}s"
  stop_pids "$mr" "${dst_pids[@]}"
  start_cluster etcd-lag-src2 etcd; lag_src=$ENDPOINTS; lag_pids=("${CLUSTER_PIDS[@]}")
  start_cluster meridian-lag-dst "$MERIDIAN_BIN" node --region dr --initial-role secondary --primary-region src --mirror-token-file "$TOKEN"
  DST_EP=$ENDPOINTS; dst_pids=("${CLUSTER_PIDS[@]}")
  "$MERIDIAN_BIN" mirror --mirror-token-file "$TOKEN" --source "$lag_src" --target "$DST_EP" >"$OUT/meridian-mirror-lag.log" 2>&1 &
  mr=$!; PIDS+=("$mr")
  lag meridian "$lag_src" "$DST_EP"
  stop_pids "$mr" "${dst_pids[@]}" "${lag_pids[@]}"

  # The same copy from a Meridian source (make-mirror reads it through the etcd API too).
  start_cluster meridian-src "$MERIDIAN_BIN" node --region src; local msrc=$ENDPOINTS msrc_pids=("${CLUSTER_PIDS[@]}")
  "$BENCH_TOOL" --endpoints="$msrc" --clients=64 --conns=8 put --total="$KEYS" --key-space-size="$KEYS" \
    --sequential-keys --key-size=8 --val-size=256 >"$OUT/mirror-load-meridian.txt" 2>&1
  start_cluster etcd-dst2 etcd; DST_EP=$ENDPOINTS; dst_pids=("${CLUSTER_PIDS[@]}")
  etcdctl make-mirror --endpoints="$msrc" "$DST_EP" >"$OUT/make-mirror-msrc.log" 2>&1 &
  mm=$!; PIDS+=("$mm")
  R[make,mcopy]=$(wait_count "$DST_EP" "$keys")
  stop_pids "$mm" "${dst_pids[@]}"
  start_cluster meridian-dst2 "$MERIDIAN_BIN" node --region dr --initial-role secondary --primary-region src --mirror-token-file "$TOKEN"
  DST_EP=$ENDPOINTS; dst_pids=("${CLUSTER_PIDS[@]}")
  "$MERIDIAN_BIN" mirror --mirror-token-file "$TOKEN" --source "$msrc" --target "$DST_EP" >"$OUT/meridian-mirror-msrc.log" 2>&1 &
  mr=$!; PIDS+=("$mr")
  R[meridian,mcopy]=$(wait_count "$DST_EP" "$keys")
  log "from a Meridian source: make-mirror ${R[make,mcopy]}s, meridian mirror ${R[meridian,mcopy]}s"
  stop_pids "$mr" "${dst_pids[@]}" "${msrc_pids[@]}"

  {
    echo "| measure | make-mirror | meridian mirror | ratio |"
    echo "|---|---:|---:|---:|"
    printf '| copy of %s keys from etcd (s) | %s | %s | %s× faster |\n' "$keys" "${R[make,copy]}" "${R[meridian,copy]}" \
      "$(awk -v a="${R[make,copy]}" -v b="${R[meridian,copy]}" 'BEGIN { printf "%.1f", a / b }')"
    printf '| copy of %s keys from a Meridian source (s) | %s | %s | %s× faster |\n' "$keys" "${R[make,mcopy]}" \
      "${R[meridian,mcopy]}" "$(awk -v a="${R[make,mcopy]}" -v b="${R[meridian,mcopy]}" 'BEGIN { printf "%.1f", a / b }')"
    printf '| copy rate from etcd (keys/s) | %.0f | %.0f | |\n' "$(awk -v k="$keys" -v t="${R[make,copy]}" 'BEGIN { print k / t }')" \
      "$(awk -v k="$keys" -v t="${R[meridian,copy]}" 'BEGIN { print k / t }')"
    printf '| lag p50 at 2,000 puts/s (ms) | %s | %s | |\n' "${R[make,p50]}" "${R[meridian,p50]}"
    printf '| lag p99 at 2,000 puts/s (ms) | %s | %s | |\n' "${R[make,p99]}" "${R[meridian,p99]}"
    printf '| probes | %s | %s | |\n' "${R[make,lag_n]}" "${R[meridian,lag_n]}"
  } | tee "$OUT/mirror-results.md"
}

main_mirror "$@"

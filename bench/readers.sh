#!/usr/bin/env bash
# Do readers stall writes? Put throughput on a 3-member cluster alone, then while 64 clients run
# ranges that each return 10,000 keys (32 ranges/s in all: a 2-core machine saturated by readers
# would measure CPU share, not stalls) and 2 watchers replay the whole history from revision 1
# over and over (as a mirror of an etcd source does), for etcd 3.4 and two Meridian builds in the
# same run. Each round gives every server a fresh cluster; the table is the median of the rounds.
#
#   MERIDIAN_A=/path/to/before MERIDIAN_B=/path/to/after bench/readers.sh
#
# Environment: MERIDIAN_A, MERIDIAN_B (required), READERS_ROUNDS (3), READERS_PUTS (5000),
# READERS_KEYS (10000), READERS_RATE (32 ranges/s). Output: a markdown table (also target/bench/readers-results.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench.sh
source "$HERE/bench.sh"
ROUNDS=${READERS_ROUNDS:-3}
PUTS=${READERS_PUTS:-5000}
RATE=${READERS_RATE:-32}
KEYS=${READERS_KEYS:-10000}
[ -x "${MERIDIAN_A:-}" ] && [ -x "${MERIDIAN_B:-}" ] || die "set MERIDIAN_A and MERIDIAN_B to two meridian binaries"

declare -A ALONE LOADED
# put_rps OUT: the put benchmark's req/s, written raw to OUT.
put_rps() {
  "$BENCH_TOOL" --endpoints="$ENDPOINTS" --clients=16 --conns=2 put --key-size=8 --val-size=256 \
    --key-space-size=100000 --total="$PUTS" >"$1" 2>&1 || { tail -n 20 "$1" >&2; die "put benchmark failed"; }
  awk '$1 == "Requests/sec:" { v = $2 } END { printf "%.0f", v }' "$1"
}

# one_round SERVER CMD...: fresh cluster; puts alone, then puts beside the readers.
one_round() {
  local server=$1 readers=() pid i; shift
  start_cluster "$server" "$@"
  # KEYS sequential keys of 256 bytes to range over; the put runs below write elsewhere too.
  "$BENCH_TOOL" --endpoints="$ENDPOINTS" --clients=16 --conns=2 put --key-size=8 --val-size=256 \
    --sequential-keys --key-space-size="$KEYS" --total="$KEYS" >"$OUT/readers-$server-load.txt" 2>&1
  ALONE[$server]+="$(put_rps "$OUT/readers-$server-alone.txt") "
  # Readers: every range returns all KEYS keys (the tool's keys are binary varints: 0x01..0xff
  # spans them); they run until stopped.
  "$BENCH_TOOL" --endpoints="$ENDPOINTS" --clients=64 --conns=8 range $'\x01' $'\xff' \
    --consistency=s --rate="$RATE" --total=100000000 >"$OUT/readers-$server-ranges.txt" 2>&1 &
  readers+=($!)
  for ((i = 0; i < 2; i++)); do
    (while :; do etcdctl --endpoints="$ENDPOINTS" watch --prefix "" --rev=1 >/dev/null 2>&1; done) &
    readers+=($!)
  done
  sleep 2
  LOADED[$server]+="$(put_rps "$OUT/readers-$server-loaded.txt") "
  for pid in "${readers[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${readers[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_pids "${CLUSTER_PIDS[@]}"
  rm -rf "$TMP/$server"-m*
}

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

main_readers() {
  mkdir -p "$OUT"
  apt_install etcd-server etcd-client
  build_benchmark
  local round s
  for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    one_round etcd etcd
    one_round meridian-a "$MERIDIAN_A" node
    one_round meridian-b "$MERIDIAN_B" node
  done
  {
    echo "Put throughput (16 clients, $PUTS puts) alone and beside 64 range clients ($RATE ranges/s, each"
    echo "returning $KEYS keys) and 2 watchers replaying from revision 1; median of $ROUNDS rounds, same run."
    echo
    echo "| server | puts alone (req/s) | puts beside readers (req/s) | kept |"
    echo "|---|---:|---:|---:|"
    for s in etcd meridian-a meridian-b; do
      local a l
      a=$(median "${ALONE[$s]}"); l=$(median "${LOADED[$s]}")
      printf '| %s | %.0f | %.0f | %s |\n' "$s" "$a" "$l" "$(ratio "$a" "$l")"
    done
    echo
    for s in etcd meridian-a meridian-b; do echo "- $s rounds: alone ${ALONE[$s]}/ beside readers ${LOADED[$s]}"; done
  } | tee "$OUT/readers-results.md"
}

main_readers "$@"

#!/usr/bin/env bash
# A/B benchmark of two Meridian builds beside etcd 3.4, on the same machine in the same run: each
# round starts a fresh 3-member cluster of etcd, of build A and of build B (one after the other,
# never at the same time) and runs the same workloads against each; the table gives the median of
# the rounds and the ratios B/etcd, A/etcd and B/A. Rounds interleave the three, so a machine that
# gets busier or quieter during the run moves all of them alike.
#
#   MERIDIAN_A=/path/to/before MERIDIAN_B=/path/to/after bench/ab.sh
#   AB_ROUNDS=5 AB_WORKLOADS="put-c1 put-c16" bench/ab.sh
#
# Environment: MERIDIAN_A, MERIDIAN_B (required: two meridian binaries), AB_ROUNDS (default 3),
# AB_WORKLOADS (default "put-c1 put-c16"), and bench.sh's BENCH_* totals.
# Output: a markdown table on stdout (also target/bench/ab-results.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench.sh
source "$HERE/bench.sh"
ROUNDS=${AB_ROUNDS:-3}
read -r -a WORKLOADS <<<"${AB_WORKLOADS:-put-c1 put-c16}"
[ -x "${MERIDIAN_A:-}" ] && [ -x "${MERIDIAN_B:-}" ] || die "set MERIDIAN_A and MERIDIAN_B to two meridian binaries"

declare -A ALL_RPS ALL_P99
# bench_ab SERVER CMD...: one round on a fresh cluster; appends each workload's figures.
bench_ab() {
  local server=$1 w; shift
  start_cluster "$server" "$@"
  run_workloads "$server"
  for w in "${WORKLOADS[@]}"; do
    ALL_RPS[$server,$w]+="${RPS[$server,$w]} "
    ALL_P99[$server,$w]+="${P99[$server,$w]} "
  done
  stop_pids "${CLUSTER_PIDS[@]}"
  rm -rf "$TMP/$server"-m*
}

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

main_ab() {
  mkdir -p "$OUT"
  apt_install etcd-server etcd-client
  build_benchmark
  local round w
  for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    bench_ab etcd etcd
    bench_ab meridian-a "$MERIDIAN_A" node
    bench_ab meridian-b "$MERIDIAN_B" node
  done
  {
    echo "Median of $ROUNDS rounds; every round ran etcd, A and B one after the other on fresh clusters."
    echo
    echo "| workload | etcd req/s | A req/s | B req/s | A/etcd | B/etcd | B/A | etcd p99 | A p99 | B p99 |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for w in "${WORKLOADS[@]}"; do
      local e a b ep ap bp
      e=$(median "${ALL_RPS[etcd,$w]}"); a=$(median "${ALL_RPS[meridian-a,$w]}"); b=$(median "${ALL_RPS[meridian-b,$w]}")
      ep=$(median "${ALL_P99[etcd,$w]}"); ap=$(median "${ALL_P99[meridian-a,$w]}"); bp=$(median "${ALL_P99[meridian-b,$w]}")
      printf '| %s | %.0f | %.0f | %.0f | %s | %s | %s | %s ms | %s ms | %s ms |\n' "$w" "$e" "$a" "$b" \
        "$(ratio "$e" "$a")" "$(ratio "$e" "$b")" "$(ratio "$a" "$b")" "$ep" "$ap" "$bp"
    done
    echo
    echo "Every round (req/s): etcd, A, B"
    for w in "${WORKLOADS[@]}"; do
      echo "- $w: etcd ${ALL_RPS[etcd,$w]}/ A ${ALL_RPS[meridian-a,$w]}/ B ${ALL_RPS[meridian-b,$w]}"
    done
  } | tee "$OUT/ab-results.md"
}

main_ab "$@"

#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets) for a bounded time: FUZZ_SECONDS each (default
# 30). Uses the nightly toolchain when rustup has one, else the stable one with RUSTC_BOOTSTRAP
# (cargo-fuzz passes libFuzzer's and the sanitizer's -Z flags). Installs cargo-fuzz from crates.io
# when it is missing. A crash leaves its input in fuzz/artifacts/<target>/ and fails the run (exit
# 1). A machine where fuzzing cannot be set up at all (no cargo-fuzz and no way to install it)
# exits 3 and says why, so CI can tell that from a finding.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${FUZZ_SECONDS:-30}
# Its own target dir: instrumented builds share nothing with the test build.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target/fuzz}
# FUZZ_TOOLCHAIN=stable forces the stable path even where a nightly exists.
toolchain=()
if [ "${FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
if ! cargo "${toolchain[@]}" fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo install cargo-fuzz"
  if ! cargo install --locked --quiet cargo-fuzz; then
    echo "fuzz: cannot run here: cargo-fuzz did not install" >&2
    exit 3
  fi
fi
for target in authority peer_batch; do
  echo "fuzz: $target for ${seconds}s"
  cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12
done

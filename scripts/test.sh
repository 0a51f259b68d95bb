#!/usr/bin/env bash
# The test command (README and .ci/run both call it): builds the `meridian` binary that the
# end-to-end tests spawn (cargo does not build another package's binaries for tests), then runs
# every test of the workspace. Extra arguments go to nextest, e.g. `scripts/test.sh -E 'test(put)'`.
# The end-to-end tests need etcd and etcdctl 3.4, chromium and promtool: `apt-get install
# etcd-server etcd-client chromium prometheus`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --bins
exec cargo nextest run --workspace --no-fail-fast "$@"

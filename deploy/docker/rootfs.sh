#!/usr/bin/env bash
# Fills a docker build context for deploy/docker/Dockerfile (FROM scratch): the meridian binary,
# stripped, and every shared library it links (from ldd), at their paths, under CONTEXT/rootfs.
#
#   deploy/docker/rootfs.sh [BINARY] [CONTEXT]
#
# BINARY defaults to target/release/meridian (built here if missing), CONTEXT to deploy/docker.
# Then `docker compose build` (or docker-compose build) builds the image with no registry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

binary=${1:-target/release/meridian}
context=${2:-deploy/docker}
if [ ! -x "$binary" ]; then
  if [ "$binary" = target/release/meridian ]; then
    cargo build --release --bin meridian
  else
    echo "rootfs.sh: no executable at $binary" >&2
    exit 1
  fi
fi

root="$context/rootfs"
rm -rf "$root"
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/data"
chmod 1777 "$root/tmp"
if command -v strip >/dev/null; then
  strip -o "$root/usr/local/bin/meridian" "$binary"
else
  cp "$binary" "$root/usr/local/bin/meridian"
fi
# Every library ldd resolves (name => /path), and the dynamic loader (a bare /path).
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
[ "$context" = deploy/docker ] || cp deploy/docker/Dockerfile "$context/Dockerfile"
echo "rootfs.sh: $(du -sh "$root" | cut -f1) in $root"

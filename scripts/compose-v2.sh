#!/usr/bin/env bash
# Installs the docker compose v2 CLI plugin from Debian's own packages on a bookworm machine that
# has only docker-compose 1.29: bookworm has no v2, but trixie's `docker-compose` package (2.x)
# needs nothing beyond libc6 >= 2.34. Its .deb is fetched with a private apt state (the system's
# sources are untouched) and only the plugin binary is unpacked into
# /usr/local/lib/docker/cli-plugins, beside the v1 `docker-compose` command.
set -euo pipefail
if docker compose version >/dev/null 2>&1; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-" -o "APT::Sandbox::User=root"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives")
apt-get "${apt_opts[@]}" update -qq >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" download -qq docker-compose 2>/dev/null)
dpkg-deb -x "$work"/docker-compose_*.deb "$work/x"
plugins=/usr/local/lib/docker/cli-plugins
mkdir -p "$plugins"
install -m 0755 "$work/x/usr/libexec/docker/cli-plugins/docker-compose" "$plugins/docker-compose"
docker compose version

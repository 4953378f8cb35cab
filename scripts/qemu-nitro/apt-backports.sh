#!/usr/bin/env bash
# Make Debian's bookworm-backports suite (binary and source) known to apt; run apt-get update once.
set -euo pipefail
LIST=/etc/apt/sources.list.d/enclavekit-bookworm-backports.sources
if [[ ! -f "$LIST" ]]; then
  cat >"$LIST" <<'SOURCES'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  rm -f /var/lib/apt/lists/.enclavekit-updated
fi
if [[ ! -f /var/lib/apt/lists/.enclavekit-updated ]] || ! apt-cache showsrc qemu 2>/dev/null | grep -q bpo12; then
  apt-get update -q >/dev/null
  touch /var/lib/apt/lists/.enclavekit-updated
fi

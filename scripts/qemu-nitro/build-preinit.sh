#!/usr/bin/env bash
# Compile scripts/qemu-nitro/preinit.c statically into .cache/qemu-nitro/preinit (test enclaves' first process).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ENCLAVEKIT_QEMU_NITRO_CACHE:-$ROOT/.cache/qemu-nitro}"
SRC="$ROOT/scripts/qemu-nitro/preinit.c"
OUT="$CACHE/preinit"
if [[ -x "$OUT" && "$OUT" -nt "$SRC" ]]; then
  echo "qemu-nitro: preinit is ready"
  exit 0
fi
if ! command -v gcc >/dev/null || [[ ! -f /usr/lib/x86_64-linux-gnu/libc.a ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev >/dev/null
fi
mkdir -p "$CACHE"
gcc -static -O2 -Wall -Wextra -o "$OUT.tmp" "$SRC"
strip "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "qemu-nitro: built $OUT"

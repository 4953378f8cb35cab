#!/usr/bin/env bash
# Build qemu-system-x86_64 with QEMU's `nitro-enclave` machine into .cache/qemu-nitro/qemu/.
#
# Debian's packaged QEMU is built without libcbor, so it has no nitro-enclave machine. This script builds
# the x86_64 target only (TCG, vhost-user, libcbor, gnutls, fdt; every other feature and device off) from
# the orig tarball of the bookworm-backports `qemu` source package, and borrows firmware (bios-microvm.bin)
# from the packaged qemu-system-x86. Idempotent: it does nothing when the cached binary already exists.
# About 3-4 minutes of compiling on 2 cores. Needs root (apt-get) and Debian's package mirrors.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ENCLAVEKIT_QEMU_NITRO_CACHE:-$ROOT/.cache/qemu-nitro}"
PREFIX="$CACHE/qemu"
BIN="$PREFIX/bin/qemu-system-x86_64"
JOBS="${JOBS:-$(nproc)}"

if [[ -x "$BIN" ]] && "$BIN" -machine help 2>/dev/null | grep -q '^nitro-enclave'; then
  echo "qemu-nitro: $BIN is ready"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
"$ROOT/scripts/qemu-nitro/apt-backports.sh"

echo "qemu-nitro: installing build dependencies"
apt-get install -y -q --no-install-recommends \
  build-essential pkgconf ninja-build python3 python3-venv flex bison xz-utils \
  libglib2.0-dev zlib1g-dev libcbor-dev libfdt-dev libgnutls28-dev \
  qemu-system-x86 >/dev/null
apt-get install -y -q --no-install-recommends -t bookworm-backports meson python3-pycotap >/dev/null

SRC="$CACHE/src"
mkdir -p "$SRC"
cd "$SRC"
# The orig tarball is all we need; the Debian packaging (dsc, debian.tar) is not used.
if ! ls qemu_*+ds.orig.tar.xz >/dev/null 2>&1; then
  echo "qemu-nitro: downloading the qemu source (bookworm-backports)"
  apt-get source --download-only -q qemu/bookworm-backports >/dev/null 2>&1 || true
fi
TARBALL="$(ls qemu_*+ds.orig.tar.xz | sort -V | tail -1)"
[[ -f "$TARBALL" ]] || { echo "qemu-nitro: no qemu orig tarball could be downloaded" >&2; exit 1; }
VERSION="${TARBALL#qemu_}"; VERSION="${VERSION%+ds.orig.tar.xz}"
TREE="$SRC/qemu-$VERSION"
rm -rf "$TREE"
tar xf "$TARBALL"

# The +ds tarball has no edk2 firmware, but the build unpacks it whenever bzip2 is installed: skip that.
sed -i 's/unpack_edk2_blobs = bzip2.found()/unpack_edk2_blobs = false/' "$TREE/meson.build"
# Only the nitro-enclave machine (it selects microvm, virtio-mmio, virtio-nsm and vhost-user-vsock).
printf 'CONFIG_NITRO_ENCLAVE=y\n' > "$TREE/configs/devices/x86_64-softmmu/nitro.mak"

mkdir -p "$TREE/build"
cd "$TREE/build"
echo "qemu-nitro: configuring QEMU $VERSION"
../configure --python=/usr/bin/python3 --prefix="$PREFIX" --target-list=x86_64-softmmu \
  --without-default-features --without-default-devices --with-devices-x86_64=nitro \
  --enable-tcg --enable-vhost-user --enable-libcbor --enable-gnutls --enable-fdt=system \
  --disable-install-blobs --disable-docs --disable-download --disable-werror \
  --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu >"$CACHE/configure.log" 2>&1 \
  || { tail -30 "$CACHE/configure.log" >&2; exit 1; }
echo "qemu-nitro: compiling (a few minutes on 2 cores)"
ninja -j "$JOBS" qemu-system-x86_64 >"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log" >&2; exit 1; }
mkdir -p "$PREFIX/bin"
install -m 0755 qemu-system-x86_64 "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
cd "$CACHE"
rm -rf "$TREE"
"$BIN" -machine help | grep -q '^nitro-enclave' || { echo "qemu-nitro: built QEMU lacks nitro-enclave" >&2; exit 1; }
echo "qemu-nitro: built $BIN"

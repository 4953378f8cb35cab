#!/usr/bin/env bash
# Fetch the guest kernel for QEMU's nitro-enclave machine into .cache/qemu-nitro/kernel/.
#
# Debian's bookworm-backports linux-image-*-cloud-amd64 (6.12) carries the mainline NSM driver and virtio-mmio
# as modules. The package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x`: it is never
# installed. Result: kernel/vmlinuz (a bzImage), kernel/modules/*.ko (decompressed: nsm, virtio_mmio, vsock,
# vmw_vsock_virtio_transport_common, vmw_vsock_virtio_transport) and kernel/VERSION. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ENCLAVEKIT_QEMU_NITRO_CACHE:-$ROOT/.cache/qemu-nitro}"
OUT="$CACHE/kernel"
MODULES=(drivers/misc/nsm drivers/virtio/virtio_mmio net/vmw_vsock/vsock
         net/vmw_vsock/vmw_vsock_virtio_transport_common net/vmw_vsock/vmw_vsock_virtio_transport)

if [[ -f "$OUT/VERSION" && -f "$OUT/vmlinuz" ]]; then
  echo "qemu-nitro: kernel $(cat "$OUT/VERSION") is ready"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
"$ROOT/scripts/qemu-nitro/apt-backports.sh"
command -v xz >/dev/null || apt-get install -y -q --no-install-recommends xz-utils >/dev/null

# The metapackage names the current ABI's image package.
PKG="$(apt-cache depends linux-image-cloud-amd64/bookworm-backports 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-6\.[0-9.]*+deb12-cloud-amd64\)$/\1/p' | head -1)"
[[ -n "$PKG" ]] || { echo "qemu-nitro: cannot find linux-image-*-cloud-amd64 in bookworm-backports" >&2; exit 1; }

WORK="$(mktemp -d "$CACHE/kernel.tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
echo "qemu-nitro: downloading $PKG"
apt-get download -q "$PKG/bookworm-backports" >/dev/null
dpkg-deb -x ./*.deb unpacked
KVER="${PKG#linux-image-}"
mkdir -p staged/modules
cp "unpacked/boot/vmlinuz-$KVER" staged/vmlinuz
for m in "${MODULES[@]}"; do
  src="unpacked/lib/modules/$KVER/kernel/$m.ko.xz"
  [[ -f "$src" ]] || { echo "qemu-nitro: $PKG lacks $m.ko.xz" >&2; exit 1; }
  xz -dc "$src" > "staged/modules/$(basename "$m").ko"
done
cp "unpacked/boot/config-$KVER" staged/config
echo "$KVER" > staged/VERSION
rm -rf "$OUT"
mv staged "$OUT"
echo "qemu-nitro: kernel $KVER unpacked into $OUT"

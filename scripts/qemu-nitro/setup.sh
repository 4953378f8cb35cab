#!/usr/bin/env bash
# One idempotent entry point for the QEMU nitro-enclave test environment (CI calls this). Everything lands in
# .cache/qemu-nitro/: the guest kernel and its modules (seconds), QEMU with the nitro-enclave machine
# (minutes, once), and the static pre-init of test enclaves. Debian's python3 (the test guests' interpreter)
# is installed if missing.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
"$HERE/fetch-kernel.sh"
"$HERE/build-qemu.sh"
"$HERE/build-preinit.sh"
if [[ ! -x /usr/bin/python3 ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 >/dev/null
fi
echo "qemu-nitro: ready"

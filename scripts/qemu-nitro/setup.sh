#!/usr/bin/env bash
# One idempotent entry point for the QEMU nitro-enclave test environment (CI calls this):
# the guest kernel (seconds) and QEMU with the nitro-enclave machine (minutes, once; cached in .cache/qemu-nitro/).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
"$HERE/fetch-kernel.sh"
"$HERE/build-qemu.sh"

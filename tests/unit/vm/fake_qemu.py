"""A stand-in for qemu-system-x86_64 -M nitro-enclave: connects to the vhost-user socket like QEMU, then
behaves like the enclave's init (heartbeat on port 9000), prints to the serial console (stdout) and waits.

Modes (FAKE_QEMU_MODE): "boot" (default), "refuse" (exit 1 like QEMU refusing an EIF), "silent" (never
sends the heartbeat), "exit" (boots, then the enclave ends at once), "reboot" (boots, then boots again
without QEMU seeing a reset, as a guest kernel restarting through the firmware does: a second heartbeat).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from enclavekit.vm.virtio_vsock import HEARTBEAT_BYTE, HEARTBEAT_PORT, Op
from tests.unit.vhost_user.frontend import FakeFrontend, request


def main() -> int:
    argv = sys.argv[1:]
    mode = os.environ.get("FAKE_QEMU_MODE", "boot")
    if "-machine" in argv:  # "-machine help"
        print("nitro-enclave        AWS Nitro Enclave")
        return 0
    Path(os.environ["FAKE_QEMU_ARGV"]).write_text(
        "\n".join(argv)
    ) if "FAKE_QEMU_ARGV" in os.environ else None
    if mode == "refuse":
        print("qemu-system-x86_64: CRC mismatch in EIF", file=sys.stderr)
        return 1
    chardev = argv[argv.index("-chardev") + 1]
    path = chardev.split("path=", 1)[1]
    fe = FakeFrontend(path)
    cid = fe.negotiated["cid"]
    print("[    0.000000] Linux version 6.12 (fake)", flush=True)
    if mode != "silent":
        fe.add_rx_buffers(8)
        fe.send(request(cid, 1025, HEARTBEAT_PORT))
        fe.send(request(cid, 1025, HEARTBEAT_PORT, Op.RW, bytes([HEARTBEAT_BYTE])))
        fe.received(count=2)
        print("EK-GUEST: hello from the fake enclave", flush=True)
    if mode == "exit":
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode == "reboot":
        print("[    5.000000] reboot: Restarting system", flush=True)
        print("[    0.000000] Linux version 6.12 (fake)", flush=True)
        fe.send(request(cid, 1026, HEARTBEAT_PORT))
        fe.send(request(cid, 1026, HEARTBEAT_PORT, Op.RW, bytes([HEARTBEAT_BYTE])))
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())

"""Enclaves in a real VM: QEMU's ``nitro-enclave`` machine, with this process as the enclave's parent.

- :mod:`~enclavekit.vm.qemu`: find a QEMU that has the machine (`find_qemu`, `QemuNotFound` explains how to
  get one) and build its command line (`qemu_command`).
- :mod:`~enclavekit.vm.runner`: `run_enclave_vm(eif_path, *, cpu_count, memory_mib, debug_mode,
  enclave_cid, console, parent_role, parent_id, forward, listen)` -> `VmEnclave` (``.record``, ``.wait()``,
  ``.terminate()``, ``.console_text()``); `terminate_recorded(enclave_id)`.
- :mod:`~enclavekit.vm.state`: records for ``describe-enclaves`` / ``terminate-enclave``.
- :mod:`~enclavekit.vm.vhost_user`: `VhostUserVsockBackend`, the parent side of the machine's vhost-user
  vsock device, built on :mod:`~enclavekit.vm.virtio_vsock` (packets, credit, connection states) and
  :mod:`~enclavekit.vm.virtqueue` (guest memory, vrings). They hand connections to
  :mod:`enclavekit.transport` (``RelayServer.submit``), which holds the socket-level API.
- :mod:`~enclavekit.vm.commands`: click commands (``python -m enclavekit.vm
  run-enclave|describe-enclaves|terminate-enclave|console``) until the root CLI wires ``run-enclave --vm``.
"""

from __future__ import annotations

from enclavekit.vm.qemu import QemuNotFound, find_qemu
from enclavekit.vm.runner import EnclaveBootError, VmEnclave, run_enclave_vm, terminate_recorded

__all__ = [
    "EnclaveBootError",
    "QemuNotFound",
    "VmEnclave",
    "find_qemu",
    "run_enclave_vm",
    "terminate_recorded",
]

"""Boot an EIF in QEMU's nitro-enclave machine, with this process as the enclave's parent.

`run_enclave_vm` checks the EIF (enclavekit's reader, unless ``precheck=False``), starts the vhost-user
vsock back-end (heartbeat answered, optional port forwarding), starts QEMU, waits for the enclave's init
heartbeat (the moment nitro-cli reports an enclave as running), records the enclave for
``describe-enclaves`` and returns a `VmEnclave` handle. The console is the VM's serial port; as on Nitro it
is only available in debug mode.

Differences from a real Nitro enclave (QEMU's, not ours): the CPU is emulated (TCG, a boot takes seconds),
PCRs are not zeroed in debug mode, attestation documents are unsigned (empty signature and certificate:
`enclavekit verify` refuses them), the EIF signature is not verified (only the certificate is parsed).

An enclave ends when its kernel reboots, as on Nitro. ``-no-reboot`` covers the resets QEMU sees, but not a
restart through the firmware: with the usual ``reboot=k`` the guest kernel finds no keyboard controller on
this microvm-based machine and falls back to jumping to the firmware's reset vector, which may boot the EIF
again without QEMU noticing. The enclave's init heartbeat tells: a second one means a second boot, and the VM
is ended then (`VmEnclave.restarted` is set).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from enclavekit.errors import Error, UsageError
from enclavekit.vm.qemu import QemuConfig, find_qemu, host_tsc_khz, qemu_command
from enclavekit.vm.state import EnclaveRecord, list_records, remove_record, state_dir, write_record
from enclavekit.vm.vhost_user import VhostUserVsockBackend
from enclavekit.vm.virtio_vsock import Endpoint

__all__ = ["EnclaveBootError", "VmEnclave", "run_enclave_vm"]

log = logging.getLogger(__name__)

#: Time for the enclave's init to send its heartbeat; TCG boots take 5-10 s on an idle 2-core machine.
DEFAULT_BOOT_TIMEOUT = 180.0
MIN_MEMORY_MIB = 64
FIRST_CID = 16
PR_SET_PDEATHSIG = 1
Console = Callable[[str], None] | TextIO


class EnclaveBootError(Error):
    """QEMU refused the EIF or the enclave did not boot (no heartbeat)."""

    exit_code = 1


class _Boots:
    """Counts the enclave's boots by its init heartbeats (called in the vhost-user back-end's thread)."""

    def __init__(self) -> None:
        self.booted = threading.Event()
        self.restarted = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None

    def heartbeat(self) -> None:
        if not self.booted.is_set():
            self.booted.set()
            return
        self.restarted.set()
        process = self.process
        if process is not None and process.poll() is None:
            log.warning(
                "the enclave booted a second time (its kernel restarted through the firmware): "
                "ending the VM, as Nitro ends an enclave whose kernel reboots"
            )
            process.terminate()  # no waiting here: QEMU's shutdown needs this thread to answer it


class _ConsoleTail(threading.Thread):
    """Follow the serial log file and hand each new piece of text to the console sink."""

    def __init__(self, path: Path, sink: Callable[[str], None]) -> None:
        super().__init__(name="enclave-console", daemon=True)
        self.path = path
        self.sink = sink
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.path.exists() and not self.stopping.wait(0.05):
            pass
        try:
            with open(self.path, encoding="utf-8", errors="replace") as source:
                while True:
                    text = source.read(65536)
                    if text:
                        self.sink(text)
                    elif self.stopping.wait(0.1):
                        rest = source.read()
                        if rest:
                            self.sink(rest)
                        return
        except OSError:
            return

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


class VmEnclave:
    """A running enclave VM: its record, its QEMU process and its parent-side back-end."""

    def __init__(
        self,
        record: EnclaveRecord,
        process: subprocess.Popen[bytes],
        backend: VhostUserVsockBackend,
        workdir: Path,
        console_tail: _ConsoleTail | None,
        records: Path | None,
        restarted: threading.Event | None = None,
    ) -> None:
        self.record = record
        self.process = process
        self.backend = backend
        self.workdir = workdir
        self._tail = console_tail
        self._records = records
        self._closed = False
        #: Set when the enclave booted a second time; the VM was ended then (see the module notes).
        self.restarted = restarted if restarted is not None else threading.Event()

    @property
    def console_log(self) -> Path | None:
        return Path(self.record.console_log) if self.record.console_log else None

    def console_text(self) -> str:
        """Everything the enclave wrote on its console so far (debug mode only)."""
        log_path = self.console_log
        if log_path is None or not log_path.exists():
            return ""
        return log_path.read_text(encoding="utf-8", errors="replace")

    def is_running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the enclave to end (its init exits and the VM powers off); returns QEMU's status."""
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is not None:
                self.close()
        return code

    def terminate(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._tail is not None:
            self._tail.stop()
        self.backend.stop()
        with contextlib.suppress(ValueError):
            remove_record(self.record.enclave_id, self._records)
        keep = os.environ.get("ENCLAVEKIT_VM_KEEP_WORKDIR")
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VmEnclave:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def _die_with_parent() -> None:
    """In the QEMU child: be killed when the process that started it dies (no orphaned VMs)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _sink(console: Console | None) -> Callable[[str], None] | None:
    if console is None:
        return None
    if callable(console):
        return console
    stream = console

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def _free_cid(records: Path | None) -> int:
    used = {r.enclave_cid for r in list_records(records)}
    cid = FIRST_CID
    while cid in used:
        cid += 1
    return cid


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def run_enclave_vm(
    eif_path: str | os.PathLike[str],
    *,
    cpu_count: int = 2,
    memory_mib: int = 512,
    debug_mode: bool = False,
    enclave_cid: int | None = None,
    enclave_name: str | None = None,
    console: Console | None = None,
    parent_role: str | None = None,
    parent_id: str | None = None,
    forward: Mapping[int, Endpoint] | None = None,
    listen: Mapping[tuple[str, int], int] | None = None,
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    qemu: str | os.PathLike[str] | None = None,
    precheck: bool = True,
    records: Path | None = None,
    wait_for_heartbeat: bool = True,
) -> VmEnclave:
    """Boot ``eif_path`` in QEMU's nitro-enclave machine and return once the enclave has booted.

    ``console`` (a callable taking text, or a text stream) receives the serial console as it arrives;
    only in ``debug_mode`` (as on Nitro). ``parent_role``/``parent_id`` become PCR3/PCR4. ``forward`` maps
    parent vsock ports the guest connects to onto local endpoints; ``listen`` maps local TCP addresses
    onto guest vsock ports. Raises `EnclaveBootError` if QEMU refuses the EIF or no heartbeat comes
    within ``boot_timeout`` seconds, and `QemuNotFound` if no suitable QEMU exists.
    """
    eif = Path(eif_path)
    if not eif.is_file():
        raise UsageError(f"--eif-path {eif} does not exist or is not a file")
    if cpu_count < 1:
        raise UsageError(f"--cpu-count must be at least 1, found {cpu_count}")
    if memory_mib < MIN_MEMORY_MIB:
        raise UsageError(f"--memory must be at least {MIN_MEMORY_MIB} MiB, found {memory_mib}")
    measurements: dict[str, str] = {}
    if precheck:
        from enclavekit.eif.reader import measure_eif

        measurements = measure_eif(eif).to_json()
        needed = 4 * eif.stat().st_size  # nitro-cli's ENCLAVE_MEMORY_EIF_SIZE_RATIO
        if memory_mib * 1024 * 1024 < needed:
            raise UsageError(
                f"--memory {memory_mib} MiB is too small for a {eif.stat().st_size}-byte EIF: "
                f"give at least {-(-needed // (1024 * 1024))} MiB (4 x the EIF size, as nitro-cli)"
            )
    binary = Path(qemu) if qemu is not None else find_qemu()
    cid = enclave_cid if enclave_cid is not None else _free_cid(records)
    enclave_id = f"{parent_id or 'i-' + secrets.token_hex(8)}-enc{secrets.token_hex(8)}"
    name = enclave_name or eif.stem
    workdir = Path(tempfile.mkdtemp(prefix="ek-vm-"))
    console_log = workdir / "console.log" if debug_mode else None
    boots = _Boots()
    backend = VhostUserVsockBackend(
        workdir / "vsock.sock",
        guest_cid=cid,
        forward=forward,
        listen=listen,
        on_heartbeat=boots.heartbeat,
    ).start()
    argv = qemu_command(
        QemuConfig(
            qemu=binary,
            eif_path=eif.resolve(),
            vhost_socket=workdir / "vsock.sock",
            memory_mib=memory_mib,
            cpu_count=cpu_count,
            module_id=enclave_id,
            serial="stdio" if console_log else "null",
            parent_role=parent_role,
            parent_id=parent_id,
            append=f"tsc_early_khz={khz}" if (khz := host_tsc_khz()) else None,
        )
    )
    log.info("starting %s", " ".join(argv))
    qemu_log = workdir / "qemu.log"
    # The serial port is QEMU's stdout (``-serial stdio``): with ``-serial file:`` guests were seen not to
    # boot. Without debug mode it is ``-serial null`` and stdout is discarded.
    with open(qemu_log, "wb") as qemu_err, open(console_log or os.devnull, "wb") as serial_out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=serial_out,
            stderr=qemu_err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    boots.process = process
    sink = _sink(console) if debug_mode else None
    tail = _ConsoleTail(console_log, sink) if console_log and sink else None
    if tail is not None:
        tail.start()
    record = EnclaveRecord(
        enclave_name=name,
        enclave_id=enclave_id,
        process_id=os.getpid(),
        qemu_pid=process.pid,
        enclave_cid=cid,
        cpu_count=cpu_count,
        memory_mib=memory_mib,
        debug_mode=debug_mode,
        eif_path=str(eif.resolve()),
        console_log=str(console_log) if console_log else None,
        measurements=measurements,
    )
    enclave = VmEnclave(record, process, backend, workdir, tail, records, boots.restarted)
    if not wait_for_heartbeat:
        write_record(record, records)
        return enclave
    deadline = time.monotonic() + boot_timeout
    while not boots.booted.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            timed_out = process.poll() is None
            status = process.poll()
            qemu_said = _tail(qemu_log).strip()
            console_said = _tail(console_log, 2000).strip() if console_log else ""
            enclave.close()
            what = (
                f"no heartbeat from the enclave within {boot_timeout:.0f} s"
                if timed_out
                else f"QEMU exited with status {status} before the enclave booted"
            )
            detail = f"; QEMU said: {qemu_said}" if qemu_said else ""
            if console_said:
                detail += f"; console ends with: {console_said[-800:]}"
            hint = "" if debug_mode else " (run with --debug-mode to see the console)"
            raise EnclaveBootError(f"{what}{detail}{hint}")
    write_record(record, records)
    return enclave


def terminate_recorded(enclave_id: str, records: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop an enclave started by another process (``terminate-enclave``); False if it is unknown."""
    for record in list_records(records):
        if record.enclave_id != enclave_id:
            continue
        for pid in (record.process_id, record.qemu_pid):
            if pid == os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            _alive(record.qemu_pid)
            or (record.process_id != os.getpid() and _alive(record.process_id))
        ):
            time.sleep(0.05)
        if _alive(record.qemu_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.qemu_pid, signal.SIGKILL)
        remove_record(enclave_id, records)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has ended; only its parent has not collected it yet
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    # A zombie child of ours still answers signal 0; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


__all__ += ["state_dir", "terminate_recorded"]

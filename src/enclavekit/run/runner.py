"""The local runner's API: run, describe, follow the console of, and terminate local enclaves.

:func:`run_enclave` checks the options the way nitro-cli does (CID ≥ 4 and unused, memory ≥ 4 × the
EIF size, CPUs available), checks and unpacks the EIF (:mod:`enclavekit.run.launch`), then starts a
detached supervisor (:mod:`enclavekit.run.supervisor`) and returns once the application runs. The
enclave outlives the call, as with nitro-cli; :func:`terminate_enclave` ends it.

Isolation (``isolation=``): ``"chroot"`` (default for root) enters a private mount namespace and
chroots into the rootfs like nitro's ``init``; ``"process"`` (default otherwise) runs ``cmd`` as a
plain process with the rootfs as working directory. Either way the application shares this
machine's kernel, network and users: this is a stand-in for the enclave's interfaces, not for its
isolation. Memory is reported, not enforced; the application is pinned to the reported CPUs.

Every application gets, on top of the image's ``env``: ``ENCLAVEKIT_NSM`` (the emulated NSM),
``ENCLAVEKIT_VSOCK_DIR`` and ``ENCLAVEKIT_VSOCK_CID`` (see :mod:`enclavekit.run.vsock`),
``ENCLAVEKIT_ENCLAVE_ID`` and ``ENCLAVEKIT_PYTHON`` (this interpreter, for images that bring only
Python sources; pair it with ``host_python=True`` in chroot mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from enclavekit._fs import write_atomic
from enclavekit.errors import Error, UsageError
from enclavekit.nsm.emulator import new_module_id
from enclavekit.run import state as st
from enclavekit.run.launch import prepare
from enclavekit.run.rootfs import check_chroot_layout, host_path_parts
from enclavekit.run.supervisor import LAUNCH_FILE

#: nitro-cli: enclave memory must be at least this many times the EIF size.
ENCLAVE_MEMORY_EIF_SIZE_RATIO = 4
#: CIDs 0-3 are reserved (hypervisor, local, host, parent); nitro-cli hands out from 16 when asked.
MIN_ENCLAVE_CID = 4
FIRST_AUTO_CID = 16
MAX_CID = 0xFFFFFFFE
DEFAULT_CPU_COUNT = 2
DEFAULT_MEMORY_MIB = 512
#: How long run_enclave waits for the supervisor to report.
START_TIMEOUT = 30.0


class EnclaveStartError(Error):
    """The enclave could not be started (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class RunOptions:
    """``run-enclave``'s options."""

    eif_path: Path
    cpu_count: int = DEFAULT_CPU_COUNT
    memory_mib: int = DEFAULT_MEMORY_MIB
    enclave_cid: int | None = None
    debug_mode: bool = False
    enclave_name: str | None = None
    isolation: str | None = None
    host_mounts: tuple[str, ...] = ()
    host_python: bool = False
    #: Explicit CPUs (nitro-cli ``--cpu-ids``); overrides ``cpu_count``.
    cpu_ids: tuple[int, ...] | None = None


_CHROOT_PROBE = (
    "import ctypes, ctypes.util, sys; "
    "libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True); "
    "sys.exit(0 if libc.unshare(0x00020000) == 0 else 1)"
)
_chroot_ok: bool | None = None


def chroot_supported() -> bool:
    """True when this process is root and may create mount namespaces (probed once)."""
    global _chroot_ok
    if _chroot_ok is None:
        if os.geteuid() != 0:
            _chroot_ok = False
        else:
            probe = subprocess.run(
                [sys.executable, "-c", _CHROOT_PROBE], capture_output=True, timeout=30
            )
            _chroot_ok = probe.returncode == 0
    return _chroot_ok


def default_isolation() -> str:
    """``chroot`` when root and mount namespaces work, else ``process``."""
    return "chroot" if chroot_supported() else "process"


def python_runtime_paths() -> tuple[str, ...]:
    """Host paths that make this interpreter and enclavekit usable inside a chroot."""
    import enclavekit

    paths = ["/usr", "/bin", "/lib", "/lib64", "/sbin", "/etc/ld.so.cache"]
    paths += [sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(enclavekit.__file__))]
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    out: list[str] = []
    for path in paths:
        if os.path.lexists(path) and path not in out:
            out.append(path)
    # Parents before children, so a later bind is not hidden by an earlier one.
    return tuple(sorted(out, key=lambda p: p.count("/")))


def _check_options(options: RunOptions, live: Sequence[st.EnclaveRecord]) -> tuple[int, ...]:
    if options.cpu_count < 1:
        raise UsageError(f"--cpu-count must be at least 1, got {options.cpu_count}")
    if options.memory_mib < 1:
        raise UsageError(f"--memory must be at least 1 MiB, got {options.memory_mib}")
    if options.enclave_cid is not None:
        if not MIN_ENCLAVE_CID <= options.enclave_cid <= MAX_CID:
            raise UsageError(
                f"--enclave-cid {options.enclave_cid} is reserved or out of range; use"
                f" {MIN_ENCLAVE_CID}..{MAX_CID} (0-3 belong to the hypervisor, loopback, host and"
                " parent)"
            )
        if any(r.cid == options.enclave_cid for r in live):
            raise UsageError(
                f"--enclave-cid {options.enclave_cid} is used by a running enclave; pick another"
                " or omit the option"
            )
    isolation = options.isolation or default_isolation()
    if isolation not in ("chroot", "process"):
        raise UsageError(f"--isolation must be chroot or process, got {isolation!r}")
    if isolation == "chroot" and not chroot_supported():
        raise UsageError(
            "--isolation chroot needs root and permission to create mount namespaces; use"
            " --isolation process"
        )
    available = sorted(os.sched_getaffinity(0))
    if options.cpu_ids is not None:
        missing = sorted(set(options.cpu_ids) - set(available))
        if not options.cpu_ids or missing or len(set(options.cpu_ids)) != len(options.cpu_ids):
            raise UsageError(
                f"--cpu-ids {list(options.cpu_ids)}: give distinct CPUs this process may use"
                f" ({available}); not available: {missing or 'none'}"
            )
        return tuple(sorted(options.cpu_ids))
    if options.cpu_count > len(available):
        raise UsageError(
            f"--cpu-count {options.cpu_count}: this machine offers {len(available)} CPU(s);"
            " ask for fewer"
        )
    return tuple(available[: options.cpu_count])


def _pick_cid(options: RunOptions, live: Sequence[st.EnclaveRecord]) -> int:
    if options.enclave_cid is not None:
        return options.enclave_cid
    used = {r.cid for r in live}
    cid = FIRST_AUTO_CID
    while cid in used:
        cid += 1
    return cid


def _pick_name(options: RunOptions, eif_path: Path, live: Sequence[st.EnclaveRecord]) -> str:
    """``--enclave-name`` if no running enclave has it (else a usage error); without one, the EIF's
    stem made unique as nitro-cli does (``app``, ``app_1``, ``app_2``, ...)."""
    names = {r.name for r in live}
    if options.enclave_name is not None:
        holder = next((r for r in live if r.name == options.enclave_name), None)
        if holder is not None:
            raise UsageError(
                f"--enclave-name {options.enclave_name}: the running enclave {holder.enclave_id}"
                " has that name, and name-based commands must never be ambiguous; pick another"
                " name or terminate that enclave"
            )
        return options.enclave_name
    base = eif_path.stem
    name, index = base, 0
    while name in names:
        index += 1
        name = f"{base}_{index}"
    return name


def _check_host_mounts(host_mounts: Sequence[str]) -> None:
    for host_path in host_mounts:
        host_path_parts(host_path)
        if not os.path.lexists(host_path):
            raise UsageError(f"--mount-host {host_path}: no such path on this machine")


def run_enclave(options: RunOptions, *, store: st.EnclaveStore | None = None) -> st.EnclaveRecord:
    """Start an enclave from ``options.eif_path``; returns its record once the app runs.

    Everything that can be checked is checked before anything is created: options, host mounts,
    then (after unpacking into the enclave's private directory) the image's ``rootfs``,
    ``cmd``/``env`` and, in chroot mode, every entry the runner will create or mount on
    (:mod:`enclavekit.run.rootfs`).
    """
    store = store or st.EnclaveStore()
    eif_path = options.eif_path.resolve()
    if not eif_path.is_file():
        raise UsageError(f"--eif-path {options.eif_path}: no such file")
    isolation = options.isolation or default_isolation()
    mounts = list(options.host_mounts)
    if options.host_python:
        mounts = list(python_runtime_paths()) + mounts
    _check_host_mounts(mounts)
    with store.locked():  # the CID and name checks hold until the record reserves them
        live = store.all()
        cpu_ids = _check_options(options, live)
        eif_size = eif_path.stat().st_size
        needed = -(-ENCLAVE_MEMORY_EIF_SIZE_RATIO * eif_size // (1024 * 1024))
        if options.memory_mib < needed:
            raise UsageError(
                f"--memory {options.memory_mib} MiB is too small for a {eif_size}-byte EIF:"
                f" nitro-cli requires at least {ENCLAVE_MEMORY_EIF_SIZE_RATIO} x the EIF size,"
                f" i.e. {needed} MiB"
            )
        cid = _pick_cid(options, live)
        name = _pick_name(options, eif_path, live)
        enclave_id = new_module_id(datetime.now(UTC), st.instance_id(store.root))
        directory = store.enclave_dir(enclave_id)
        directory.parent.mkdir(parents=True, exist_ok=True)
        # 0700: the unpacked image may hold set-uid files owned by root; keep other users out.
        directory.mkdir(mode=0o700, exist_ok=False)
        try:
            prepared = prepare(eif_path, directory)
            if isolation == "chroot":
                check_chroot_layout(prepared.initramfs, mounts)
        except BaseException:
            st.remove_tree(directory)
            raise
        vsock = st.ensure_private_dir(st.vsock_dir(store.root))
        st.ensure_private_dir(st.runtime_dir(store.root, enclave_id))
        launch = {
            "rootfs": str(prepared.rootfs),
            "argv": list(prepared.argv),
            "env": list(prepared.env),
            "isolation": isolation,
            "host_mounts": mounts,
            "vsock_dir": str(vsock),
            "runtime_dir": str(st.runtime_dir(store.root, enclave_id)),
            "cpu_ids": list(cpu_ids),
            "extra_env": {
                "ENCLAVEKIT_VSOCK_CID": str(cid),
                "ENCLAVEKIT_ENCLAVE_ID": enclave_id,
                "ENCLAVEKIT_PYTHON": sys.executable,
            },
        }
        write_atomic(directory / LAUNCH_FILE, json.dumps(launch, indent=2).encode())
        record = st.EnclaveRecord(
            name=name,
            enclave_id=enclave_id,
            cid=cid,
            cpu_ids=cpu_ids,
            memory_mib=options.memory_mib,
            debug_mode=options.debug_mode,
            eif_path=str(eif_path),
            measurements=prepared.measurements.to_json(),
            isolation=isolation,
            metadata=prepared.described_metadata or None,
        )
        store.save(record)
    try:
        return _spawn_supervisor(store, record, directory)
    except OSError:  # the enclave process could not be spawned
        store.remove(record.enclave_id)
        raise


def _console_log(store: st.EnclaveStore, enclave_id: str) -> Path:
    """Where an ended enclave's console is kept."""
    return st.logs_dir(store.root) / f"{enclave_id}.log"


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while st.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _spawn_supervisor(
    store: st.EnclaveStore, record: st.EnclaveRecord, directory: Path
) -> st.EnclaveRecord:
    log = open(directory / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enclavekit.run.supervisor", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(directory),
        )
    finally:
        log.close()
    proc.wait(START_TIMEOUT)  # returns as soon as the supervisor has detached
    deadline = time.monotonic() + START_TIMEOUT
    last = record
    while time.monotonic() < deadline:
        current = store.load(record.enclave_id)
        if current is None:  # started and already ended: report what was started
            return last.replace(state=st.STATE_RUNNING)
        last = current
        if current.state == st.STATE_RUNNING:
            return current
        if current.state == st.STATE_FAILED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(current.pid, signal.SIGTERM)
            _wait_gone(current.pid, 5.0)  # the console log is in place when we name it
            raise EnclaveStartError(
                f"the enclave application could not be started: {current.error}; console log:"
                f" {_console_log(store, record.enclave_id)}"
            )
        if (current.pid and not st.pid_alive(current.pid)) or (proc.returncode and not current.pid):
            store.remove(record.enclave_id)
            raise EnclaveStartError(
                "the enclave process ended before the enclave ran; see"
                f" {st.logs_dir(store.root) / (record.enclave_id + '.supervisor.log')}"
            )
        time.sleep(0.05)
    if last.pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(last.pid, signal.SIGKILL)
    store.remove(record.enclave_id)
    raise EnclaveStartError(f"the enclave did not start within {START_TIMEOUT:.0f} s")


def describe_enclaves(store: st.EnclaveStore | None = None) -> list[st.EnclaveRecord]:
    """Records of the running enclaves, oldest first."""
    return (store or st.EnclaveStore()).all()


class EnclaveEnded(UsageError):
    """The enclave asked for has ended; carries how (exit 2: nothing runs under that id/name)."""

    def __init__(self, ended: st.EndedEnclave) -> None:
        self.ended = ended
        super().__init__(f"no running enclave: {ended.summary()}")


def find_enclave(
    store: st.EnclaveStore, *, enclave_id: str | None = None, name: str | None = None
) -> st.EnclaveRecord:
    """The running enclave with this id or name; else :class:`EnclaveEnded` when one with it has
    ended (its exit status and console log), else a UsageError listing what is running."""
    live = store.all()
    for record in live:
        if (enclave_id is not None and record.enclave_id == enclave_id) or (
            name is not None and record.name == name
        ):
            return record
    ended = store.find_ended(enclave_id=enclave_id, name=name)
    if ended is not None:
        raise EnclaveEnded(ended)
    wanted = f"id {enclave_id}" if enclave_id is not None else f"name {name}"
    running = ", ".join(r.enclave_id for r in live) or "none"
    raise UsageError(f"no running enclave with {wanted} (running: {running})")


def terminate_enclave(
    record: st.EnclaveRecord, *, store: st.EnclaveStore | None = None, timeout: float = 10.0
) -> bool:
    """Stop one enclave and wait for it to be gone; True when it is."""
    store = store or st.EnclaveStore()
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not st.pid_alive(record.pid) and store.load(record.enclave_id) is None:
            return True
        if not st.pid_alive(record.pid):
            store.remove(record.enclave_id)
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if record.app_pid:
            os.killpg(record.app_pid, signal.SIGKILL)
    store.remove(record.enclave_id)
    return not st.pid_alive(record.pid)


def console_path(store: st.EnclaveStore, record: st.EnclaveRecord) -> Path:
    return store.enclave_dir(record.enclave_id) / "console.log"


def follow_console(
    store: st.EnclaveStore,
    record: st.EnclaveRecord,
    *,
    disconnect_timeout: float | None = None,
    poll: float = 0.1,
) -> Iterator[bytes]:
    """The console output so far, then new output as it comes, until the enclave ends (or the
    timeout passes)."""
    path = console_path(store, record)
    archived = st.logs_dir(store.root) / f"{record.enclave_id}.log"
    deadline = None if disconnect_timeout is None else time.monotonic() + disconnect_timeout
    offset = 0
    while True:
        source = path if path.exists() else archived
        with contextlib.suppress(FileNotFoundError), open(source, "rb") as f:
            f.seek(offset)
            chunk = f.read()
            if chunk:
                offset += len(chunk)
                yield chunk
        if not st.pid_alive(record.pid) and not path.exists():
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(poll)

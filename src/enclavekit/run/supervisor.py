"""The per-enclave process (nitro-cli's "enclave process"): serves the emulated NSM and runs the app.

Started detached by :func:`enclavekit.run.runner.run_enclave` as ``python -m
enclavekit.run.supervisor <enclave-dir>``. It

1. loads the record and ``launch.json`` the runner wrote;
2. starts an :class:`~enclavekit.nsm.NsmEmulator` whose PCR0/1/2 (and PCR8) are the EIF's
   measurements (zero in debug mode), module id = the enclave id, signed by the state directory's
   emulated AWS PKI, served on ``<enclave-dir>/runtime/nsm.sock``;
3. starts the application (chrooted through :mod:`enclavekit.run.enter`, or as a plain process
   whose working directory is the rootfs) in its own session, output to ``console.log``, and
   waits until its ``execve`` succeeded (chroot mode: ``enter`` reports through a close-on-exec
   pipe; process mode: ``subprocess`` does the same);
4. marks the record RUNNING, or FAILED with the reason (also written to the console) when the
   command could not be executed — the runner waits for this;
5. waits until the application exits or SIGTERM/SIGINT arrives; then stops the application's
   process group (SIGTERM, SIGKILL after :data:`STOP_GRACE` s), the NSM server, keeps how the
   enclave ended (:meth:`~enclavekit.run.state.EnclaveStore.record_end`) and removes the enclave
   directory (the console log moves to ``<state>/logs/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from enclavekit._fs import write_atomic
from enclavekit.nsm.emulator import NsmEmulator
from enclavekit.nsm.server import serve_in_background
from enclavekit.pki.emulated import EmulatedAwsPki
from enclavekit.run import state as st
from enclavekit.run.enter import IN_ENCLAVE_RUNTIME, INIT_PATH, exec_failure

#: Seconds between SIGTERM and SIGKILL when stopping the application.
STOP_GRACE = 3.0
#: Seconds the chroot entry may take to reach the application's execve.
EXEC_TIMEOUT = 30.0
LAUNCH_FILE = "launch.json"


class AppStartError(Exception):
    """The application's command could not be executed; the message says why."""


def _pcrs(measurements: dict[str, str]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for key, value in measurements.items():
        if key.startswith("PCR") and key[3:].isdigit():
            out[int(key[3:])] = bytes.fromhex(value)
    return out


def _host_lookup(argv0: str, rootfs: Path) -> str:
    """Process mode: ``argv0`` as init would find it, preferring the rootfs over the host."""
    if "/" in argv0:
        inside = rootfs / argv0.lstrip("/")
        if argv0.startswith("/") and inside.exists():
            return str(inside)
        return argv0
    for directory in INIT_PATH:
        inside = rootfs / directory.lstrip("/") / argv0
        if os.access(inside, os.X_OK) and inside.is_file():
            return str(inside)
    for directory in INIT_PATH:
        candidate = os.path.join(directory, argv0)
        if os.access(candidate, os.X_OK):
            return candidate
    return argv0


def _process_exec_failure(argv0: str, program: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) and not os.path.lexists(program):
        if "/" in argv0:
            return f"cannot execute {argv0}: no such file in the rootfs or on this machine"
        return (
            f"cannot execute {argv0}: not found in {':'.join(INIT_PATH)} of the rootfs or of this"
            " machine"
        )
    return exec_failure(program, exc)


def _wait_for_exec(app: subprocess.Popen[bytes], status: int) -> None:
    """Block until ``enter`` has exec'd the application (pipe closed, empty) or failed (reason)."""
    deadline = time.monotonic() + EXEC_TIMEOUT
    chunks: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _stop(app)
                raise AppStartError(f"the application was not started within {EXEC_TIMEOUT:.0f} s")
            ready, _, _ = select.select([status], [], [], left)
            if not ready:
                continue
            chunk = os.read(status, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(status)
    if chunks:
        app.wait()
        raise AppStartError(b"".join(chunks).decode("utf-8", "replace"))


def _start_app(directory: Path, launch: dict[str, Any], console: Any) -> subprocess.Popen[bytes]:
    rootfs = Path(launch["rootfs"])
    env_items = list(launch["env"])
    runtime = Path(launch["runtime_dir"])
    if launch["isolation"] == "chroot":
        extra = {
            "ENCLAVEKIT_NSM": f"unix://{IN_ENCLAVE_RUNTIME}/nsm.sock",
            "ENCLAVEKIT_VSOCK_DIR": f"{IN_ENCLAVE_RUNTIME}/vsock",
        }
    else:
        extra = {
            "ENCLAVEKIT_NSM": f"unix://{runtime}/nsm.sock",
            "ENCLAVEKIT_VSOCK_DIR": str(launch["vsock_dir"]),
        }
    extra.update(launch["extra_env"])
    env_items += [f"{k}={v}" for k, v in extra.items()]
    if launch["isolation"] == "chroot":
        spec = {
            "rootfs": str(rootfs),
            "runtime_dir": str(runtime),
            "vsock_dir": str(launch["vsock_dir"]),
            "host_mounts": launch["host_mounts"],
            "argv": launch["argv"],
            "env": env_items,
        }
        status, status_w = os.pipe()
        spec["status_fd"] = status_w
        spec_path = directory / "enter.json"
        write_atomic(spec_path, json.dumps(spec).encode(), mode=0o600)
        argv = [sys.executable, "-m", "enclavekit.run.enter", str(spec_path)]
        try:
            app = subprocess.Popen(
                argv,
                cwd=str(directory),
                env=dict(os.environ),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(status_w,),
            )
        except BaseException:
            os.close(status)
            raise
        finally:
            os.close(status_w)
        _pin(app, launch)  # before the exec: the application inherits it
        _wait_for_exec(app, status)
    else:
        argv = list(launch["argv"])
        argv[0] = _host_lookup(argv[0], rootfs)
        try:
            app = subprocess.Popen(
                argv,
                cwd=str(rootfs),
                env=dict(item.split("=", 1) for item in env_items if "=" in item),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:  # subprocess reports the child's failed execve here
            raise AppStartError(_process_exec_failure(launch["argv"][0], argv[0], exc)) from None
        _pin(app, launch)
    return app


def _pin(app: subprocess.Popen[bytes], launch: dict[str, Any]) -> None:
    """Pin the application to the enclave's CPUs (from here: preexec_fn is unsafe in this
    multi-threaded process)."""
    cpu_ids = launch.get("cpu_ids") or []
    if cpu_ids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(app.pid, cpu_ids)


def _stop(app: subprocess.Popen[bytes]) -> None:
    """End the application and everything it started (its session's process group)."""
    if app.poll() is not None:
        # The enclave ends with its application: leftovers it forked die with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(app.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(app.pid, signal.SIGTERM)
    try:
        app.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(app.pid, signal.SIGKILL)
        app.wait()


def supervise(directory: Path) -> int:
    """Steps 1-5 of the module docstring; returns the exit status for this process."""
    store = st.EnclaveStore(directory.parent.parent)
    record = store.load(directory.name)
    if record is None:
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    record = record.replace(pid=os.getpid())
    store.save(record)
    app: subprocess.Popen[bytes] | None = None
    console_path = directory / "console.log"
    try:
        launch = json.loads((directory / LAUNCH_FILE).read_text())
        pki = EmulatedAwsPki.load_or_create(store.root / "nsm")
        emulator = NsmEmulator(
            pcrs=_pcrs(dict(record.measurements)),
            debug_mode=record.debug_mode,
            pki=pki,
            module_id=record.enclave_id,
        )
        runtime = Path(launch["runtime_dir"])
        runtime.mkdir(mode=0o755, parents=True, exist_ok=True)
        with (
            serve_in_background(emulator, f"unix://{runtime}/nsm.sock", workers=2),
            open(console_path, "ab", buffering=0) as console,
        ):
            app = _start_app(directory, launch, console)
            record = record.replace(state=st.STATE_RUNNING, app_pid=app.pid)
            store.save(record)
            while not stop.is_set() and app.poll() is None:
                stop.wait(0.2)
            if stop.is_set():
                store.save(record.replace(state=st.STATE_TERMINATING))
            _stop(app)
            console.write(f"\n[enclavekit] enclave exited with status {app.returncode}\n".encode())
        store.record_end(record, exit_status=app.returncode, terminated=stop.is_set())
    except Exception as exc:  # the runner must learn why, whatever it was
        if isinstance(exc, AppStartError):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        with contextlib.suppress(OSError), open(console_path, "ab") as console:
            console.write(f"[enclavekit] the enclave could not start: {reason}\n".encode())
        if app is not None:
            _stop(app)
        store.record_end(record, error=reason)
        store.save(record.replace(state=st.STATE_FAILED, error=reason))
        # Give the runner time to read the reason before the record goes away.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stop.is_set():
            stop.wait(0.2)
    store.remove(record.enclave_id)
    return 0


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m enclavekit.run.supervisor ENCLAVE_DIR\n")
        raise SystemExit(2)
    # Detach: the launcher waits for this first process only; the enclave process lives on,
    # re-parented away from the caller (no zombie, no child to reap there).
    if os.fork() > 0:
        os._exit(0)
    raise SystemExit(supervise(Path(sys.argv[1])))


if __name__ == "__main__":
    main()

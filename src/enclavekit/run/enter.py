"""Enter an unpacked rootfs the way nitro's ``init`` does, then exec the application (root only).

Run as ``python -m enclavekit.run.enter SPEC.json`` by the supervisor (a fresh, single-threaded
process, so ``unshare``/``mount``/``chroot`` happen before anything else runs). Steps:

1. ``unshare(CLONE_NEWNS)`` and make every mount private, so nothing below leaks to the host;
2. inside the rootfs: ``proc`` on ``/proc``, the host's ``/dev`` bound on ``/dev``, tmpfs on
   ``/tmp`` and ``/run``; ``/run/enclavekit`` = the enclave's runtime directory (its NSM socket) and
   ``/run/enclavekit/vsock`` = the emulated vsock directory;
3. each requested host path bound read-only at the same path (host symlinks such as ``/bin →
   usr/bin`` are recreated as symlinks);
4. ``chroot`` into the rootfs, ``chdir("/")`` (init ignores WORKDIR);
5. look ``argv[0]`` up in init's fixed ``PATH=/sbin:/usr/sbin:/bin:/usr/bin`` and ``execve`` it
   with the image's environment (plus the runner's variables).

Not done: sysfs and cgroup mounts, ``setsid`` (the supervisor already started a new session), user
or network namespaces (the application shares the host's network and users).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
INIT_PATH = ("/sbin", "/usr/sbin", "/bin", "/usr/bin")
#: Where the runner's files appear inside the enclave.
IN_ENCLAVE_RUNTIME = "/run/enclavekit"


class EnterError(Exception):
    """A step failed; the message names it."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise EnterError(f"{what}: {os.strerror(errno)}")


def _mount(
    libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int
) -> None:
    _check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _inside(rootfs: Path, path: str) -> Path:
    return rootfs / path.lstrip("/")


def _bind_host_path(libc: ctypes.CDLL, rootfs: Path, host_path: str) -> None:
    target = _inside(rootfs, host_path)
    if os.path.islink(host_path):
        if not os.path.lexists(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(host_path), target)
        return
    if os.path.isdir(host_path):
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    _mount(libc, host_path, str(target), None, MS_BIND | MS_REC)
    _mount(libc, None, str(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _lookup(argv0: str) -> str:
    if "/" in argv0:
        return argv0
    for directory in INIT_PATH:
        candidate = os.path.join(directory, argv0)
        if os.access(candidate, os.X_OK):
            return candidate
    raise EnterError(f"{argv0}: not found in {':'.join(INIT_PATH)} inside the enclave")


def enter(spec: dict[str, Any]) -> None:
    """Steps 1-5 of the module docstring; returns only by raising."""
    libc = _libc()
    rootfs = Path(spec["rootfs"])
    # 1.
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    # 2.
    for name in ("proc", "dev", "tmp", "run", "sys"):
        _inside(rootfs, name).mkdir(exist_ok=True)
    _mount(libc, "proc", str(_inside(rootfs, "proc")), "proc", MS_NOSUID | MS_NODEV)
    _mount(libc, "/dev", str(_inside(rootfs, "dev")), None, MS_BIND | MS_REC)
    _mount(libc, "tmpfs", str(_inside(rootfs, "tmp")), "tmpfs", MS_NOSUID | MS_NODEV)
    _mount(libc, "tmpfs", str(_inside(rootfs, "run")), "tmpfs", MS_NOSUID | MS_NODEV)
    runtime = _inside(rootfs, IN_ENCLAVE_RUNTIME)
    runtime.mkdir(parents=True, exist_ok=True)
    _mount(libc, spec["runtime_dir"], str(runtime), None, MS_BIND)
    (runtime / "vsock").mkdir(exist_ok=True)
    _mount(libc, spec["vsock_dir"], str(runtime / "vsock"), None, MS_BIND)
    # 3.
    for host_path in spec.get("host_mounts", []):
        _bind_host_path(libc, rootfs, host_path)
    # 4.
    os.chroot(rootfs)
    os.chdir("/")
    # 5.
    argv = list(spec["argv"])
    env = dict(item.split("=", 1) for item in spec["env"] if "=" in item)
    os.execve(_lookup(argv[0]), argv, env)  # noqa: S606 - init execs the image's cmd the same way


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m enclavekit.run.enter SPEC.json\n")
        raise SystemExit(2)
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        enter(spec)
    except (EnterError, OSError) as exc:
        sys.stderr.write(f"enclavekit: cannot start the enclave application: {exc}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()

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

Every entry of the image used on the way (``rootfs``, the mount points, each component of a
``--mount-host`` path) is reached through :mod:`enclavekit.run.rootfs` without following links and
mounted on through ``/proc/self/fd/N``; the chroot is ``fchdir`` + ``chroot(".")`` on the checked
descriptor. The runner checks the same layout before starting (so a refusal is a clear exit 1);
this is the enforcement at the moment of use.

Not done: sysfs and cgroup mounts, ``setsid`` (the supervisor already started a new session), user
or network namespaces (the application shares the host's network and users).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from enclavekit.run.rootfs import (
    CHROOT_MOUNT_POINTS,
    UnsafeImageEntry,
    host_path_parts,
    open_directory,
)

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


def _fd_path(fd: int) -> str:
    """Mount on what a descriptor refers to, never on a name that could be swapped for a link."""
    return f"/proc/self/fd/{fd}"


def _open_dir(dir_fd: int, parts: tuple[str, ...], shown: str, why: str) -> int:
    fd = open_directory(dir_fd, parts, shown=shown, create=True, why=why)
    assert fd is not None  # created when missing
    return fd


def _mount_on_dir(
    libc: ctypes.CDLL, source: str | None, rootfs: int, name: str, fstype: str | None, flags: int
) -> None:
    fd = _open_dir(rootfs, (name,), "/rootfs", f"the runner mounts on /{name}")
    try:
        _mount(libc, source, _fd_path(fd), fstype, flags)
    finally:
        os.close(fd)


def _bind_host_path(libc: ctypes.CDLL, rootfs: int, host_path: str) -> None:
    parts = host_path_parts(host_path)
    why = f"--mount-host {host_path} binds the host path there"
    parent = _open_dir(rootfs, parts[:-1], "/rootfs", why)
    try:
        name = parts[-1]
        if os.path.islink(host_path):
            try:
                os.lstat(name, dir_fd=parent)
            except FileNotFoundError:
                os.symlink(os.readlink(host_path), name, dir_fd=parent)
            return
        if os.path.isdir(host_path):
            target = _open_dir(parent, (name,), "/rootfs/" + "/".join(parts[:-1]), why)
        else:
            try:
                target = os.open(
                    name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent,
                )  # fmt: skip
            except OSError as exc:
                raise EnterError(f"/rootfs/{'/'.join(parts)}: {exc.strerror} ({why})") from None
            if not stat.S_ISREG(os.fstat(target).st_mode):
                os.close(target)
                raise EnterError(f"/rootfs/{'/'.join(parts)} is not a regular file ({why})")
        try:
            _mount(libc, host_path, _fd_path(target), None, MS_BIND | MS_REC)
        finally:
            os.close(target)
        # Remount read-only what is now mounted there (reopened: the old descriptor is below it).
        mounted = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            _mount(libc, None, _fd_path(mounted), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        finally:
            os.close(mounted)
    finally:
        os.close(parent)


def _lookup(argv0: str) -> str:
    if "/" in argv0:
        return argv0
    for directory in INIT_PATH:
        candidate = os.path.join(directory, argv0)
        if os.access(candidate, os.X_OK):
            return candidate
    raise EnterError(f"{argv0}: not found in {':'.join(INIT_PATH)} inside the enclave")


def exec_failure(program: str, exc: OSError) -> str:
    """Why ``execve(program)`` failed, in words a user can act on."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOENT and os.path.lexists(program):
        reason += " (its interpreter or dynamic loader is missing from the image)"
    elif exc.errno == errno.EACCES:
        reason += " (not executable: check its mode bits)"
    return f"cannot execute {program}: {reason}"


def enter(spec: dict[str, Any]) -> None:
    """Steps 1-5 of the module docstring; returns only by raising."""
    libc = _libc()
    # 1.
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    # The rootfs is reached from the runner's own unpack directory without following links
    # (opened in the new namespace: a descriptor from before unshare is not mountable on).
    initramfs = os.open(os.path.dirname(spec["rootfs"]), os.O_RDONLY | os.O_DIRECTORY)
    try:
        rootfs = _open_dir(initramfs, ("rootfs",), "/", "nitro's init chroots into it")
    finally:
        os.close(initramfs)
    # 2. (every mount point checked and created before anything is mounted)
    for name in CHROOT_MOUNT_POINTS:
        os.close(_open_dir(rootfs, (name,), "/rootfs", f"the runner mounts on /{name}"))
    _mount_on_dir(libc, "proc", rootfs, "proc", "proc", MS_NOSUID | MS_NODEV)
    _mount_on_dir(libc, "/dev", rootfs, "dev", None, MS_BIND | MS_REC)
    _mount_on_dir(libc, "tmpfs", rootfs, "tmp", "tmpfs", MS_NOSUID | MS_NODEV)
    _mount_on_dir(libc, "tmpfs", rootfs, "run", "tmpfs", MS_NOSUID | MS_NODEV)
    runtime = IN_ENCLAVE_RUNTIME.strip("/").split("/")
    runtime_fd = _open_dir(rootfs, tuple(runtime), "/rootfs", "the runner's NSM socket")
    try:
        _mount(libc, spec["runtime_dir"], _fd_path(runtime_fd), None, MS_BIND)
    finally:
        os.close(runtime_fd)
    vsock_fd = _open_dir(rootfs, (*runtime, "vsock"), "/rootfs", "the runner's vsock directory")
    try:
        _mount(libc, spec["vsock_dir"], _fd_path(vsock_fd), None, MS_BIND)
    finally:
        os.close(vsock_fd)
    # 3.
    for host_path in spec.get("host_mounts", []):
        _bind_host_path(libc, rootfs, host_path)
    # 4.
    os.fchdir(rootfs)
    os.close(rootfs)
    os.chroot(".")
    os.chdir("/")
    # 5.
    argv = list(spec["argv"])
    env = dict(item.split("=", 1) for item in spec["env"] if "=" in item)
    program = _lookup(argv[0])
    try:
        os.execve(program, argv, env)  # noqa: S606 - init execs the image's cmd the same way
    except OSError as exc:
        raise EnterError(exec_failure(program, exc)) from None


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m enclavekit.run.enter SPEC.json\n")
        raise SystemExit(2)
    spec = json.loads(Path(sys.argv[1]).read_text())
    # The supervisor learns the outcome from this pipe: closed by a successful execve (it is
    # close-on-exec), or carrying the reason when the application could not be started.
    status_fd = spec.get("status_fd")
    if status_fd is not None:
        os.set_inheritable(status_fd, False)
    try:
        enter(spec)
    except (EnterError, UnsafeImageEntry, OSError) as exc:
        message = f"cannot start the enclave application: {exc}"
        sys.stderr.write(f"enclavekit: {message}\n")
        if status_fd is not None:
            with contextlib.suppress(OSError):
                os.write(status_fd, str(exc).encode("utf-8", "replace")[:4096])
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()

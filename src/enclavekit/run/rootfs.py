"""Reaching into an unpacked image without following its symbolic links.

The image's entries are untrusted. Its ``rootfs`` may be a link to a host directory, its
``rootfs/etc`` a link to ``/etc``, its ``cmd`` a link to a host file: if the runner followed them it
would read host files as the enclave's argv, create directories on the host, or chroot there. So
every entry the runner reads, creates or mounts on below the unpack directory is reached here one
component at a time with ``openat(..., O_NOFOLLOW)``: a symbolic link, or something of the wrong
type, anywhere on the way is refused with :class:`UnsafeImageEntry` (exit 1) naming the entry as the
image spells it (``/rootfs/etc``). Directories are created with ``mkdirat`` under a descriptor
already checked, and callers mount on ``/proc/self/fd/N`` of a descriptor, never on a path name, so
nothing can be swapped between the check and the use.

The image's links stay as they are for the application, which resolves them inside its chroot.

Not done: resolving a link *inside* the root (``openat2(RESOLVE_IN_ROOT)``): a path the runner
needs that passes through one of the image's links is refused even when the link would stay inside
the rootfs (e.g. ``--mount-host /lib/x`` when the image's ``/lib`` is ``usr/lib``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from enclavekit.errors import Error, UsageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Directories the runner creates and mounts on inside the rootfs (see enclavekit.run.enter).
CHROOT_MOUNT_POINTS = ("proc", "dev", "tmp", "run", "sys")


class UnsafeImageEntry(Error):
    """An image entry the runner must use is a symbolic link or of the wrong type (exit 1)."""

    exit_code = 1


def _describe(dir_fd: int, name: str) -> str:
    """What ``name`` is, for a refusal message (``a symbolic link to /etc``)."""
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return "missing"
    if stat.S_ISLNK(info.st_mode):
        try:
            return f"a symbolic link to {os.readlink(name, dir_fd=dir_fd)}"
        except OSError:
            return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISREG(info.st_mode):
        return "a regular file"
    return "a special file"


def _refuse(shown: str, found: str, expected: str, why: str) -> UnsafeImageEntry:
    return UnsafeImageEntry(
        f"the image's entry {shown} is {found}, expected {expected}; {why}. The runner never"
        " follows or writes through the image's symbolic links: rebuild the image with a real"
        f" {expected} there"
    )


def open_directory(
    dir_fd: int, parts: Sequence[str], *, shown: str, create: bool = False, why: str = ""
) -> int | None:
    """A descriptor of the directory ``parts`` below ``dir_fd``, every component a real directory.

    ``shown`` is how the image spells ``dir_fd`` (``/rootfs``) for messages. Missing components
    are created (0755) when ``create``; otherwise a missing component returns ``None``. The caller
    closes the descriptor.
    """
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise ValueError(f"bad path component {part!r}")
            shown = f"{shown.rstrip('/')}/{part}"
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = _open_existing_directory(fd, part, shown, why)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise _refuse(shown, _describe(fd, part), "directory", why) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_existing_directory(dir_fd: int, part: str, shown: str, why: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise _refuse(shown, _describe(dir_fd, part), "directory", why) from None


def read_regular_file(dir_fd: int, name: str, *, shown: str, limit: int) -> bytes | None:
    """The content of the regular file ``name`` in ``dir_fd`` (not followed if a link), or
    ``None`` when it does not exist. Anything but a regular file is refused."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise _refuse(shown, _describe(dir_fd, name), "regular file", "init reads it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(shown, _describe(dir_fd, name), "regular file", "init reads it")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > limit:
                raise UnsafeImageEntry(
                    f"the image's {shown} is larger than {limit} bytes; init's {name} is a few lines"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def host_path_parts(host_path: str) -> tuple[str, ...]:
    """``/etc/ssl`` → ``("etc", "ssl")``; ``..``/``.`` components are refused (usage error)."""
    parts = tuple(p for p in host_path.split("/") if p)
    if not host_path.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        raise UsageError(
            f"--mount-host {host_path!r}: give an absolute host path without '.' or '..'"
            " components (it is bound at the same path inside the chroot)"
        )
    return parts


@contextlib.contextmanager
def opened_directory(path: Path) -> Iterator[int]:
    """A descriptor of a directory of the runner's own (its path is trusted, not the image's)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def check_chroot_layout(initramfs: Path, host_mounts: Sequence[str]) -> None:
    """Refuse, before anything is created, an image whose chroot the runner would have to build
    through a link: ``rootfs``, each of :data:`CHROOT_MOUNT_POINTS` and every component of every
    ``--mount-host`` path must be a real directory where it exists (a file mount's last component
    a regular file; a host path that is a link is recreated as a link only where the image has
    nothing, so whatever the image has there is left alone)."""
    with opened_directory(initramfs) as top:
        rootfs = open_directory(top, ("rootfs",), shown="/", why="nitro's init chroots into it")
        if rootfs is None:
            return  # launch.prepare refuses an image without /rootfs
        try:
            for name in CHROOT_MOUNT_POINTS:
                fd = open_directory(
                    rootfs, (name,), shown="/rootfs", why=f"the runner mounts on /{name}"
                )
                if fd is not None:
                    os.close(fd)
            for host_path in host_mounts:
                _check_mount_target(rootfs, host_path)
        finally:
            os.close(rootfs)


def _check_mount_target(rootfs: int, host_path: str) -> None:
    parts = host_path_parts(host_path)
    why = f"--mount-host {host_path} binds the host path there"
    parent = open_directory(rootfs, parts[:-1], shown="/rootfs", why=why)
    if parent is None:
        return  # created by the runner below a real directory
    try:
        last = parts[-1]
        shown = "/rootfs/" + "/".join(parts)
        if os.path.islink(host_path):
            return  # recreated as a link only if the image has nothing there
        try:
            info = os.lstat(last, dir_fd=parent)
        except FileNotFoundError:
            return
        expected = "directory" if os.path.isdir(host_path) else "regular file"
        is_dir = stat.S_ISDIR(info.st_mode)
        if (expected == "directory") != is_dir or not (is_dir or stat.S_ISREG(info.st_mode)):
            raise _refuse(shown, _describe(parent, last), expected, why)
    finally:
        os.close(parent)

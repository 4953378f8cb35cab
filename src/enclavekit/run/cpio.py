"""Reading and safely unpacking cpio "newc" ramdisks (the initramfs parts of an EIF).

:func:`iter_entries` parses an archive held in memory: ``070701`` (newc) and ``070702`` (newc with
checksums; the checksum is read but not verified, as the kernel's initramfs unpacker does when it
is zero) headers, names padded to 4 bytes, data padded to 4 bytes, ending at ``TRAILER!!!``. Zero
padding after the trailer and further concatenated archives are accepted (the kernel unpacks them
all, and an EIF's ramdisks are concatenated); a gzip-compressed part is inflated first, bounded by
:data:`MAX_UNPACKED_SIZE`.

:func:`extract` writes entries below a destination directory and refuses anything that could land
outside it: absolute names are made relative (``/etc`` → ``etc``, as the kernel does), but ``..``
components, NUL bytes and names that pass through a symbolic link are refused with
:class:`~enclavekit.errors.MalformedInput`; files are created with ``O_NOFOLLOW``. Symbolic links are
created as they are (their targets are resolved later inside the chroot, which is where they
belong). Device nodes and FIFOs are skipped (the runner bind-mounts ``/dev``); ownership is applied
only when running as root. Later entries with the same name replace earlier ones, as in an initramfs
(linuxkit's customer ramdisk lists the ``rootfs`` directory twice).

Not checked: the ``check`` field of ``070702`` archives, hard-link groups (each entry is a separate
file; linuxkit writes none), and that the archive is what the EIF's PCRs say (the caller measures
the EIF before unpacking it).
"""

from __future__ import annotations

import enum
import os
import re
import stat
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from enclavekit.errors import MalformedInput

#: newc header: 6-byte magic + 13 fields of 8 hex digits.
HEADER_SIZE = 110
MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = b"TRAILER!!!"
#: A name longer than PATH_MAX cannot be created anyway.
MAX_NAME = 4096
#: Bound on a gzip-compressed ramdisk once inflated (an EIF's memory is bounded too).
MAX_UNPACKED_SIZE = 4 * 1024 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


class EntryType(enum.IntEnum):
    """The file-type bits of a cpio mode (``mode & S_IFMT``)."""

    FIFO = stat.S_IFIFO
    CHAR = stat.S_IFCHR
    DIRECTORY = stat.S_IFDIR
    BLOCK = stat.S_IFBLK
    REGULAR = stat.S_IFREG
    SYMLINK = stat.S_IFLNK
    SOCKET = stat.S_IFSOCK


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member. ``data`` is the file content or the symlink target."""

    name: str
    entry_type: EntryType
    permissions: int
    uid: int
    gid: int
    mtime: int
    data: bytes
    inode: int = 0
    nlink: int = 1
    rdev: tuple[int, int] = (0, 0)


def _align4(n: int) -> int:
    return (n + 3) & ~3


_HEX_FIELDS = re.compile(rb"[0-9a-fA-F]{104}")


def _fields(header: bytes, offset: int) -> list[int]:
    """The 13 numeric fields of a newc header (8 hex digits each)."""
    if _HEX_FIELDS.fullmatch(header, 6) is None:
        bad = next(
            i
            for i in range(13)
            if re.fullmatch(rb"[0-9a-fA-F]{8}", header[6 + 8 * i : 14 + 8 * i]) is None
        )
        raise MalformedInput(
            f"cpio header at offset {offset}: field {bad} is"
            f" {header[6 + 8 * bad : 14 + 8 * bad]!r}, expected 8 hex digits"
        )
    return [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]


def inflate_if_gzip(data: bytes, *, limit: int = MAX_UNPACKED_SIZE) -> bytes:
    """``data`` itself, or its gzip-inflated form (every gzip member; bounded by ``limit``)."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    out = bytearray()
    rest = data
    try:
        while rest.startswith(_GZIP_MAGIC):
            inflater = zlib.decompressobj(wbits=31)
            chunk = inflater.decompress(rest, limit + 1 - len(out))
            out += chunk
            if len(out) > limit or inflater.unconsumed_tail:
                raise MalformedInput(
                    f"gzip ramdisk inflates to more than {limit} bytes; refusing it"
                )
            if not inflater.eof:
                raise MalformedInput("gzip ramdisk is truncated")
            rest = inflater.unused_data
    except zlib.error as exc:
        raise MalformedInput(f"gzip ramdisk is damaged: {exc}") from exc
    if rest.strip(b"\0"):
        raise MalformedInput("gzip ramdisk is followed by data that is not gzip")
    return bytes(out)


def iter_entries(data: bytes) -> Iterator[CpioEntry]:
    """Every entry of every archive concatenated in ``data`` (trailers not included).

    Raises :class:`MalformedInput` for a bad magic, non-hex fields, names or data running past the
    end, a missing trailer, or non-zero bytes between archives.
    """
    data = inflate_if_gzip(data)
    pos = 0
    size = len(data)
    while True:
        # Skip zero padding between concatenated archives (and after the last one).
        while pos < size and data[pos] == 0:
            pos += 1
        if pos >= size:
            return
        if data.startswith(_GZIP_MAGIC, pos):
            yield from iter_entries(data[pos:])
            return
        pos = yield from _one_archive(data, pos)


def _one_archive(data: bytes, pos: int) -> Generator[CpioEntry, None, int]:
    size = len(data)
    while True:
        if pos + HEADER_SIZE > size:
            raise MalformedInput(
                f"cpio archive is truncated: a header at offset {pos} needs {HEADER_SIZE} bytes,"
                f" {size - pos} remain (missing TRAILER!!!)"
            )
        header = data[pos : pos + HEADER_SIZE]
        magic = header[:6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            if not data[pos:].strip(b"\0"):
                raise MalformedInput(
                    f"cpio archive is truncated: zero padding at offset {pos} before any"
                    " TRAILER!!! entry"
                )
            raise MalformedInput(
                f"cpio header at offset {pos}: magic {magic!r}, expected {MAGIC_NEWC!r} (newc);"
                " other cpio formats are not supported"
            )
        fields = _fields(header, pos)
        inode, mode, uid, gid, nlink, mtime, filesize = fields[:7]
        rdevmajor, rdevminor, namesize = fields[9], fields[10], fields[11]
        if not 1 <= namesize <= MAX_NAME + 1:
            raise MalformedInput(
                f"cpio entry at offset {pos}: name size {namesize}, expected 1..{MAX_NAME + 1}"
            )
        name_start = pos + HEADER_SIZE
        name_end = name_start + namesize
        if name_end > size:
            raise MalformedInput(f"cpio entry at offset {pos}: the name runs past the end")
        raw_name = data[name_start : name_end - 1]
        if data[name_end - 1] != 0 or b"\0" in raw_name:
            raise MalformedInput(
                f"cpio entry at offset {pos}: the name must end with one NUL and contain none"
            )
        data_start = _align4(name_end)
        data_end = data_start + filesize
        if data_end > size:
            raise MalformedInput(
                f"cpio entry {raw_name!r} at offset {pos}: {filesize} data bytes run past the end"
                " of the archive (truncated)"
            )
        pos = _align4(data_end)
        if raw_name == TRAILER:
            return pos
        try:
            name = raw_name.decode("utf-8", "surrogateescape")
        except UnicodeDecodeError:  # pragma: no cover - surrogateescape never fails
            raise MalformedInput(f"cpio entry name {raw_name!r} cannot be decoded") from None
        file_type = mode & 0o170000
        try:
            entry_type = EntryType(file_type)
        except ValueError:
            raise MalformedInput(
                f"cpio entry {name!r}: unknown file type {file_type:#o} in mode {mode:#o}"
            ) from None
        yield CpioEntry(
            name=name,
            entry_type=entry_type,
            permissions=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime=mtime,
            data=data[data_start:data_end],
            inode=inode,
            nlink=nlink,
            rdev=(rdevmajor, rdevminor),
        )


def safe_relative_name(name: str) -> tuple[str, ...]:
    """The path components of an archive name, or :class:`MalformedInput` if it could escape.

    Leading ``/`` and ``./`` are dropped (the kernel unpacks relative to ``/``); ``.`` components
    are dropped; an empty result means the root itself. ``..`` anywhere is refused.
    """
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise MalformedInput(
                f"cpio entry {name!r} contains '..'; refusing a path that could leave the"
                " unpack directory (path traversal)"
            )
        parts.append(part)
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class ExtractStats:
    """What :func:`extract` did."""

    files: int
    directories: int
    symlinks: int
    skipped: int
    bytes_written: int


def extract(data: bytes, destination: Path, *, apply_ownership: bool | None = None) -> ExtractStats:
    """Unpack every entry of ``data`` below ``destination`` (created if missing).

    See the module docstring for what is refused. ``apply_ownership`` defaults to "running as
    root". Directory modes are applied after all entries are written (so a read-only directory can
    still be filled).
    """
    if apply_ownership is None:
        apply_ownership = hasattr(os, "geteuid") and os.geteuid() == 0
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    files = directories = symlinks = skipped = written = 0
    dir_modes: dict[tuple[str, ...], CpioEntry] = {}
    verified: set[tuple[str, ...]] = set()
    for entry in iter_entries(data):
        parts = safe_relative_name(entry.name)
        if not parts:
            if entry.entry_type == EntryType.DIRECTORY:
                continue
            raise MalformedInput(f"cpio entry {entry.name!r} names the root but is not a directory")
        parent = _ensure_parent(root, parts[:-1], entry.name, verified)
        target = parent / parts[-1]
        if entry.entry_type == EntryType.DIRECTORY:
            _make_directory(target, entry.name)
            dir_modes[parts] = entry
            directories += 1
            continue
        _remove_existing(target)
        if entry.entry_type == EntryType.REGULAR:
            fd = os.open(
                target,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                view = memoryview(entry.data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if apply_ownership:
                    os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.permissions)
                os.utime(fd, (entry.mtime, entry.mtime))
            finally:
                os.close(fd)
            files += 1
            written += len(entry.data)
        elif entry.entry_type == EntryType.SYMLINK:
            link_target = entry.data.decode("utf-8", "surrogateescape")
            if not link_target or "\0" in link_target:
                raise MalformedInput(f"cpio symlink {entry.name!r} has an empty or NUL target")
            os.symlink(link_target, target)
            if apply_ownership:
                os.lchown(target, entry.uid, entry.gid)
            symlinks += 1
        else:
            skipped += 1  # device nodes, FIFOs, sockets: the runner provides /dev
    # Directory modes and times last, deepest first.
    for parts, entry in sorted(dir_modes.items(), key=lambda item: -len(item[0])):
        path = root.joinpath(*parts)
        if apply_ownership:
            os.lchown(path, entry.uid, entry.gid)
        os.chmod(path, entry.permissions | 0o700 if not apply_ownership else entry.permissions)
        os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
    return ExtractStats(files, directories, symlinks, skipped, written)


def _ensure_parent(
    root: Path, parts: tuple[str, ...], name: str, verified: set[tuple[str, ...]]
) -> Path:
    """``root/parts`` as a real directory chain (created 0755 as needed), never via a symlink.

    ``verified`` remembers chains already checked: a checked directory cannot become a link later,
    because replacing a directory is refused.
    """
    current = root
    if parts in verified:
        return root.joinpath(*parts)
    for depth, part in enumerate(parts, 1):
        current = current / part
        if parts[:depth] in verified:
            continue
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise MalformedInput(
                f"cpio entry {name!r} goes through the symbolic link {part!r}; refusing to write"
                " through a link (it could point outside the unpack directory)"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise MalformedInput(f"cpio entry {name!r}: {part!r} is not a directory")
        verified.add(parts[:depth])
    verified.add(parts)
    return current


def _make_directory(target: Path, name: str) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        os.mkdir(target, 0o755)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    _remove_existing(target)
    os.mkdir(target, 0o755)


def _remove_existing(target: Path) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise MalformedInput(
            f"cpio entry {target.name!r} would replace a directory with a non-directory"
        )
    os.unlink(target)

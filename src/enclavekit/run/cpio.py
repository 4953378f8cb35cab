"""Reading and safely unpacking cpio "newc" ramdisks (the initramfs parts of an EIF), streamed.

:class:`CpioParser` is a push parser: :meth:`~CpioParser.feed` it the bytes of one ramdisk in
chunks of any size, then :meth:`~CpioParser.finish`; it calls an :class:`EntryHandler` with each
entry's header, its data in pieces as they arrive, and its end, so nothing is held whole: memory is
the chunk being fed plus one header and name. It reads ``070701`` (newc) and ``070702`` (newc with
checksums; the checksum is read but not verified, as the kernel's initramfs unpacker does when it
is zero) headers, names padded to 4 bytes, data padded to 4 bytes, ending at ``TRAILER!!!``. Zero
padding after the trailer and further concatenated archives are accepted (the kernel unpacks them
all, and an EIF's ramdisks are concatenated); from a gzip member on (at an archive boundary) the
rest of the stream is gzip members, inflated as they stream (bounded by :data:`MAX_UNPACKED_SIZE`
per stream and :data:`MAX_GZIP_NESTING` levels) and followed by zero padding only.

:class:`Extractor` is the handler that writes entries below a destination directory and refuses
anything that could land outside it: absolute names are made relative (``/etc`` → ``etc``, as the
kernel does), but ``..`` components, NUL bytes and names that pass through a symbolic link are
refused with :class:`~enclavekit.errors.MalformedInput`; files are created with ``O_NOFOLLOW`` and
their data written as it arrives. Symbolic links are created as they are (their targets, at most
:data:`MAX_NAME` bytes, are resolved later inside the chroot, which is where they belong). Device
nodes and FIFOs are skipped (the runner bind-mounts ``/dev``); ownership is applied only when
running as root. Later entries with the same name replace earlier ones, as in an initramfs
(linuxkit's customer ramdisk lists the ``rootfs`` directory twice). :func:`extract` and
:func:`iter_entries` are the in-memory forms (one archive held as bytes).

Not checked: the ``check`` field of ``070702`` archives, hard-link groups (each entry is a separate
file; linuxkit writes none), and that the archive is what the EIF's PCRs say: the caller measures
the bytes it feeds and must not use what was unpacked before that check passed
(:mod:`enclavekit.run.launch` unpacks into a staging directory and removes it on a mismatch).
An archive cut off mid-entry leaves that entry's partial file behind: remove the destination.
"""

from __future__ import annotations

import enum
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from enclavekit.errors import MalformedInput

#: newc header: 6-byte magic + 13 fields of 8 hex digits.
HEADER_SIZE = 110
MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = b"TRAILER!!!"
#: A name (or a symbolic link's target) longer than PATH_MAX cannot be created anyway.
MAX_NAME = 4096
#: Bound on what the gzip members of one stream inflate to (an EIF's memory is bounded too).
MAX_UNPACKED_SIZE = 4 * 1024 * 1024 * 1024
#: gzip members inside inflated gzip members, at most this deep.
MAX_GZIP_NESTING = 4
#: Largest piece inflated at once (what a gzip member costs in memory).
INFLATE_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_NONZERO = re.compile(rb"[^\0]")
_HEX_FIELDS = re.compile(rb"[0-9a-fA-F]{104}")


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
class CpioHeader:
    """One archive member's header: what it is, and how many data bytes follow (``size``)."""

    name: str
    entry_type: EntryType
    permissions: int
    uid: int
    gid: int
    mtime: int
    size: int
    inode: int = 0
    nlink: int = 1
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member held in memory. ``data`` is the file content or the symlink target."""

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


class EntryHandler(Protocol):
    """What :class:`CpioParser` calls: ``begin`` per entry, ``data`` with its data in pieces (the
    view is valid only during the call), ``end`` once the entry's data is complete."""

    def begin(self, header: CpioHeader) -> None: ...

    def data(self, piece: memoryview) -> None: ...

    def end(self) -> None: ...


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _fields(header: bytes | bytearray, offset: int) -> list[int]:
    """The 13 numeric fields of a newc header (8 hex digits each)."""
    if _HEX_FIELDS.fullmatch(header, 6) is None:
        bad = next(
            i
            for i in range(13)
            if re.fullmatch(rb"[0-9a-fA-F]{8}", header[6 + 8 * i : 14 + 8 * i]) is None
        )
        raise MalformedInput(
            f"cpio header at offset {offset}: field {bad} is"
            f" {bytes(header[6 + 8 * bad : 14 + 8 * bad])!r}, expected 8 hex digits"
        )
    return [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]


class _State(enum.Enum):
    BETWEEN = enum.auto()  # zero padding between archives (or before the first)
    START = enum.auto()  # the first header of an archive, or a gzip member
    HEADER = enum.auto()  # a further header of the current archive
    NAME = enum.auto()  # the entry's name and its padding
    DATA = enum.auto()  # the entry's data
    PAD = enum.auto()  # the data's padding
    GZIP = enum.auto()  # the rest of the stream is gzip members


class CpioParser:
    """Push parser of one stream of concatenated newc archives (see the module docstring).

    Offsets in messages count from the start of the stream (of the inflated data inside gzip).
    """

    def __init__(
        self, handler: EntryHandler, *, gzip_limit: int = MAX_UNPACKED_SIZE, _nesting: int = 0
    ) -> None:
        self._handler = handler
        self._gzip_limit = gzip_limit
        self._nesting = _nesting
        self._state = _State.BETWEEN
        self._base = 0  # stream offset of the chunk being fed
        self._buf = bytearray()  # header, then name bytes collected so far
        self._need = 0  # bytes _buf must reach
        self._entry_at = 0  # stream offset of the current entry's header
        self._fields: list[int] = []
        self._name = b""
        self._left = 0  # data or padding bytes left
        self._trailer = False  # the current entry is the trailer
        self._next_at = 0  # stream offset of the header after the current entry
        self._gzip: _GzipMembers | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Parse the next bytes of the stream."""
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state is _State.DATA:
                n = min(self._left, end - pos)
                if not self._trailer:
                    self._handler.data(view[pos : pos + n])
                pos += n
                self._left -= n
                if not self._left:
                    self._end_data(self._base + pos)
            elif state is _State.PAD:
                n = min(self._left, end - pos)
                pos += n
                self._left -= n
                if not self._left:
                    self._after_pad()
            elif state is _State.BETWEEN:
                found = _NONZERO.search(view, pos)
                if found is None:
                    break
                pos = found.start()
                self._begin_header(_State.START, self._base + pos)
            elif state is _State.GZIP:
                assert self._gzip is not None
                self._gzip.feed(view[pos:])
                break
            else:
                take = min(self._need - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if state is _State.START and self._buf[:2] == _GZIP_MAGIC:
                    self._start_gzip()
                    continue
                if len(self._buf) == self._need:
                    if state is _State.NAME:
                        self._parse_name(self._base + pos)
                    else:
                        self._parse_header()
        self._base += end

    def finish(self) -> None:
        """The stream ended: refuse it if an archive in it is not complete."""
        state, at = self._state, self._entry_at
        if state is _State.GZIP:
            assert self._gzip is not None
            self._gzip.finish()
        elif state in (_State.START, _State.HEADER):
            if state is _State.HEADER and not self._buf.strip(b"\0"):
                raise MalformedInput(
                    f"cpio archive is truncated: zero padding at offset {at} before any"
                    " TRAILER!!! entry"
                )
            raise MalformedInput(
                f"cpio archive is truncated: a header at offset {at} needs {HEADER_SIZE} bytes,"
                f" {len(self._buf)} remain (missing TRAILER!!!)"
            )
        elif state is _State.NAME:
            raise MalformedInput(f"cpio entry at offset {at}: the name runs past the end")
        elif state is _State.DATA:
            raise MalformedInput(
                f"cpio entry {self._name!r} at offset {at}: {self._fields[6]} data bytes run past"
                " the end of the archive (truncated)"
            )
        elif state is _State.PAD and not self._trailer:
            raise MalformedInput(
                f"cpio archive is truncated: it ends after the entry {self._name!r} at offset"
                f" {at} (missing TRAILER!!!)"
            )

    # -- transitions --------------------------------------------------------------------------

    def _begin_header(self, state: _State, at: int) -> None:
        self._state = state
        self._entry_at = at
        self._buf.clear()
        self._need = HEADER_SIZE

    def _start_gzip(self) -> None:
        if self._nesting >= MAX_GZIP_NESTING:
            raise MalformedInput(
                f"gzip inside gzip more than {MAX_GZIP_NESTING} levels deep at offset"
                f" {self._entry_at}; refusing the ramdisk"
            )
        inner = CpioParser(self._handler, gzip_limit=self._gzip_limit, _nesting=self._nesting + 1)
        self._gzip = _GzipMembers(inner, self._gzip_limit)
        self._state = _State.GZIP
        self._gzip.feed(memoryview(bytes(self._buf)))
        self._buf.clear()

    def _parse_header(self) -> None:
        header, at = self._buf, self._entry_at
        magic = bytes(header[:6])
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            if not header.strip(b"\0"):
                raise MalformedInput(
                    f"cpio archive is truncated: zero padding at offset {at} before any"
                    " TRAILER!!! entry"
                )
            raise MalformedInput(
                f"cpio header at offset {at}: magic {magic!r}, expected {MAGIC_NEWC!r} (newc);"
                " other cpio formats are not supported"
            )
        self._fields = _fields(header, at)
        namesize = self._fields[11]
        if not 1 <= namesize <= MAX_NAME + 1:
            raise MalformedInput(
                f"cpio entry at offset {at}: name size {namesize}, expected 1..{MAX_NAME + 1}"
            )
        name_end = at + HEADER_SIZE + namesize
        self._state = _State.NAME
        self._buf.clear()
        self._need = namesize + _align4(name_end) - name_end

    def _parse_name(self, data_start: int) -> None:
        inode, mode, uid, gid, nlink, mtime, filesize = self._fields[:7]
        rdevmajor, rdevminor, namesize = self._fields[9], self._fields[10], self._fields[11]
        raw_name = bytes(self._buf[: namesize - 1])
        if self._buf[namesize - 1] != 0 or b"\0" in raw_name:
            raise MalformedInput(
                f"cpio entry at offset {self._entry_at}: the name must end with one NUL and"
                " contain none"
            )
        self._name = raw_name
        self._trailer = raw_name == TRAILER
        if not self._trailer:
            name = raw_name.decode("utf-8", "surrogateescape")
            file_type = mode & 0o170000
            try:
                entry_type = EntryType(file_type)
            except ValueError:
                raise MalformedInput(
                    f"cpio entry {name!r}: unknown file type {file_type:#o} in mode {mode:#o}"
                ) from None
            self._handler.begin(
                CpioHeader(
                    name=name,
                    entry_type=entry_type,
                    permissions=mode & 0o7777,
                    uid=uid,
                    gid=gid,
                    mtime=mtime,
                    size=filesize,
                    inode=inode,
                    nlink=nlink,
                    rdev=(rdevmajor, rdevminor),
                )
            )
        self._state = _State.DATA
        self._left = filesize
        if not filesize:
            self._end_data(data_start)

    def _end_data(self, data_end: int) -> None:
        if not self._trailer:
            self._handler.end()
        self._next_at = _align4(data_end)
        self._state = _State.PAD
        self._left = self._next_at - data_end
        if not self._left:
            self._after_pad()

    def _after_pad(self) -> None:
        if self._trailer:
            self._state = _State.BETWEEN
        else:
            self._begin_header(_State.HEADER, self._next_at)


class _Stream(Protocol):
    def feed(self, chunk: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> None: ...


class _GzipMembers:
    """gzip members, inflated as they stream into ``inner``; then only zero padding."""

    def __init__(self, inner: _Stream, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._total = 0
        self._inflater: zlib._Decompress | None = zlib.decompressobj(wbits=31)
        self._head = bytearray()  # the start of what follows a member, until it is known
        self._zeros = False  # only zero padding may follow

    def feed(self, data: memoryview) -> None:
        rest: bytes | memoryview = data
        while rest:
            if self._zeros:
                if _NONZERO.search(rest) is not None:
                    raise MalformedInput("gzip ramdisk is followed by data that is not gzip")
                return
            if self._inflater is None:
                rest = self._next_member(rest)
                continue
            rest = self._inflate(rest)

    def _next_member(self, rest: bytes | memoryview) -> bytes | memoryview:
        if not self._head and rest[0] == 0:
            self._zeros = True
            return rest
        take = 2 - len(self._head)
        self._head += rest[:take]
        rest = rest[take:]
        if len(self._head) < 2:
            return rest
        if self._head != _GZIP_MAGIC:
            raise MalformedInput("gzip ramdisk is followed by data that is not gzip")
        self._inflater = zlib.decompressobj(wbits=31)
        self._head.clear()
        return _GZIP_MAGIC + bytes(rest)

    def _inflate(self, data: bytes | memoryview) -> bytes:
        inflater = self._inflater
        assert inflater is not None
        try:
            while True:
                out = inflater.decompress(data, INFLATE_CHUNK)
                self._total += len(out)
                if self._total > self._limit:
                    raise MalformedInput(
                        f"gzip ramdisk inflates to more than {self._limit} bytes; refusing it"
                    )
                if out:
                    self._inner.feed(out)
                data = inflater.unconsumed_tail
                if inflater.eof or (not data and len(out) < INFLATE_CHUNK):
                    break
        except zlib.error as exc:
            raise MalformedInput(f"gzip ramdisk is damaged: {exc}") from exc
        if inflater.eof:
            self._inflater = None
            return inflater.unused_data
        return b""

    def finish(self) -> None:
        if self._inflater is not None:
            raise MalformedInput("gzip ramdisk is truncated")
        if self._head and not self._zeros:
            raise MalformedInput("gzip ramdisk is followed by data that is not gzip")
        self._inner.finish()


class _Collector:
    """Handler keeping every entry in memory (for :func:`iter_entries`)."""

    def __init__(self) -> None:
        self.entries: list[CpioEntry] = []
        self._header: CpioHeader | None = None
        self._data = bytearray()

    def begin(self, header: CpioHeader) -> None:
        self._header = header
        self._data = bytearray()

    def data(self, piece: memoryview) -> None:
        self._data += piece

    def end(self) -> None:
        h = self._header
        assert h is not None
        self.entries.append(
            CpioEntry(
                h.name,
                h.entry_type,
                h.permissions,
                h.uid,
                h.gid,
                h.mtime,
                bytes(self._data),
                h.inode,
                h.nlink,
                h.rdev,
            )
        )


def iter_entries(data: bytes) -> Iterator[CpioEntry]:
    """Every entry of every archive concatenated in ``data`` (trailers not included), in memory.

    Raises :class:`MalformedInput` for a bad magic, non-hex fields, names or data running past the
    end, a missing trailer, or non-zero bytes between archives.
    """
    collector = _Collector()
    parser = CpioParser(collector)
    parser.feed(data)
    parser.finish()
    return iter(collector.entries)


def inflate_if_gzip(data: bytes, *, limit: int = MAX_UNPACKED_SIZE) -> bytes:
    """``data`` itself, or its gzip-inflated form (every gzip member; bounded by ``limit``)."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    out = _Buffer()
    members = _GzipMembers(out, limit)
    members.feed(memoryview(data))
    members.finish()
    return bytes(out)


class _Buffer(bytearray):
    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        self.extend(chunk)

    def finish(self) -> None:
        pass


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


class Extractor:
    """The :class:`EntryHandler` that writes entries below ``destination`` (created if missing).

    Feed it one :meth:`parser` per stream (an EIF's ramdisks in order, later entries winning), then
    call :meth:`finish`, which applies directory modes and times (so a read-only directory can still
    be filled), or :meth:`close` after an error. ``apply_ownership`` defaults to "running as root".
    See the module docstring for what is refused.
    """

    def __init__(self, destination: Path, *, apply_ownership: bool | None = None) -> None:
        if apply_ownership is None:
            apply_ownership = hasattr(os, "geteuid") and os.geteuid() == 0
        self._ownership = apply_ownership
        destination.mkdir(parents=True, exist_ok=True)
        self._root = destination.resolve()
        self._files = self._directories = self._symlinks = self._skipped = self._written = 0
        self._dir_modes: dict[tuple[str, ...], CpioHeader] = {}
        self._verified: set[tuple[str, ...]] = set()
        self._header: CpioHeader | None = None
        self._fd = -1  # the regular file being written
        self._link: bytearray | None = None  # the symbolic link's target being collected
        self._target = self._root

    def parser(self, *, gzip_limit: int = MAX_UNPACKED_SIZE) -> CpioParser:
        """A parser of one more stream, unpacking here."""
        return CpioParser(self, gzip_limit=gzip_limit)

    def begin(self, header: CpioHeader) -> None:
        self._header = header
        parts = safe_relative_name(header.name)
        if not parts:
            if header.entry_type == EntryType.DIRECTORY:
                self._target = self._root
                return
            raise MalformedInput(
                f"cpio entry {header.name!r} names the root but is not a directory"
            )
        parent = _ensure_parent(self._root, parts[:-1], header.name, self._verified)
        target = self._target = parent / parts[-1]
        if header.entry_type == EntryType.DIRECTORY:
            _make_directory(target, header.name)
            self._dir_modes[parts] = header
            self._directories += 1
            return
        _remove_existing(target)
        if header.entry_type == EntryType.REGULAR:
            self._fd = os.open(
                target,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        elif header.entry_type == EntryType.SYMLINK:
            if header.size > MAX_NAME:
                raise MalformedInput(
                    f"cpio symlink {header.name!r} has a {header.size}-byte target; at most"
                    f" {MAX_NAME} bytes (PATH_MAX) are possible"
                )
            self._link = bytearray()

    def data(self, piece: memoryview) -> None:
        if self._fd >= 0:
            while piece:
                n = os.write(self._fd, piece)
                piece = piece[n:]
                self._written += n
        elif self._link is not None:
            self._link += piece
        # directory data, device nodes, FIFOs, sockets: ignored

    def end(self) -> None:
        header = self._header
        assert header is not None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                if self._ownership:
                    os.fchown(fd, header.uid, header.gid)
                os.fchmod(fd, header.permissions)
                os.utime(fd, (header.mtime, header.mtime))
            finally:
                os.close(fd)
            self._files += 1
        elif self._link is not None:
            link_target = self._link.decode("utf-8", "surrogateescape")
            self._link = None
            if not link_target or "\0" in link_target:
                raise MalformedInput(f"cpio symlink {header.name!r} has an empty or NUL target")
            os.symlink(link_target, self._target)
            if self._ownership:
                os.lchown(self._target, header.uid, header.gid)
            self._symlinks += 1
        elif header.entry_type != EntryType.DIRECTORY:
            self._skipped += 1  # device nodes, FIFOs, sockets: the runner provides /dev

    def close(self) -> None:
        """Release the file being written (after an error; :meth:`finish` is not called)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def finish(self) -> ExtractStats:
        """Directory modes and times, deepest first; what was written."""
        self.close()
        for parts, entry in sorted(self._dir_modes.items(), key=lambda item: -len(item[0])):
            path = self._root.joinpath(*parts)
            if self._ownership:
                os.lchown(path, entry.uid, entry.gid)
            os.chmod(path, entry.permissions if self._ownership else entry.permissions | 0o700)
            os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
        return ExtractStats(
            self._files, self._directories, self._symlinks, self._skipped, self._written
        )


def extract(data: bytes, destination: Path, *, apply_ownership: bool | None = None) -> ExtractStats:
    """Unpack every entry of the archive(s) in ``data`` below ``destination`` (an
    :class:`Extractor` fed in one piece)."""
    extractor = Extractor(destination, apply_ownership=apply_ownership)
    try:
        parser = extractor.parser()
        parser.feed(data)
        parser.finish()
    finally:
        extractor.close()
    return extractor.finish()


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

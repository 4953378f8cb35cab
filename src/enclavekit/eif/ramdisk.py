"""cpio "newc" ramdisks laid out byte for byte as linuxkit writes them (spec ``eif.md`` §6.2–6.4).

linuxkit (vendored gocpio, ``kernel+initrd-nogz`` output) numbers inodes from 721 upwards, hard-codes the
archive's own device as 3:1, gives directories two links and everything else one, pads each name and each
file's data to 4 bytes (relative to the archive start), ends with a ``TRAILER!!!`` entry and pads the whole
archive with zeros to a multiple of 512 bytes. Nothing here depends on the clock, the umask or the time zone.

What is *not* written: compressed archives, hard links (linuxkit turns them into relative symlinks before they
reach the cpio writer), checksummed ``070702`` archives.
"""

from __future__ import annotations

import binascii
import enum
import io
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

from enclavekit.eif.layers import ContentRef, EntryKind, TarEntry
from enclavekit.errors import MalformedInput

#: linuxkit's ``defaultModTime`` (2017-04-18T16:30:00Z), stamped on everything linuxkit creates itself.
LINUXKIT_MTIME = 1492533000
#: gocpio's first inode number; each entry, the trailer included, takes the next one.
FIRST_INODE = 721
#: gocpio writes this device number (major, minor) for every entry.
ARCHIVE_DEVICE = (3, 1)
#: The archive is zero-padded to a multiple of this many bytes.
ARCHIVE_ALIGNMENT = 512
#: newc stores every number as 8 hex digits.
MAX_FIELD = 0xFFFFFFFF

TRAILER_NAME = b"TRAILER!!!"
_MAGIC = b"070701"
#: A newc header after its magic: 13 fields, each 8 lowercase hex digits (the bytes of 13 big-endian
#: uint32, hexlified: one C call instead of 13 ``%08x`` conversions).
_FIELDS = struct.Struct(">13I")
_hexlify = binascii.hexlify


class FileType(enum.IntEnum):
    """The file-type nibble of a cpio mode (``mode >> 12``)."""

    FIFO = 0o01
    CHAR = 0o02
    DIRECTORY = 0o04
    BLOCK = 0o06
    REGULAR = 0o10
    SYMLINK = 0o12


class Sink(Protocol):
    """Where archive bytes go (a file, a hashing tee, ...)."""

    def write(self, data: bytes, /) -> object: ...


class CpioEntry(NamedTuple):
    """One archive member's header fields. ``size`` is the data length (a symlink's target length).

    Checked by :class:`CpioWriter` when written: a non-empty name without NUL that is not the
    trailer's, permissions within ``0o7777``, every field within newc's 32 bits.
    """

    name: bytes
    file_type: FileType
    permissions: int
    uid: int = 0
    gid: int = 0
    mtime: int = LINUXKIT_MTIME
    size: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def mode(self) -> int:
        return (int(self.file_type) << 12) | self.permissions

    @property
    def nlink(self) -> int:
        return 2 if self.file_type is FileType.DIRECTORY else 1


_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")
_NUL_AND_ZEROS = tuple(b"\0" + zeros for zeros in _ZEROS)
_DIRECTORY_TYPE = int(FileType.DIRECTORY)
_DEVICE_MAJOR, _DEVICE_MINOR = ARCHIVE_DEVICE


class CpioWriter:
    """Streams a linuxkit-style newc archive into ``sink``; each byte is written once.

    Use :meth:`add` (whole data in memory) or :meth:`begin` + :meth:`write` (streamed data whose length was
    declared in the entry), then :meth:`close` for the trailer and the 512-byte padding.
    """

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._offset = 0
        self._inode = FIRST_INODE
        self._remaining = 0
        self._closed = False

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    def _emit(self, data: bytes) -> None:
        if data:
            self._sink.write(data)
            self._offset += len(data)

    def _header(self, entry: CpioEntry, name: bytes, inode: int, *, trailer: bool) -> bytes:
        fields = (
            inode,
            0 if trailer else (int(entry.file_type) << 12) | entry.permissions,
            entry.uid,
            entry.gid,
            1 if trailer or entry.file_type is not FileType.DIRECTORY else 2,
            entry.mtime,
            entry.size,
            ARCHIVE_DEVICE[0],
            ARCHIVE_DEVICE[1],
            entry.rdev_major,
            entry.rdev_minor,
            len(name) + 1,
            0,
        )
        if min(fields) < 0 or max(fields) > MAX_FIELD:
            raise MalformedInput(
                f"{entry.name!r}: a cpio newc field must be within 0..{MAX_FIELD}, got "
                f"{min(fields) if min(fields) < 0 else max(fields)} (files of 4 GiB or more, "
                "negative times and large ids cannot be stored)"
            )
        return _MAGIC + _hexlify(_FIELDS.pack(*fields))

    def begin(self, entry: CpioEntry) -> None:
        """Write ``entry``'s header and name; its ``size`` bytes of data must follow via :meth:`write`."""
        self._begin(entry)

    def _begin(self, entry: CpioEntry, *, trailer: bool = False) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        if not trailer and (not entry.name or b"\0" in entry.name or entry.name == TRAILER_NAME):
            raise ValueError(
                f"cpio entry name must be non-empty, without NUL, not the trailer's: {entry.name!r}"
            )
        if entry.permissions & ~0o7777:
            raise ValueError(f"permissions must fit in 0o7777, got {entry.permissions:#o}")
        if self._remaining:
            raise ValueError(f"previous entry is missing {self._remaining} bytes of data")
        name = TRAILER_NAME if trailer else entry.name
        head = self._header(entry, name, self._inode, trailer=trailer) + name + b"\0"
        self._inode += 1
        before = _ZEROS[-self._offset % 4]
        after = _ZEROS[-(self._offset + len(before) + len(head)) % 4]
        self._emit(before + head + after)
        self._remaining = entry.size

    def write(self, data: bytes) -> None:
        """Data of the entry begun last; more than it declared is refused."""
        if len(data) > self._remaining:
            raise ValueError(
                f"entry data exceeds its declared size by {len(data) - self._remaining}"
            )
        self._remaining -= len(data)
        self._emit(data)

    def add_small(
        self,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        mtime: int,
        rdev_major: int,
        rdev_minor: int,
        data: bytes,
    ) -> None:
        """:meth:`add` for an entry given as fields (``mode`` with its file type) and its whole data, in
        one write to the sink. The name must be non-empty, without NUL, not the trailer's (the caller's
        names are checked paths); fields outside newc's range take :meth:`add`'s path (and its error)."""
        size = len(data)
        if (uid | gid | mtime | rdev_major | rdev_minor | size) >> 32 or self._remaining:
            file_type = FileType(mode >> 12)
            entry = CpioEntry(
                name, file_type, mode & 0o7777, uid, gid, mtime, size, rdev_major, rdev_minor
            )
            self.add(entry, data)
            return
        if self._closed:
            raise ValueError("archive already closed")
        offset = self._offset
        length = len(name) + 1
        inode = self._inode
        self._inode = inode + 1
        before = _ZEROS[-offset % 4]
        head = _hexlify(
            _FIELDS.pack(
                inode,
                mode,
                uid,
                gid,
                2 if mode >> 12 == _DIRECTORY_TYPE else 1,
                mtime,
                size,
                _DEVICE_MAJOR,
                _DEVICE_MINOR,
                rdev_major,
                rdev_minor,
                length,
                0,  # check
            )
        )
        # The name's NUL and the padding after it, to 4 bytes (_MAGIC + the header are 110 bytes).
        terminator = _NUL_AND_ZEROS[-(offset + len(before) + 110 + length) % 4]
        out = b"".join((before, _MAGIC, head, name, terminator, data))
        self._sink.write(out)
        self._offset = offset + len(out)

    def add(self, entry: CpioEntry, data: bytes | Iterable[bytes] = b"") -> None:
        """Header, name and data of one entry."""
        self.begin(entry)
        for chunk in (data,) if isinstance(data, bytes) else data:
            self.write(chunk)
        self.end()

    def end(self) -> None:
        """Check that the entry begun last got all its data."""
        if self._remaining:
            raise MalformedInput(
                f"entry data is {self._remaining} bytes shorter than declared (file changed or truncated?)"
            )

    def close(self) -> int:
        """Trailer and final padding. Returns the archive's length."""
        if not self._closed:
            # gocpio's trailer: mode 0 (no file type), one link, mtime 0, no data.
            self._begin(CpioEntry(b"-", FileType.REGULAR, 0, mtime=0), trailer=True)
            self._closed = True
            self._emit(b"\0" * (-self._offset % ARCHIVE_ALIGNMENT))
        return self._offset


def bootstrap_ramdisk(init: bytes, nsm_ko: bytes) -> bytes:
    """Ramdisk 0 exactly as nitro-cli's linuxkit run makes it: ``dev/``, ``init``, ``nsm.ko`` (§6.3)."""
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.add(CpioEntry(b"dev", FileType.DIRECTORY, 0o755))
    writer.add(CpioEntry(b"init", FileType.REGULAR, 0o755, size=len(init)), init)
    writer.add(CpioEntry(b"nsm.ko", FileType.REGULAR, 0o755, size=len(nsm_ko)), nsm_ko)
    writer.close()
    return out.getvalue()


# -- the customer ramdisk (ramdisk 1) ---------------------------------------------------------------------

#: nitro-cli's linuxkit YAML puts the image below this prefix.
ROOTFS_PREFIX = b"rootfs/"
#: The symlink linuxkit writes in place of ``etc/resolv.conf`` for init images.
RESOLV_CONF_TARGET = b"/run/resolvconf/resolv.conf"
#: linuxkit's replacement ``etc/hosts`` (160 bytes).
HOSTS = (
    b"127.0.0.1       localhost\n"
    b"::1     localhost ip6-localhost ip6-loopback\n"
    b"fe00::0 ip6-localnet\n"
    b"ff00::0 ip6-mcastprefix\n"
    b"ff02::1 ip6-allnodes\n"
    b"ff02::2 ip6-allrouters\n"
)
#: Exact names linuxkit drops from an image (directories carry a trailing ``/`` and so never match).
EXCLUDED = frozenset(
    {b".dockerenv", b"Dockerfile", b"dev/console", b"dev/pts", b"dev/shm", b"etc/hostname"}
)
#: Names that must exist: kept with linuxkit's timestamp when present, synthesised otherwise (in this order).
#: Value: (file type, permissions, symlink target or None).
MUST_EXIST: dict[bytes, tuple[FileType, int, bytes | None]] = {
    b"dev/": (FileType.DIRECTORY, 0o755, None),
    b"dev/pts/": (FileType.DIRECTORY, 0o755, None),
    b"dev/shm/": (FileType.DIRECTORY, 0o755, None),
    b"etc/": (FileType.DIRECTORY, 0o755, None),
    b"etc/hosts": (FileType.REGULAR, 0o644, None),
    b"etc/mtab": (FileType.SYMLINK, 0o755, b"/proc/mounts"),
    b"etc/resolv.conf": (FileType.SYMLINK, 0o644, RESOLV_CONF_TARGET),
    b"proc/": (FileType.DIRECTORY, 0o755, None),
    b"sys/": (FileType.DIRECTORY, 0o755, None),
}
#: The directories nitro-cli's YAML ``files:`` section adds below ``rootfs/``, in its order.
FILES_DIRECTORIES = (b"dev", b"run", b"sys", b"var", b"proc", b"tmp")

_FILE_TYPES = {
    EntryKind.REGULAR: FileType.REGULAR,
    EntryKind.DIRECTORY: FileType.DIRECTORY,
    EntryKind.SYMLINK: FileType.SYMLINK,
    EntryKind.HARDLINK: FileType.SYMLINK,
    EntryKind.CHAR: FileType.CHAR,
    EntryKind.BLOCK: FileType.BLOCK,
    EntryKind.FIFO: FileType.FIFO,
}


#: Every name the customer ramdisk treats specially (one set lookup per entry finds them all).
_SPECIAL_NAMES = EXCLUDED | frozenset(MUST_EXIST)

_REGULAR_MODE = FileType.REGULAR << 12
_SYMLINK_MODE = FileType.SYMLINK << 12


def relative_link(name: bytes, target: bytes) -> bytes:
    """Go's ``filepath.Rel(filepath.Dir(name), target)`` for clean relative paths: how linuxkit turns a
    hard link into a symlink."""
    base = [p for p in name.split(b"/")[:-1] if p not in (b"", b".")]
    dest = [p for p in target.split(b"/") if p not in (b"", b".")]
    common = 0
    while common < min(len(base), len(dest)) and base[common] == dest[common]:
        common += 1
    parts = [b".."] * (len(base) - common) + dest[common:]
    return b"/".join(parts) or b"."


def argv_file(items: Iterable[str]) -> bytes:
    """The ``cmd``/``env`` file: each item followed by a newline (none: an empty file)."""
    out = bytearray()
    for item in items:
        if "\n" in item:
            raise MalformedInput(
                f"{item!r} contains a newline; the enclave's init reads one item per line, so it would be "
                "split in two"
            )
        out += item.encode("utf-8", "surrogateescape") + b"\n"
    return bytes(out)


class _ChunkBuffer:
    """A sink that collects small writes into chunks of at least :data:`CHUNK_SIZE` bytes."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.ready: list[bytes] = []

    def write(self, data: bytes, /) -> None:
        if len(data) >= CHUNK_SIZE:
            self.flush()
            self.ready.append(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= CHUNK_SIZE:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.ready.append(b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0

    def take(self) -> list[bytes]:
        out, self.ready = self.ready, []
        return out


#: Chunks handed on by :func:`customer_ramdisk_chunks` are at least this large (except the last).
CHUNK_SIZE = 1 << 20


#: Directories whose files linuxkit may treat specially: :class:`PlainFiles` refuses files in them.
_SPECIAL_PARENTS = frozenset(name.rstrip(b"/").rpartition(b"/")[0] for name in _SPECIAL_NAMES)


class PlainFiles:
    """A shortcut into :func:`customer_ramdisk_chunks` for a listing that holds a regular file's
    whole contents already (a one-pass listing reads them from its window): :meth:`add` writes the
    file as the ramdisk would write its :class:`~enclavekit.eif.layers.TarEntry`, without making
    one, or returns False (nothing written) when the file lies in a directory where linuxkit
    renames, replaces or drops names (``/``, ``etc``, ``dev``, ...): the listing then passes the
    entry as usual. Files added here must come in the listing's order, between its entries.
    """

    def __init__(self, writer: CpioWriter) -> None:
        self._add_small = writer.add_small

    def add(
        self, parent: bytes, name: bytes, permissions: int, uid: int, gid: int, mtime: int,
        data: bytes,
    ) -> bool:  # fmt: skip
        """Write regular file ``name`` (in directory ``parent``) with ``data``, or return False."""
        if parent in _SPECIAL_PARENTS:
            return False
        self._add_small(
            ROOTFS_PREFIX + name, _REGULAR_MODE | permissions, uid, gid, mtime, 0, 0, data
        )
        return True


#: A listing that ``customer_ramdisk_chunks`` may hand :class:`PlainFiles`: ``None`` items in it
#: only mark where the ramdisk may hand on the chunks it has.
Listing = Callable[[PlainFiles], Iterable[TarEntry | None]]


def customer_ramdisk_chunks(
    entries: Iterable[TarEntry] | Listing,
    *,
    cmd: bytes,
    env: bytes,
    read: Callable[[ContentRef], Iterable[bytes]],
) -> Iterator[bytes]:
    """Ramdisk 1 as nitro-cli's linuxkit run makes it from a ``docker export`` listing (spec §6.4),
    as a stream of chunks (each byte produced once, nothing held whole).

    ``entries`` is the export listing (see :meth:`MergedTree.export`), or a function of a
    :class:`PlainFiles` that returns it; ``read`` yields a file's contents.
    """
    buffer = _ChunkBuffer()
    writer = CpioWriter(buffer)
    listing: Iterable[TarEntry | None] = (
        entries(PlainFiles(writer)) if callable(entries) else entries
    )
    # 1. The prefix directory.
    writer.add(CpioEntry(ROOTFS_PREFIX.rstrip(b"/"), FileType.DIRECTORY, 0o755))
    # 2. The image, filtered as linuxkit's ImageTar filters it.
    seen: set[bytes] = set()
    add = writer.add_small
    regular, symlink, hardlink = EntryKind.REGULAR, EntryKind.SYMLINK, EntryKind.HARDLINK
    excluded, types = EXCLUDED, _FILE_TYPES
    special = _SPECIAL_NAMES
    for entry in listing:
        if entry is None:  # PlainFiles wrote files
            if buffer.ready:
                yield from buffer.take()
            continue
        name, kind, permissions, uid, gid, mtime, linkname, major, minor, content = entry
        if name in special:
            if name in excluded:
                continue
            seen.add(name)
            if name == b"etc/hosts":
                writer.add(_cpio(entry, FileType.REGULAR, len(HOSTS), LINUXKIT_MTIME), HOSTS)
                continue
            if name == b"etc/resolv.conf":
                target = RESOLV_CONF_TARGET
                writer.add(_cpio(entry, FileType.SYMLINK, len(target), LINUXKIT_MTIME), target)
                continue
            mtime = LINUXKIT_MTIME  # the other must-exist names
        data = b""
        if kind is regular:
            mode = _REGULAR_MODE | permissions
            if content is not None:
                chunks = read(content)
                if type(chunks) is tuple and len(chunks) == 1 and len(chunks[0]) == content.size:
                    data = chunks[0]
                else:
                    writer.begin(_cpio(entry, FileType.REGULAR, content.size, mtime))
                    for chunk in chunks:
                        writer.write(chunk)
                        if buffer.ready:
                            yield from buffer.take()
                    writer.end()
                    continue
        elif kind is hardlink:
            mode = _SYMLINK_MODE | permissions
            data = relative_link(ROOTFS_PREFIX + name, ROOTFS_PREFIX + linkname)
        elif kind is symlink:
            mode = _SYMLINK_MODE | permissions
            data = linkname
        else:
            mode = (types[kind] << 12) | permissions
        add(ROOTFS_PREFIX + name, mode, uid, gid, mtime, major, minor, data)
        if buffer.ready:
            yield from buffer.take()
    # 3. Must-exist entries the image lacked.
    for name, (file_type, permissions, link) in MUST_EXIST.items():
        if name in seen:
            continue
        data = link if link is not None else HOSTS if name == b"etc/hosts" else b""
        cpio_name = ROOTFS_PREFIX + name.rstrip(b"/")
        writer.add(CpioEntry(cpio_name, file_type, permissions, size=len(data)), data)
    # 4. The YAML ``files:`` section: the prefix directory again (an implicit parent), the mount
    #    points, then cmd and env.
    writer.add(CpioEntry(ROOTFS_PREFIX.rstrip(b"/"), FileType.DIRECTORY, 0o755))
    for directory in FILES_DIRECTORIES:
        writer.add(CpioEntry(ROOTFS_PREFIX + directory, FileType.DIRECTORY, 0o755))
    writer.add(CpioEntry(b"cmd", FileType.REGULAR, 0o644, size=len(cmd)), cmd)
    writer.add(CpioEntry(b"env", FileType.REGULAR, 0o644, size=len(env)), env)
    writer.close()
    buffer.flush()
    yield from buffer.take()


def _cpio(entry: TarEntry, file_type: FileType, size: int, mtime: int) -> CpioEntry:
    return CpioEntry(
        ROOTFS_PREFIX + entry.name,
        file_type,
        entry.permissions,
        entry.uid,
        entry.gid,
        mtime,
        size,
        entry.rdev_major,
        entry.rdev_minor,
    )

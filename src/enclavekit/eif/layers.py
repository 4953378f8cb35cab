"""Image layers applied in order into a merged view, and that view listed as ``docker export`` lists it.

The merged view is an index in memory (names, modes, owners, times, link targets) whose file *contents* stay
where they already are on disk: a :class:`ContentRef` points into an uncompressed layer blob or into a spool
file that compressed layers are unpacked into. Memory therefore grows with the number of entries, never with
the size of files.

Layer semantics (OCI image spec "Applying changesets", as Docker's overlay2 driver realises them):

- ``.wh.NAME`` hides ``NAME`` of lower layers; ``.wh..wh..opq`` hides every lower-layer entry of its directory.
  Neither hides entries of the same layer, whatever their order in the tar (a same-layer directory ``NAME``
  stays, without what lower layers had below it). Other ``.wh..wh.*`` names are aufs bookkeeping and are
  ignored.
- A directory entry over an existing directory changes its attributes and keeps its contents; any other
  entry replaces what was there (a whole subtree, if it was a directory).
- Hard links share one file (contents, mode, owner, time); the export lists the first name in walk order as
  the file and later names as links to it, as Docker's archiver does.

Refused (``MalformedInput``): absolute names, ``..`` components, entries below a symlink or a file, relative
symlinks that climb out of the root, hard links to missing entries or directories, more than
:data:`MAX_ENTRIES` entries. What is *not* emulated: parent directories a layer creates implicitly (without
their own tar entry) get mode 0755, owner 0:0 and linuxkit's timestamp rather than Docker's extraction time;
extended attributes are dropped (linuxkit's cpio conversion drops them too).
"""

from __future__ import annotations

import enum
import itertools
import math
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, cast

from enclavekit.errors import MalformedInput

#: Refuse images with more entries than this: the merged index is held in memory (~0.5 KiB per entry).
MAX_ENTRIES = 2_000_000
#: Compressed layers may unpack to at most this many bytes in total (an EIF holds the image in
#: enclave memory; 64 GiB is far beyond any enclave image).
MAX_SPOOL = 64 << 30
#: Refuse deeper paths (Linux's PATH_MAX allows ~2000; real images stay far below; the walk recurses).
MAX_DEPTH = 256
#: Mode, owner and time given to a parent directory a layer creates without an entry of its own.
IMPLICIT_DIR_PERMISSIONS = 0o755
IMPLICIT_DIR_MTIME = 1492533000

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
_META_PREFIX = b".wh..wh."


class EntryKind(enum.Enum):
    """What a tar header describes."""

    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class ContentRef:
    """``size`` bytes at ``offset`` of the file at ``path``: where a regular file's contents live."""

    path: str
    offset: int
    size: int


class TarEntry(NamedTuple):
    """One tar header as a layer supplies it or as the export lists it (names are raw bytes).

    Directories in an export listing end with ``/``; a hard link's ``linkname`` is the full path of the
    first name of the file; a symlink's ``linkname`` is its target. (An immutable named tuple rather
    than a dataclass: one is made per file, twice, and construction cost shows on large images.)
    """

    name: bytes
    kind: EntryKind
    permissions: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    linkname: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    content: ContentRef | None = None

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else 0


_serials = itertools.count(1)


class _Node:
    """A file-system object of the merged view; hard-linked names share one node."""

    __slots__ = (
        "children",
        "content",
        "gid",
        "kind",
        "linkname",
        "mtime",
        "permissions",
        "rdev",
        "serial",
        "uid",
    )

    def __init__(self, entry: TarEntry) -> None:
        self.serial = next(_serials)
        self.kind = entry.kind
        self.permissions = entry.permissions
        self.uid = entry.uid
        self.gid = entry.gid
        self.mtime = entry.mtime
        self.linkname = entry.linkname
        self.rdev = (entry.rdev_major, entry.rdev_minor)
        self.content = entry.content
        self.children: dict[bytes, _Node] | None = {} if entry.kind is EntryKind.DIRECTORY else None


def split_name(name: bytes, *, what: str = "entry") -> tuple[bytes, ...]:
    """The components of a tar member name; refuses absolute names and ``..`` (path traversal)."""
    if name.startswith(b"/"):
        raise MalformedInput(
            f"{what} {_show(name)} is an absolute path; layer entries must be relative to the image root "
            "(path traversal refused)"
        )
    split = name.split(b"/")
    parts = tuple(
        split if b"" not in split and b"." not in split else (p for p in split if p and p != b".")
    )
    if b".." in parts:
        raise MalformedInput(
            f"{what} {_show(name)} contains a '..' component, which would leave the image root "
            "(path traversal refused)"
        )
    if b"\0" in name:
        raise MalformedInput(f"{what} {_show(name)} contains a NUL byte")
    if len(parts) > MAX_DEPTH:
        raise MalformedInput(
            f"{what} {_show(name[:200])}... is nested deeper than {MAX_DEPTH} levels"
        )
    return parts


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


def _escapes_root(directory: tuple[bytes, ...], target: bytes) -> bool:
    """Would a relative symlink in ``directory`` pointing at ``target`` climb above the root?"""
    depth = len(directory)
    for part in target.split(b"/"):
        if part in (b"", b"."):
            continue
        depth = depth - 1 if part == b".." else depth + 1
        if depth < 0:
            return True
    return False


class MergedTree:
    """The root file system an image's layers add up to. Feed layers in order, then :meth:`export`."""

    def __init__(self) -> None:
        self._root = _Node(TarEntry(b"", EntryKind.DIRECTORY, 0o755))
        self._touched: set[tuple[int, bytes]] = set()
        self._entries = 0
        self._layer = "layer"

    # -- building ---------------------------------------------------------------------------------------
    def begin_layer(self, label: str) -> None:
        """Start a new layer: whiteouts from now on hide only what earlier layers added."""
        self._touched = set()
        self._layer = label

    def _fail(self, message: str) -> MalformedInput:
        return MalformedInput(f"{self._layer}: {message}")

    def _parent(self, parts: tuple[bytes, ...], name: bytes) -> _Node:
        """The directory holding ``parts[-1]``, creating missing directories as the layer would."""
        node = self._root
        for depth, part in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = _Node(
                    TarEntry(
                        part,
                        EntryKind.DIRECTORY,
                        IMPLICIT_DIR_PERMISSIONS,
                        mtime=IMPLICIT_DIR_MTIME,
                    )
                )
                node.children[part] = child
                self._count()
            elif child.kind is not EntryKind.DIRECTORY:
                where = _show(b"/".join(parts[: depth + 1]))
                if child.kind is EntryKind.SYMLINK:
                    raise self._fail(
                        f"entry {_show(name)} lies below the symlink {where}; writing through symlinks "
                        "could leave the image root (path traversal refused)"
                    )
                raise self._fail(
                    f"entry {_show(name)} lies below {where}, which is a {child.kind.value}, "
                    "not a directory"
                )
            self._touched.add((node.serial, part))
            node = child
        return node

    def _count(self) -> None:
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise self._fail(f"the image has more than {MAX_ENTRIES} entries; refusing to index it")

    def _lookup(self, parts: tuple[bytes, ...]) -> _Node | None:
        node = self._root
        for part in parts:
            if node.children is None:
                return None
            found = node.children.get(part)
            if found is None:
                return None
            node = found
        return node

    def apply(self, entry: TarEntry) -> None:
        """Apply one entry of the current layer."""
        parts = split_name(entry.name)
        if not parts:
            return  # the root directory itself: docker export never lists it
        base = parts[-1]
        if WHITEOUT_PREFIX in entry.name and any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
            raise self._fail(f"entry {_show(entry.name)} lies below a whiteout name")
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, entry.name)
            return
        parent = self._parent(parts, entry.name)
        assert parent.children is not None
        existing = parent.children.get(base)
        if entry.kind is EntryKind.HARDLINK:
            node = self._link_target(entry)
        elif (
            entry.kind is EntryKind.DIRECTORY
            and existing is not None
            and existing.children is not None
        ):
            existing.permissions = entry.permissions
            existing.uid, existing.gid, existing.mtime = entry.uid, entry.gid, entry.mtime
            self._touched.add((parent.serial, base))
            return
        else:
            if entry.kind is EntryKind.SYMLINK:
                self._check_symlink(parts, entry)
            node = _Node(entry)
        if existing is None:
            self._count()
        parent.children[base] = node
        self._touched.add((parent.serial, base))

    def _check_symlink(self, parts: tuple[bytes, ...], entry: TarEntry) -> None:
        if not entry.linkname:
            raise self._fail(f"symlink {_show(entry.name)} has an empty target")
        if not entry.linkname.startswith(b"/") and _escapes_root(parts[:-1], entry.linkname):
            raise self._fail(
                f"symlink {_show(entry.name)} -> {_show(entry.linkname)} points outside the image root "
                "(symlink escape refused)"
            )

    def _link_target(self, entry: TarEntry) -> _Node:
        target_parts = split_name(entry.linkname, what="hard link target")
        target = self._lookup(target_parts) if target_parts else None
        if target is None:
            raise self._fail(
                f"hard link {_show(entry.name)} points to {_show(entry.linkname)}, which does not exist "
                "in this or an earlier layer"
            )
        if target.kind is EntryKind.DIRECTORY:
            raise self._fail(
                f"hard link {_show(entry.name)} points to the directory {_show(entry.linkname)}"
            )
        return target

    def _whiteout(self, parts: tuple[bytes, ...], name: bytes) -> None:
        base = parts[-1]
        if base.startswith(_META_PREFIX) and base != OPAQUE_MARKER:
            return
        parent = self._parent(parts, name)
        assert parent.children is not None
        if base == OPAQUE_MARKER:
            self._hide_lower(parent)
            return
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise self._fail(f"whiteout {_show(name)} names no entry")
        if (parent.serial, hidden) not in self._touched:
            parent.children.pop(hidden, None)
            return
        # The same layer also has an entry there: it stays, but what lower layers put below it
        # is hidden all the same (OCI: whiteouts apply to lower layers only).
        kept = parent.children.get(hidden)
        if kept is not None and kept.children is not None:
            self._hide_lower(kept)

    def _hide_lower(self, directory: _Node) -> None:
        """An opaque directory: drop everything earlier layers put below it."""
        assert directory.children is not None
        for name in list(directory.children):
            child = directory.children[name]
            if (directory.serial, name) not in self._touched:
                del directory.children[name]
            elif child.children is not None:
                self._hide_lower(child)

    # -- listing ----------------------------------------------------------------------------------------
    def export(self) -> Iterator[TarEntry]:
        """The tree as ``docker export`` lists it: depth first, names sorted bytewise within each
        directory, directories with a trailing ``/``, later names of a hard-linked file as links."""
        links = Counter(self._walk_serials(self._root))
        yield from self._emit(self._root, b"", links, {})

    def _walk_serials(self, directory: _Node) -> Iterator[int]:
        todo = [directory]
        while todo:
            current = todo.pop()
            assert current.children is not None
            for child in current.children.values():
                if child.children is not None:
                    todo.append(child)
                else:
                    yield child.serial

    def _emit(
        self, directory: _Node, prefix: bytes, links: Counter[int], first_name: dict[int, bytes]
    ) -> Iterator[TarEntry]:
        assert directory.children is not None
        for name in sorted(directory.children):
            node = directory.children[name]
            path = prefix + name
            if node.children is not None:
                yield TarEntry(
                    path + b"/",
                    EntryKind.DIRECTORY,
                    node.permissions,
                    node.uid,
                    node.gid,
                    node.mtime,
                )
                yield from self._emit(node, path + b"/", links, first_name)
                continue
            if links[node.serial] > 1:
                first = first_name.get(node.serial)
                if first is not None:
                    yield TarEntry(
                        path,
                        EntryKind.HARDLINK,
                        node.permissions,
                        node.uid,
                        node.gid,
                        node.mtime,
                        first,
                    )
                    continue
                first_name[node.serial] = path
            yield TarEntry(
                path,
                node.kind,
                node.permissions,
                node.uid,
                node.gid,
                node.mtime,
                node.linkname,
                node.rdev[0],
                node.rdev[1],
                node.content,
            )


class ContentReader:
    """Reads :class:`ContentRef` bytes in chunks, keeping a few files open."""

    CHUNK = 1 << 20
    MAX_OPEN = 16

    def __init__(self) -> None:
        self._files: dict[str, BinaryIO] = {}

    def chunks(self, ref: ContentRef) -> Iterator[bytes]:
        """The referenced bytes; a file that shrank since it was indexed is an error."""
        handle = self._files.get(ref.path)
        if handle is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files))).close()
            handle = open(ref.path, "rb")  # noqa: SIM115 - closed by close()
            self._files[ref.path] = handle
        handle.seek(ref.offset)
        remaining = ref.size
        while remaining:
            chunk = handle.read(min(self.CHUNK, remaining))
            if not chunk:
                raise MalformedInput(
                    f"{ref.path}: expected {ref.size} bytes at offset {ref.offset}, the file ended "
                    f"{remaining} bytes early (was it changed during the build?)"
                )
            remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading layer tars ----------------------------------------------------------------------------------

#: Read size when copying or checking layer data.
TAR_BUFSIZE = 1 << 20
#: Largest single read of a layer tar: tarfile reads PAX headers and GNU long names whole, so an
#: oversized one would otherwise be held in memory.
MAX_HEADER_READ = 16 << 20

_TAR_KINDS = {
    tarfile.REGTYPE: EntryKind.REGULAR,
    tarfile.AREGTYPE: EntryKind.REGULAR,
    tarfile.CONTTYPE: EntryKind.REGULAR,
    tarfile.GNUTYPE_SPARSE: EntryKind.REGULAR,
    tarfile.DIRTYPE: EntryKind.DIRECTORY,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.HARDLINK,
    tarfile.CHRTYPE: EntryKind.CHAR,
    tarfile.BLKTYPE: EntryKind.BLOCK,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}


class Spool:
    """An append-only scratch file for unpacked compressed layers, refusing more than ``limit``
    bytes in total (a decompression bomb fills no disk)."""

    def __init__(self, path: str, *, limit: int = MAX_SPOOL) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._size = 0
        self._limit = limit

    def append(self, chunks: Iterable[bytes]) -> ContentRef:
        start = self._size
        for chunk in chunks:
            if self._size + len(chunk) > self._limit:
                raise MalformedInput(
                    f"the image's compressed layers unpack to more than {self._limit} bytes; "
                    "refusing (decompression bomb?)"
                )
            self._file.write(chunk)
            self._size += len(chunk)
        return ContentRef(self.path, start, self._size - start)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_layer_file(location: ContentRef, *, label: str, spool: Spool) -> Iterator[TarEntry]:
    """The entries of an uncompressed layer tar stored at ``location``; file contents are referenced
    in place (only headers are read). The caller checks the layer's digest first."""
    with open(location.path, "rb") as handle:
        window = _Window(handle, location.offset, location.size)
        try:
            with tarfile.open(
                fileobj=cast(BinaryIO, window),
                mode="r:",
                encoding="utf-8",
                errors="surrogateescape",
            ) as archive:
                # next() rather than iteration: tarfile keeps every member it has read in
                # ``members``; clearing it keeps memory flat (hard links are resolved by the
                # merged tree, never by tarfile).
                seen: Any = getattr(archive, "members", None)  # undocumented, long-stable
                while (member := archive.next()) is not None:
                    if isinstance(seen, list):
                        seen.clear()
                    yield _to_entry(member, archive, label=label, spool=spool, direct=location)
                end = archive.offset
        except (tarfile.TarError, EOFError, UnicodeError) as exc:
            raise MalformedInput(
                f"{label}: not a readable tar archive ({exc}); the layer is corrupt or truncated"
            ) from exc
        window.seek(end)
        while chunk := window.read(TAR_BUFSIZE):
            if chunk.strip(b"\0"):
                raise _damaged(label, end)


def _damaged(label: str, offset: int) -> MalformedInput:
    return MalformedInput(
        f"{label}: the tar listing stops at a damaged header (offset {offset}) but data follows; "
        "the layer is corrupt"
    )


class _Window:
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file."""

    def __init__(self, handle: BinaryIO, offset: int, size: int) -> None:
        self._handle = handle
        self._offset = offset
        self._size = size
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._size - self._pos:
            n = max(0, self._size - self._pos)
        if n > MAX_HEADER_READ:
            # tarfile reads headers (PAX records, GNU long names) whole; file data is never read
            # through here in one piece.
            raise MalformedInput(
                f"a tar header of {n} bytes at offset {self._pos}; refusing more than "
                f"{MAX_HEADER_READ} (PAX records and long names are small)"
            )
        self._handle.seek(self._offset + self._pos)
        data = self._handle.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _to_entry(
    member: tarfile.TarInfo,
    archive: tarfile.TarFile,
    *,
    label: str,
    spool: Spool,
    direct: ContentRef | None,
) -> TarEntry:
    kind = _TAR_KINDS.get(member.type)
    name = member.name.encode("utf-8", "surrogateescape")
    if kind is None:
        raise MalformedInput(
            f"{label}: entry {_show(name)} has unsupported tar type {member.type!r}"
        )
    content: ContentRef | None = None
    if kind is EntryKind.REGULAR:
        if direct is not None and not member.issparse():
            if member.offset_data + member.size > direct.size:
                raise MalformedInput(f"{label}: entry {_show(name)} runs past the end of the layer")
            content = ContentRef(direct.path, direct.offset + member.offset_data, member.size)
        else:
            data = archive.extractfile(member)
            assert data is not None
            content = spool.append(iter(lambda: data.read(TAR_BUFSIZE), b""))
            if content.size != member.size:
                raise MalformedInput(f"{label}: entry {_show(name)} is truncated")
    return TarEntry(
        name,
        kind,
        member.mode & 0o7777,
        member.uid,
        member.gid,
        math.floor(member.mtime),
        member.linkname.encode("utf-8", "surrogateescape"),
        member.devmajor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        member.devminor if kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        content,
    )

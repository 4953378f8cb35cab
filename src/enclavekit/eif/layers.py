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
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from enclavekit.eif.tarscan import FileWindow, TarMember, TarScanner
from enclavekit.errors import MalformedInput

#: Refuse images with more entries than this: the merged index is held in memory (see :class:`MergedTree`).
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


class ContentRef(NamedTuple):
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

#: A non-directory node of the merged tree is one int: bits 0-46 the offset of the entry's tar header in
#: its layer, or (with :data:`_EXTRA` set) an index into the tree's list of entries that came without a
#: tar header (root-fs directories, Docker's init layer); bits 48-62 the layer number. A regular file
#: whose attributes fit (:func:`_pack`; every ustar header's do) also carries them from bit 64 on, with
#: :data:`_PACKED` set: the listing then needs no second parse of its header. Other entries' attributes
#: are read again from their headers when listed. Hard-linked names hold the same int.
_LAYER_SHIFT = 48
_LAYER_MASK = (1 << 15) - 1
_EXTRA = 1 << 47
_POSITION_MASK = _EXTRA - 1
_PACKED = 1 << 63
_ATTR_SHIFT = 64
#: Widths of the packed attributes: mode (12 bits), uid, gid, mtime, size, and the data's distance
#: from the header in 512-byte blocks (extension headers in between).
_UID_BITS = _GID_BITS = 32
_MTIME_BITS = 36
_SIZE_BITS = 40
_DELTA_BITS = 16
_M_UID, _M_GID, _M_MTIME = (1 << _UID_BITS) - 1, (1 << _GID_BITS) - 1, (1 << _MTIME_BITS) - 1
_M_SIZE, _M_DELTA = (1 << _SIZE_BITS) - 1, (1 << _DELTA_BITS) - 1
_S_UID = 12
_S_GID = _S_UID + _UID_BITS
_S_MTIME = _S_GID + _GID_BITS
_S_SIZE = _S_MTIME + _MTIME_BITS
_S_DELTA = _S_SIZE + _SIZE_BITS


class _Dir:
    """A directory of the merged view: its attributes, its children, the last layer that touched it."""

    __slots__ = ("children", "gid", "layer", "mtime", "permissions", "serial", "uid")

    def __init__(self, permissions: int, uid: int, gid: int, mtime: int, layer: int) -> None:
        self.serial = next(_serials)
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.layer = layer
        self.children: dict[bytes, _Dir | int] = {}


_TAR_KINDS = {
    b"0": EntryKind.REGULAR,
    b"\0": EntryKind.REGULAR,
    b"7": EntryKind.REGULAR,
    b"5": EntryKind.DIRECTORY,
    b"2": EntryKind.SYMLINK,
    b"1": EntryKind.HARDLINK,
    b"3": EntryKind.CHAR,
    b"4": EntryKind.BLOCK,
    b"6": EntryKind.FIFO,
}


def tar_kind(type_byte: bytes) -> EntryKind:
    """The kind of a tar member by its type byte (the scanner yields only these types)."""
    return _TAR_KINDS[type_byte]


def clean_name(name: bytes) -> bool:
    """Whether ``name`` is a plain relative path: non-empty, no leading, trailing or double ``/``, no
    component starting with ``.`` (so no ``.``/``..``), no NUL, no whiteout prefix anywhere. Other names
    need :func:`split_name` (and may be refused)."""
    return not (
        not name
        or name.startswith((b"/", b"."))
        or name.endswith(b"/")
        or b"//" in name
        or b"/." in name
        or b"\0" in name
        or WHITEOUT_PREFIX in name
    )


def directory_entry(path: bytes, permissions: int, uid: int, gid: int, mtime: int) -> TarEntry:
    """A directory as the export lists it (``path`` without its trailing ``/``)."""
    return _new(
        TarEntry, (path + b"/", EntryKind.DIRECTORY, permissions, uid, gid, mtime, b"", 0, 0, None)
    )


def member_entry(
    path: bytes, kind: EntryKind, member: TarMember, file: str, offset: int
) -> TarEntry:
    """A non-directory tar member as the export lists it under ``path`` (its layer tar lies at
    ``offset`` of ``file``): permission bits only, a target for symlinks, device numbers for devices,
    contents for files."""
    device = kind is EntryKind.CHAR or kind is EntryKind.BLOCK
    return _new(
        TarEntry,
        (
            path,
            kind,
            member.mode & 0o7777,
            member.uid,
            member.gid,
            member.mtime,
            member.linkname if kind is EntryKind.SYMLINK else b"",
            member.devmajor if device else 0,
            member.devminor if device else 0,
            _new(ContentRef, (file, offset + member.data, member.size))
            if kind is EntryKind.REGULAR
            else None,
        ),
    )


_new = tuple.__new__
#: A layer's scanner, its file and the offset of the tar in that file.
_Source = tuple[TarScanner, str, int]


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


def escapes_root(depth: int, target: bytes) -> bool:
    """Would a relative symlink ``depth`` directories below the root pointing at ``target`` climb above
    the root?"""
    for part in target.split(b"/"):
        if part in (b"", b"."):
            continue
        depth = depth - 1 if part == b".." else depth + 1
        if depth < 0:
            return True
    return False


class MergedTree:
    """The root file system an image's layers add up to. Feed layers in order (:meth:`add_layer` for a
    layer tar, or :meth:`begin_layer` and :meth:`apply` per entry), then :meth:`export`.

    Memory per entry: its name (a dict key in its directory) and one int (layer number and the offset of
    its tar header — what whiteouts and hard links across layers need — and, for a regular file, its
    attributes packed into the same int: 60 bytes instead of 36, so listing it needs no second parse of
    its header); other entries' attributes are read again from their headers when the tree is listed;
    directories keep their attributes.
    """

    def __init__(self) -> None:
        self._layer_number = 0
        self._root = _Dir(0o755, 0, 0, 0, 0)
        self._linked: set[tuple[int, bytes]] = set()  # hard-link names the current layer wrote
        self._link_targets: set[int] = set()  # nodes a hard link ever pointed at
        self._entries = 0
        self._layer = "layer"
        self._sources: dict[int, tuple[ContentRef, str]] = {}  # layer number -> its tar
        self._extra: list[TarEntry] = []
        self._cached: bytes | None = None  # parent path of the last entry, and its directory
        self._cached_dir = self._root

    # -- building ---------------------------------------------------------------------------------------
    def begin_layer(self, label: str) -> None:
        """Start a new layer: whiteouts from now on hide only what earlier layers added."""
        self._layer_number += 1
        if self._layer_number >= 1 << (63 - _LAYER_SHIFT):
            raise self._fail("too many layers")
        self._linked = set()
        self._layer = label
        self._cached = None

    def add_layer(self, location: ContentRef, *, label: str) -> None:
        """Apply every entry of the uncompressed layer tar at ``location`` (see :mod:`.tarscan`)."""
        self.begin_layer(label)
        self._sources[self._layer_number] = (location, label)
        stamp = self._layer_number << _LAYER_SHIFT
        packed_stamp = stamp | _PACKED
        kinds = _TAR_KINDS
        directory = EntryKind.DIRECTORY
        regular = EntryKind.REGULAR
        with open(location.path, "rb") as handle:
            scanner = TarScanner(FileWindow(handle), location.offset, location.size, label=label)
            for member in scanner.members():
                kind = kinds[member.type]
                if kind is regular:
                    position, uid, gid, mtime, size = (
                        member.position,
                        member.uid,
                        member.gid,
                        member.mtime,
                        member.size,
                    )
                    delta = (member.data - position) >> 9
                    if (
                        0 <= uid <= _M_UID
                        and 0 <= gid <= _M_GID
                        and 0 <= mtime <= _M_MTIME
                        and size <= _M_SIZE
                        and delta <= _M_DELTA
                    ):
                        attrs = (
                            (member.mode & 0o7777)
                            | uid << _S_UID
                            | gid << _S_GID
                            | mtime << _S_MTIME
                            | size << _S_SIZE
                            | delta << _S_DELTA
                        )
                        self._apply(
                            member.name, kind, b"", packed_stamp | position | attrs << _ATTR_SHIFT
                        )
                        continue
                    self._apply(member.name, kind, b"", stamp | position)
                elif kind is directory:
                    self._apply(
                        member.name,
                        kind,
                        b"",
                        0,
                        member.mode & 0o7777,
                        member.uid,
                        member.gid,
                        member.mtime,
                    )
                else:
                    self._apply(member.name, kind, member.linkname, stamp | member.position)

    def _fail(self, message: str) -> MalformedInput:
        return MalformedInput(f"{self._layer}: {message}")

    def _count(self) -> None:
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise self._fail(f"the image has more than {MAX_ENTRIES} entries; refusing to index it")

    def _directory(self, parts: Iterable[bytes], name: bytes) -> _Dir:
        """The directory ``parts`` (creating missing ones as the layer would), marked as touched."""
        layer = self._layer_number
        node = self._root
        walked: list[bytes] = []
        for part in parts:
            walked.append(part)
            child = node.children.get(part)
            if child is None:
                child = _Dir(IMPLICIT_DIR_PERMISSIONS, 0, 0, IMPLICIT_DIR_MTIME, layer)
                node.children[part] = child
                self._count()
            elif not isinstance(child, _Dir):
                where = _show(b"/".join(walked))
                if self._kind(child) is EntryKind.SYMLINK:
                    raise self._fail(
                        f"entry {_show(name)} lies below the symlink {where}; writing through symlinks "
                        "could leave the image root (path traversal refused)"
                    )
                raise self._fail(
                    f"entry {_show(name)} lies below {where}, which is a {self._kind(child).value}, "
                    "not a directory"
                )
            else:
                child.layer = layer
            node = child
        return node

    def _kind(self, node: int) -> EntryKind:
        if node & _PACKED:
            return EntryKind.REGULAR
        if node & _EXTRA:
            return self._extra[node & _POSITION_MASK].kind
        location, label = self._sources[node >> _LAYER_SHIFT & _LAYER_MASK]
        with open(location.path, "rb") as handle:
            scanner = TarScanner(FileWindow(handle), location.offset, location.size, label=label)
            return _TAR_KINDS[scanner.member_at(node & _POSITION_MASK).type]

    def _lookup(self, parts: tuple[bytes, ...]) -> _Dir | int | None:
        node: _Dir | int = self._root
        for part in parts:
            if not isinstance(node, _Dir):
                return None
            found = node.children.get(part)
            if found is None:
                return None
            node = found
        return node

    def apply(self, entry: TarEntry) -> None:
        """Apply one entry of the current layer (its attributes are kept with it)."""
        if entry.kind is EntryKind.DIRECTORY:
            self._apply(
                entry.name, entry.kind, b"", 0, entry.permissions, entry.uid, entry.gid, entry.mtime
            )
            return
        node = (self._layer_number << _LAYER_SHIFT) | _EXTRA | len(self._extra)
        if node & _POSITION_MASK != len(self._extra):
            raise self._fail("too many entries")
        self._extra.append(entry)
        self._apply(entry.name, entry.kind, entry.linkname, node)

    def _apply(
        self,
        name: bytes,
        kind: EntryKind,
        linkname: bytes,
        node: int,
        permissions: int = 0,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
    ) -> None:
        """One entry: ``node`` for non-directories, the attributes for directories."""
        if not clean_name(name):
            parts = split_name(name)
            if not parts:
                return  # the root directory itself: docker export never lists it
            base = parts[-1]
            if WHITEOUT_PREFIX in name and any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
                raise self._fail(f"entry {_show(name)} lies below a whiteout name")
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parts, name)
                return
            parent_path = b"/".join(parts[:-1])
        else:  # a clean relative name (no "", "." or ".." components, no whiteout)
            parent_path, _, base = name.rpartition(b"/")
        if parent_path == self._cached:
            parent = self._cached_dir
        else:
            parts_above = parent_path.split(b"/") if parent_path else []
            if len(parts_above) >= MAX_DEPTH:
                split_name(name)
            parent = self._directory(parts_above, name)
            self._cached, self._cached_dir = parent_path, parent
        children = parent.children
        existing = children.get(base)
        if kind is EntryKind.DIRECTORY:
            if isinstance(existing, _Dir):
                existing.permissions, existing.uid, existing.gid = permissions, uid, gid
                existing.mtime, existing.layer = mtime, self._layer_number
                return
            children[base] = _Dir(permissions, uid, gid, mtime, self._layer_number)
        elif kind is EntryKind.HARDLINK:
            target = self._link_target(name, linkname)
            children[base] = target
            self._linked.add((parent.serial, base))
            self._link_targets.add(target)
        else:
            if kind is EntryKind.SYMLINK:
                self._check_symlink(parent_path, name, linkname)
            children[base] = node
        if existing is None:
            self._count()
        elif isinstance(existing, _Dir):
            self._cached = None  # a directory went away: cached parents may have gone with it

    def _check_symlink(self, parent_path: bytes, name: bytes, linkname: bytes) -> None:
        if not linkname:
            raise self._fail(f"symlink {_show(name)} has an empty target")
        depth = parent_path.count(b"/") + 1 if parent_path else 0
        if not linkname.startswith(b"/") and escapes_root(depth, linkname):
            raise self._fail(
                f"symlink {_show(name)} -> {_show(linkname)} points outside the image root "
                "(symlink escape refused)"
            )

    def _link_target(self, name: bytes, linkname: bytes) -> int:
        target_parts = split_name(linkname, what="hard link target")
        target = self._lookup(target_parts) if target_parts else None
        if target is None:
            raise self._fail(
                f"hard link {_show(name)} points to {_show(linkname)}, which does not exist "
                "in this or an earlier layer"
            )
        if isinstance(target, _Dir):
            raise self._fail(f"hard link {_show(name)} points to the directory {_show(linkname)}")
        return target

    def _touched(self, directory: _Dir, name: bytes, node: _Dir | int) -> bool:
        """Did the current layer write ``name`` in ``directory``?"""
        if isinstance(node, _Dir):
            return node.layer == self._layer_number
        return (
            node >> _LAYER_SHIFT & _LAYER_MASK == self._layer_number
            or (directory.serial, name) in self._linked
        )

    def _whiteout(self, parts: tuple[bytes, ...], name: bytes) -> None:
        base = parts[-1]
        if base.startswith(_META_PREFIX) and base != OPAQUE_MARKER:
            return
        self._cached = None
        parent = self._directory(parts[:-1], name)
        if base == OPAQUE_MARKER:
            self._hide_lower(parent)
            return
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in (b"", b".", b".."):
            raise self._fail(f"whiteout {_show(name)} names no entry")
        kept = parent.children.get(hidden)
        if kept is None:
            return
        if not self._touched(parent, hidden, kept):
            del parent.children[hidden]
            return
        # The same layer also has an entry there: it stays, but what lower layers put below it
        # is hidden all the same (OCI: whiteouts apply to lower layers only).
        if isinstance(kept, _Dir):
            self._hide_lower(kept)

    def _hide_lower(self, directory: _Dir) -> None:
        """An opaque directory: drop everything earlier layers put below it."""
        for name, child in list(directory.children.items()):
            if not self._touched(directory, name, child):
                del directory.children[name]
            elif isinstance(child, _Dir):
                self._hide_lower(child)

    # -- listing ----------------------------------------------------------------------------------------
    def export(self, reader: ContentReader | None = None) -> Iterator[TarEntry]:
        """The tree as ``docker export`` lists it: depth first, names sorted bytewise within each
        directory, directories with a trailing ``/``, later names of a hard-linked file as links.

        Tar headers are read again through ``reader`` (which then also serves the file contents from
        the same window); a private one is used when none is given."""
        own = reader is None
        reader = reader or ContentReader()
        try:
            linked = self._link_targets
            links = Counter(node for node in self._walk_nodes(self._root) if node in linked)
            shared = {node for node, count in links.items() if count > 1}
            scanners = {
                number: (
                    TarScanner(
                        reader.window(location.path), location.offset, location.size, label=label
                    ),
                    location.path,
                    location.offset,
                )
                for number, (location, label) in self._sources.items()
            }
            yield from self._emit(self._root, b"", shared, {}, scanners)
        finally:
            if own:
                reader.close()

    def _walk_nodes(self, directory: _Dir) -> Iterator[int]:
        todo = [directory]
        while todo:
            current = todo.pop()
            for child in current.children.values():
                if isinstance(child, _Dir):
                    todo.append(child)
                else:
                    yield child

    def _emit(
        self,
        directory: _Dir,
        prefix: bytes,
        shared: set[int],
        first_name: dict[int, bytes],
        scanners: dict[int, _Source],
    ) -> Iterator[TarEntry]:
        children = directory.children
        extra = self._extra
        kinds = _TAR_KINDS
        regular = EntryKind.REGULAR
        for name in sorted(children):
            node = children[name]
            path = prefix + name
            if isinstance(node, _Dir):
                yield directory_entry(path, node.permissions, node.uid, node.gid, node.mtime)
                yield from self._emit(node, path + b"/", shared, first_name, scanners)
                continue
            if node in shared:
                first = first_name.get(node)
                if first is not None:
                    yield self._link_entry(node, path, first, scanners)
                    continue
                first_name[node] = path
            if node & _PACKED:
                _, file, offset = scanners[node >> _LAYER_SHIFT & _LAYER_MASK]
                attrs = node >> _ATTR_SHIFT
                yield _new(
                    TarEntry,
                    (
                        path,
                        regular,
                        attrs & 0o7777,
                        attrs >> _S_UID & _M_UID,
                        attrs >> _S_GID & _M_GID,
                        attrs >> _S_MTIME & _M_MTIME,
                        b"",
                        0,
                        0,
                        _new(
                            ContentRef,
                            (
                                file,
                                offset
                                + (node & _POSITION_MASK)
                                + ((attrs >> _S_DELTA & _M_DELTA) << 9),
                                attrs >> _S_SIZE & _M_SIZE,
                            ),
                        ),
                    ),
                )
                continue
            if node & _EXTRA:
                entry = extra[node & _POSITION_MASK]
                yield entry if entry.name == path else entry._replace(name=path)
                continue
            scanner, file, offset = scanners[node >> _LAYER_SHIFT & _LAYER_MASK]
            member = scanner.member_at(node & _POSITION_MASK)
            kind = kinds[member.type]
            if kind is EntryKind.SYMLINK or kind is EntryKind.DIRECTORY:
                # Headers are read again here: checks that depend on them are made again.
                self._recheck(path, kind, member.linkname, node)
            yield member_entry(path, kind, member, file, offset)

    def _recheck(self, path: bytes, kind: EntryKind, linkname: bytes, node: int) -> None:
        self._layer = self._sources[node >> _LAYER_SHIFT & _LAYER_MASK][1]
        if kind is EntryKind.DIRECTORY:
            raise self._fail(
                f"{_show(path)} was indexed as a file but its tar header now says directory; was the "
                "layer changed during the build?"
            )
        self._check_symlink(path.rpartition(b"/")[0], path, linkname)

    def _link_entry(
        self, node: int, path: bytes, first: bytes, scanners: dict[int, _Source]
    ) -> TarEntry:
        """A later name of a hard-linked file: a link to ``first``, with the file's attributes."""
        if node & _PACKED:
            attrs = node >> _ATTR_SHIFT
            permissions, uid, gid, mtime = (
                attrs & 0o7777,
                attrs >> _S_UID & _M_UID,
                attrs >> _S_GID & _M_GID,
                attrs >> _S_MTIME & _M_MTIME,
            )
        elif node & _EXTRA:
            entry = self._extra[node & _POSITION_MASK]
            permissions, uid, gid, mtime = entry.permissions, entry.uid, entry.gid, entry.mtime
        else:
            member = scanners[node >> _LAYER_SHIFT & _LAYER_MASK][0].member_at(
                node & _POSITION_MASK
            )
            permissions, uid, gid, mtime = (
                member.mode & 0o7777,
                member.uid,
                member.gid,
                member.mtime,
            )
        return TarEntry(path, EntryKind.HARDLINK, permissions, uid, gid, mtime, first)


class ContentReader:
    """Reads :class:`ContentRef` bytes through a window per file (:class:`.tarscan.FileWindow`), keeping a
    few files open: contents read in file order cost one ``read`` per window, not one per file."""

    CHUNK = 1 << 20
    MAX_OPEN = 16

    def __init__(self) -> None:
        self._files: dict[str, tuple[BinaryIO, FileWindow, int]] = {}

    def window(self, path: str) -> FileWindow:
        """The window over ``path`` (opened if needed)."""
        return self._open(path)[1]

    def _open(self, path: str) -> tuple[BinaryIO, FileWindow, int]:
        found = self._files.get(path)
        if found is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.pop(next(iter(self._files)))[0].close()
            handle = open(path, "rb")  # noqa: SIM115 - closed by close()
            size = os.fstat(handle.fileno()).st_size
            found = self._files[path] = (handle, FileWindow(handle), size)
        return found

    def chunks(self, ref: ContentRef) -> Iterable[bytes]:
        """The referenced bytes; a file that shrank since it was indexed is an error."""
        found = self._files.get(ref.path)
        _, window, size = found if found is not None else self._open(ref.path)
        if ref.size <= self.CHUNK:
            data = window.read(ref.offset, ref.size, limit=size)
            if len(data) != ref.size:
                raise self._short(ref, ref.size - len(data))
            return (data,)
        return self._stream(window, size, ref)

    def _stream(self, window: FileWindow, size: int, ref: ContentRef) -> Iterator[bytes]:
        position, remaining = ref.offset, ref.size
        while remaining:
            chunk = window.read(position, min(self.CHUNK, remaining), limit=size)
            if not chunk:
                raise self._short(ref, remaining)
            position += len(chunk)
            remaining -= len(chunk)
            yield chunk

    @staticmethod
    def _short(ref: ContentRef, missing: int) -> MalformedInput:
        return MalformedInput(
            f"{ref.path}: expected {ref.size} bytes at offset {ref.offset}, the file ended "
            f"{missing} bytes early (was it changed during the build?)"
        )

    def close(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading layer tars ----------------------------------------------------------------------------------


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

    def mark(self) -> int:
        """The spool's size now, for :meth:`rewind`."""
        return self._size

    def rewind(self, mark: int) -> None:
        """Forget everything appended since :meth:`mark` returned ``mark``."""
        self._file.seek(mark)
        self._file.truncate()
        self._size = mark

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_layer_file(location: ContentRef, *, label: str) -> Iterator[TarEntry]:
    """The entries of an uncompressed layer tar stored at ``location``, in archive order; file contents
    are referenced in place (only headers are read, see :mod:`.tarscan`). The caller checks the layer's
    digest. (:meth:`MergedTree.add_layer` reads a layer into the tree without making these entries.)"""
    with open(location.path, "rb") as handle:
        scanner = TarScanner(FileWindow(handle), location.offset, location.size, label=label)
        for member in scanner.members():
            kind = _TAR_KINDS[member.type]
            device = kind in (EntryKind.CHAR, EntryKind.BLOCK)
            yield TarEntry(
                member.name,
                kind,
                member.mode & 0o7777,
                member.uid,
                member.gid,
                member.mtime,
                member.linkname,
                member.devmajor if device else 0,
                member.devminor if device else 0,
                ContentRef(location.path, location.offset + member.data, member.size)
                if kind is EntryKind.REGULAR
                else None,
            )

"""A single-layer image listed as ``docker export`` lists it, in one pass over its tar, without a merged tree.

When an image has one layer whose tar is already in walk order (names strictly increasing as component
tuples — depth first, names sorted bytewise, a directory before its contents — as Docker's archiver, buildah
and most flattening tools write them), the export listing is the tar's own order with Docker's init layer
merged in and missing parent directories made up: nothing needs to be held per entry. :func:`streamed_export`
yields exactly the entries :meth:`~enclavekit.eif.layers.MergedTree.export` would (a property test holds
both to that), or raises :class:`NotStreamable` at the first entry it does not handle itself, and the caller
builds the merged tree instead (its verdicts and messages are the tree's):

- names that are not clean relative paths (``./``, ``..``, ``//``, a trailing ``/``, NUL) or hold ``.wh.``
  (whiteouts: a bottom layer's hide nothing, but their parents count);
- an entry not after the previous one in walk order (a duplicate name included);
- an entry below a non-directory (the tree refuses it), hard links (the export needs the file's first
  name and attributes), a symlink that the tree would refuse, paths deeper than
  :data:`~enclavekit.eif.layers.MAX_DEPTH`, more than :data:`~enclavekit.eif.layers.MAX_ENTRIES` entries;
- an init-layer entry over an image entry of another kind (Docker replaces a subtree there).

A :class:`NotStreamable` can come after entries were yielded: the caller discards what it made of them.
Corrupt tar data raises :class:`~enclavekit.errors.MalformedInput` from the scanner, as it would for the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from enclavekit.eif.layers import (
    IMPLICIT_DIR_MTIME,
    IMPLICIT_DIR_PERMISSIONS,
    MAX_DEPTH,
    MAX_ENTRIES,
    WHITEOUT_PREFIX,
    ContentReader,
    ContentRef,
    EntryKind,
    TarEntry,
    clean_name,
    directory_entry,
    escapes_root,
    member_entry,
    tar_kind,
)
from enclavekit.eif.tarscan import TarScanner


class NotStreamable(Exception):
    """The layer needs the merged tree (see the module); not an error of the image."""


_DIR = EntryKind.DIRECTORY
_REGULAR = EntryKind.REGULAR
_SYMLINK = EntryKind.SYMLINK
_HARDLINK = EntryKind.HARDLINK
_REGULAR_TYPES = frozenset(t for t in (b"0", b"\0", b"7") if tar_kind(t) is EntryKind.REGULAR)


#: ``plain(parent, name, permissions, uid, gid, mtime, data)``: writes a regular file given whole, or
#: returns False (see :class:`~enclavekit.eif.ramdisk.PlainFiles`).
PlainFile = Callable[[bytes, bytes, int, int, int, int, bytes], bool]
#: Files of at most this many bytes are offered to ``plain`` (their data is in the scan's window).
PLAIN_MAX = 64 << 10
#: After this many files taken by ``plain``, the listing yields ``None`` (the consumer may hand on
#: what they made: at most 16 x 64 KiB held).
PLAIN_RUN = 16


def streamed_export(
    location: ContentRef,
    *,
    label: str,
    init_layer: Sequence[TarEntry],
    reader: ContentReader,
) -> Iterator[TarEntry]:
    """The listing of the one layer tar at ``location`` with ``init_layer`` applied on top (clean names,
    no hard links), or :class:`NotStreamable`."""
    for entry in streamed_listing(location, label=label, init_layer=init_layer, reader=reader):
        assert entry is not None  # no plain files without ``plain``
        yield entry


def streamed_listing(
    location: ContentRef,
    *,
    label: str,
    init_layer: Sequence[TarEntry],
    reader: ContentReader,
    plain: PlainFile | None = None,
) -> Iterator[TarEntry | None]:
    """:func:`streamed_export`, except that a regular file beside the previous one, of at most
    :data:`PLAIN_MAX` bytes, is first offered to ``plain`` with its data; a file it takes is not
    listed, and a ``None`` follows every :data:`PLAIN_RUN` files it took."""
    init = sorted((tuple(entry.name.split(b"/")), entry) for entry in init_layer)
    init_parents = {entry.name.rpartition(b"/")[0] for entry in init_layer}
    next_init = 0
    scanner = TarScanner(reader.window(location.path), location.offset, location.size, label=label)
    file, base = location.path, location.offset
    # The previous entry: its parent directory (bytes and components), its last component, whether it
    # was a directory. The root before the first entry.
    previous_parent, previous_leaf = b"", b""
    previous_parent_parts: tuple[bytes, ...] = ()
    previous_is_dir = True
    open_dirs: list[
        tuple[bytes, ...]
    ] = []  # the directories above the current position, outermost first
    count = taken = 0
    new = tuple.__new__
    read = scanner.read
    for member in scanner.members():
        _, name, member_type, mode, uid, gid, mtime, _, _, _, data, size = member
        parent, _, leaf = name.rpartition(b"/")
        # The common case, a file beside the previous file: after it in walk order exactly when its
        # last component is; no directory opens or closes, no parent is missing, and no init-layer entry
        # can lie between the two unless their directory holds init-layer entries.
        if (
            parent == previous_parent
            and not previous_is_dir
            and leaf > previous_leaf
            and member_type in _REGULAR_TYPES
            and parent not in init_parents
            and leaf[:1] != b"."
            and b"\0" not in leaf
            and WHITEOUT_PREFIX not in leaf
        ):
            count += 1
            if count > MAX_ENTRIES:
                raise NotStreamable(name)
            if plain is not None and size <= PLAIN_MAX:
                contents = read(data, size)
                if len(contents) == size and plain(
                    parent, name, mode & 0o7777, uid, gid, mtime, contents
                ):
                    previous_leaf = leaf
                    taken += 1
                    if taken == PLAIN_RUN:
                        taken = 0
                        yield None
                    continue
            # member_entry(name, _REGULAR, member, file, base), inline: this is the per-file path.
            content = new(ContentRef, (file, base + data, size))
            yield new(
                TarEntry, (name, _REGULAR, mode & 0o7777, uid, gid, mtime, b"", 0, 0, content)
            )
            previous_leaf = leaf
            continue
        if not clean_name(name):
            raise NotStreamable(name)
        parts = tuple(name.split(b"/"))
        previous = (*previous_parent_parts, previous_leaf) if previous_leaf else ()
        if parts <= previous or len(parts) >= MAX_DEPTH:
            raise NotStreamable(name)
        if not previous_is_dir and parts[: len(previous)] == previous:
            raise NotStreamable(name)  # below a file or symlink: the tree refuses it
        kind = tar_kind(member.type)
        if kind is _HARDLINK:
            raise NotStreamable(name)
        # Leave the directories this entry is not in, then make up the parents it lacks.
        while open_dirs and parts[: len(open_dirs[-1])] != open_dirs[-1]:
            open_dirs.pop()
        for depth in range(len(open_dirs) + 1, len(parts)):
            implicit = parts[:depth]
            while next_init < len(init) and init[next_init][0] < implicit:
                yield _listed(init[next_init][1])
                next_init += 1
            count += 1
            entry = directory_entry(
                b"/".join(implicit), IMPLICIT_DIR_PERMISSIONS, 0, 0, IMPLICIT_DIR_MTIME
            )
            if next_init < len(init) and init[next_init][0] == implicit:
                entry = _over(entry, init[next_init][1])
                next_init += 1
            yield entry
            open_dirs.append(implicit)
        while next_init < len(init) and init[next_init][0] < parts:
            yield _listed(init[next_init][1])
            next_init += 1
        count += 1
        if count > MAX_ENTRIES:
            raise NotStreamable(name)
        if kind is _DIR:
            entry = directory_entry(
                name, member.mode & 0o7777, member.uid, member.gid, member.mtime
            )
            open_dirs.append(parts)
        else:
            if kind is _SYMLINK and (
                not member.linkname
                or (
                    not member.linkname.startswith(b"/")
                    and escapes_root(len(parts) - 1, member.linkname)
                )
            ):
                raise NotStreamable(name)
            entry = member_entry(name, kind, member, file, base)
        if next_init < len(init) and init[next_init][0] == parts:
            entry = _over(entry, init[next_init][1])
            next_init += 1
        yield entry
        previous_parent, previous_parent_parts, previous_leaf = parent, parts[:-1], leaf
        previous_is_dir = kind is _DIR
    yield from (_listed(entry) for _, entry in init[next_init:])


def _listed(entry: TarEntry) -> TarEntry:
    """An init-layer entry as the export lists it (directories with ``/`` and only their attributes)."""
    if entry.kind is not _DIR:
        return entry
    return directory_entry(entry.name, entry.permissions, entry.uid, entry.gid, entry.mtime)


def _over(image_entry: TarEntry, init_entry: TarEntry) -> TarEntry:
    """What Docker's init layer makes of an image entry of the same name."""
    if image_entry.kind is _DIR and init_entry.kind is _DIR:  # attributes change, contents stay
        return _listed(init_entry)
    if image_entry.kind is not _DIR and init_entry.kind is not _DIR:
        return init_entry
    raise NotStreamable(init_entry.name)

"""Layers applied in order (whiteouts, opaque directories, hard links) and the docker-export listing."""

from __future__ import annotations

import contextlib
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.layers import (
    ContentRef,
    EntryKind,
    MergedTree,
    Spool,
    TarEntry,
    read_layer_file,
)
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import F, layer


def _entries(data: bytes, spool: Spool) -> list[TarEntry]:
    path = Path(spool.path + ".layers")
    with open(path, "ab") as handle:
        offset = handle.tell()
        handle.write(data)
    return list(read_layer_file(ContentRef(str(path), offset, len(data)), label="test layer"))


def _add(tree: MergedTree, data: bytes, spool: Spool, label: str) -> None:
    """One layer applied as the build applies it (:meth:`MergedTree.add_layer`)."""
    path = Path(spool.path + ".layers")
    with open(path, "ab") as handle:
        offset = handle.tell()
        handle.write(data)
    tree.add_layer(ContentRef(str(path), offset, len(data)), label=label)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(str(tmp_path / "spool"))
    yield s
    s.close()


def _tree(spool: Spool, *layers: bytes) -> MergedTree:
    tree = MergedTree()
    for i, data in enumerate(layers):
        _add(tree, data, spool, f"layer {i}")
    spool.flush()
    return tree


def _listing(tree: MergedTree) -> list[tuple[bytes, str]]:
    return [(e.name, e.kind.value) for e in tree.export()]


def test_whiteout_hides_a_lower_file(spool: Spool) -> None:
    tree = _tree(
        spool,
        layer(F("a", kind="dir"), F("a/x", b"1"), F("a/y", b"2")),
        layer(F("a/.wh.x")),
    )
    assert _listing(tree) == [(b"a/", "directory"), (b"a/y", "regular")]


def test_whiteout_does_not_hide_the_same_layers_entry(spool: Spool) -> None:
    tree = _tree(spool, layer(F("a", kind="dir"), F("a/x", b"1"), F("a/.wh.x")))
    assert (b"a/x", "regular") in _listing(tree)


def test_whiteout_then_recreate_in_one_layer_replaces(spool: Spool) -> None:
    tree = _tree(
        spool,
        layer(F("a", kind="dir"), F("a/x", kind="dir"), F("a/x/old", b"1")),
        layer(F("a/.wh.x"), F("a/x", b"new")),
    )
    assert _listing(tree) == [(b"a/", "directory"), (b"a/x", "regular")]


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_hides_lower_contents_only(spool: Spool, marker_first: bool) -> None:
    upper = [F("a", kind="dir"), F("a/new", b"n"), F("a/sub", kind="dir"), F("a/sub/k", b"k")]
    marker = F("a/.wh..wh..opq")
    upper = [marker, *upper] if marker_first else [*upper, marker]
    tree = _tree(
        spool,
        layer(F("a", kind="dir"), F("a/old", b"o"), F("a/sub", kind="dir"), F("a/sub/old", b"o")),
        layer(*upper),
    )
    assert _listing(tree) == [
        (b"a/", "directory"),
        (b"a/new", "regular"),
        (b"a/sub/", "directory"),
        (b"a/sub/k", "regular"),
    ]


def test_directory_over_directory_keeps_contents_and_takes_attributes(spool: Spool) -> None:
    tree = _tree(
        spool,
        layer(F("a", kind="dir", mode=0o700, mtime=1), F("a/x", b"1")),
        layer(F("a", kind="dir", mode=0o755, uid=5, mtime=2)),
    )
    entries = list(tree.export())
    assert [e.name for e in entries] == [b"a/", b"a/x"]
    assert (entries[0].permissions, entries[0].uid, entries[0].mtime) == (0o755, 5, 2)


def test_file_replaces_a_directory_tree(spool: Spool) -> None:
    tree = _tree(spool, layer(F("a", kind="dir"), F("a/x", b"1")), layer(F("a", b"file")))
    assert _listing(tree) == [(b"a", "regular")]


def test_walk_order_is_per_directory_bytewise(spool: Spool) -> None:
    tree = _tree(
        spool, layer(F("a-b", b""), F("a", kind="dir"), F("a/c", b""), F("B", b""), F("\xe9", b""))
    )
    assert [e.name for e in tree.export()] == [b"B", b"a/", b"a/c", b"a-b", "\xe9".encode()]


def test_hard_links_listed_as_first_name_then_links(spool: Spool) -> None:
    tree = _tree(
        spool,
        layer(
            F("z", b"data", mode=0o755),
            F("a", kind="link", link="z"),
            F("m", kind="link", link="z"),
        ),
    )
    entries = list(tree.export())
    assert [(e.name, e.kind, e.linkname) for e in entries] == [
        (b"a", EntryKind.REGULAR, b""),
        (b"m", EntryKind.HARDLINK, b"a"),
        (b"z", EntryKind.HARDLINK, b"a"),
    ]
    assert entries[0].size == 4 and entries[2].permissions == 0o755


def test_hard_link_with_one_name_left_is_a_plain_file(spool: Spool) -> None:
    tree = _tree(spool, layer(F("z", b"data"), F("a", kind="link", link="z")), layer(F(".wh.a")))
    assert [(e.name, e.kind) for e in tree.export()] == [(b"z", EntryKind.REGULAR)]


def test_contents_are_referenced_in_the_spool(spool: Spool) -> None:
    tree = _tree(spool, layer(F("f", b"hello" * 1000)))
    (entry,) = tree.export()
    assert entry.content is not None
    with open(entry.content.path, "rb") as handle:
        handle.seek(entry.content.offset)
        assert handle.read(entry.content.size) == b"hello" * 1000


def test_direct_references_point_into_the_layer_even_with_pax_long_names(
    tmp_path: Path, spool: Spool
) -> None:
    long = "d/" + "x" * 300
    data = layer(
        F("d", kind="dir"), F(long, b"payload"), F("e", b"second", pax={"comment": "c" * 600})
    )
    blob = tmp_path / "layer.tar"
    blob.write_bytes(b"PREFIX" + data)

    entries = list(read_layer_file(ContentRef(str(blob), 6, len(data)), label="l"))
    raw = blob.read_bytes()
    found = {
        e.name: raw[e.content.offset : e.content.offset + e.content.size]
        for e in entries
        if e.content
    }
    assert found == {long.encode(): b"payload", b"e": b"second"}


def test_devices_fifos_and_modes_survive(spool: Spool) -> None:
    tree = _tree(
        spool,
        layer(
            F("dev", kind="dir"),
            F("dev/null", kind="char", mode=0o666, dev=(1, 3)),
            F("dev/sda", kind="block", mode=0o660, dev=(8, 0)),
            F("p", kind="fifo", mode=0o600),
            F("s", b"x", mode=0o6755, uid=1000, gid=1001),
        ),
    )
    got = {
        e.name: (e.kind, e.permissions, e.rdev_major, e.rdev_minor, e.uid, e.gid)
        for e in tree.export()
    }
    assert got[b"dev/null"] == (EntryKind.CHAR, 0o666, 1, 3, 0, 0)
    assert got[b"dev/sda"] == (EntryKind.BLOCK, 0o660, 8, 0, 0, 0)
    assert got[b"p"][:2] == (EntryKind.FIFO, 0o600)
    assert got[b"s"] == (EntryKind.REGULAR, 0o6755, 0, 0, 1000, 1001)


# -- attacks ---------------------------------------------------------------------------------------------


def test_path_traversal_dotdot_in_layer_is_refused(spool: Spool) -> None:
    """A ``../`` entry name would write outside the image root."""
    with pytest.raises(MalformedInput, match=r"'\.\.' component"):
        _tree(spool, layer(F("a/../../etc/passwd", b"x")))


def test_absolute_path_in_layer_is_refused(spool: Spool) -> None:
    """An absolute entry name would write outside the image root."""
    with pytest.raises(MalformedInput, match="absolute path"):
        _tree(spool, layer(F("/etc/passwd", b"x")))


def test_symlink_escape_is_refused(spool: Spool) -> None:
    """A relative symlink that climbs above the root is refused (as Docker's untar refuses it)."""
    with pytest.raises(MalformedInput, match="symlink escape"):
        _tree(spool, layer(F("a", kind="dir"), F("a/evil", kind="symlink", link="../../etc")))


def test_absolute_symlink_is_allowed(spool: Spool) -> None:
    tree = _tree(spool, layer(F("lib", kind="symlink", link="/usr/lib")))
    assert [(e.name, e.linkname) for e in tree.export()] == [(b"lib", b"/usr/lib")]


def test_write_through_symlink_in_later_layer_is_refused(spool: Spool) -> None:
    """An entry below a symlink could land anywhere the symlink points."""
    with pytest.raises(MalformedInput, match="below the symlink"):
        _tree(
            spool, layer(F("etc", kind="symlink", link="/host-etc")), layer(F("etc/passwd", b"x"))
        )


def test_write_through_symlink_in_same_layer_is_refused(spool: Spool) -> None:
    """The same attack inside one layer."""
    with pytest.raises(MalformedInput, match="below the symlink"):
        _tree(spool, layer(F("x", kind="symlink", link="/"), F("x/etc/passwd", b"x")))


def test_hard_link_traversal_is_refused(spool: Spool) -> None:
    """A hard link whose target leaves the root."""
    with pytest.raises(MalformedInput, match=r"'\.\.' component"):
        _tree(spool, layer(F("a", kind="link", link="../../etc/shadow")))


def test_hard_link_to_missing_target_is_refused(spool: Spool) -> None:
    with pytest.raises(MalformedInput, match="does not exist"):
        _tree(spool, layer(F("a", kind="link", link="nowhere")))


def test_hard_link_to_directory_is_refused(spool: Spool) -> None:
    with pytest.raises(MalformedInput, match="directory"):
        _tree(spool, layer(F("d", kind="dir"), F("a", kind="link", link="d")))


def test_whiteout_traversal_is_refused(spool: Spool) -> None:
    """``.wh...`` must not remove the parent directory."""
    with pytest.raises(MalformedInput):
        _tree(spool, layer(F("a", kind="dir"), F("a/.wh..", b"")))


def test_corrupt_tar_is_refused(spool: Spool) -> None:
    data = bytearray(layer(F("a", b"x" * 2000)))
    data[148:156] = b"99999999"  # header checksum
    with pytest.raises(MalformedInput, match="not a readable tar"):
        _entries(bytes(data), spool)


def test_truncated_tar_is_refused(spool: Spool) -> None:
    data = layer(F("a", b"x" * 5000))
    with pytest.raises(MalformedInput):
        _entries(data[:1500], spool)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_raise_only_malformed_input(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    spool = Spool(str(tmp_path_factory.mktemp("s") / "spool"))
    try:
        with contextlib.suppress(MalformedInput):
            tree = MergedTree()
            tree.begin_layer("random")
            for entry in _entries(data, spool):
                tree.apply(entry)
        with contextlib.suppress(MalformedInput):
            tree = MergedTree()
            _add(tree, data, spool, "random")
            list(tree.export())
    finally:
        spool.close()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(
                st.sampled_from(["a", "b", ".wh.a", ".wh.b", ".wh..wh..opq", "c"]),
                min_size=1,
                max_size=3,
            ),
            st.sampled_from(["file", "dir", "symlink"]),
        ),
        max_size=12,
    )
)
def test_random_layer_stacks_never_crash(
    tmp_path_factory: pytest.TempPathFactory, items: list
) -> None:
    spool = Spool(str(tmp_path_factory.mktemp("s") / "spool"))
    tree = MergedTree()
    try:
        for i in range(0, len(items), 3):
            tree.begin_layer(f"l{i}")
            for parts, kind in items[i : i + 3]:
                name = "/".join(parts)
                entries = _entries(
                    layer(F(name, b"x", kind=kind, link="a" if kind == "symlink" else "")), spool
                )
                for entry in entries:
                    with contextlib.suppress(MalformedInput):
                        tree.apply(entry)
        names = [e.name for e in tree.export()]
        assert len(names) == len(set(names))
        assert not any(n.rsplit(b"/", 1)[-1].startswith(b".wh.") for n in names)
    finally:
        spool.close()


def test_tarfile_formats_gnu_and_ustar_are_read(spool: Spool) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        tree = _tree(spool, layer(F("d", kind="dir"), F("d/f", b"1"), fmt=fmt))
        assert _listing(tree) == [(b"d/", "directory"), (b"d/f", "regular")]


def test_decompression_bomb_is_capped(tmp_path: Path) -> None:
    """A spool refuses to grow past its limit."""
    spool = Spool(str(tmp_path / "spool"), limit=1000)
    try:
        spool.append([b"x" * 600])
        with pytest.raises(MalformedInput, match="decompression bomb"):
            spool.append([b"x" * 600])
    finally:
        spool.close()


def test_oversized_pax_header_is_refused(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge PAX record would be read into memory whole; it is refused instead."""
    import enclavekit.eif.tarscan as tarscan_module

    monkeypatch.setattr(tarscan_module, "MAX_HEADER_READ", 4096)
    with pytest.raises(MalformedInput, match="tar header of"):
        _entries(layer(F("a", b"x", pax={"comment": "c" * 10_000})), spool)
    assert [e.name for e in _entries(layer(F("a", b"x" * 100_000)), spool)] == [b"a"]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", ".c", "d.e"]), min_size=1, max_size=3),
            st.sampled_from(["file", "dir"]),
            st.lists(st.sampled_from(["/", "//", "/./"]), min_size=3, max_size=3),
            st.sampled_from(["", "./"]),
            st.sampled_from(["", "/"]),
        ),
        max_size=8,
    )
)
def test_redundant_name_spellings_give_the_tree_of_the_clean_names(
    tmp_path_factory: pytest.TempPathFactory, items: list
) -> None:
    """Clean names take a fast path, names with ``./``, ``//`` or a trailing ``/`` the checked one:
    both give the same tree."""
    spool = Spool(str(tmp_path_factory.mktemp("s") / "spool"))
    try:
        clean = [F("/".join(parts), b"x", kind=kind) for parts, kind, *_ in items]
        noisy = [
            F(
                lead
                + parts[0]
                + "".join(sep + p for sep, p in zip(seps, parts[1:], strict=False))
                + tail,
                b"x",
                kind=kind,
            )
            for parts, kind, seps, lead, tail in items
        ]
        outcomes = []
        for entries in (clean, noisy):
            try:
                tree = _tree(spool, layer(*entries))
                outcomes.append([(e.name, e.kind, e.size) for e in tree.export()])
            except MalformedInput as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1]
    finally:
        spool.close()

"""The one-pass listing of a single layer (``layerstream``) against the merged tree: the same entries, or
:class:`NotStreamable` and the tree decides. Hypothesis generates layers in and out of walk order, with
implicit parents, names of Docker's init layer, symlinks (escaping ones too), hard links, whiteouts,
devices and entries below files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.build import docker_init_layer
from enclavekit.eif.layers import ContentReader, ContentRef, MergedTree, TarEntry
from enclavekit.eif.layerstream import NotStreamable, streamed_export, streamed_listing
from enclavekit.eif.ramdisk import customer_ramdisk_chunks
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import F, layer

_LABEL = "layer 0"


def _tree_listing(path: Path) -> list[TarEntry] | type[MalformedInput]:
    location = ContentRef(str(path), 0, path.stat().st_size)
    try:
        tree = MergedTree()
        tree.add_layer(location, label=_LABEL)
        tree.begin_layer("docker init layer")
        for entry in docker_init_layer():
            tree.apply(entry)
        return list(tree.export())
    except MalformedInput:
        return MalformedInput


def _streamed(path: Path) -> list[TarEntry] | type[NotStreamable]:
    location = ContentRef(str(path), 0, path.stat().st_size)
    with ContentReader() as reader:
        try:
            return list(
                streamed_export(
                    location, label=_LABEL, init_layer=docker_init_layer(), reader=reader
                )
            )
        except NotStreamable:
            return NotStreamable


def _ramdisks(path: Path) -> tuple[bytes, bytes]:
    """The customer ramdisk from the streamed entries, and with the plain-file shortcut."""
    location = ContentRef(str(path), 0, path.stat().st_size)
    init = docker_init_layer()
    with ContentReader() as reader:
        entries = streamed_export(location, label=_LABEL, init_layer=init, reader=reader)
        listed = b"".join(
            customer_ramdisk_chunks(entries, cmd=b"sh\n", env=b"", read=reader.chunks)
        )
    with ContentReader() as reader:
        shortcut = b"".join(
            customer_ramdisk_chunks(
                lambda plain_files: streamed_listing(
                    location, label=_LABEL, init_layer=init, reader=reader, plain=plain_files.add
                ),
                cmd=b"sh\n",
                env=b"",
                read=reader.chunks,
            )
        )
    return listed, shortcut


def _check(tmp_path: Path, entries: list[F]) -> str:
    path = tmp_path / "layer.tar"
    path.write_bytes(layer(*entries))
    streamed = _streamed(path)
    tree = _tree_listing(path)
    if streamed is NotStreamable:
        return "fallback"
    assert streamed == tree  # a listing the tree refuses must never stream
    listed, shortcut = _ramdisks(path)
    assert shortcut == listed  # the plain-file shortcut writes what the entries would
    return "streamed"


_NAMES = ["a", "b", "dev", "etc", "hosts", "pts", "x.y", ".wh.a", ".wh..wh..opq", "proc"]


_PLAIN_NAMES = [n for n in _NAMES if not n.startswith(".wh.")]


@st.composite
def _entries(draw: st.DrawFn, *, ordered: bool = False) -> list[F]:
    """Any layer; ``ordered``: sorted, distinct names without whiteouts or hard links (mostly
    streamable, so that the comparison is made often)."""
    names = _PLAIN_NAMES if ordered else _NAMES
    paths = draw(
        st.lists(
            st.lists(st.sampled_from(names), min_size=1, max_size=3).map("/".join),
            max_size=12,
            unique=ordered,
        )
    )
    if ordered or draw(st.booleans()):
        paths.sort(key=lambda p: tuple(p.encode().split(b"/")))
    kinds = ["file", "file", "dir", "dir", "dir", "symlink", "fifo", "char"]
    out = []
    for i, path in enumerate(paths):
        kind = draw(st.sampled_from(kinds if ordered else [*kinds, "link"]))
        if kind == "symlink":
            link = draw(st.sampled_from(["a", "../a", "../../../x", "/etc/hosts", ""]))
        elif kind == "link":
            link = draw(st.sampled_from(paths[:i] or ["missing"]))
        else:
            link = ""
        out.append(
            F(
                path,
                data=draw(st.binary(max_size=8)) if kind == "file" else b"",
                kind=kind,
                mode=draw(st.sampled_from([0o644, 0o755, 0o4755])),
                uid=draw(st.sampled_from([0, 1000])),
                mtime=draw(st.sampled_from([0, 1_700_000_000])),
                link=link,
                dev=(1, 3) if kind == "char" else (0, 0),
            )
        )
    return out


@settings(max_examples=400, deadline=None)
@given(_entries())
def test_streamed_listing_is_the_tree_listing_or_falls_back(
    tmp_path_factory: pytest.TempPathFactory, entries: list[F]
) -> None:
    _check(tmp_path_factory.mktemp("stream"), entries)


@settings(max_examples=400, deadline=None)
@given(_entries(ordered=True))
def test_streamed_listing_of_ordered_layers_is_the_tree_listing(
    tmp_path_factory: pytest.TempPathFactory, entries: list[F]
) -> None:
    _check(tmp_path_factory.mktemp("stream"), entries)


def test_a_docker_ordered_layer_streams(tmp_path: Path) -> None:
    """The common shape (as Docker's archiver writes a layer) takes the one-pass path, implicit parents
    and the init layer's names included."""
    entries = [
        F("bin", kind="dir", mode=0o755),
        F("bin/sh", b"#!", mode=0o755),
        F("dev", kind="dir", mode=0o700, uid=5),  # the init layer's attributes win
        F("etc", kind="dir", mode=0o755),
        F("etc/hosts", b"127.0.0.1 x\n"),  # replaced by the init layer's
        F("etc/os-release", b"ID=test\n"),
        F("usr/lib/python3/x.py", b"pass\n"),  # usr, usr/lib, usr/lib/python3 implicit
        F("usr/lib/python3/y.py", b"pass\n"),
        F("usr/share/doc", kind="symlink", link="../lib"),
        F("var/run", kind="symlink", link="/run"),
    ]
    assert _check(tmp_path, entries) == "streamed"


@pytest.mark.parametrize(
    "entries",
    [
        [F("b", b"1"), F("a", b"2")],  # out of order
        [F("a", b"1"), F("a", b"2")],  # the same name twice
        [F("a", b"1"), F("b", kind="link", link="a")],  # a hard link
        [F("a", kind="dir"), F("a/.wh.b")],  # a whiteout
        [F("a", b"1"), F("a/b", b"2")],  # below a file
        [F("a", kind="symlink", link="../../x")],  # a symlink escaping the root
        [F("dev", b"not a directory")],  # an init-layer directory over a file
        [F("./a", b"1")],  # not a clean name
    ],
    ids=["order", "duplicate", "hardlink", "whiteout", "below-file", "escape", "init-kind", "dot"],
)
def test_attack_shapes_the_tree_must_judge_are_not_streamed(
    tmp_path: Path, entries: list[F]
) -> None:
    assert _check(tmp_path, entries) == "fallback"


# -- the build: one pass, or the tree after a partial first attempt ------------------------------------


def _build(
    tmp_path: Path, blobs_dir: Path, entries: list[F], name: str, *, compress: bool
) -> bytes:
    from enclavekit.eif.build import build_enclave
    from enclavekit.eif.image import open_source
    from tests.unit.build_enclave.factory import oci_layout

    layout = oci_layout(tmp_path / f"{name}-oci", [layer(*entries)], compress=compress)
    out = tmp_path / f"{name}.eif"
    build_enclave(
        open_source(str(layout)), out, blobs_dir=blobs_dir, source_date_epoch="1700000000"
    )
    return out.read_bytes()


def _refuse(*args: object, **kwargs: object) -> Iterator[TarEntry]:
    raise NotStreamable("forced")
    yield  # pragma: no cover


_ORDERED = [
    F("bin", kind="dir", mode=0o755),
    *[F(f"bin/tool{i:03d}", bytes([i]) * (i * 37), mode=0o755) for i in range(200)],
    F("etc", kind="dir", mode=0o755),
    F("etc/hosts", b"127.0.0.1 x\n"),
    F("usr/lib/x.so", b"\x7fELF" * 1000),
]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_one_pass_build_is_byte_identical_to_the_tree_build(
    tmp_path: Path, blobs_dir: Path, monkeypatch: pytest.MonkeyPatch, compress: bool
) -> None:
    import enclavekit.eif.build as build_module

    streamed = _build(tmp_path, blobs_dir, _ORDERED, "streamed", compress=compress)
    monkeypatch.setattr(build_module, "streamed_listing", _refuse)
    assert _build(tmp_path, blobs_dir, _ORDERED, "tree", compress=compress) == streamed


def test_a_late_fallback_discards_the_partial_eif(
    tmp_path: Path, blobs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ordered layer with a hard link near its end: the one-pass attempt has written most of the
    EIF when it stops; the tree build then gives the same bytes as building with the tree alone, and
    no temporary file or spool remains."""
    import enclavekit.eif.build as build_module

    entries = [*_ORDERED, F("usr/lib/y.so", kind="link", link="usr/lib/x.so")]
    path = tmp_path / "layer.tar"
    path.write_bytes(layer(*entries))
    assert _streamed(path) is NotStreamable
    out = _build(tmp_path, blobs_dir, entries, "late", compress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(build_module, "streamed_listing", _refuse)
    assert _build(tmp_path, blobs_dir, entries, "tree", compress=False) == out


def test_the_plain_file_shortcut_writes_what_the_entries_would(tmp_path: Path) -> None:
    """Runs longer than PLAIN_RUN, a file over PLAIN_MAX, files in linuxkit's special directories
    (``etc/hosts`` is replaced, ``Dockerfile`` dropped) and ordinary ones: the shortcut takes the
    ordinary small files and the ramdisk is byte-identical to the one made from the entries."""
    from enclavekit.eif import layerstream

    entries = [
        F("Dockerfile", b"FROM scratch\n"),
        F("a.txt", b"top level\n"),
        F("etc", kind="dir", mode=0o755),
        F("etc/hostname", b"box\n"),
        F("etc/hosts", b"127.0.0.1 x\n"),
        F("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        F("usr", kind="dir", mode=0o755),
        F("usr/big.bin", b"\x01" * (layerstream.PLAIN_MAX + 1)),
        *[F(f"usr/m{i:03d}.py", bytes([i]) * i, uid=1000, mtime=7) for i in range(40)],
    ]
    path = tmp_path / "layer.tar"
    path.write_bytes(layer(*entries))
    taken: list[bytes] = []
    location = ContentRef(str(path), 0, path.stat().st_size)
    with ContentReader() as reader:

        def listing(plain_files: object) -> Iterator[TarEntry | None]:
            add = plain_files.add  # type: ignore[attr-defined]

            def counted(parent: bytes, name: bytes, *rest: object) -> bool:
                took: bool = add(parent, name, *rest)
                if took:
                    taken.append(name)
                return took

            return streamed_listing(
                location, label=_LABEL, init_layer=docker_init_layer(), reader=reader,
                plain=counted,
            )  # fmt: skip

        shortcut = b"".join(
            customer_ramdisk_chunks(listing, cmd=b"sh\n", env=b"", read=reader.chunks)
        )
    listed, _ = _ramdisks(path)
    assert shortcut == listed
    # big.bin follows its directory (and is too big); the top level and etc are linuxkit's.
    assert taken == [f"usr/m{i:03d}.py".encode() for i in range(40)]

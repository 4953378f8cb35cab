"""The newc reader and the path-traversal-safe unpacker."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.ramdisk import bootstrap_ramdisk
from enclavekit.errors import MalformedInput
from enclavekit.run.cpio import CpioEntry, EntryType, extract, iter_entries, safe_relative_name
from tests.unit.run.conftest import d, f, link, newc


def test_entries_round_trip_with_types_modes_and_data() -> None:
    archive = newc([d("rootfs"), f("rootfs/a.txt", b"hello", 0o640), link("rootfs/l", "a.txt")])
    entries = list(iter_entries(archive))
    assert [e.name for e in entries] == ["rootfs", "rootfs/a.txt", "rootfs/l"]
    assert [e.entry_type for e in entries] == [
        EntryType.DIRECTORY,
        EntryType.REGULAR,
        EntryType.SYMLINK,
    ]
    assert entries[1].data == b"hello" and entries[1].permissions == 0o640
    assert entries[2].data == b"a.txt"


def test_reads_the_linuxkit_bootstrap_ramdisk_written_by_the_builder() -> None:
    archive = bootstrap_ramdisk(b"\x7fELF init", b"nsm module")
    entries = {e.name: e for e in iter_entries(archive)}
    assert set(entries) == {"dev", "init", "nsm.ko"}
    assert entries["init"].data == b"\x7fELF init"
    assert entries["init"].permissions == 0o755
    assert entries["dev"].entry_type == EntryType.DIRECTORY


def test_crc_format_gzip_and_concatenated_archives_are_read() -> None:
    one = newc([f("a", b"1")], magic=b"070702")
    two = gzip.compress(newc([f("b", b"22")]))
    names = [e.name for e in iter_entries(one + two)]
    assert names == ["a", "b"]


def test_extract_writes_files_links_and_modes(tmp_path: Path) -> None:
    archive = newc(
        [
            d("rootfs"),
            d("rootfs/bin", 0o750),
            f("rootfs/bin/app", b"#!/bin/sh\n", 0o755),
            link("rootfs/bin/alias", "app"),
            ("rootfs/dev-null", 0o020666, b""),
        ]
    )
    stats = extract(archive, tmp_path / "out")
    root = tmp_path / "out" / "rootfs"
    assert (root / "bin" / "app").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((root / "bin" / "app").stat().st_mode) == 0o755
    assert os.readlink(root / "bin" / "alias") == "app"
    assert not (root / "dev-null").exists()
    assert (stats.files, stats.symlinks, stats.skipped) == (1, 1, 1)


def test_later_entries_replace_earlier_ones_like_an_initramfs(tmp_path: Path) -> None:
    extract(
        newc([d("rootfs"), f("rootfs/x", b"old"), d("rootfs"), f("rootfs/x", b"new")]), tmp_path
    )
    assert (tmp_path / "rootfs" / "x").read_bytes() == b"new"


def test_absolute_names_land_inside_the_destination(tmp_path: Path) -> None:
    extract(newc([f("/etc/passwd", b"inside")]), tmp_path)
    assert (tmp_path / "etc" / "passwd").read_bytes() == b"inside"


@pytest.mark.parametrize("name", ["../evil", "rootfs/../../evil", "a/./../../evil", ".."])
def test_path_traversal_in_ramdisk_is_refused(tmp_path: Path, name: str) -> None:
    """A '..' component could write outside the unpack directory."""
    with pytest.raises(MalformedInput, match="path traversal"):
        extract(newc([f(name, b"x")]), tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_symlink_traversal_in_ramdisk_is_refused(tmp_path: Path) -> None:
    """A file written through a symlinked directory could land anywhere on the host."""
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = newc([d("rootfs"), link("rootfs/escape", str(outside)), f("rootfs/escape/x", b"x")])
    with pytest.raises(MalformedInput, match="symbolic link"):
        extract(archive, tmp_path / "out")
    assert not (outside / "x").exists()


def test_symlink_replaced_by_file_does_not_follow_the_link(tmp_path: Path) -> None:
    """Overwriting a symlink entry must replace the link, not write to its target."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    extract(newc([link("x", str(victim)), f("x", b"attacker")]), tmp_path / "out")
    assert victim.read_bytes() == b"original"
    assert (tmp_path / "out" / "x").read_bytes() == b"attacker"


def test_file_replacing_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedInput, match="replace a directory"):
        extract(newc([d("a"), f("a", b"x")]), tmp_path)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (b"070701" + b"0" * 10, "truncated"),
        (b"070707" + b"0" * 200, "magic"),
        (newc([f("a", b"x")], trailer=False), "truncated"),
        (newc([f("a", b"x")])[:120], "run"),
        (b"070701" + b"zz" * 4 + b"0" * 96 + b"\0" * 16, "hex digits"),
    ],
)
def test_malformed_archives_are_refused(archive: bytes, message: str) -> None:
    with pytest.raises(MalformedInput, match=message):
        list(iter_entries(archive))


def test_name_without_nul_terminator_is_refused() -> None:
    archive = bytearray(newc([f("abc", b"")]))
    archive[110 + 3] = ord("x")  # overwrite the NUL after "abc"
    with pytest.raises(MalformedInput, match="NUL"):
        list(iter_entries(bytes(archive)))


def test_gzip_bomb_is_bounded() -> None:
    """An inflating ramdisk is refused once it passes the limit instead of filling memory."""
    from enclavekit.run.cpio import inflate_if_gzip

    with pytest.raises(MalformedInput, match="more than"):
        inflate_if_gzip(gzip.compress(b"\0" * 100_000), limit=10_000)


def test_damaged_gzip_is_refused() -> None:
    with pytest.raises(MalformedInput, match="gzip"):
        list(iter_entries(gzip.compress(newc([f("a", b"x")]))[:-10]))


def test_safe_relative_name_drops_dots_and_slashes() -> None:
    assert safe_relative_name("./a//b/./c") == ("a", "b", "c")
    assert safe_relative_name("/") == ()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_malformed_input(data: bytes) -> None:
    try:
        list(iter_entries(data))
    except MalformedInput:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(0, 400))
def test_mutated_archives_raise_only_malformed_input(junk: bytes, where: int) -> None:
    archive = bytearray(newc([d("rootfs"), f("rootfs/a", b"data" * 10)]))
    where = min(where, len(archive) - 1)
    archive[where : where + len(junk)] = junk
    try:
        list(iter_entries(bytes(archive)))
    except MalformedInput:
        pass


_PARTS = st.sampled_from(["a", "b", "..", ".", "", "rootfs", "etc"])
_NAMES = st.lists(_PARTS, min_size=1, max_size=4).map("/".join)


@st.composite
def _hostile_entries(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    entries = []
    for _ in range(draw(st.integers(1, 8))):
        name = draw(_NAMES) or "x"
        kind = draw(st.sampled_from(["file", "dir", "link"]))
        if kind == "file":
            entries.append(f(name, b"payload"))
        elif kind == "dir":
            entries.append(d(name))
        else:
            target = draw(st.sampled_from(["..", "../..", "/", "/tmp", "a", "../outside"]))
            entries.append(link(name, target))
    return entries


@settings(max_examples=200, deadline=None)
@given(_hostile_entries())
def test_no_archive_writes_outside_the_unpack_directory(
    entries: list[tuple[str, int, bytes]],
) -> None:
    """Whatever names and links an archive combines, nothing lands outside the destination."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        (base / "outside").mkdir()
        try:
            extract(newc(entries), base / "out")
        except MalformedInput:
            pass
        assert sorted(p.name for p in base.iterdir()) == ["out", "outside"]
        assert list((base / "outside").iterdir()) == []


def _fed_in_pieces(archive: bytes, cuts: list[int]) -> list[CpioEntry]:
    from enclavekit.run.cpio import CpioParser, _Collector

    collector = _Collector()
    parser = CpioParser(collector)
    previous = 0
    for cut in sorted({min(c, len(archive)) for c in cuts}) + [len(archive)]:
        parser.feed(archive[previous:cut])
        previous = cut
    parser.finish()
    return collector.entries


_SAMPLE = newc(
    [d("rootfs"), f("rootfs/a", b"x" * 1000), link("rootfs/l", "a"), f("rootfs/b", b"yz")]
) + gzip.compress(newc([f("c", b"gz" * 3000), d("e")]) + newc([f("g", b"second member")]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(_SAMPLE)), max_size=12))
def test_streamed_in_pieces_of_any_size_the_entries_are_the_same(cuts: list[int]) -> None:
    """The parser is fed the ramdisk as it is read; where the reads end must not matter."""
    whole = list(iter_entries(_SAMPLE))
    assert [e.name for e in whole] == ["rootfs", "rootfs/a", "rootfs/l", "rootfs/b", "c", "e", "g"]
    assert _fed_in_pieces(_SAMPLE, cuts) == whole


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 2000), st.lists(st.integers(0, 2000)))
def test_mutated_archives_fed_in_pieces_raise_only_malformed_input(
    junk: bytes, where: int, cuts: list[int]
) -> None:
    archive = bytearray(_SAMPLE)
    where = min(where, len(archive) - 1)
    archive[where : where + len(junk)] = junk
    try:
        _fed_in_pieces(bytes(archive), cuts)
    except MalformedInput:
        pass


def test_attack_gzip_bomb_streamed_is_refused_in_bounded_memory() -> None:
    """A small gzip member inflating without end must be refused at the limit, never inflated
    whole: the parser inflates at most INFLATE_CHUNK bytes at a time."""
    from enclavekit.run.cpio import INFLATE_CHUNK, CpioHeader, CpioParser

    pieces: list[int] = []

    class Sizes:
        def begin(self, header: CpioHeader) -> None:
            pass

        def data(self, piece: memoryview) -> None:
            pieces.append(len(piece))

        def end(self) -> None:
            pass

    bomb = gzip.compress(newc([f("big", b"\0" * (8 * INFLATE_CHUNK))]), compresslevel=9)
    parser = CpioParser(Sizes(), gzip_limit=3 * INFLATE_CHUNK)
    with pytest.raises(MalformedInput, match="more than"):
        parser.feed(bomb)
    assert max(pieces) <= INFLATE_CHUNK


def test_gzip_nested_too_deep_is_refused() -> None:
    archive = newc([f("a", b"x")])
    for _ in range(6):
        archive = gzip.compress(archive)
    with pytest.raises(MalformedInput, match="levels deep"):
        list(iter_entries(archive))


def test_symlink_target_longer_than_path_max_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedInput, match="PATH_MAX"):
        extract(newc([link("l", "a" * 5000)]), tmp_path)

"""The linuxkit-style cpio writer: byte layout (spec eif.md §6.2–6.4) and the bootstrap known answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.layers import ContentRef, EntryKind, TarEntry
from enclavekit.eif.ramdisk import (
    HOSTS,
    LINUXKIT_MTIME,
    CpioEntry,
    CpioWriter,
    FileType,
    argv_file,
    bootstrap_ramdisk,
    customer_ramdisk_chunks,
    relative_link,
)
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import read_cpio


@pytest.fixture(scope="module")
def bootstrap(assets: Path) -> bytes:
    return bootstrap_ramdisk(
        (assets / "build" / "init").read_bytes(), (assets / "build" / "nsm.ko").read_bytes()
    )


def test_bootstrap_ramdisk_matches_spec_known_answer(bootstrap: bytes) -> None:
    assert len(bootstrap) == 764416
    assert hashlib.sha384(bootstrap).hexdigest() == (
        "8cd1a7c92774b5351c4969f6998f07f6715dbb291ef8a7ade6c3126435a2227d"
        "72904343f41ca3df9984e1f7fa036371"
    )
    assert hashlib.sha256(bootstrap).hexdigest() == (
        "c752bd2c30ce7f8449fcea83b05eb53a4a10302dfbc8f5ee8f8a48ae3976a8e2"
    )


def test_bootstrap_ramdisk_entries_follow_the_table(bootstrap: bytes, assets: Path) -> None:
    members = read_cpio(bootstrap)
    assert [(m.ino, m.name, m.mode, m.mtime, m.nlink) for m in members] == [
        (721, b"dev", 0o40755, LINUXKIT_MTIME, 2),
        (722, b"init", 0o100755, LINUXKIT_MTIME, 1),
        (723, b"nsm.ko", 0o100755, LINUXKIT_MTIME, 1),
        (724, b"TRAILER!!!", 0, 0, 1),
    ]
    assert all(m.dev == (3, 1) and m.uid == 0 and m.gid == 0 for m in members)
    assert members[1].data == (assets / "build" / "init").read_bytes()


def test_first_header_is_byte_exact(bootstrap: bytes) -> None:
    expected = (
        b"070701"
        + b"000002d1"
        + b"000041ed"
        + b"00000000" * 2
        + b"00000002"
        + b"58f63f08"
        + b"00000000"
        + b"00000003"
        + b"00000001"
        + b"00000000" * 2
        + b"00000004"
        + b"00000000"
        + b"dev\0"
        + b"\0\0"
    )
    assert bootstrap[: len(expected)] == expected


def test_empty_archive_is_trailer_padded_to_512() -> None:
    sink = _Sink()
    assert CpioWriter(sink).close() == 512
    assert sink.data[:6] == b"070701"
    assert b"TRAILER!!!\0" in sink.data


def test_field_overflow_is_refused() -> None:
    writer = CpioWriter(_Sink())
    with pytest.raises(MalformedInput, match="within"):
        writer.begin(CpioEntry(b"big", FileType.REGULAR, 0o644, size=1 << 32))


def test_short_data_is_refused() -> None:
    writer = CpioWriter(_Sink())
    with pytest.raises(MalformedInput, match="shorter"):
        writer.add(CpioEntry(b"f", FileType.REGULAR, 0o644, size=4), b"ab")


@pytest.mark.parametrize(
    ("name", "target", "expected"),
    [
        (b"rootfs/usr/bin/b", b"rootfs/usr/bin/a", b"a"),
        (b"rootfs/usr/bin/b", b"rootfs/usr/lib/a", b"../lib/a"),
        (b"rootfs/b", b"rootfs/x/y/z", b"x/y/z"),
        (b"rootfs/a/b/c", b"rootfs/d", b"../../d"),
    ],
)
def test_hard_links_become_relative_symlinks(name: bytes, target: bytes, expected: bytes) -> None:
    assert relative_link(name, target) == expected


def test_argv_file_rejects_newlines() -> None:
    assert argv_file(["/bin/app", "-v"]) == b"/bin/app\n-v\n"
    assert argv_file([]) == b""
    with pytest.raises(MalformedInput, match="newline"):
        argv_file(["a\nb"])


def _customer(entries: list[TarEntry], contents: dict[str, bytes] | None = None) -> bytes:
    contents = contents or {}
    return b"".join(
        customer_ramdisk_chunks(
            entries, cmd=b"/bin/app\n", env=b"A=1\n", read=lambda ref: [contents[ref.path]]
        )
    )


def test_customer_ramdisk_layout_with_export_entries() -> None:
    entries = [
        TarEntry(b".dockerenv", EntryKind.REGULAR, 0o755),
        TarEntry(b"bin/", EntryKind.DIRECTORY, 0o755, mtime=5),
        TarEntry(b"bin/a", EntryKind.REGULAR, 0o4755, 1, 2, 6, content=ContentRef("a", 0, 3)),
        TarEntry(b"bin/b", EntryKind.HARDLINK, 0o4755, 1, 2, 6, b"bin/a"),
        TarEntry(b"dev/", EntryKind.DIRECTORY, 0o755, mtime=7),
        TarEntry(b"dev/console", EntryKind.REGULAR, 0o755),
        TarEntry(b"dev/null", EntryKind.CHAR, 0o666, mtime=8, rdev_major=1, rdev_minor=3),
        TarEntry(b"dev/pts/", EntryKind.DIRECTORY, 0o755, mtime=9),
        TarEntry(b"etc/", EntryKind.DIRECTORY, 0o755, mtime=9),
        TarEntry(b"etc/hostname", EntryKind.REGULAR, 0o755),
        TarEntry(b"etc/hosts", EntryKind.REGULAR, 0o755, mtime=9),
        TarEntry(b"etc/mtab", EntryKind.SYMLINK, 0o777, mtime=9, linkname=b"/proc/mounts"),
        TarEntry(b"etc/resolv.conf", EntryKind.REGULAR, 0o755, mtime=9),
    ]
    members = read_cpio(_customer(entries, {"a": b"abc"}))
    got = [(m.name, oct(m.mode), m.mtime, m.data) for m in members]
    assert got == [
        (b"rootfs", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/bin/", "0o40755", 5, b""),
        (b"rootfs/bin/a", "0o104755", 6, b"abc"),
        (b"rootfs/bin/b", "0o124755", 6, b"a"),
        (b"rootfs/dev/", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/dev/null", "0o20666", 8, b""),
        (b"rootfs/dev/pts/", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/etc/", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/etc/hosts", "0o100755", LINUXKIT_MTIME, HOSTS),
        (b"rootfs/etc/mtab", "0o120777", LINUXKIT_MTIME, b"/proc/mounts"),
        (b"rootfs/etc/resolv.conf", "0o120755", LINUXKIT_MTIME, b"/run/resolvconf/resolv.conf"),
        # must-exist entries the listing lacked
        (b"rootfs/dev/shm", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/proc", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/sys", "0o40755", LINUXKIT_MTIME, b""),
        # the YAML files: section
        (b"rootfs", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/dev", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/run", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/sys", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/var", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/proc", "0o40755", LINUXKIT_MTIME, b""),
        (b"rootfs/tmp", "0o40755", LINUXKIT_MTIME, b""),
        (b"cmd", "0o100644", LINUXKIT_MTIME, b"/bin/app\n"),
        (b"env", "0o100644", LINUXKIT_MTIME, b"A=1\n"),
        (b"TRAILER!!!", "0o0", 0, b""),
    ]
    assert members[2].uid == 1 and members[2].gid == 2
    assert members[5].rdev == (1, 3)
    assert [m.ino for m in members] == list(range(721, 721 + len(members)))


def test_hosts_replacement_is_linuxkits_160_bytes() -> None:
    assert len(HOSTS) == 160
    assert hashlib.sha256(HOSTS).hexdigest() == (
        "43037ff87af87fda11c4377e963593a0f55e513702779db721c6ce574c06e88e"
    )


def test_empty_listing_synthesises_every_must_exist_entry() -> None:
    names = [m.name for m in read_cpio(_customer([]))]
    assert names[:10] == [
        b"rootfs",
        b"rootfs/dev",
        b"rootfs/dev/pts",
        b"rootfs/dev/shm",
        b"rootfs/etc",
        b"rootfs/etc/hosts",
        b"rootfs/etc/mtab",
        b"rootfs/etc/resolv.conf",
        b"rootfs/proc",
        b"rootfs/sys",
    ]


_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b != b"TRAILER!!!")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _names, st.sampled_from(list(FileType)), st.integers(0, 0o7777), st.binary(max_size=70)
        ),
        max_size=8,
    )
)
def test_any_entries_round_trip_through_an_independent_reader(
    items: list[tuple[bytes, FileType, int, bytes]],
) -> None:
    sink = _Sink()
    writer = CpioWriter(sink)
    for name, kind, perms, data in items:
        writer.add(CpioEntry(name, kind, perms, size=len(data)), data)
    length = writer.close()
    assert length == len(sink.data) and length % 512 == 0
    members = read_cpio(sink.data)
    assert [(m.name, m.mode, m.data) for m in members[:-1]] == [
        (name, (int(kind) << 12) | perms, data) for name, kind, perms, data in items
    ]


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

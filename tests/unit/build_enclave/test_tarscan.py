"""The strict tar scanner against Python's tarfile (the reader it replaced), and what it refuses."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.eif import build
from enclavekit.eif.layers import ContentReader, ContentRef, MergedTree
from enclavekit.eif.ramdisk import customer_ramdisk_chunks
from enclavekit.eif.tarscan import FileWindow, TarMember, TarScanner
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import F, layer

_FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def _scan(data: bytes) -> list[TarMember]:
    scanner = TarScanner(FileWindow(io.BytesIO(data)), 0, len(data), label="layer")
    return list(scanner.members())


def _tarfile_view(data: bytes) -> list[tuple]:
    """What the tarfile-based reader took from each member (names normalised as the tree does)."""
    out = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for m in archive:
            device = m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE)
            out.append(
                (
                    m.name.encode("utf-8", "surrogateescape").rstrip(b"/"),
                    m.type,
                    m.mode & 0o7777,
                    m.uid,
                    m.gid,
                    math.floor(m.mtime),
                    m.linkname.encode("utf-8", "surrogateescape")
                    if m.type in (tarfile.LNKTYPE, tarfile.SYMTYPE)
                    else b"",
                    (m.devmajor, m.devminor) if device else (0, 0),
                    (m.offset_data, m.size) if m.isreg() else None,
                )
            )
    return out


def _scan_view(data: bytes) -> list[tuple]:
    device_types = (b"3", b"4")
    return [
        (
            m.name.rstrip(b"/"),
            b"0" if m.type == b"\0" else m.type,
            m.mode & 0o7777,
            m.uid,
            m.gid,
            m.mtime,
            m.linkname if m.type in (b"1", b"2") else b"",
            (m.devmajor, m.devminor) if m.type in device_types else (0, 0),
            (m.data, m.size) if m.type in (b"0", b"\0", b"7") else None,
        )
        for m in _scan(data)
    ]


_segment = st.text(st.sampled_from("abcXYZ019-_.é"), min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..")
)
_name = st.lists(_segment, min_size=1, max_size=6).map("/".join)
_entry = st.builds(
    F,
    name=_name,
    data=st.binary(max_size=700),
    kind=st.sampled_from(["file", "dir", "symlink", "link", "char", "block", "fifo"]),
    mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2_000_000),
    gid=st.integers(0, 70_000),
    mtime=st.integers(0, 2**33 - 1),
    link=_name,
    dev=st.tuples(st.integers(0, 4095), st.integers(0, 255)),
)


def _archive(entries: list[F], fmt: str) -> bytes | None:
    try:
        return layer(*entries, fmt=_FORMATS[fmt])
    except ValueError:
        return None  # the format cannot hold these fields (ustar: long names, large ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_entry, max_size=8), st.sampled_from(sorted(_FORMATS)))
def test_scanner_reads_what_tarfile_reads(entries: list[F], fmt: str) -> None:
    data = _archive(entries, fmt)
    if data is None:
        return
    assert _scan_view(data) == _tarfile_view(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_entry, min_size=1, max_size=4),
    st.sampled_from(sorted(_FORMATS)),
    st.data(),
)
def test_damaged_archives_give_tarfiles_entries_or_are_refused(
    entries: list[F], fmt: str, draw: st.DataObject
) -> None:
    """Any byte changed, or the archive cut short: the scanner refuses or agrees with tarfile."""
    data = _archive(entries, fmt)
    if data is None:
        return
    raw = bytearray(data)
    if draw.draw(st.booleans()):
        raw = raw[: draw.draw(st.integers(0, len(raw)))]
    else:
        at = draw.draw(st.integers(0, len(raw) - 1))
        raw[at] = draw.draw(st.integers(0, 255))
    try:
        ours = _scan_view(bytes(raw))
    except MalformedInput:
        return
    try:
        theirs = _tarfile_view(bytes(raw))
    except (tarfile.TarError, EOFError):
        theirs = None  # tarfile refuses: so must the scanner
    assert ours == theirs
    for item in ours:  # and every content lies inside the archive
        if item[-1] is not None:
            assert item[-1][0] + item[-1][1] <= len(raw)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_only_raise_malformed_input(data: bytes) -> None:
    try:
        _scan(data)
    except MalformedInput:
        pass


def test_gnu_long_names_pax_records_and_ustar_prefixes_are_read() -> None:
    long = "d/" + "x" * 300
    split = "u/" + "r" * 90 + "/" + "s" * 60  # ustar stores it as prefix + name
    for fmt, name in (("pax", long), ("gnu", long), ("ustar", split)):
        data = layer(F(name, b"payload", uid=7, mtime=123), fmt=_FORMATS[fmt])
        (member,) = _scan(data)
        assert (member.name, member.uid, member.mtime) == (name.encode(), 7, 123)
        assert data[member.data : member.data + member.size] == b"payload"


def test_pax_mtime_fraction_and_large_ids() -> None:
    data = layer(F("f", b"x", uid=3_000_000, pax={"mtime": "1700000000.75", "gid": "5000000"}))
    (member,) = _scan(data)
    assert (member.uid, member.gid, member.mtime) == (3_000_000, 5_000_000, 1_700_000_000)


def test_signed_checksums_as_old_sun_tars_wrote_them_are_accepted() -> None:
    raw = bytearray(layer(F("\xe9", b"x"), fmt=tarfile.GNU_FORMAT))
    signed = 256 + sum(b - 256 if b >= 128 else b for b in raw[:148] + raw[156:512])
    raw[148:156] = b"%06o\0 " % signed
    assert [m.name for m in _scan(bytes(raw))] == ["\xe9".encode()]


# -- refused -------------------------------------------------------------------------------------------


def _pax_header(records: dict[str, str], kind: bytes = b"x") -> bytes:
    """A raw PAX header (``x`` or ``g``) as tarfile would write it."""
    body = b"".join(_record(k, v) for k, v in records.items())
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = kind, len(body)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return header + body + bytes(-len(body) % 512)


def _record(key: str, value: str) -> bytes:
    payload = f" {key}={value}\n".encode()
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length += 1
    return str(length).encode() + payload


def _member(name: str, data: bytes = b"") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def test_attack_global_pax_path_renames_every_later_member_is_refused() -> None:
    """tarfile applies a global ``path`` to every later member, Docker ignores it: refused."""
    data = _pax_header({"path": "etc/shadow"}, b"g") + _member("harmless", b"x") + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert [m.name for m in archive] == ["etc/shadow"]
    with pytest.raises(MalformedInput, match="global PAX header"):
        _scan(data)
    # other global records (git archive's comment) are ignored
    data = _pax_header({"comment": "abc"}, b"g") + _member("harmless", b"x") + bytes(1024)
    assert [m.name for m in _scan(data)] == [b"harmless"]


def test_attack_sparse_member_is_refused() -> None:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    data = info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(MalformedInput, match="sparse"):
        _scan(data)
    data = (
        _pax_header({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}) + _member("f") + bytes(1024)
    )
    with pytest.raises(MalformedInput, match="sparse"):
        _scan(data)


def test_attack_damaged_header_mid_archive_hides_the_rest_is_refused() -> None:
    """tarfile stops silently at a bad header after the first: the rest of the layer would vanish."""
    raw = bytearray(layer(F("a", b"1"), F("b", b"2"), F("c", b"3")))
    raw[1024 + 148 : 1024 + 156] = b"0000000\0"  # b's checksum
    with pytest.raises(MalformedInput, match="bad checksum"):
        _scan(bytes(raw))


def test_attack_data_after_the_end_of_archive_is_refused() -> None:
    data = layer(F("a", b"1")) + _member("hidden", b"x")
    with pytest.raises(MalformedInput, match="data follows"):
        _scan(data)


def test_attack_numbers_int_would_accept_are_refused() -> None:
    """``int`` reads "+0000644", "0o00644" and "00_0644"; tarfile takes them, the scanner does not."""
    for text in (b"+000644\0", b"0o00644\0", b"00_0644\0"):
        raw = bytearray(layer(F("a", b"1")))
        raw[100:108] = text
        raw[148:156] = b"%06o\0 " % (256 + sum(raw[:148]) + sum(raw[156:512]))
        with pytest.raises(MalformedInput, match="invalid number"):
            _scan(bytes(raw))


def test_attack_gnu_atime_in_the_prefix_area_is_not_glued_onto_the_name() -> None:
    raw = bytearray(layer(F("passwd", b"1"), fmt=tarfile.GNU_FORMAT))
    raw[345:357] = (
        b"14567777777\0"  # GNU atime, which tarfile would read as the prefix "14567777777"
    )
    raw[148:156] = b"%06o\0 " % (256 + sum(raw[:148]) + sum(raw[156:512]))
    with pytest.raises(MalformedInput, match="prefix"):
        _scan(bytes(raw))


def test_attack_extension_header_without_a_member_is_refused() -> None:
    data = _pax_header({"path": "x"}) + bytes(1024)
    with pytest.raises(MalformedInput, match="not followed by a member"):
        _scan(data)


@pytest.mark.parametrize(
    "body",
    [b"99 path=x\n", b"8 path=x", b"7 =xyz\n", b"x path=y\n", b"9 pathxy\n"],
)
def test_attack_pax_records_that_do_not_tile_the_header_are_refused(body: bytes) -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(body)
    data = (
        info.tobuf(tarfile.USTAR_FORMAT)
        + body
        + bytes(-len(body) % 512)
        + _member("f")
        + bytes(1024)
    )
    with pytest.raises(MalformedInput, match="PAX"):
        _scan(data)


def test_attack_pax_size_that_is_not_a_number_is_refused() -> None:
    """tarfile reads a bad PAX size as 0 (and the file's data as the next header)."""
    data = _pax_header({"size": "0x10"}) + _member("f", b"x" * 16) + bytes(1024)
    with pytest.raises(MalformedInput, match="decimal"):
        _scan(data)


def test_member_data_running_past_the_layer_is_refused() -> None:
    data = layer(F("a", b"x" * 5000))
    with pytest.raises(MalformedInput, match="runs past the end"):
        _scan(data[:2048])


def test_empty_layer_is_refused_and_zero_blocks_are_an_empty_layer() -> None:
    with pytest.raises(MalformedInput, match="empty"):
        _scan(b"")
    assert _scan(bytes(1024)) == []


def test_attack_layer_changed_after_indexing_cannot_smuggle_an_escaping_symlink(
    tmp_path: Path,
) -> None:
    """Headers are read again when the tree is listed: a symlink rewritten in between is re-checked."""
    blob = tmp_path / "layer.tar"
    blob.write_bytes(layer(F("a", kind="dir"), F("a/link", kind="symlink", link="bbbbbbbb")))
    tree = MergedTree()
    tree.add_layer(ContentRef(str(blob), 0, blob.stat().st_size), label="layer 0")
    blob.write_bytes(layer(F("a", kind="dir"), F("a/link", kind="symlink", link="../../..")))
    with pytest.raises(MalformedInput, match="symlink escape"):
        list(tree.export())


# -- the output the tarfile-based build wrote -------------------------------------------------------------


def _diverse_layers() -> list[bytes]:
    big = bytes(range(256)) * 6000  # > 1 MiB: read in chunks
    return [
        layer(
            F("bin", kind="dir"),
            F("bin/sh", b"#!sh\n", mode=0o4755),
            F("etc", kind="dir", mode=0o700),
            F("etc/passwd", b"root\n"),
            F("usr/lib/" + "x" * 150 + "/deep", b"long", uid=3000000),
            F("dev", kind="dir"),
            F("dev/null", kind="char", mode=0o666, dev=(1, 3)),
            F("dev/sda", kind="block", dev=(8, 0)),
            F("fifo", kind="fifo"),
            F("lib", kind="symlink", link="usr/lib"),
            F("z", b"shared", mode=0o640),
            F("a", kind="link", link="z"),
            F("big", big),
            F("empty", b""),
            F("opt", kind="dir"),
            F("opt/old", b"o"),
            F("opt/sub", kind="dir"),
            F("opt/sub/k", b"k"),
            F("etc/hosts", b"1.2.3.4 x\n"),
            F("etc/resolv.conf", b"nameserver 1.1.1.1\n"),
            F(".dockerenv", b""),
        ),
        layer(
            F("p/" + "q" * 120, b"gnu-long"),
            F("m", kind="link", link="z"),
            F("opt/.wh..wh..opq"),
            F("opt/new", b"n"),
            F(".wh.empty"),
            F("bin", kind="dir", mode=0o711, mtime=5),
            F("etc/passwd", b"root2\n", mtime=7),
            F("\xe9t\xe9", b"utf8"),
            F("dir-a", kind="dir"),
            F("dir-a/x", b"1"),
            F("dir-a-b", b"2"),
            fmt=tarfile.GNU_FORMAT,
        ),
        layer(
            F("u/" + "r" * 90 + "/" + "s" * 60, b"ustar-prefix"),
            F("dir-a", b"now a file"),
            fmt=tarfile.USTAR_FORMAT,
        ),
    ]


def test_customer_ramdisk_is_byte_identical_to_the_tarfile_builds(tmp_path: Path) -> None:
    """Whiteouts, opaque directories, hard links across layers, devices, GNU/PAX/ustar names, a large
    file: the ramdisk's SHA-384 as the tarfile-based build (before issue 18) wrote it."""
    blob = tmp_path / "layers"
    refs, offset = [], 0
    with open(blob, "wb") as out:
        for data in _diverse_layers():
            out.write(data)
            refs.append(ContentRef(str(blob), offset, len(data)))
            offset += len(data)
    tree = MergedTree()
    for i, ref in enumerate(refs):
        tree.add_layer(ref, label=f"l{i}")
    tree.begin_layer("init")
    for entry in build.docker_init_layer():
        tree.apply(entry)
    with ContentReader() as reader:
        chunks = customer_ramdisk_chunks(
            tree.export(reader), cmd=b"/bin/sh\n", env=b"A=1\n", read=reader.chunks
        )
        data = b"".join(chunks)
    assert len(data) == 1542656
    assert hashlib.sha384(data).hexdigest() == (
        "c885082d9c8b038fec475282936b09571da92fd1b8d8e0abb82838da1fff7f9a2add66149109d97343669b7dd4a0ad3a"
    )

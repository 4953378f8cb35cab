"""Writer and reader: nitro-cli layout, independent PCR/CRC checks, and damaged files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.eif.format import (
    HEADER_SIZE,
    HEADER_STRUCT,
    EifHeader,
    SectionType,
    crc32_combine,
)
from enclavekit.eif.reader import Eif, measure_eif
from enclavekit.eif.writer import EifWriter, write_eif, write_eif_file
from enclavekit.errors import EifError, EifIntegrityError, Error
from tests.unit.eif.helpers import (
    CMDLINE,
    SigningMaterial,
    SyntheticEif,
    independent_pcr,
    sample_metadata,
    section_bytes,
)

MakeEif = Callable[..., SyntheticEif]
EMPTY_PCR2 = independent_pcr(b"")


def independent_crc(raw: bytes) -> int:
    return zlib.crc32(raw[:544] + raw[548:])


def fix_crc(raw: bytearray) -> None:
    raw[544:548] = independent_crc(bytes(raw)).to_bytes(4, "big")


def walk(raw: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, type, flags, size) of every section, walking sequentially like nitro-cli."""
    out, pos = [], HEADER_SIZE
    while pos < len(raw):
        section_type, flags, size = struct.unpack(">HHQ", raw[pos : pos + 12])
        out.append((pos, section_type, flags, size))
        pos += 12 + size
    assert pos == len(raw)
    return out


# --- writing ---------------------------------------------------------------------------------------


def test_written_eif_has_nitro_cli_layout(make_eif: MakeEif) -> None:
    eif = make_eif()
    raw = eif.path.read_bytes()
    fields = HEADER_STRUCT.unpack(raw[:HEADER_SIZE])
    assert raw[:4] == b".eif"
    assert fields[1:7] == (4, 0, 1 << 30, 2, 0, 5)  # version, flags, mem, cpus, reserved, count
    sections = walk(raw)
    assert [s[1] for s in sections] == [1, 2, 5, 3, 3]  # kernel, cmdline, metadata, ramdisks
    assert all(s[2] == 0 for s in sections)
    offsets, sizes = fields[7:39], fields[39:71]
    assert list(offsets[:5]) == [s[0] for s in sections] and not any(offsets[5:])
    assert list(sizes[:5]) == [s[3] for s in sections] and not any(sizes[5:])
    assert sections[0][0] == 548 and sections[1][0] == 548 + 12 + len(eif.kernel)
    assert fields[-1] == independent_crc(raw)
    assert raw[sections[1][0] + 12 : sections[1][0] + 12 + sections[1][3]] == CMDLINE


def test_written_measurements_match_independent_pcrs(make_eif: MakeEif) -> None:
    eif = make_eif()
    with Eif.open(eif.path) as opened:
        report = opened.verify()
    assert report.crc_ok
    m = report.measurements
    assert (m.pcr0, m.pcr1, m.pcr2, m.pcr8) == (eif.pcr0, eif.pcr1, eif.pcr2, None)
    assert measure_eif(eif.path) == m


def test_three_ramdisks_feed_pcr2_in_order(make_eif: MakeEif) -> None:
    eif = make_eif(ramdisk_sizes=(100, 200, 300))
    m = measure_eif(eif.path)
    assert m.pcr2 == independent_pcr(eif.ramdisks[1] + eif.ramdisks[2])
    assert m.pcr0 == eif.pcr0


def test_single_ramdisk_gives_the_empty_pcr2(make_eif: MakeEif) -> None:
    eif = make_eif(ramdisk_sizes=(5000,))
    m = measure_eif(eif.path)
    assert m.pcr2 == EMPTY_PCR2
    assert m.pcr0 == m.pcr1 == eif.pcr1


def test_write_returns_the_measurements_the_reader_finds(tmp_path: Path) -> None:
    kernel = section_bytes("k", 3 << 20)  # several chunks
    ramdisk = section_bytes("r", (5 << 20) + 7)
    written = write_eif(
        tmp_path / "x.eif",
        kernel=kernel,
        cmdline="console=ttyS0",
        ramdisks=[b"boot", ramdisk],
        metadata=sample_metadata(),
    )
    assert written == measure_eif(tmp_path / "x.eif")
    assert written.pcr0 == independent_pcr(kernel + b"console=ttyS0" + b"boot" + ramdisk)
    assert written.pcr2 == independent_pcr(ramdisk)  # hashed on the writer's second thread


def _written_both_ways(last_ramdisk: Callable[[], Any]) -> list[tuple[bytes, Any]]:
    """The bytes and measurements of the same small EIF written by the parallel and the sequential writer;
    ``last_ramdisk()`` gives the data of its second ramdisk (called once per writer)."""
    outputs = []
    for parallel in (True, False):
        stream = io.BytesIO()
        writer = EifWriter(stream, parallel=parallel)
        writer.add_section(SectionType.KERNEL, b"k")
        writer.add_section(SectionType.CMDLINE, b"c")
        writer.add_section(SectionType.RAMDISK, b"r0")
        writer.add_section(SectionType.RAMDISK, last_ramdisk())
        writer.finish()
        outputs.append((stream.getvalue(), writer.measurer.result()))
    return outputs


def test_sequential_writer_writes_the_same_bytes() -> None:
    outputs = _written_both_ways(lambda: section_bytes("r1", (3 << 20) + 5))
    assert outputs[0] == outputs[1]


def test_pipelined_and_inline_chunks_keep_their_order() -> None:
    """Big chunks go through the hashing and writing threads, small ones are written inline: the file and
    PCR2 must still see them in order."""
    sizes = [1 << 20, 10, 200_000, 3, 3, (1 << 20) + 1, 70_000, 1]
    parts = [section_bytes(f"p{i}", n) for i, n in enumerate(sizes)]
    outputs = _written_both_ways(lambda: iter(parts))
    assert outputs[0] == outputs[1]
    assert outputs[0][1].pcr2 == independent_pcr(b"".join(parts))


def test_disk_full_on_the_writing_thread_is_raised_and_stops_the_workers() -> None:
    class FillsUp(io.BytesIO):
        def write(self, data: object) -> int:
            if self.tell() > (2 << 20):
                raise OSError(28, "No space left on device")
            return super().write(data)  # type: ignore[arg-type]

    writer = EifWriter(FillsUp())
    writer.add_section(SectionType.KERNEL, b"k")
    writer.add_section(SectionType.CMDLINE, b"c")
    writer.add_section(SectionType.RAMDISK, b"r0")
    with pytest.raises(OSError, match="No space left"):
        writer.add_section(SectionType.RAMDISK, section_bytes("r1", 8 << 20))
    writer.close()
    writer.close()  # idempotent


def test_sections_from_paths_streams_and_chunk_iterables(tmp_path: Path) -> None:
    kernel_path = tmp_path / "bzImage"
    kernel_path.write_bytes(section_bytes("k", 10_000))
    ramdisk = section_bytes("r", 20_000)

    def chunks() -> Iterator[bytes]:
        yield ramdisk[:3]
        yield ramdisk[3:]

    written = write_eif_file(
        tmp_path / "x.eif",
        kernel=kernel_path,
        cmdline=CMDLINE,
        ramdisks=[io.BytesIO(b"bootstrap"), chunks()],
        metadata=sample_metadata().to_bytes(),
    )
    expected = independent_pcr(kernel_path.read_bytes() + CMDLINE + b"bootstrap" + ramdisk)
    assert written.measurements.pcr0 == expected
    assert written.size == (tmp_path / "x.eif").stat().st_size


def test_aarch64_sets_header_flag_bit0(tmp_path: Path) -> None:
    written = write_eif_file(
        tmp_path / "arm.eif",
        kernel=b"Image",
        cmdline=CMDLINE,
        ramdisks=[b"r"],
        metadata=sample_metadata(),
        arch="aarch64",
    )
    assert written.header.flags == 1
    with Eif.open(written.path) as eif:
        assert eif.header.is_arm64


def test_version_3_eif_without_metadata_is_read(make_eif: MakeEif) -> None:
    eif = make_eif(version=3)
    with Eif.open(eif.path) as opened:
        report = opened.verify()
    assert opened.header.version == 3
    assert report.metadata is None and report.crc_ok
    assert report.measurements.pcr0 == eif.pcr0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ramdisks": []}, "ramdisk"),
        ({"metadata": None}, "metadata"),
        ({"version": 5}, "version"),
        ({"version": 3}, "metadata"),
        ({"cmdline": "a\0b"}, "NUL"),
        ({"arch": "riscv"}, "arch"),
    ],
)
def test_write_refuses_impossible_requests(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {
        "kernel": b"k",
        "cmdline": "c",
        "ramdisks": [b"r"],
        "metadata": sample_metadata(),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_eif(tmp_path / "x.eif", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "x.eif").exists()


def test_failed_write_leaves_no_partial_output(tmp_path: Path) -> None:
    """A source failing mid-stream must leave neither the target nor a temp file behind."""
    target = tmp_path / "out.eif"
    target.write_bytes(b"previous content")

    def failing() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        write_eif(target, kernel=b"k", cmdline="c", ramdisks=[failing()], metadata=b"{}")
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.eif"]


def test_source_failing_mid_pipeline_leaves_no_partial_output(tmp_path: Path) -> None:
    """Same, with chunks big enough to be in the worker threads' pipe when the source fails."""
    target = tmp_path / "out.eif"

    def failing() -> Iterator[bytes]:
        for i in range(5):
            yield section_bytes(f"c{i}", 1 << 20)
        raise OSError("layer vanished")

    with pytest.raises(OSError, match="layer vanished"):
        write_eif(target, kernel=b"k", cmdline="c", ramdisks=[b"b", failing()], metadata=b"{}")
    assert list(tmp_path.iterdir()) == []


def test_low_level_writer_header_and_crc_on_any_stream() -> None:
    stream = io.BytesIO()
    stream.write(b"prefix")
    writer = EifWriter(stream, version=4)
    writer.add_section(SectionType.KERNEL, b"kernel")
    writer.add_section(SectionType.CMDLINE, b"cmd")
    writer.add_section(SectionType.RAMDISK, [b"ram", b"disk"])
    header = writer.finish()
    raw = stream.getvalue()[len(b"prefix") :]
    assert EifHeader.unpack(raw[:HEADER_SIZE]) == header
    assert header.crc32 == independent_crc(raw)
    assert header.section_offsets[:3] == (548, 548 + 18, 548 + 18 + 15)


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


# --- reading damaged files -------------------------------------------------------------------------


def _damaged(eif: SyntheticEif, mutate: Callable[[bytearray], None], crc: bool = True) -> Path:
    raw = bytearray(eif.path.read_bytes())
    mutate(raw)
    if crc:
        fix_crc(raw)
    eif.path.write_bytes(bytes(raw))
    return eif.path


def test_bad_crc_is_reported_and_fails_measure(make_eif: MakeEif) -> None:
    """A single flipped data bit is caught by the CRC."""
    eif = make_eif()
    last = walk(eif.path.read_bytes())[-1]

    def flip(raw: bytearray) -> None:
        raw[last[0] + 12 + 5] ^= 0x01

    path = _damaged(eif, flip, crc=False)
    with Eif.open(path) as opened:
        report = opened.verify()
    assert not report.crc_ok
    assert "CRC mismatch" in report.problems()[0]
    with pytest.raises(EifIntegrityError, match="CRC") as info:
        measure_eif(path)
    assert info.value.exit_code == 1


def test_crc_covers_the_unused_header_field(make_eif: MakeEif) -> None:
    eif = make_eif()

    def poke(raw: bytearray) -> None:
        raw[0x21C] = 1

    path = _damaged(eif, poke, crc=False)
    with Eif.open(path) as opened:
        assert not opened.verify().crc_ok


def test_parallel_and_sequential_passes_agree(make_eif: MakeEif) -> None:
    eif = make_eif(ramdisk_sizes=(3 << 20, (5 << 20) + 3))
    with Eif.open(eif.path) as opened:
        assert opened.verify(parallel=True) == opened.verify(parallel=False)
        assert opened.verify().measurements.pcr2 == eif.pcr2


def test_truncated_file_is_an_integrity_error(make_eif: MakeEif) -> None:
    """A file cut short inside a section is refused with exit code 1."""
    eif = make_eif()
    raw = eif.path.read_bytes()
    for cut in (len(raw) - 1, len(raw) - 100, 548 + 5, 600):
        eif.path.write_bytes(raw[:cut])
        with pytest.raises(EifIntegrityError, match="truncated|ends") as info:
            Eif.open(eif.path)
        assert info.value.exit_code == 1


def test_file_shorter_than_a_header_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "short.eif"
    path.write_bytes(b".eif" + bytes(100))
    with pytest.raises(EifError, match="548") as info:
        Eif.open(path)
    assert info.value.exit_code == 2


def test_wrong_magic_is_unreadable(make_eif: MakeEif) -> None:
    path = _damaged(make_eif(), lambda raw: raw.__setitem__(slice(0, 4), b"ELF\x7f"))
    with pytest.raises(EifError, match="magic") as info:
        Eif.open(path)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("version", [0, 1, 5, 0xFFFF])
def test_unsupported_versions_are_unreadable(make_eif: MakeEif, version: int) -> None:
    path = _damaged(
        make_eif(), lambda raw: raw.__setitem__(slice(4, 6), version.to_bytes(2, "big"))
    )
    with pytest.raises(EifError, match="version") as info:
        Eif.open(path)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("section_type", [0, 6, 0xFFFF])
def test_unknown_section_type_is_refused(make_eif: MakeEif, section_type: int) -> None:
    path = _damaged(
        make_eif(), lambda raw: raw.__setitem__(slice(548, 550), section_type.to_bytes(2, "big"))
    )
    with pytest.raises(EifError, match="section type|invalid EIF section"):
        Eif.open(path)


def test_size_table_disagreeing_with_section_header_is_refused(make_eif: MakeEif) -> None:
    """A header size table that lies about a section (QEMU reads by the table) is refused."""

    def lie(raw: bytearray) -> None:
        base = 0x11C + 8 * 3  # section_sizes[3]
        size = int.from_bytes(raw[base : base + 8], "big")
        raw[base : base + 8] = (size - 1).to_bytes(8, "big")

    with pytest.raises(EifIntegrityError, match="size table"):
        Eif.open(_damaged(make_eif(), lie))


def test_offset_table_off_by_one_is_refused(make_eif: MakeEif) -> None:
    """An offset table pointing one byte off (readers disagree on the layout) is refused."""

    def shift(raw: bytearray) -> None:
        base = 0x1C + 8 * 2
        offset = int.from_bytes(raw[base : base + 8], "big")
        raw[base : base + 8] = (offset + 1).to_bytes(8, "big")

    with pytest.raises(EifIntegrityError, match="offset table"):
        Eif.open(_damaged(make_eif(), shift))


def test_trailing_garbage_is_refused(make_eif: MakeEif) -> None:
    """Bytes after the last section (smuggled data outside the CRC) are refused."""
    for junk in (b"x" * 5, b"y" * 40):
        eif = make_eif(f"junk{len(junk)}.eif")
        path = _damaged(eif, lambda raw, j=junk: raw.extend(j))
        with pytest.raises(EifIntegrityError, match="after the"):
            Eif.open(path)


def test_section_flags_must_be_zero(make_eif: MakeEif) -> None:
    path = _damaged(make_eif(), lambda raw: raw.__setitem__(slice(550, 552), b"\x00\x01"))
    with pytest.raises(EifIntegrityError, match="flags"):
        Eif.open(path)


@pytest.mark.parametrize("count", [0, 4, 6, 33])
def test_section_count_disagreeing_with_the_file_is_refused(make_eif: MakeEif, count: int) -> None:
    path = _damaged(
        make_eif(), lambda raw: raw.__setitem__(slice(0x1A, 0x1C), count.to_bytes(2, "big"))
    )
    with pytest.raises(EifIntegrityError, match="section"):
        Eif.open(path)


def _raw_eif(path: Path, sections: list[tuple[int, bytes]], version: int = 4) -> Path:
    with open(path, "wb") as stream:
        writer = EifWriter(stream, version=version)
        for section_type, data in sections:
            writer.add_section(section_type, data)
        writer.finish()
    return path


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ([(2, b"c"), (3, b"r")], "one kernel"),
        ([(1, b"k"), (1, b"k"), (2, b"c"), (3, b"r")], "one kernel"),
        ([(1, b"k"), (2, b"c")], "ramdisk"),
        ([(1, b"k"), (2, b"c"), (3, b"r"), (5, b"{}"), (5, b"{}")], "metadata"),
        ([(1, b"k"), (2, b"c"), (3, b"r"), (4, b"\x80"), (4, b"\x80")], "signature sections"),
        ([(1, b"k"), (2, b"c"), (3, b"r"), (4, b"\x81" + bytes(40_000))], "32768"),
    ],
)
def test_impossible_section_sets_are_refused(
    tmp_path: Path, sections: list[tuple[int, bytes]], match: str
) -> None:
    with pytest.raises(EifIntegrityError, match=match):
        Eif.open(_raw_eif(tmp_path / "x.eif", sections))


def test_signature_in_a_version_2_eif_is_refused(tmp_path: Path) -> None:
    path = _raw_eif(tmp_path / "x.eif", [(1, b"k"), (2, b"c"), (3, b"r"), (4, b"\x80")], 2)
    with pytest.raises(EifIntegrityError, match="version 2"):
        Eif.open(path)


def test_kernel_after_the_first_ramdisk_still_feeds_pcr1(tmp_path: Path) -> None:
    """Like nitro-cli's reader, kernel/cmdline are measured wherever they appear."""
    path = _raw_eif(tmp_path / "x.eif", [(2, b"cmd"), (3, b"r0"), (1, b"kern"), (3, b"r1")], 3)
    m = measure_eif(path)
    assert m.pcr0 == independent_pcr(b"cmdr0kernr1")
    assert m.pcr1 == independent_pcr(b"cmdr0kern")
    assert m.pcr2 == independent_pcr(b"r1")


def test_malformed_metadata_is_an_eif_error(tmp_path: Path) -> None:
    path = _raw_eif(tmp_path / "x.eif", [(1, b"k"), (2, b"c"), (5, b'{"ImageName": 1}'), (3, b"r")])
    with Eif.open(path) as eif, pytest.raises(EifError, match="metadata"):
        eif.verify()


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(EifError, match="cannot open") as info:
        Eif.open(tmp_path / "nope.eif")
    assert info.value.exit_code == 2


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=1200), st.integers(0, 255)), max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=1300)),
    recrc=st.booleans(),
)
def test_mutated_eifs_never_raise_anything_but_enclavekit_errors(
    tmp_path: Path,
    signing_p256: SigningMaterial,
    edits: list[tuple[int, int]],
    cut: int | None,
    recrc: bool,
) -> None:
    """Random byte edits and truncations give a report or an enclavekit Error, never a crash."""
    base = tmp_path / "base.eif"
    if not base.exists():
        write_eif(
            base,
            kernel=b"k" * 100,
            cmdline=CMDLINE,
            ramdisks=[b"r" * 50, b"s" * 60],
            metadata=sample_metadata(),
            signer=signing_p256.signer,
        )
    raw = bytearray(base.read_bytes())
    for position, value in edits:
        if position < len(raw):
            raw[position] = value
    if cut is not None:
        del raw[cut:]
    if recrc and len(raw) >= HEADER_SIZE:
        fix_crc(raw)
    target = tmp_path / "mutated.eif"
    target.write_bytes(bytes(raw))
    try:
        with Eif.open(target) as eif:
            eif.verify()
    except Error:
        pass


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_enclavekit_errors(
    tmp_path: Path, data: bytes
) -> None:
    """Arbitrary input, with or without the magic, only raises enclavekit errors."""
    target = tmp_path / "random.eif"
    for candidate in (data, b".eif\x00\x04" + data):
        target.write_bytes(candidate)
        try:
            with Eif.open(target) as eif:
                eif.verify()
        except Error:
            pass


def test_progress_reports_increasing_offsets_up_to_the_file_size(make_eif: MakeEif) -> None:
    eif = make_eif(ramdisk_sizes=(100, (5 << 20) + 1))
    seen: list[int] = []
    with Eif.open(eif.path) as opened:
        opened.verify(progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == eif.path.stat().st_size


@pytest.mark.parametrize("parallel", [True, False])
def test_file_shrinking_during_the_pass_is_an_integrity_error(
    make_eif: MakeEif, parallel: bool
) -> None:
    """A file truncated after open (a racing writer) fails cleanly, without hanging threads."""
    eif = make_eif(ramdisk_sizes=(100, 3 << 20))
    with Eif.open(eif.path) as opened:
        with open(eif.path, "r+b") as handle:
            handle.truncate(eif.path.stat().st_size - (1 << 20))
        with pytest.raises(EifIntegrityError, match="ends early|file ends"):
            opened.verify(parallel=parallel)


def test_worker_failure_is_raised_not_swallowed() -> None:
    from enclavekit.eif._pass import _ThreadedSink

    class Broken:
        def update(self, data: object) -> None:
            raise RuntimeError("hash failed")

    sink = _ThreadedSink()
    buffer = sink.buffer()
    sink.chunk(memoryview(buffer)[:10], buffer, Broken())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="hash failed"):
        sink.finish()

"""Checking and unpacking an EIF into an enclave directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclavekit.eif.reader import measure_eif
from enclavekit.errors import EifError, EifIntegrityError, MalformedInput
from enclavekit.run.launch import DEFAULT_ARGV, DEFAULT_ENV, prepare
from tests.unit.run.conftest import d, f, make_eif, newc


def test_prepare_unpacks_rootfs_and_reads_cmd_and_env(tmp_path: Path) -> None:
    eif = make_eif(
        tmp_path / "app.eif",
        cmd=["/bin/app", "--flag", "two words"],
        env=["PATH=/bin", "HELLO=Hello from the enclave side!"],
        files=[d("rootfs/bin"), f("rootfs/bin/app", b"#!/bin/sh\n", 0o755)],
    )
    prepared = prepare(eif, tmp_path / "enclave")
    assert prepared.argv == ("/bin/app", "--flag", "two words")
    assert prepared.env == ("PATH=/bin", "HELLO=Hello from the enclave side!")
    assert (prepared.rootfs / "bin" / "app").read_bytes() == b"#!/bin/sh\n"
    assert (prepared.initramfs / "init").exists()  # the bootstrap ramdisk is unpacked too
    assert prepared.measurements == measure_eif(eif)
    assert prepared.described_metadata["ImageName"] == "test-app"


def test_empty_cmd_falls_back_to_init_defaults(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "app.eif", cmd=[], env=["X=1"])
    prepared = prepare(eif, tmp_path / "enclave")
    assert (prepared.argv, prepared.env) == (DEFAULT_ARGV, DEFAULT_ENV)


def test_damaged_eif_is_refused_before_unpacking(tmp_path: Path) -> None:
    """A flipped byte in a ramdisk breaks the CRC; the runner must not run altered code."""
    eif = make_eif(tmp_path / "app.eif", cmd=["/bin/true"])
    raw = bytearray(eif.read_bytes())
    raw[-600] ^= 0x01
    eif.write_bytes(bytes(raw))
    with pytest.raises(EifIntegrityError, match="CRC"):
        prepare(eif, tmp_path / "enclave")
    assert not (tmp_path / "enclave" / "initramfs" / "rootfs").exists()


def test_not_an_eif_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.eif"
    path.write_bytes(b"not an eif" * 100)
    with pytest.raises(EifError):
        prepare(path, tmp_path / "enclave")


def test_ramdisks_without_rootfs_are_refused(tmp_path: Path) -> None:
    from enclavekit.eif.metadata import BuildInfo, IdentityInfo
    from enclavekit.eif.writer import write_eif

    path = tmp_path / "bare.eif"
    write_eif(
        path,
        kernel=b"k",
        cmdline="c",
        ramdisks=[newc([f("cmd", b"/bin/true\n")])],
        metadata=IdentityInfo("x", "1", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )
    with pytest.raises(MalformedInput, match="rootfs"):
        prepare(path, tmp_path / "enclave")


def test_path_traversal_in_eif_ramdisk_is_refused(tmp_path: Path) -> None:
    """A ramdisk entry named ../x inside a well-formed EIF must not escape the enclave dir."""
    eif = make_eif(tmp_path / "app.eif", cmd=["/bin/true"], files=[f("../../escaped", b"x")])
    with pytest.raises(MalformedInput, match="path traversal"):
        prepare(eif, tmp_path / "a" / "enclave")
    assert not (tmp_path / "escaped").exists()


def _corrupt_last_file(eif: Path, content: bytes) -> None:
    """Flip one byte of ``content``, the data of the last file of the last ramdisk: the cpio
    still parses, only the CRC over the whole file (known at its very end) tells."""
    raw = bytearray(eif.read_bytes())
    at = raw.rindex(content)
    raw[at] ^= 0x01
    eif.write_bytes(bytes(raw))


def test_attack_damaged_eif_with_crc_mismatch_at_the_end_leaves_nothing_unpacked(
    tmp_path: Path,
) -> None:
    """The ramdisks are unpacked while the EIF is read; a mismatch found only at its end must
    leave no unpacked file behind (neither the enclave's initramfs nor the staging directory)."""
    eif = make_eif(
        tmp_path / "app.eif",
        cmd=["/bin/true"],
        env=["LAST=the-very-last-bytes"],
        files=[d("rootfs/bin"), f("rootfs/bin/app", b"#!/bin/sh\n", 0o755)],
    )
    _corrupt_last_file(eif, b"LAST=the-very-last-bytes")
    directory = tmp_path / "enclave"
    directory.mkdir()
    with pytest.raises(EifIntegrityError, match="CRC mismatch"):
        prepare(eif, directory)
    assert list(directory.iterdir()) == []


def test_ramdisk_damage_that_breaks_its_cpio_is_reported_as_damage(tmp_path: Path) -> None:
    """A flipped byte in a cpio header breaks the archive too; the CRC names the real cause."""
    eif = make_eif(tmp_path / "app.eif", cmd=["/bin/true"])
    raw = bytearray(eif.read_bytes())
    at = raw.rindex(b"070701")
    raw[at] = ord("9")
    eif.write_bytes(bytes(raw))
    directory = tmp_path / "enclave"
    directory.mkdir()
    with pytest.raises(EifIntegrityError, match="CRC mismatch"):
        prepare(eif, directory)
    assert list(directory.iterdir()) == []


def test_attack_eif_rewritten_after_its_check_runs_unmeasured_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the EIF file rewrites it once the runner has read it all (its CRC and PCRs
    computed). If the runner read the ramdisks a second time to unpack them, it would run the new
    code while the enclave's NSM attests the PCRs of the old: what is unpacked must be the very
    bytes that were measured."""
    import io

    import enclavekit.eif.reader as reader

    genuine, evil = b"echo genuine application", b"echo attacker-controlled"
    eif = make_eif(
        tmp_path / "app.eif",
        cmd=["/bin/app"],
        files=[d("rootfs/bin"), f("rootfs/bin/app", genuine, 0o755)],
    )
    measured = measure_eif(eif)
    at = eif.read_bytes().index(genuine)
    size = eif.stat().st_size

    class RewrittenAfterOneFullRead(io.FileIO):
        swapped = False

        def _after_read(self) -> None:
            if not self.swapped and self.tell() >= size:
                RewrittenAfterOneFullRead.swapped = True
                with open(eif, "r+b") as attacker:
                    attacker.seek(at)
                    attacker.write(evil)

        def read(self, n: int = -1, /) -> bytes:
            out = super().read(n)
            self._after_read()
            return out

        def readinto(self, buffer: object, /) -> int:
            n = super().readinto(buffer)  # type: ignore[arg-type]
            self._after_read()
            return n

    def opener(path: object, mode: str = "r", buffering: int = -1) -> io.FileIO:
        assert mode == "rb" and buffering == 0
        return RewrittenAfterOneFullRead(path, "rb")  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "open", opener, raising=False)
    prepared = prepare(eif, tmp_path / "enclave")
    assert RewrittenAfterOneFullRead.swapped  # the attack did happen
    assert prepared.measurements == measured
    assert (prepared.rootfs / "bin" / "app").read_bytes() == genuine


# VmHWM (this process image's peak RSS), not ru_maxrss: a child spawned with vfork inherits the
# parent's (pytest's) peak in ru_maxrss across exec.
_MEASURE_PREPARE = """
import sys
from pathlib import Path
from enclavekit.run.launch import prepare
prepare(Path(sys.argv[1]), Path(sys.argv[2]))
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def test_attack_huge_ramdisk_file_exhausts_the_runners_memory(tmp_path: Path) -> None:
    """A 200 MiB file in the ramdisk (EIFs of a GiB are common) must be unpacked in bounded memory:
    peak RSS below 100 MiB whatever the EIF size (a resource bound, not a timing test)."""
    import subprocess
    import sys

    from enclavekit.eif.metadata import BuildInfo, IdentityInfo
    from enclavekit.eif.writer import write_eif
    from tests.unit.run.conftest import newc_chunks

    big = 200 * 1024 * 1024
    eif = tmp_path / "big.eif"
    write_eif(
        eif,
        kernel=b"synthetic kernel",
        cmdline="console=ttyS0",
        ramdisks=[
            newc([d("dev"), f("init", b"#!stand-in init\n", 0o755)]),
            newc_chunks([d("rootfs"), ("rootfs/big.bin", 0o100644, big), f("cmd", b"/bin/true\n")]),
        ],
        metadata=IdentityInfo("big", "1.0", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE_PREPARE, str(eif), str(tmp_path / "enclave")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak_kib = int(out.stdout.split()[-1])
    unpacked = tmp_path / "enclave" / "initramfs" / "rootfs" / "big.bin"
    assert unpacked.stat().st_size == big
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB for a {big >> 20} MiB ramdisk file"

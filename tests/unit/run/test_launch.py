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

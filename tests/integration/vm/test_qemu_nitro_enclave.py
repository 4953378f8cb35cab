"""QEMU's nitro-enclave machine as an independent implementation of EIF loading, PCRs and the NSM.

One boot of a signed EIF built by enclavekit (Debian guest kernel, nitro's init, an enclavekit program using
the real /dev/nsm) checks: QEMU's PCR0/1/2/8 equal describe-eif's, PCR3/PCR4 equal `enclavekit pcr`, PCR16
extends and locks, an attestation comes back (and `enclavekit verify` refuses it: QEMU does not sign).
Damaged EIFs are refused by QEMU exactly where describe-eif reports damage. Needs scripts/qemu-nitro/setup.sh.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from enclavekit.cli import cli
from enclavekit.eif.describe import describe_eif
from enclavekit.errors import EifError
from enclavekit.vm.runner import EnclaveBootError, run_enclave_vm

from .conftest import INSTANCE, ROLE

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

HEADER_CRC_OFFSET = 544
SECTION_OFFSETS = 0x1C


def _cli_json(*args: str) -> Any:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_qemu_pcrs_0_1_2_8_equal_describe_eif(booted: dict[str, Any], signed_eif: Path) -> None:
    described = describe_eif(signed_eif)["Measurements"]
    pcrs = booted["result"]["pcrs"]
    for index in (0, 1, 2, 8):
        assert pcrs[str(index)] == described[f"PCR{index}"], f"PCR{index}"


def test_qemu_pcrs_3_and_4_equal_enclavekit_pcr(booted: dict[str, Any]) -> None:
    pcrs = booted["result"]["pcrs"]
    assert pcrs["3"] == _cli_json("pcr", "--iam-role", ROLE)["PCR"]
    assert pcrs["4"] == _cli_json("pcr", "--instance-id", INSTANCE)["PCR"]


def test_pcr16_extends_then_locks_on_the_real_device(booted: dict[str, Any]) -> None:
    from enclavekit.eif.measure import extend

    result = booted["result"]
    assert result["locked"] == list(range(16))
    assert result["extend16"] == extend(bytes(48), b"enclavekit").hex()
    assert result["pcr16_locked"] is True
    assert result["extend_after_lock"] == "ReadOnlyIndex"
    assert result["random_len"] == 32


def test_describe_enclaves_shows_the_running_vm(booted: dict[str, Any], signed_eif: Path) -> None:
    (entry,) = booted["described"]
    assert entry["EnclaveID"].startswith(INSTANCE + "-enc")
    assert entry["Flags"] == "DEBUG_MODE"
    assert entry["MemoryMiB"] == 512
    assert entry["Measurements"] == describe_eif(signed_eif)["Measurements"]
    assert booted["result"]["module_id"] == entry["EnclaveID"]


def test_qemu_attestation_is_refused_by_verify(booted: dict[str, Any], tmp_path: Path) -> None:
    """QEMU's documents carry no signature chain: verify must refuse them, saying why."""
    doc = tmp_path / "qemu-attestation.hex"
    doc.write_text(booted["result"]["attestation"])
    result = CliRunner().invoke(cli, ["verify", str(doc), "--json"])
    assert result.exit_code in (1, 2), result.output
    reason = result.output.lower()
    assert "unsigned" in reason, result.output


# -- damaged EIFs: QEMU refuses exactly what describe-eif reports as damaged -----------------------------


def _recrc(data: bytearray) -> None:
    crc = zlib.crc32(bytes(data[:HEADER_CRC_OFFSET]) + bytes(data[HEADER_CRC_OFFSET + 4 :]))
    struct.pack_into(">I", data, HEADER_CRC_OFFSET, crc)


def _bad_crc(data: bytearray) -> None:
    data[-100] ^= 0xFF


def _section_flags(data: bytearray) -> None:
    (offset,) = struct.unpack_from(">Q", data, SECTION_OFFSETS + 8 * 1)  # cmdline section header
    struct.pack_into(">H", data, offset + 2, 1)
    _recrc(data)


def _offset_table(data: bytearray) -> None:
    (offset,) = struct.unpack_from(">Q", data, SECTION_OFFSETS + 8 * 2)
    struct.pack_into(">Q", data, SECTION_OFFSETS + 8 * 2, offset + 1)
    _recrc(data)


def _reports_damage(path: Path) -> bool:
    try:
        info = describe_eif(path)
    except EifError:
        return True
    return not info["CheckCRC"] or info.get("SignatureCheck") is False


@pytest.mark.parametrize(
    "damage", [_bad_crc, _section_flags, _offset_table], ids=lambda f: f.__name__
)
def test_qemu_refuses_what_describe_eif_reports_damaged(
    damage: Any, signed_eif: Path, vm_qemu: Path, tmp_path: Path
) -> None:
    """A damaged EIF (CRC, section flags, offset table) is refused by QEMU and flagged by describe-eif."""
    data = bytearray(signed_eif.read_bytes())
    damage(data)
    broken = tmp_path / "broken.eif"
    broken.write_bytes(bytes(data))
    assert _reports_damage(broken)
    with pytest.raises(EnclaveBootError, match="QEMU exited"):
        run_enclave_vm(
            broken,
            memory_mib=512,
            cpu_count=1,
            qemu=vm_qemu,
            precheck=False,
            records=tmp_path / "records",
            boot_timeout=120,
        )


def test_undamaged_copy_is_not_reported(signed_eif: Path) -> None:
    assert not _reports_damage(signed_eif)

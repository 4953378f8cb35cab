"""The client API against the in-process emulator: the NSM state machine of nsm.md §4."""

from __future__ import annotations

import hashlib

import pytest

from enclavekit._cbor import loads
from enclavekit.errors import NsmError
from enclavekit.nsm import Nsm, NsmEmulator

ZERO = bytes(48)
ABC_KNOWN_ANSWER = bytes.fromhex(
    "b1c16eb7634112b7c9d5ebd27e62a2d4528bbfcfd68b62d3afd9ecf98e0f413a"
    "84314acce78317fb69fd895155343e09"
)


def test_describe_nsm_reports_32_pcrs_with_0_to_15_locked(nsm: Nsm, emulator: NsmEmulator) -> None:
    description = nsm.describe_nsm()
    assert description.max_pcrs == 32
    assert description.locked_pcrs == tuple(range(16))
    assert description.digest == "SHA384"
    assert description.module_id == emulator.module_id
    assert (description.version_major, description.version_minor) == (1, 0)


def test_boot_pcrs_locked_and_application_pcrs_zero(nsm: Nsm) -> None:
    locked, value = nsm.describe_pcr(0)
    assert locked is True
    assert value == b"\x00" * 47 + b"\x01"
    for index in range(16, 32):
        assert tuple(nsm.describe_pcr(index)) == (False, ZERO)


def test_pcr4_is_the_instance_id_measurement(nsm: Nsm, emulator: NsmEmulator) -> None:
    expected = hashlib.sha384(ZERO + emulator.instance_id.encode()).digest()
    assert nsm.describe_pcr(4).data == expected


def test_extend_pcr16_with_abc_gives_the_known_answer(nsm: Nsm) -> None:
    assert nsm.extend_pcr(16, b"abc") == ABC_KNOWN_ANSWER
    assert nsm.describe_pcr(16).data == ABC_KNOWN_ANSWER


@pytest.mark.parametrize("index", [32, 100, 65535])
def test_out_of_range_index_is_invalid_index(nsm: Nsm, index: int) -> None:
    for call in (nsm.describe_pcr, nsm.lock_pcr, lambda i: nsm.extend_pcr(i, b"x")):
        with pytest.raises(NsmError) as excinfo:
            call(index)
        assert excinfo.value.code == "InvalidIndex"


@pytest.mark.parametrize("index", [0, 3, 15])
def test_boot_pcrs_are_read_only(nsm: Nsm, index: int) -> None:
    with pytest.raises(NsmError) as excinfo:
        nsm.extend_pcr(index, b"x")
    assert excinfo.value.code == "ReadOnlyIndex"
    with pytest.raises(NsmError) as excinfo:
        nsm.lock_pcr(index)
    assert excinfo.value.code == "ReadOnlyIndex"


def test_lock_pcr_then_extend_is_read_only(nsm: Nsm) -> None:
    nsm.extend_pcr(17, b"x")
    nsm.lock_pcr(17)
    assert nsm.describe_pcr(17).lock is True
    with pytest.raises(NsmError, match="ReadOnlyIndex"):
        nsm.extend_pcr(17, b"y")
    with pytest.raises(NsmError, match="ReadOnlyIndex"):
        nsm.lock_pcr(17)


def test_lock_pcrs_after_single_locks_succeeds_like_nsm_check(nsm: Nsm) -> None:
    for index in range(16, 32):
        nsm.lock_pcr(index)
    nsm.lock_pcrs(32)
    assert nsm.describe_nsm().locked_pcrs == tuple(range(32))


def test_lock_pcrs_beyond_32_is_invalid_index(nsm: Nsm) -> None:
    with pytest.raises(NsmError, match="InvalidIndex"):
        nsm.lock_pcrs(33)


def test_get_random_returns_256_fresh_bytes(nsm: Nsm) -> None:
    first, second = nsm.get_random(), nsm.get_random()
    assert len(first) == 256
    assert first != second
    assert len(nsm.get_random(1000)) == 1000


def test_attestation_covers_exactly_the_locked_pcrs(nsm: Nsm) -> None:
    nsm.extend_pcr(16, b"abc")
    nsm.lock_pcr(16)
    nsm.extend_pcr(20, b"unlocked")
    payload = loads(loads(nsm.attestation())[2])
    assert sorted(payload["pcrs"]) == [*range(16), 16]
    assert payload["pcrs"][16] == ABC_KNOWN_ANSWER


def test_attestation_keeps_null_and_empty_distinct(nsm: Nsm) -> None:
    payload = loads(loads(nsm.attestation(user_data=b"", nonce=b"\x01\x02"))[2])
    assert payload["user_data"] == b""
    assert payload["nonce"] == b"\x01\x02"
    assert payload["public_key"] is None


def test_attestation_accepts_1024_bytes_in_all_three_fields(nsm: Nsm) -> None:
    """AWS's on-hardware test asks for this and expects success."""
    blob = bytes(range(256)) * 4
    payload = loads(loads(nsm.attestation(blob, blob, blob))[2])
    assert payload["user_data"] == payload["nonce"] == payload["public_key"] == blob


def test_oversized_attestation_request_is_input_too_large(nsm: Nsm) -> None:
    with pytest.raises(NsmError) as excinfo:
        nsm.attestation(user_data=bytes(4096))
    assert excinfo.value.code == "InputTooLarge"

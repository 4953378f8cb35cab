"""PCR known answers (spec eif.md §2, §7.3) and the Measurements model."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from cryptography import x509

from enclavekit.eif.measure import (
    HASH_ALGORITHM_SHA384,
    ZERO_PCR,
    Measurements,
    PcrHasher,
    extend,
    pcr3_of_iam_role,
    pcr4_of_instance_id,
    pcr8_of_certificate,
    pcr_of_bytes,
    pcr_of_file,
    pcr_of_stream,
)
from enclavekit.errors import MalformedInput
from tests.unit.eif.helpers import independent_pcr

BITKEY_PCR8 = (
    "180ed42dffb8e71132b21c3180388e412973099f267e831d9c3dd71ad9ffd5f4"
    "05515d1029dc4cd92364b082a8ed65e1"
)
EMPTY_PCR2 = (
    "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c"
    "10edb30948c90ba67310f7b964fc500a"
)

# (module_id of a genuine AWS attestation document in shared/vectors/real, first 24 hex digits of its PCR4)
REAL_DOCUMENT_PCR4 = [
    ("i-020b6af9246d90e92-enc0183d09086c24190", "1f442c86d494a88185642086"),
    ("i-03ad7cdb817437eeb-enc0183cc7569b3f6e1", "615fa5b1a8838d392d8e54aa"),
    ("i-025cfe04ec207e1bf-enc01847fb5d285b74b", "df57df83935a297bcdf8f00b"),
    ("i-0ec0e572c8263d8ff-enc0185c4fd382eeb25", "bb22382784496191b9dbc35f"),
    ("i-06e1ffc9a8410edb1-enc0185c56e099c2d54", "4b582ff5abceeabfac181509"),
    ("i-0918f6c55e3b61d89-enc018aa8b8e2285d13", "d0531b1400dd43288c82c226"),
    ("i-0fd25f30661854f2b-enc01790c5d9eab829d", "abf3ca5026b60f4d641ec378"),
    ("i-084e1dd2f1b2c529b-enc0190fecc5b166251", "4b41d8e9ba3411505c160476"),
    ("i-0f1cd77d37fd8bcc9-enc018e7aa61e2040ff", "45ff8769d16a46d16fcf4b87"),
    ("i-0809070ca8037095f-enc01910a5cff6ce304", "7c0a65e1456f71483c68fcd3"),
    ("i-0bbf1bfe232b8c2ce-enc0191ba35c9d1b77a", "d352cfa31b8dc5f4856c9fa8"),
    ("i-0de38b2b6853cc9e8-enc0193685e7fee7d85", "98bdf1bde262272618ccd732"),
]


def test_pcr8_of_bitkey_certificate_pem(eif_assets: Path) -> None:
    pem = (eif_assets / "bitkey-codesigning-leaf.pem").read_bytes()
    assert pcr8_of_certificate(pem).hex() == BITKEY_PCR8


def test_pcr8_of_bitkey_certificate_der_and_parsed(eif_assets: Path) -> None:
    der = (eif_assets / "bitkey-codesigning-leaf.der").read_bytes()
    assert pcr8_of_certificate(der).hex() == BITKEY_PCR8
    assert pcr8_of_certificate(x509.load_der_x509_certificate(der)).hex() == BITKEY_PCR8


def test_pcr8_is_the_extend_of_the_der_fingerprint(eif_assets: Path) -> None:
    der = (eif_assets / "bitkey-codesigning-leaf.der").read_bytes()
    assert pcr8_of_certificate(der) == independent_pcr(der)


def test_pcr8_uses_the_first_certificate_of_a_pem_bundle(eif_assets: Path) -> None:
    pem = (eif_assets / "bitkey-codesigning-leaf.pem").read_bytes()
    assert pcr8_of_certificate(pem + pem).hex() == BITKEY_PCR8


def test_pcr8_of_garbage_is_malformed_input() -> None:
    with pytest.raises(MalformedInput, match="certificate"):
        pcr8_of_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_pcr3_of_the_aws_guide_role_example() -> None:
    assert pcr3_of_iam_role("arn:aws:iam::123456789012:role/Webserver").hex() == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef"
        "4fc1f1a452e315b9e98f9e312e6921e6"
    )


def test_pcr4_of_the_aws_guide_instance_example() -> None:
    assert pcr4_of_instance_id("i-1234567890abcdef0").hex() == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812"
        "719327281c401a67a10fcba87ae79ce0"
    )


def test_pcr4_of_the_bitkey_document_instance() -> None:
    assert pcr4_of_instance_id("i-00514f303b4726c71").hex() == (
        "c306966a13b05a2342407b8fbbd85a26ef7fb065932dfc4dd9ce810a096f4a33"
        "f0249a500d7e21c1f563569852f36202"
    )


@pytest.mark.parametrize(("module_id", "prefix"), REAL_DOCUMENT_PCR4)
def test_pcr4_of_real_attestation_document_instances(module_id: str, prefix: str) -> None:
    instance_id = module_id.split("-enc")[0]
    assert pcr4_of_instance_id(instance_id).hex().startswith(prefix)


def test_pcr3_and_pcr4_have_no_inner_hash() -> None:
    assert pcr4_of_instance_id("i-1") == hashlib.sha384(ZERO_PCR + b"i-1").digest()
    assert pcr4_of_instance_id("i-1") != independent_pcr(b"i-1")


def test_empty_pcr2_constant() -> None:
    assert pcr_of_bytes(b"").hex() == EMPTY_PCR2


def test_file_stream_and_bytes_pcrs_agree(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = independent_pcr(data)
    assert pcr_of_bytes(data) == expected
    assert pcr_of_file(path) == expected
    assert pcr_of_stream(io.BytesIO(data)) == expected
    assert pcr_of_stream([data[:5], data[5:]]) == expected


def test_hasher_copy_shares_the_prefix() -> None:
    hasher = PcrHasher()
    hasher.update(b"kernel")
    snapshot = hasher.copy()
    hasher.update(b"more")
    assert snapshot.pcr() == independent_pcr(b"kernel")
    assert hasher.pcr() == independent_pcr(b"kernelmore")


def test_extend_refuses_a_wrong_register_size() -> None:
    with pytest.raises(ValueError, match="48"):
        extend(b"\x00" * 32, b"x")


def test_measurements_json_order_and_values() -> None:
    m = Measurements(b"\x00" * 48, b"\x01" * 48, b"\x02" * 48)
    out = m.to_json()
    assert list(out) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert out["HashAlgorithm"] == HASH_ALGORITHM_SHA384 == "Sha384 { ... }"
    assert out["PCR1"] == "01" * 48
    signed = Measurements(b"\x00" * 48, b"\x01" * 48, b"\x02" * 48, b"\x08" * 48)
    assert list(signed.to_json()) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert signed.pcrs == {0: b"\x00" * 48, 1: b"\x01" * 48, 2: b"\x02" * 48, 8: b"\x08" * 48}
    assert Measurements.from_json(signed.to_json()) == signed


def test_measurements_refuse_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="pcr1"):
        Measurements(b"\x00" * 48, b"\x00" * 47, b"\x00" * 48)


@pytest.mark.parametrize(
    "bad",
    [
        {"PCR0": "00" * 48, "PCR1": "00" * 48},
        {"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": "zz" * 48},
        {"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": "00" * 47},
        {"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": 5},
        {"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": "00" * 48, "HashAlgorithm": 1},
    ],
)
def test_measurements_from_bad_json_is_malformed(bad: dict[str, object]) -> None:
    with pytest.raises(MalformedInput):
        Measurements.from_json(bad)

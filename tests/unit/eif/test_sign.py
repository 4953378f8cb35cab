"""The signature section: serde_cbor byte vectors (spec eif.md §3.6), COSE_Sign1, strict decoding."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclavekit.eif.sign import (
    EifSigner,
    PcrSignature,
    check_signature_section,
    cose_sign1,
    cose_verify,
    decode_signature_section,
    encode_byte_vec,
    encode_pcr_info,
    encode_signature_section,
)
from enclavekit.errors import EifIntegrityError, MalformedInput, UsageError
from tests.unit.eif.helpers import SigningMaterial, make_signing_material

PCR_INFO_VECTOR = (
    "a26e72656769737465725f696e646578006e72656769737465725f76616c75659830000102030405060708090a"
    "0b0c0d0e0f101112131415161718181819181a181b181c181d181e181f1820182118221823182418251826182718"
    "281829182a182b182c182d182e182f"
)
SECTION_VECTOR = (
    "81a2737369676e696e675f6365727469666963617465983b182d182d182d182d182d18421845184718491"
    "84e182018431845185218541849184618491843184118541845182d182d182d182d182d0a184d18491849"
    "18420a182d182d182d182d182d1845184e1844182018431845185218541849184618491843184118541845"
    "182d182d182d182d182d0a697369676e61747572658a18d21884184418a1011838182218a018401840"
)
VECTOR_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
VECTOR_COSE = bytes.fromhex("d28444a1013822a04040")


def test_pcr_info_encoding_matches_the_upstream_vector() -> None:
    assert encode_pcr_info(0, bytes(range(48))).hex() == PCR_INFO_VECTOR


def test_signature_section_encoding_matches_the_upstream_vector() -> None:
    section = encode_signature_section([PcrSignature(VECTOR_CERT, VECTOR_COSE)])
    assert section.hex() == SECTION_VECTOR


def test_signature_section_vector_decodes_back() -> None:
    decoded = decode_signature_section(bytes.fromhex(SECTION_VECTOR))
    assert decoded == (PcrSignature(VECTOR_CERT, VECTOR_COSE),)


@pytest.mark.parametrize(
    ("data", "head"),
    [(b"", "80"), (bytes(23), "97"), (bytes(24), "9818"), (bytes(256), "990100")],
)
def test_byte_vectors_use_the_shortest_array_header(data: bytes, head: str) -> None:
    assert encode_byte_vec(data).hex().startswith(head)
    assert cbor2.loads(encode_byte_vec(data)) == list(data)


@pytest.mark.parametrize(
    ("curve", "protected"),
    [
        (ec.SECP256R1(), "a10126"),
        (ec.SECP384R1(), "a1013822"),
        (ec.SECP521R1(), "a1013823"),
    ],
)
def test_cose_alg_follows_the_key_curve(curve: ec.EllipticCurve, protected: str) -> None:
    key = ec.generate_private_key(curve)
    cose = cose_sign1(b"payload", key)
    decoded = cbor2.loads(cose)
    assert not isinstance(decoded, cbor2.CBORTag), "COSE_Sign1 must be untagged"
    assert decoded[0].hex() == protected
    assert decoded[1] == {}
    size = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}[curve.name]
    assert len(decoded[3]) == 2 * size
    assert cose_verify(cose, key.public_key()) == b"payload"


def test_cose_signature_over_sig_structure_verifies_independently() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cose = cbor2.loads(cose_sign1(b"abc", key))
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    sig_structure = cbor2.dumps(["Signature1", cose[0], b"", cose[2]])
    r, s = int.from_bytes(cose[3][:48], "big"), int.from_bytes(cose[3][48:], "big")
    key.public_key().verify(encode_dss_signature(r, s), sig_structure, ec.ECDSA(hashes.SHA384()))


def test_cose_with_a_flipped_signature_byte_is_refused() -> None:
    """An altered COSE signature must not verify."""
    key = ec.generate_private_key(ec.SECP384R1())
    cose = bytearray(cose_sign1(b"payload", key))
    cose[-1] ^= 1
    with pytest.raises(EifIntegrityError, match="does not verify"):
        cose_verify(bytes(cose), key.public_key())


def test_cose_signed_by_another_key_is_refused() -> None:
    """A signature by a key other than the certificate's must not verify."""
    cose = cose_sign1(b"payload", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(EifIntegrityError):
        cose_verify(cose, ec.generate_private_key(ec.SECP384R1()).public_key())


def test_cose_alg_downgrade_to_another_curve_is_refused() -> None:
    """A COSE header naming another algorithm than the certificate key's curve is refused."""
    cose = cose_sign1(b"payload", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(EifIntegrityError, match="algorithm"):
        cose_verify(cose, ec.generate_private_key(ec.SECP384R1()).public_key())


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\xa0",  # a map, not a list
        b"\x80",  # empty list
        cbor2.dumps([{"signing_certificate": b"abc", "signature": [1]}]),  # bstr, not array
        cbor2.dumps([{"signing_certificate": [1]}]),  # missing key
        cbor2.dumps([{"signing_certificate": [1], "signature": [1], "x": 1}]),  # extra key
        cbor2.dumps([{"signing_certificate": [256], "signature": [1]}]),  # not a byte
        cbor2.dumps([{"signing_certificate": [-1], "signature": [1]}]),
        bytes.fromhex(SECTION_VECTOR) + b"\x00",  # trailing byte
        # duplicate key: {"signature": [1], "signature": [2]}
        b"\x81\xa2"
        + cbor2.dumps("signature")
        + b"\x81\x01"
        + cbor2.dumps("signature")
        + b"\x81\x02",
        b"\x81" * 40 + b"\x80",  # deep nesting
    ],
)
def test_malformed_signature_sections_are_refused(bad: bytes) -> None:
    with pytest.raises(MalformedInput):
        decode_signature_section(bad)


def test_oversized_signature_section_is_refused() -> None:
    """A signature section above 32768 bytes is refused before decoding (DoS bound)."""
    with pytest.raises(MalformedInput, match="32768"):
        decode_signature_section(b"\x81" + b"\x00" * 40_000)


def test_signer_roundtrip_and_signature_check(signing_p384: SigningMaterial) -> None:
    pcr0 = bytes(range(48))
    section = signing_p384.signer.signature_section(pcr0)
    (element,) = decode_signature_section(section)
    assert element.signing_certificate == signing_p384.cert_pem  # stored as given
    info = check_signature_section(section, pcr0)
    assert info.signature_check is True
    assert info.pcr8 == signing_p384.signer.pcr8
    assert check_signature_section(section, bytes(48)).signature_check is False


def test_signer_refuses_a_key_that_does_not_match_the_certificate(
    signing_p384: SigningMaterial,
) -> None:
    with pytest.raises(UsageError, match="does not belong"):
        EifSigner(signing_p384.cert_pem, ec.generate_private_key(ec.SECP384R1()))


def test_signer_refuses_rsa_keys(tmp_path: Path, signing_p384: SigningMaterial) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UsageError, match="RSA"):
        EifSigner.from_files(signing_p384.cert_path, path)


def test_signer_refuses_unsupported_curves(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="curve"):
        make_signing_material(tmp_path, ec.SECP256K1()).signer


def test_signer_from_files_reports_unreadable_keys(
    tmp_path: Path, signing_p384: SigningMaterial
) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    with pytest.raises(UsageError, match="cannot load"):
        EifSigner.from_files(signing_p384.cert_path, garbage)
    with pytest.raises(UsageError, match="cannot read"):
        EifSigner.from_files(signing_p384.cert_path, tmp_path / "missing.key")

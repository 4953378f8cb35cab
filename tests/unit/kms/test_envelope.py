"""CMS EnvelopedData decoding and decryption: KMS vector, openssl envelopes, own encoder, defects."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import MalformedInput
from enclavekit.kms.envelope import (
    MAX_ENVELOPE_SIZE,
    UNDECRYPTABLE_MESSAGE,
    Envelope,
    NotForThisKey,
    UndecryptableEnvelope,
    encode_envelope,
    key_identifiers,
)

OPENSSL_PLAINTEXT = b"Hello from openssl cms -encrypt\n"


def _mutated(der: bytes, change: Callable[[Any], None]) -> bytes:
    info = cms.ContentInfo.load(der)
    change(info)
    return bytes(info.dump(force=True))


# --- good envelopes -------------------------------------------------------------------------


def test_public_kms_vector_decrypts(kms_assets: Path, enclaver_key: rsa.RSAPrivateKey) -> None:
    """The KMS-shaped BER vector (enclaver) decrypts to its published plaintext."""
    envelope = Envelope.from_ber((kms_assets / "enclaver-hello.ber").read_bytes())
    assert envelope.version == 2
    (recipient,) = envelope.recipients
    assert recipient.rid_kind == "subject_key_identifier"
    assert recipient.key_identifier == key_identifiers(enclaver_key.public_key())[0]
    assert envelope.decrypt(enclaver_key) == b"Hello, World"


@pytest.mark.parametrize("form", ["keyid", "issuer"])
def test_openssl_oaep_envelopes_decrypt(
    kms_assets: Path,
    recipient_key: rsa.RSAPrivateKey,
    recipient_cert: x509.Certificate,
    form: str,
) -> None:
    envelope = Envelope.from_ber((kms_assets / f"openssl-oaep-{form}.der").read_bytes())
    expected_kind = "subject_key_identifier" if form == "keyid" else "issuer_and_serial_number"
    assert envelope.recipients[0].rid_kind == expected_kind
    assert envelope.decrypt(recipient_key) == OPENSSL_PLAINTEXT
    assert envelope.decrypt(recipient_key, certificate=recipient_cert) == OPENSSL_PLAINTEXT


@pytest.mark.parametrize("ber", [True, False])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 5000])
def test_own_encoder_round_trips(recipient_key: rsa.RSAPrivateKey, ber: bool, size: int) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(size % 256)
    blob = encode_envelope(plaintext, recipient_key.public_key(), ber=ber, chunk_size=64)
    assert (blob[1] == 0x80) is ber
    assert Envelope.from_ber(blob).decrypt(recipient_key) == plaintext


def test_own_encoder_issuer_and_serial(
    recipient_key: rsa.RSAPrivateKey, recipient_cert: x509.Certificate
) -> None:
    blob = encode_envelope(
        b"secret",
        recipient_key.public_key(),
        rid="issuer_and_serial_number",
        certificate=recipient_cert,
    )
    envelope = Envelope.from_ber(blob)
    assert envelope.version == 0
    assert envelope.recipients[0].serial_number == recipient_cert.serial_number
    assert envelope.decrypt(recipient_key, certificate=recipient_cert) == b"secret"


def test_own_encoder_output_opens_with_openssl(
    tmp_path: Path, recipient_key: rsa.RSAPrivateKey, kms_assets: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    blob = tmp_path / "env.ber"
    blob.write_bytes(encode_envelope(b"to openssl", recipient_key.public_key()))
    out = subprocess.run(
        [
            *("openssl", "cms", "-decrypt", "-inform", "DER", "-in", str(blob)),
            *("-inkey", str(kms_assets / "recipient-key.pem")),
            *("-recip", str(kms_assets / "recipient-cert.pem")),
        ],
        capture_output=True,
        check=True,
    )
    assert out.stdout == b"to openssl"


def test_openssl_live_round_trip(tmp_path: Path, kms_assets: Path) -> None:
    """openssl cms -encrypt (OAEP, SHA-256, AES-256-CBC) made now, decrypted by enclavekit."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    (tmp_path / "p.txt").write_bytes(b"live")
    subprocess.run(
        [
            *("openssl", "cms", "-encrypt", "-binary", "-keyid", "-aes256", "-outform", "DER"),
            *("-in", str(tmp_path / "p.txt"), "-out", str(tmp_path / "e.der")),
            *("-recip", str(kms_assets / "recipient-cert.pem")),
            *("-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"),
            *("-keyopt", "rsa_mgf1_md:sha256"),
        ],
        check=True,
        capture_output=True,
    )
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (kms_assets / "recipient-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert Envelope.from_ber((tmp_path / "e.der").read_bytes()).decrypt(key) == b"live"


# --- wrong key --------------------------------------------------------------------------------


def test_envelope_for_another_key_is_refused(
    kms_assets: Path, other_key: rsa.RSAPrivateKey
) -> None:
    envelope = Envelope.from_ber((kms_assets / "enclaver-hello.ber").read_bytes())
    with pytest.raises(NotForThisKey) as info:
        envelope.decrypt(other_key)
    assert info.value.exit_code == 1
    assert "fb09e9af" in str(info.value)


def test_issuer_serial_envelope_for_another_key_is_refused(
    kms_assets: Path, other_key: rsa.RSAPrivateKey
) -> None:
    envelope = Envelope.from_ber((kms_assets / "openssl-oaep-issuer.der").read_bytes())
    with pytest.raises(NotForThisKey, match="issuerAndSerialNumber"):
        envelope.decrypt(other_key)


def test_spoofed_key_identifier_does_not_help(
    recipient_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    """An envelope naming our SKI but wrapped to another key fails closed (OAEP check)."""
    blob = encode_envelope(b"x", other_key.public_key(), ber=False)
    ours = key_identifiers(recipient_key.public_key())[0]

    def spoof(info: Any) -> None:
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["rid"] = cms.RecipientIdentifier(name="subject_key_identifier", value=ours)

    with pytest.raises(NotForThisKey):
        Envelope.from_ber(_mutated(blob, spoof)).decrypt(recipient_key)


# --- malformed ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def der_envelope(recipient_key: rsa.RSAPrivateKey) -> bytes:
    return encode_envelope(b"payload" * 3, recipient_key.public_key(), ber=False)


def test_empty_input_is_malformed() -> None:
    with pytest.raises(MalformedInput, match="empty"):
        Envelope.from_ber(b"")


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedInput, match="limit"):
        Envelope.from_ber(b"\x30" * (MAX_ENVELOPE_SIZE + 1))


@pytest.mark.parametrize("cut", [1, 2, 10, 100, 300])
def test_truncated_envelope_is_malformed(kms_assets: Path, cut: int) -> None:
    data = (kms_assets / "enclaver-hello.ber").read_bytes()
    with pytest.raises(MalformedInput):
        Envelope.from_ber(data[:-cut])


def test_trailing_bytes_are_malformed(kms_assets: Path) -> None:
    data = (kms_assets / "enclaver-hello.ber").read_bytes()
    with pytest.raises(MalformedInput):
        Envelope.from_ber(data + b"\x00")


def test_pkcs1v15_key_transport_is_refused(kms_assets: Path) -> None:
    """PKCS#1 v1.5 (Bleichenbacher-prone) key transport is never attempted."""
    with pytest.raises(MalformedInput, match="RSAES-OAEP"):
        Envelope.from_ber((kms_assets / "openssl-pkcs1v15.der").read_bytes())


def test_signed_data_is_not_an_envelope(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        info["content_type"] = "signed_data"

    with pytest.raises(MalformedInput):
        Envelope.from_ber(_mutated(der_envelope, change))


def test_unknown_enveloped_data_version_is_malformed(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        info["content"]["version"] = "v3"

    with pytest.raises(MalformedInput, match="version 0 or 2"):
        Envelope.from_ber(_mutated(der_envelope, change))


def test_recipient_version_must_match_identifier_form(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        info["content"]["recipient_infos"][0].chosen["version"] = "v0"

    with pytest.raises(MalformedInput, match="subjectKeyIdentifier requires version 2"):
        Envelope.from_ber(_mutated(der_envelope, change))


def test_oaep_with_sha1_is_refused(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        params = info["content"]["recipient_infos"][0].chosen["key_encryption_algorithm"]
        params["parameters"]["hash_algorithm"] = {"algorithm": "sha1"}

    with pytest.raises(MalformedInput, match="OAEP hash sha256"):
        Envelope.from_ber(_mutated(der_envelope, change))


def test_mgf1_with_sha1_is_refused(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        params = info["content"]["recipient_infos"][0].chosen["key_encryption_algorithm"]
        params["parameters"]["mask_gen_algorithm"] = {
            "algorithm": "mgf1",
            "parameters": {"algorithm": "sha1"},
        }

    with pytest.raises(MalformedInput, match="MGF1 hash sha256"):
        Envelope.from_ber(_mutated(der_envelope, change))


def test_aes128_content_is_refused(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        eci = info["content"]["encrypted_content_info"]
        iv = eci["content_encryption_algorithm"]["parameters"].native
        eci["content_encryption_algorithm"] = {"algorithm": "aes128_cbc", "parameters": iv}

    with pytest.raises(MalformedInput, match="aes256-CBC"):
        Envelope.from_ber(_mutated(der_envelope, change))


def _undecryptable(blob: bytes, key: rsa.RSAPrivateKey) -> None:
    """Content defects decode, then fail in decrypt as the one UndecryptableEnvelope (exit 1)."""
    envelope = Envelope.from_ber(blob)
    with pytest.raises(UndecryptableEnvelope) as info:
        envelope.decrypt(key)
    assert info.value.exit_code == 1
    assert str(info.value) == UNDECRYPTABLE_MESSAGE


def test_short_iv_does_not_decrypt(der_envelope: bytes, recipient_key: rsa.RSAPrivateKey) -> None:
    def change(info: Any) -> None:
        eci = info["content"]["encrypted_content_info"]
        eci["content_encryption_algorithm"] = {"algorithm": "aes256_cbc", "parameters": b"1234"}

    _undecryptable(_mutated(der_envelope, change), recipient_key)


def test_partial_block_ciphertext_does_not_decrypt(
    der_envelope: bytes, recipient_key: rsa.RSAPrivateKey
) -> None:
    def change(info: Any) -> None:
        eci = info["content"]["encrypted_content_info"]
        eci["encrypted_content"] = eci["encrypted_content"].native[:-1]

    _undecryptable(_mutated(der_envelope, change), recipient_key)


def test_detached_content_does_not_decrypt(
    der_envelope: bytes, recipient_key: rsa.RSAPrivateKey
) -> None:
    def change(info: Any) -> None:
        eci = info["content"]["encrypted_content_info"]
        eci["encrypted_content"] = None

    _undecryptable(_mutated(der_envelope, change), recipient_key)


def test_tampered_ciphertext_does_not_decrypt(
    kms_assets: Path, enclaver_key: rsa.RSAPrivateKey
) -> None:
    """Flipping the last ciphertext byte is caught by the padding check, not returned as data."""
    data = bytearray((kms_assets / "enclaver-hello.ber").read_bytes())
    data[-11] ^= 0x01  # last content byte before the three end-of-contents markers
    _undecryptable(bytes(data), enclaver_key)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "32"])
def test_expected_length_must_be_a_non_negative_int(
    der_envelope: bytes, recipient_key: rsa.RSAPrivateKey, bad: object
) -> None:
    with pytest.raises(ValueError, match="expected_length"):
        Envelope.from_ber(der_envelope).decrypt(recipient_key, expected_length=bad)  # type: ignore[arg-type]


def test_expected_length_accepts_the_right_length(
    der_envelope: bytes, recipient_key: rsa.RSAPrivateKey
) -> None:
    envelope = Envelope.from_ber(der_envelope)
    assert envelope.decrypt(recipient_key, expected_length=21) == b"payload" * 3
    with pytest.raises(UndecryptableEnvelope):
        envelope.decrypt(recipient_key, expected_length=20)


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Envelope.from_ber("MIA=")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedInput):
        Envelope.from_ber(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=460), st.integers(min_value=1, max_value=255))
def test_mutated_vector_only_raises_project_errors(position: int, flip: int) -> None:
    """Any one-byte change to the KMS vector parses cleanly or raises MalformedInput."""
    path = Path(__file__).parents[2] / "assets" / "kms" / "enclaver-hello.ber"
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= flip
    with contextlib.suppress(MalformedInput):
        Envelope.from_ber(bytes(data))


def test_unmapped_version_number_is_reported(der_envelope: bytes) -> None:
    def change(info: Any) -> None:
        info["content"]["version"] = 7

    with pytest.raises(MalformedInput, match="version 0 or 2, found 7"):
        Envelope.from_ber(_mutated(der_envelope, change))

"""HPKE sealed payloads: round trips per key type, tampering, wrong keys, hostile headers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.atls.seal import (
    HEADER,
    MAX_PAYLOAD,
    generate_sealing_key,
    load_private_key,
    load_recipient_key,
    public_key_der,
    seal,
    unseal,
)
from enclavekit.errors import MalformedInput, UsageError, VerificationError

KINDS = ["p256", "p384", "p521", "x25519"]


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_through_spki(kind: str) -> None:
    key = generate_sealing_key(kind)
    recipient = load_recipient_key(public_key_der(key))
    sealed = seal(b"secret", recipient)
    assert sealed[0] == 1
    assert unseal(sealed, key) == b"secret"
    assert b"secret" not in sealed


@pytest.mark.parametrize("kind", KINDS)
def test_empty_payload(kind: str) -> None:
    key = generate_sealing_key(kind)
    assert unseal(seal(b"", key.public_key()), key) == b""  # type: ignore[arg-type]


def test_wrong_key_cannot_unseal() -> None:
    """A payload sealed to one enclave key does not open with another."""
    a, b = generate_sealing_key(), generate_sealing_key()
    with pytest.raises(VerificationError, match="another key"):
        unseal(seal(b"x", a.public_key()), b)  # type: ignore[arg-type]


def test_tampered_ciphertext_is_refused() -> None:
    """Flipping any ciphertext bit makes unseal fail."""
    key = generate_sealing_key()
    sealed = bytearray(seal(b"hello world", key.public_key()))  # type: ignore[arg-type]
    sealed[-1] ^= 1
    with pytest.raises(VerificationError):
        unseal(bytes(sealed), key)


def test_suite_downgrade_in_header_is_refused() -> None:
    """Rewriting the header's suite ids is detected before decryption."""
    key = generate_sealing_key("p384")
    sealed = seal(b"x", key.public_key())  # type: ignore[arg-type]
    forged = HEADER.pack(1, 0x0011, 2, 1) + sealed[HEADER.size :]
    with pytest.raises(MalformedInput, match="suite"):
        unseal(forged, key)


def test_unknown_version_is_refused() -> None:
    key = generate_sealing_key()
    sealed = seal(b"x", key.public_key())  # type: ignore[arg-type]
    with pytest.raises(MalformedInput, match="version 2"):
        unseal(b"\x02" + sealed[1:], key)


@pytest.mark.parametrize("cut", [0, 3, 7, 20, 100])
def test_truncated_payload_is_refused(cut: int) -> None:
    key = generate_sealing_key()
    sealed = seal(b"x", key.public_key())  # type: ignore[arg-type]
    with pytest.raises((MalformedInput, VerificationError)):
        unseal(sealed[:cut], key)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_bytes_raise_only_package_errors(data: bytes) -> None:
    key = _KEY
    with contextlib.suppress(MalformedInput, VerificationError):
        unseal(data, key)


_KEY = generate_sealing_key("x25519")


def test_rsa_recipient_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(65537, 2048)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UsageError, match="RSA"):
        load_recipient_key(der)


def test_garbage_recipient_is_malformed() -> None:
    with pytest.raises(MalformedInput):
        load_recipient_key(b"dummy")


def test_oversized_payload_is_refused() -> None:
    key = generate_sealing_key()
    with pytest.raises(UsageError):
        seal(b"\x00" * (MAX_PAYLOAD + 1), key.public_key())  # type: ignore[arg-type]


def test_private_key_pem_roundtrip() -> None:
    from cryptography.hazmat.primitives import serialization

    key = generate_sealing_key("p256")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert public_key_der(load_private_key(pem)) == public_key_der(key)
    with pytest.raises(MalformedInput):
        load_private_key(b"not a key")

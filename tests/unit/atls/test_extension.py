"""The attestation-document certificate extension: encoding, decoding, hostile input."""

from __future__ import annotations

import contextlib

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.atls.extension import (
    ATTESTATION_EXTENSION_OID,
    MAX_DOCUMENT_SIZE,
    attestation_extension,
    decode_extension_value,
    document_from_certificate,
    encode_extension_value,
)
from enclavekit.errors import MalformedInput
from tests.unit.atls.atls_support import make_csr


def test_oid_is_under_the_uuid_arc() -> None:
    assert ATTESTATION_EXTENSION_OID.dotted_string.startswith("2.25.")
    assert ATTESTATION_EXTENSION_OID.dotted_string.endswith(".1")


@given(st.binary(min_size=1, max_size=4096))
@settings(max_examples=200)
def test_roundtrip(document: bytes) -> None:
    assert decode_extension_value(encode_extension_value(document)) == document


@given(st.binary(max_size=512))
@settings(max_examples=200)
def test_random_bytes_raise_only_malformed_input(value: bytes) -> None:
    with contextlib.suppress(MalformedInput):
        decode_extension_value(value)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x04",  # truncated header
        b"\x04\x05abc",  # truncated contents
        b"\x04\x01a\x00",  # trailing byte
        b"\x04\x00",  # empty document
        b"\x0c\x01a",  # UTF8String, not OCTET STRING
        b"\x04\x81\x01a",  # non-minimal length (BER, not DER)
        b"\x04\x83"
        + (MAX_DOCUMENT_SIZE + 100).to_bytes(3, "big")
        + b"\x00" * (MAX_DOCUMENT_SIZE + 100),
    ],
)
def test_malformed_values_are_refused(value: bytes) -> None:
    with pytest.raises(MalformedInput):
        decode_extension_value(value)


def test_oversized_document_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="limit"):
        encode_extension_value(b"\x00" * (MAX_DOCUMENT_SIZE + 1))


def _cert_with(ext: x509.ExtensionType | None, critical: bool = False) -> x509.Certificate:
    from datetime import UTC, datetime, timedelta

    _, key = make_csr()
    name = x509.Name([])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=1))
    )
    if ext is not None:
        b = b.add_extension(ext, critical=critical)
    return b.sign(key, hashes.SHA384())


def test_document_from_certificate() -> None:
    cert = _cert_with(attestation_extension(b"doc"))
    assert document_from_certificate(cert) == b"doc"


def test_certificate_without_extension_is_refused() -> None:
    with pytest.raises(MalformedInput, match="no attestation extension"):
        document_from_certificate(_cert_with(None))


def test_critical_extension_is_refused() -> None:
    with pytest.raises(MalformedInput, match="critical"):
        document_from_certificate(_cert_with(attestation_extension(b"doc"), critical=True))


def test_wrapped_value_is_a_der_octet_string() -> None:
    assert core.OctetString.load(encode_extension_value(b"xyz")).native == b"xyz"

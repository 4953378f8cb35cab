"""``enclavekit kms unwrap``: decrypt a KMS ``CiphertextForRecipient`` envelope with the enclave key."""

from __future__ import annotations

import base64
import binascii
import sys

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.cli._files import read_input, text_encoding_error
from enclavekit.cli._render import emit_json, json_option
from enclavekit.errors import MalformedInput, UsageError
from enclavekit.kms.envelope import MAX_ENVELOPE_SIZE, Envelope, key_identifiers


def _read(path: str, option: str, limit: int) -> bytes:
    return read_input(path, option, limit=limit)


def _envelope_bytes(data: bytes, path: str) -> bytes:
    """Binary BER/DER as is; otherwise base64 text (as in the KMS JSON ``CiphertextForRecipient``)."""
    if data[:1] == b"\x30":
        return data
    problem = text_encoding_error(data)
    if problem is not None:
        raise MalformedInput(f"--envelope {path}: {problem}")
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInput(
            f"--envelope {path}: neither BER/DER (starting with 0x30) nor base64 text"
        ) from None


def _private_key(path: str) -> rsa.RSAPrivateKey:
    data = _read(path, "--private-key", 1024 * 1024)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"--private-key {path}: cannot load it ({exc}); expected an unencrypted PEM or DER RSA"
            " key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"--private-key {path} is {type(key).__name__}, expected an RSA key")
    return key


@click.group("kms")
def kms_group() -> None:
    """KMS recipient envelopes (CiphertextForRecipient)."""


@kms_group.command("unwrap")
@click.option(
    "--private-key",
    "private_key_path",
    required=True,
    metavar="KEY.pem",
    help="The enclave's RSA private key (PEM or DER, unencrypted).",
)
@click.option(
    "--envelope",
    "envelope_path",
    required=True,
    metavar="FILE",
    help="CiphertextForRecipient: BER/DER bytes or base64 text; '-' reads stdin.",
)
@click.option(
    "--certificate",
    "certificate_path",
    metavar="CERT.pem",
    help="Recipient certificate, to match issuerAndSerialNumber recipients by name.",
)
@click.option(
    "--expected-length",
    type=click.IntRange(0, MAX_ENVELOPE_SIZE),
    metavar="BYTES",
    help="The plaintext's known length (32 for an AES_256 data key): any other length fails like a "
    "tampered envelope, which leaves a relay no padding oracle.",
)
@json_option
def unwrap(
    private_key_path: str,
    envelope_path: str,
    certificate_path: str | None,
    expected_length: int | None,
    as_json: bool,
) -> None:
    """Decrypt an envelope and write the plaintext to stdout.

    Exit 1 when the envelope is not addressed to this key or its content does not decrypt (one message
    for every cause: no padding oracle), 2 when it is malformed or unsupported.
    """
    key = _private_key(private_key_path)
    certificate = None
    if certificate_path is not None:
        try:
            certificate = x509.load_pem_x509_certificate(
                _read(certificate_path, "--certificate", 1024 * 1024)
            )
        except ValueError as exc:
            raise UsageError(
                f"--certificate {certificate_path}: not a PEM certificate ({exc})"
            ) from None
    raw = _envelope_bytes(_read(envelope_path, "--envelope", MAX_ENVELOPE_SIZE * 2), envelope_path)
    envelope = Envelope.from_ber(raw)
    plaintext = envelope.decrypt(key, certificate=certificate, expected_length=expected_length)
    if as_json:
        emit_json(
            {
                "Plaintext": base64.b64encode(plaintext).decode("ascii"),
                "RecipientKeyId": key_identifiers(key.public_key())[0].hex(),
                "EnvelopeVersion": envelope.version,
            }
        )
        return
    sys.stdout.buffer.write(plaintext)
    sys.stdout.buffer.flush()


def register(group: click.Group) -> None:
    group.add_command(kms_group)

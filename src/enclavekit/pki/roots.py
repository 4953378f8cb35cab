"""Trust anchors for attestation verification.

The AWS Nitro Enclaves root G1 ships inside the package and is checked against its published SHA-256
fingerprint at load time, so a corrupted install fails closed. Other roots (the emulator's, a test CA) are only
ever used when the caller passes them explicitly.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavekit.errors import MalformedInput, UsageError

#: SHA-256 of the DER of AWS_NitroEnclaves_Root-G1 (attestation spec §2).
AWS_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"


def fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of a certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@cache
def aws_root() -> x509.Certificate:
    """The pinned AWS Nitro Enclaves root certificate G1."""
    pem = resources.files("enclavekit.pki").joinpath("aws_nitro_root_g1.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if fingerprint(cert) != AWS_ROOT_G1_SHA256:  # pragma: no cover - a corrupted installation
        raise RuntimeError("the packaged AWS Nitro root does not match its pinned fingerprint")
    return cert


def load_pem_roots(path: str | Path) -> list[x509.Certificate]:
    """Load every certificate of a PEM file as trust anchors (raises UsageError/MalformedInput)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read trust root file {str(path)!r}: {exc.strerror}; pass a PEM certificate file"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise MalformedInput(
            f"{str(path)!r}: expected one or more PEM certificates (-----BEGIN CERTIFICATE-----), found none"
        )
    return certs

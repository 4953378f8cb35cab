"""Helpers for the EIF tests: synthetic sections, signing keys made at test time, independent PCRs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.sign import EifSigner

CMDLINE = b"reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on"


def independent_pcr(content: bytes) -> bytes:
    """SHA384(48 zero bytes || SHA384(content)), written out without enclavekit code."""
    return hashlib.sha384(bytes(48) + hashlib.sha384(content).digest()).digest()


def section_bytes(label: str, size: int) -> bytes:
    """Deterministic pseudo-random section content."""
    return hashlib.shake_256(label.encode()).digest(size)


@dataclass(frozen=True)
class SyntheticEif:
    path: Path
    kernel: bytes
    cmdline: bytes
    ramdisks: tuple[bytes, ...]

    @property
    def pcr0(self) -> bytes:
        return independent_pcr(self.kernel + self.cmdline + b"".join(self.ramdisks))

    @property
    def pcr1(self) -> bytes:
        return independent_pcr(self.kernel + self.cmdline + self.ramdisks[0])

    @property
    def pcr2(self) -> bytes:
        return independent_pcr(b"".join(self.ramdisks[1:]))


def sample_metadata() -> IdentityInfo:
    return IdentityInfo(
        "example.com/app",
        "1.0",
        BuildInfo(
            build_time="2024-06-21T10:00:00.000000+00:00",
            build_tool="nitro-cli",
            build_tool_version="1.4.2",
            operating_system="Linux",
            kernel_version="4.14.256",
        ),
        docker_info={"Id": "sha256:abc", "Config": {"Env": ["B=2", "A=1"], "Cmd": ["/app"]}},
        custom_metadata={"zeta": 1, "alpha": {"y": 2, "x": 1}},
    )


@dataclass(frozen=True)
class SigningMaterial:
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def signer(self) -> EifSigner:
        return EifSigner(self.cert_pem, self.key)


def make_signing_material(
    directory: Path, curve: ec.EllipticCurve, name: str = "signer"
) -> SigningMaterial:
    key = ec.generate_private_key(curve)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {curve.name}"),
        ]
    )
    start = datetime(2024, 1, 5, 3, 4, 5, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .sign(key, hashes.SHA384())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path = directory / f"{name}-{curve.name}.pem"
    key_path = directory / f"{name}-{curve.name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return SigningMaterial(cert_pem, key, cert_path, key_path)

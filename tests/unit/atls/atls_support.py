"""Helpers for attested-TLS tests: a tiny AWS-shaped PKI that signs COSE_Sign1 documents.

The factory is the test stand-in for the NSM emulator: it makes real ES384 COSE_Sign1 documents
chained root → intermediate → leaf, which the real :class:`enclavekit.attestation.Verifier` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavekit.atls.ca import (
    CaPolicy,
    ServicePolicy,
)
from enclavekit.attestation import Verifier

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
PCRS = {i: bytes([i + 1]) * 48 for i in range(3)} | {i: bytes(48) for i in range(3, 16)}
DEBUG_PCRS = {i: bytes(48) for i in range(16)}
NITROTPM_MODULE_ID = "i-0123456789abcdef0-tpm0123456789abcdef"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    ku = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if subject != issuer:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    return b.sign(issuer_key, hashes.SHA384())


@dataclass
class DocumentFactory:
    """Signs attestation documents with a test root → intermediate → per-document leaf."""

    name: str = "test nitro root"
    root_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP384R1())
    )

    def __post_init__(self) -> None:
        self.root = _cert(
            self.name,
            self.root_key,
            self.name,
            self.root_key,
            ca=True,
            not_before=T0 - timedelta(days=365),
            not_after=T0 + timedelta(days=3650),
        )
        self.int_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = _cert(
            self.name + " int",
            self.int_key,
            self.name,
            self.root_key,
            ca=True,
            not_before=T0 - timedelta(days=30),
            not_after=T0 + timedelta(days=365),
        )
        self.leaf_key = ec.generate_private_key(ec.SECP384R1())
        self.leaf = _cert(
            "i-0123456789abcdef0-enc0123456789abcdef",
            self.leaf_key,
            self.name + " int",
            self.int_key,
            ca=False,
            not_before=T0 - timedelta(hours=1),
            not_after=T0 + timedelta(hours=3),
        )

    def make(
        self,
        *,
        public_key: bytes | None = None,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        pcrs: Mapping[int, bytes] = PCRS,
        timestamp: datetime = T0,
        nitrotpm: bool = False,
    ) -> bytes:
        """A signed document; ``nitrotpm`` makes it NitroTPM-shaped (``-tpm`` id, ``nitrotpm_pcrs``)."""
        payload = cbor2.dumps(
            {
                "module_id": NITROTPM_MODULE_ID
                if nitrotpm
                else "i-0123456789abcdef0-enc0123456789abcdef",
                "digest": "SHA384",
                "timestamp": int(timestamp.timestamp() * 1000),
                "nitrotpm_pcrs" if nitrotpm else "pcrs": dict(pcrs),
                "certificate": self.leaf.public_bytes(serialization.Encoding.DER),
                "cabundle": [
                    self.root.public_bytes(serialization.Encoding.DER),
                    self.intermediate.public_bytes(serialization.Encoding.DER),
                ],
                "public_key": public_key,
                "user_data": user_data,
                "nonce": nonce,
            }
        )
        protected = cbor2.dumps({1: -35})
        sig_structure = cbor2.dumps(["Signature1", protected, b"", payload])
        r, s = decode_dss_signature(self.leaf_key.sign(sig_structure, ec.ECDSA(hashes.SHA384())))
        return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])

    def verifier(self) -> Verifier:
        return Verifier([self.root])


class Clock:
    """A settable clock for injection."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def ca_policy(**svc: object) -> CaPolicy:
    service = ServicePolicy(
        name="web",
        dns_names=("web.enclave.test", "localhost"),
        pcr_allowlist=({0: PCRS[0], 1: PCRS[1], 2: PCRS[2]},),
        **svc,  # type: ignore[arg-type]
    )
    return CaPolicy(services={"web": service})


def make_csr(
    key: ec.EllipticCurvePrivateKey | None = None, cn: str = "web"
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP384R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA384())
    return csr.public_bytes(serialization.Encoding.PEM), key


def spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

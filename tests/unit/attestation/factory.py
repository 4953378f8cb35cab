"""A test PKI and document factory (python-tuf's repository simulator, for attestation documents).

``TestPki`` builds an AWS-shaped chain (root → regional → zonal → instance → leaf, P-384, ecdsa-with-SHA384)
with controllable validity windows; ``make_document`` encodes and signs a document whose every field can be
overridden, so each test changes exactly one thing and asserts exactly that check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enclavekit.attestation.document import _encode_sig_structure

NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
LEAF_LIFETIME = timedelta(hours=3, seconds=3)
PROTECTED = b"\xa1\x01\x38\x22"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    *,
    ca: bool,
    path_len: int | None = None,
    key_usage: str = "auto",
    hash_alg: hashes.HashAlgorithm | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
    elif key_usage == "auto":
        builder = builder.add_extension(
            x509.KeyUsage(True, True, False, False, False, False, False, False, False),
            critical=False,
        )
    elif key_usage == "no-digital-signature":
        builder = builder.add_extension(
            x509.KeyUsage(False, True, False, False, False, False, False, False, False),
            critical=False,
        )
    return builder.sign(issuer_key, hash_alg or hashes.SHA384())


@dataclass
class TestPki:
    """An AWS-shaped chain. ``leaf_not_before`` controls the leaf window (3 h 0 min 3 s)."""

    __test__ = False  # not a pytest class

    leaf_not_before: datetime = NOW - timedelta(minutes=10)
    leaf_curve: ec.EllipticCurve = field(default_factory=ec.SECP384R1)
    leaf_is_ca: bool = False
    leaf_key_usage: str = "auto"
    module_id: str = "i-0123456789abcdef0-enc0123456789abcdef"

    def __post_init__(self) -> None:
        p384 = ec.SECP384R1()
        self.root_key = ec.generate_private_key(p384)
        start = NOW - timedelta(days=365)
        self.root = _cert(
            "test.nitro-enclaves",
            self.root_key,
            None,
            self.root_key,
            start,
            NOW + timedelta(days=3650),
            ca=True,
        )
        self.cas: list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = []
        parent, parent_key = self.root, self.root_key
        for cn, plen in (("regional.test", 2), ("zonal.test", 1), ("instance.test", 0)):
            k = ec.generate_private_key(p384)
            c = _cert(
                cn,
                k,
                parent,
                parent_key,
                NOW - timedelta(days=2),
                NOW + timedelta(days=2),
                ca=True,
                path_len=plen,
            )
            self.cas.append((c, k))
            parent, parent_key = c, k
        self.leaf_key = ec.generate_private_key(self.leaf_curve)
        self.leaf = _cert(
            f"{self.module_id}.test.aws",
            self.leaf_key,
            parent,
            parent_key,
            self.leaf_not_before,
            self.leaf_not_before + LEAF_LIFETIME,
            ca=self.leaf_is_ca,
            key_usage=self.leaf_key_usage,
        )

    @property
    def leaf_window(self) -> tuple[datetime, datetime]:
        return self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc

    def cabundle(self) -> list[bytes]:
        return [self.root.public_bytes(Encoding.DER)] + [
            c.public_bytes(Encoding.DER) for c, _ in self.cas
        ]


def default_pcrs(debug: bool = False, count: int = 16) -> dict[int, bytes]:
    pcrs = {i: bytes(48) for i in range(count)}
    if not debug:
        pcrs[0], pcrs[1], pcrs[2] = b"\x00" + b"\xa0" * 47, b"\xa1" * 48, b"\xa2" * 48
    return pcrs


def payload_fields(pki: TestPki, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "module_id": pki.module_id,
        "digest": "SHA384",
        "timestamp": int(NOW.timestamp() * 1000),
        "pcrs": default_pcrs(),
        "certificate": pki.leaf.public_bytes(Encoding.DER),
        "cabundle": pki.cabundle(),
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    fields.update(overrides)
    return fields


def encode_payload(fields: dict[str, Any], *, indefinite: bool = False) -> bytes:
    if not indefinite:
        return cbor2.dumps(fields)
    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items()) + b"\xff"


def sign(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    protected: bytes = PROTECTED,
    accept: Callable[[int, int], bool] = lambda r, s: True,
) -> bytes:
    """ES384 r ‖ s (48 bytes each, zero-padded) over the Sig_structure; retries until ``accept(r, s)``."""
    while True:
        der = key.sign(_encode_sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        if r.bit_length() > 384 or s.bit_length() > 384:  # P-521: cannot fit; any 96 bytes will do
            return bytes(range(96))
        if accept(r, s):
            return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def envelope(
    protected: bytes, payload: bytes, signature: bytes, *, tag: int | None = None
) -> bytes:
    body = [protected, {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(tag, body) if tag is not None else body)


def make_document(
    pki: TestPki,
    *,
    indefinite: bool = True,
    raw_payload: bytes | None = None,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
    protected: bytes = PROTECTED,
    tag: int | None = None,
    **overrides: Any,
) -> bytes:
    """A signed document (indefinite-length payload map by default, as AWS emits since 2025)."""
    payload = (
        raw_payload
        if raw_payload is not None
        else encode_payload(payload_fields(pki, **overrides), indefinite=indefinite)
    )
    signature = sign(payload, signing_key or pki.leaf_key, protected=protected)
    return envelope(protected, payload, signature, tag=tag)

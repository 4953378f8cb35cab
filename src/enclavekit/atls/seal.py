"""Sealed payloads: HPKE (RFC 9180, base mode) to the public key an enclave attested to.

Anyone can seal; only the holder of the private key, which never leaves the enclave, can unseal. The
relay in between (the parent instance, a queue, a bucket) sees ciphertext only.

Sealed-payload format, version 1 (all integers big-endian)::

    offset  size  field
    0       1     version = 0x01
    1       2     KEM id   (RFC 9180 §7.1: 0x0010 P-256, 0x0011 P-384, 0x0012 P-521, 0x0020 X25519)
    3       2     KDF id   (0x0001 HKDF-SHA256, 0x0002 HKDF-SHA384, 0x0003 HKDF-SHA512)
    5       2     AEAD id  (0x0001 AES-128-GCM, 0x0002 AES-256-GCM, 0x0003 ChaCha20-Poly1305)
    7       n     HPKE ``enc`` (the KEM's encapsulated key) followed by the AEAD ciphertext + tag

The 7-byte header is authenticated: HPKE ``info`` is ``b"enclavekit-seal-v1\\x00" + header``, so a
changed suite or version makes decryption fail. The suite is fixed by the recipient key type (no
negotiation): P-256 → HKDF-SHA256/AES-128-GCM, P-384 → HKDF-SHA384/AES-256-GCM,
P-521 → HKDF-SHA512/AES-256-GCM, X25519 → HKDF-SHA256/ChaCha20-Poly1305; :func:`unseal` refuses a
header whose suite is not the one for its key.

Not provided: sender authentication (HPKE base mode; anyone may seal), replay protection (add your
own message ids), and streaming (payloads are bounded by :data:`MAX_PAYLOAD`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from enclavekit.errors import MalformedInput, UsageError, VerificationError

VERSION = 1
HEADER = struct.Struct(">BHHH")
INFO_PREFIX = b"enclavekit-seal-v1\x00"
#: Single-shot HPKE holds the whole payload in memory; 64 MiB keeps that bounded.
MAX_PAYLOAD = 64 * 1024 * 1024

SealPublicKey = ec.EllipticCurvePublicKey | x25519.X25519PublicKey
SealPrivateKey = ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey


@dataclass(frozen=True, slots=True)
class _SuiteIds:
    kem: int
    kdf: int
    aead: int
    enc_length: int
    suite: Suite


def _suite(kem: KEM, kdf: KDF, aead: AEAD) -> Suite:
    return Suite(kem, kdf, aead)


_BY_CURVE: dict[str, _SuiteIds] = {
    "secp256r1": _SuiteIds(0x0010, 1, 1, 65, _suite(KEM.P256, KDF.HKDF_SHA256, AEAD.AES_128_GCM)),
    "secp384r1": _SuiteIds(0x0011, 2, 2, 97, _suite(KEM.P384, KDF.HKDF_SHA384, AEAD.AES_256_GCM)),
    "secp521r1": _SuiteIds(0x0012, 3, 2, 133, _suite(KEM.P521, KDF.HKDF_SHA512, AEAD.AES_256_GCM)),
    "x25519": _SuiteIds(
        0x0020, 1, 3, 32, _suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
    ),
}
#: AEAD tag length, for the minimum-size check.
_TAG = 16


def _suite_for(key: SealPublicKey | SealPrivateKey) -> _SuiteIds:
    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return _BY_CURVE["x25519"]
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        ids = _BY_CURVE.get(key.curve.name)
        if ids is not None:
            return ids
        raise UsageError(f"curve {key.curve.name} is not supported for sealing; use P-256/384/521")
    raise UsageError(f"key type {type(key).__name__} cannot be sealed to; expected EC or X25519")


def load_recipient_key(spki_der: bytes) -> SealPublicKey:
    """Parse a DER SubjectPublicKeyInfo (an attestation document's ``public_key``)."""
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(
            "public_key: expected a DER SubjectPublicKeyInfo (EC or X25519), found undecodable"
            f" bytes ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | x25519.X25519PublicKey):
        raise UsageError(
            f"public_key is {type(key).__name__}; sealing needs an EC (P-256/384/521) or X25519 key"
        )
    _suite_for(key)
    return key


def seal(plaintext: bytes, recipient: SealPublicKey) -> bytes:
    """Seal ``plaintext`` to ``recipient``; returns the version-1 sealed payload."""
    if len(plaintext) > MAX_PAYLOAD:
        raise UsageError(f"payload is {len(plaintext)} bytes; seal handles at most {MAX_PAYLOAD}")
    ids = _suite_for(recipient)
    header = HEADER.pack(VERSION, ids.kem, ids.kdf, ids.aead)
    return header + ids.suite.encrypt(plaintext, recipient, info=INFO_PREFIX + header)


def unseal(sealed: bytes, private_key: SealPrivateKey) -> bytes:
    """Open a sealed payload with the enclave's private key.

    Raises :class:`MalformedInput` for a bad header (version, suite, length) and
    :class:`VerificationError` when decryption fails (wrong key or tampered payload).
    """
    if len(sealed) > MAX_PAYLOAD + 1024:
        raise MalformedInput(f"sealed payload is {len(sealed)} bytes; limit {MAX_PAYLOAD}")
    if len(sealed) < HEADER.size:
        raise MalformedInput(f"sealed payload is {len(sealed)} bytes; expected a 7-byte header")
    version, kem, kdf, aead = HEADER.unpack_from(sealed)
    if version != VERSION:
        raise MalformedInput(
            f"sealed payload version {version}; this build reads version {VERSION}"
        )
    ids = _suite_for(private_key)
    if (kem, kdf, aead) != (ids.kem, ids.kdf, ids.aead):
        raise MalformedInput(
            f"sealed payload suite KEM 0x{kem:04x}/KDF 0x{kdf:04x}/AEAD 0x{aead:04x} does not match"
            f" the key (expected 0x{ids.kem:04x}/0x{ids.kdf:04x}/0x{ids.aead:04x})"
        )
    if len(sealed) < HEADER.size + ids.enc_length + _TAG:
        raise MalformedInput(
            "sealed payload is truncated: shorter than its encapsulated key and tag"
        )
    header = sealed[: HEADER.size]
    try:
        return bytes(
            ids.suite.decrypt(sealed[HEADER.size :], private_key, info=INFO_PREFIX + header)
        )
    except (InvalidTag, ValueError) as exc:
        raise VerificationError(
            "sealed payload does not decrypt with this key: it was sealed to another key or altered"
        ) from exc


def generate_sealing_key(kind: str = "p384") -> SealPrivateKey:
    """A new in-memory key of ``kind`` (``p256``, ``p384``, ``p521``, ``x25519``)."""
    curves: dict[str, ec.EllipticCurve] = {
        "p256": ec.SECP256R1(),
        "p384": ec.SECP384R1(),
        "p521": ec.SECP521R1(),
    }
    if kind == "x25519":
        return x25519.X25519PrivateKey.generate()
    if kind not in curves:
        raise ValueError(f"unknown key kind {kind!r}; expected p256, p384, p521 or x25519")
    return ec.generate_private_key(curves[kind])


def public_key_der(key: SealPrivateKey | SealPublicKey) -> bytes:
    """DER SubjectPublicKeyInfo, the form the NSM puts in ``public_key``."""
    pub = (
        key.public_key()
        if isinstance(key, ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey)
        else key
    )
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(pem: bytes) -> SealPrivateKey:
    """A PEM (PKCS#8) private key for :func:`unseal`."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(
            f"private key: expected an unencrypted PEM PKCS#8 key ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey):
        raise UsageError(f"private key is {type(key).__name__}; expected EC or X25519")
    return key

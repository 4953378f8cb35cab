"""The EIF signature section, byte-for-byte as nitro-cli encodes it (spec ``eif.md`` §3).

Section data = serde_cbor of a one-element list::

    [ { "signing_certificate": <PEM file bytes>, "signature": <COSE_Sign1 bytes> } ]

where both byte fields are CBOR *arrays of unsigned integers* (serde's ``Vec<u8>``), not byte
strings. The COSE_Sign1 is untagged, has an empty unprotected map and a protected header ``{1:
alg}`` whose alg follows the key's curve (P-256 → ES256, P-384 → ES384, P-521 → ES512). Its payload
is serde_cbor of ``PcrInfo {register_index: 0, register_value: PCR0}``.

What this module checks when verifying: the COSE signature against the certificate's public key, and
that the signed payload names PCR0 with the expected value. What it does *not* check: the
certificate's validity period or chain (nitro-cli's describe-eif does not either; ``run-enclave``
checks the period).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from enclavekit import _cbor
from enclavekit.eif.format import SIGNATURE_MAX_SIZE
from enclavekit.eif.measure import PCR_SIZE, load_certificate, pcr8_of_certificate
from enclavekit.errors import EifIntegrityError, MalformedInput, UsageError

#: COSE algorithm ids by curve: (alg, hash, coordinate size in bytes).
_CURVES: dict[str, tuple[int, hashes.HashAlgorithm, int]] = {
    "secp256r1": (-7, hashes.SHA256(), 32),
    "secp384r1": (-35, hashes.SHA384(), 48),
    "secp521r1": (-36, hashes.SHA512(), 66),
}
_ALGS = {alg: (digest, size) for alg, digest, size in _CURVES.values()}


class EcSigningKey(Protocol):
    """What signing needs of an EC private key: pyca's ``EllipticCurvePrivateKey`` has it, and so
    does :class:`enclavekit.kms.signing_key.KmsSigningKey` (the key stays in AWS KMS)."""

    @property
    def curve(self) -> ec.EllipticCurve: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(
        self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes: ...


# --- serde_cbor-compatible encoding ---------------------------------------------------------------


def _head(major: int, n: int) -> bytes:
    """A CBOR item head with the shortest length form."""
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    if n < 0x1_0000_0000:
        return bytes([major << 5 | 26]) + n.to_bytes(4, "big")
    return bytes([major << 5 | 27]) + n.to_bytes(8, "big")


_UINT8 = tuple(bytes([b]) if b < 24 else bytes([0x18, b]) for b in range(256))


def encode_byte_vec(data: bytes) -> bytes:
    """serde_cbor's encoding of ``Vec<u8>``: an array of unsigned integers, one per byte."""
    return _head(4, len(data)) + b"".join(_UINT8[b] for b in data)


def _text(s: str) -> bytes:
    raw = s.encode()
    return _head(3, len(raw)) + raw


def _bstr(b: bytes) -> bytes:
    return _head(2, len(b)) + b


def encode_pcr_info(register_index: int, register_value: bytes) -> bytes:
    """serde_cbor of ``PcrInfo {register_index: i32, register_value: Vec<u8>}`` (the signed
    payload)."""
    index = _head(0, register_index) if register_index >= 0 else _head(1, -1 - register_index)
    return (
        b"\xa2"
        + _text("register_index")
        + index
        + _text("register_value")
        + encode_byte_vec(register_value)
    )


@dataclass(frozen=True, slots=True)
class PcrSignature:
    """One element of the signature section: the certificate file as given and a COSE_Sign1."""

    signing_certificate: bytes
    signature: bytes


def encode_signature_section(signatures: Sequence[PcrSignature]) -> bytes:
    """serde_cbor of ``Vec<PcrSignature>`` (nitro-cli always writes exactly one element)."""
    out = [_head(4, len(signatures))]
    for item in signatures:
        out.append(b"\xa2")
        out.append(_text("signing_certificate") + encode_byte_vec(item.signing_certificate))
        out.append(_text("signature") + encode_byte_vec(item.signature))
    return b"".join(out)


def _byte_vec(value: Any, what: str) -> bytes:
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v <= 255 for v in value):
        raise MalformedInput(f"{what}: expected a CBOR array of integers 0..255 (serde Vec<u8>)")
    return bytes(value)


def decode_signature_section(data: bytes) -> tuple[PcrSignature, ...]:
    """Decode a signature section strictly (no trailing bytes, no duplicate or missing keys).

    Byte strings are accepted in place of integer arrays only where upstream accepts them: nowhere,
    so they are refused.
    """
    if len(data) > SIGNATURE_MAX_SIZE:
        raise MalformedInput(
            f"signature section is {len(data)} bytes, more than the {SIGNATURE_MAX_SIZE} bytes "
            "EIFs allow"
        )
    obj = _cbor.loads(data, what="EIF signature section")
    if not isinstance(obj, list) or not obj:
        raise MalformedInput(
            "EIF signature section: expected a non-empty CBOR array of PcrSignature"
        )
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or set(item) != {"signing_certificate", "signature"}:
            raise MalformedInput(
                f"EIF signature section element {i}: expected a map with exactly the keys "
                "'signing_certificate' and 'signature'"
            )
        out.append(
            PcrSignature(
                _byte_vec(item["signing_certificate"], f"signature[{i}].signing_certificate"),
                _byte_vec(item["signature"], f"signature[{i}].signature"),
            )
        )
    return tuple(out)


# --- COSE_Sign1 -----------------------------------------------------------------------------------


def _curve_params(
    key: ec.EllipticCurvePublicKey | EcSigningKey,
) -> tuple[int, Any, int]:
    try:
        return _CURVES[key.curve.name]
    except KeyError:
        raise UsageError(
            f"unsupported EC curve {key.curve.name}; EIF signing keys must be P-256, P-384 or P-521"
        ) from None


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return b"\x84" + _text("Signature1") + _bstr(protected) + _bstr(b"") + _bstr(payload)


def cose_sign1(payload: bytes, private_key: EcSigningKey) -> bytes:
    """An untagged COSE_Sign1 over ``payload`` with an empty unprotected map (as
    aws-nitro-enclaves-cose)."""
    alg, digest, size = _curve_params(private_key)
    protected = b"\xa1\x01" + _head(1, -1 - alg)
    der = private_key.sign(_sig_structure(protected, payload), ec.ECDSA(digest))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return b"\x84" + _bstr(protected) + b"\xa0" + _bstr(payload) + _bstr(signature)


def cose_verify(cose: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Verify an (untagged or tag-18) COSE_Sign1 with ``public_key``; return its payload.

    Raises :class:`EifIntegrityError` for a wrong signature, :class:`MalformedInput` for bad
    structure.
    """
    obj = _cbor.loads(cose, what="COSE_Sign1")
    if isinstance(obj, _cbor.Tagged):
        if obj.tag != 18:
            raise MalformedInput(f"COSE_Sign1: expected tag 18 or no tag, found tag {obj.tag}")
        obj = obj.value
    if not (isinstance(obj, list) and len(obj) == 4):
        raise MalformedInput("COSE_Sign1: expected an array of 4 elements")
    protected, _unprotected, payload, signature = obj
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise MalformedInput(
            "COSE_Sign1: protected header, payload and signature must be byte strings"
        )
    header = _cbor.loads(protected, what="COSE protected header") if protected else {}
    alg = header.get(1) if isinstance(header, dict) else None
    if alg not in _ALGS:
        raise MalformedInput(
            f"COSE_Sign1: unsupported or missing algorithm {alg!r} (ES256/384/512)"
        )
    digest, size = _ALGS[alg]
    key_alg, _, _ = _curve_params(public_key)
    if key_alg != alg:
        raise EifIntegrityError(
            f"the COSE signature claims algorithm {alg} but the certificate key is "
            f"{public_key.curve.name}"
        )
    if len(signature) != 2 * size:
        raise EifIntegrityError(
            f"COSE signature: expected {2 * size} bytes (r || s), found {len(signature)}"
        )
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    try:
        public_key.verify(der, _sig_structure(protected, payload), ec.ECDSA(digest))
    except InvalidSignature:
        raise EifIntegrityError(
            "the EIF signature does not verify with the signing certificate's public key; the "
            "image or "
            "its signature section was altered - re-sign it with sign-eif"
        ) from None
    return bytes(payload)


# --- Signer ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EifSigner:
    """A signing certificate (PEM file bytes, stored as given) and its EC private key (on disk or
    in KMS). The certificate's public key must be the key's: checked here, before anything is
    signed."""

    certificate_pem: bytes
    private_key: EcSigningKey

    def __post_init__(self) -> None:
        cert = load_certificate(self.certificate_pem)
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise UsageError("the signing certificate must hold an EC (P-256/384/521) public key")
        _curve_params(public)
        if public.public_numbers() != self.private_key.public_key().public_numbers():
            raise UsageError(
                f"the private key {_key_name(self.private_key)}does not belong to the signing "
                "certificate (their public keys differ); pass the key the certificate was issued "
                "for, or a certificate issued for that key"
            )

    @classmethod
    def from_files(cls, certificate: str | Path, private_key: str | Path) -> EifSigner:
        """Load a PEM certificate and a PEM (or DER) EC private key, or use the AWS KMS key whose
        key or alias ARN (``arn:aws:kms:…``) is given as ``private_key``."""
        cert_bytes = _read(certificate, "signing certificate")
        if isinstance(private_key, str) and private_key.startswith("arn:"):
            from enclavekit.kms.signing_key import KmsSigningKey

            return cls(cert_bytes, KmsSigningKey(private_key))
        key_bytes = _read(private_key, "private key")
        try:
            if b"-----BEGIN" in key_bytes:
                key = serialization.load_pem_private_key(key_bytes, password=None)
            else:
                key = serialization.load_der_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"cannot load the private key {private_key}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError(
                "the private key must be an EC key (P-256, P-384 or P-521); RSA is refused"
            )
        return cls(cert_bytes, key)

    @property
    def certificate(self) -> x509.Certificate:
        return load_certificate(self.certificate_pem)

    @property
    def pcr8(self) -> bytes:
        return pcr8_of_certificate(self.certificate_pem)

    def signature_section(self, pcr0: bytes) -> bytes:
        """The complete signature section data signing ``pcr0``."""
        if len(pcr0) != PCR_SIZE:
            raise ValueError(f"PCR0 must be {PCR_SIZE} bytes")
        cose = cose_sign1(encode_pcr_info(0, pcr0), self.private_key)
        section = encode_signature_section([PcrSignature(self.certificate_pem, cose)])
        if len(section) > SIGNATURE_MAX_SIZE:
            raise UsageError(
                f"the signature section would be {len(section)} bytes, more than the "
                f"{SIGNATURE_MAX_SIZE} bytes EIFs allow; use a smaller certificate file"
            )
        return section


def _key_name(key: EcSigningKey) -> str:
    """``'<KMS key ARN> '`` for a KMS key, nothing for a key held in memory."""
    key_id = getattr(key, "key_id", None)
    return f"{key_id} " if isinstance(key_id, str) else ""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """The outcome of checking a signature section against an EIF's PCR0 (describe-eif
    semantics)."""

    certificate: x509.Certificate
    pcr8: bytes
    #: The signed payload names PCR0 with the value recomputed from the image.
    signature_check: bool


def check_signature_section(data: bytes | Sequence[PcrSignature], pcr0: bytes) -> SignatureInfo:
    """describe-eif's check: verify the first element's COSE signature (an invalid signature raises
    :class:`EifIntegrityError`), then compare its payload with ``PcrInfo(0, pcr0)``.

    PCR8 is computed from the first element's certificate, as nitro-cli's reader does; further
    elements (nitro-cli never writes any) are decoded but not checked.
    """
    signatures = decode_signature_section(data) if isinstance(data, bytes) else tuple(data)
    if not signatures:
        raise MalformedInput("EIF signature section holds no signature")
    try:
        first = load_certificate(signatures[0].signing_certificate)
    except MalformedInput as exc:
        raise EifIntegrityError(f"EIF signature section: {exc}") from exc
    public = first.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise EifIntegrityError("the EIF signing certificate does not hold an EC public key")
    payload = cose_verify(signatures[0].signature, public)
    return SignatureInfo(first, pcr8_of_certificate(first), payload == encode_pcr_info(0, pcr0))

"""Encoding and signing of emulated attestation documents, byte-shaped like AWS's
(``attestation.md`` §1).

Untagged COSE_Sign1 ``[h'a1013822', {}, payload, signature]``; ES384 with a raw 96-byte r ‖ s
signature (high-S left as produced); the payload map has the 9 keys in AWS's order with ``null`` for
absent optional fields, the ``pcrs`` map and ``cabundle`` array definite, and the top-level map
indefinite (AWS since mid-2025) or definite (older documents).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enclavekit.pki.emulated import SigningCredentials

#: ``{1: -35}``: alg = ES384.
PROTECTED_HEADER = b"\xa1\x01\x38\x22"
_ENCODED_PROTECTED = cbor2.dumps(PROTECTED_HEADER)
_SIG_PREFIX = b"\x84" + cbor2.dumps("Signature1") + _ENCODED_PROTECTED + cbor2.dumps(b"")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KEYS = {
    name: cbor2.dumps(name)
    for name in ("module_id", "digest", "timestamp", "pcrs", "public_key", "user_data", "nonce")
}
_SHA384 = _KEYS["digest"] + cbor2.dumps("SHA384")
_COORDINATE = 48


def timestamp_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch (integer arithmetic, no float rounding)."""
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def encode_pcrs(pcrs: Mapping[int, bytes], *, key: str = "pcrs") -> bytes:
    """The ``"pcrs": {...}`` payload entry (definite map, ascending indices); ``key="nitrotpm_pcrs"`` for
    a NitroTPM-shaped document."""
    return cbor2.dumps(key) + cbor2.dumps({i: bytes(pcrs[i]) for i in sorted(pcrs)})


def encode_payload(
    *,
    encoded_module_id: bytes,
    timestamp: int,
    encoded_pcrs: bytes,
    credentials: SigningCredentials,
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
    indefinite: bool = True,
) -> bytes:
    """The attestation document payload map, from pre-encoded pieces (module id, PCRs, chain)."""
    body = b"".join(
        (
            encoded_module_id,
            _SHA384,
            _KEYS["timestamp"],
            b"\x1b" + timestamp.to_bytes(8, "big"),  # AWS always uses the 8-byte form
            encoded_pcrs,
            credentials.encoded_chain,
            _KEYS["public_key"],
            cbor2.dumps(public_key),
            _KEYS["user_data"],
            cbor2.dumps(user_data),
            _KEYS["nonce"],
            cbor2.dumps(nonce),
        )
    )
    return b"\xbf" + body + b"\xff" if indefinite else b"\xa9" + body


def encode_module_id(module_id: str) -> bytes:
    """The ``"module_id": "..."`` payload entry."""
    return _KEYS["module_id"] + cbor2.dumps(module_id)


def sign_document(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Wrap ``payload`` in an untagged COSE_Sign1 signed with ES384 (raw r ‖ s, no low-S
    normalisation).
    """
    encoded_payload = cbor2.dumps(payload)
    to_be_signed = _SIG_PREFIX + encoded_payload
    r, s = decode_dss_signature(key.sign(to_be_signed, ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(_COORDINATE, "big") + s.to_bytes(_COORDINATE, "big")
    return b"\x84" + _ENCODED_PROTECTED + b"\xa0" + encoded_payload + cbor2.dumps(signature)

"""Decoding of Nitro attestation documents (COSE_Sign1 + CBOR payload). Nothing here is verified.

:meth:`AttestationDocument.from_cbor` enforces the structure of attestation spec §1.1–1.4 and §3.2 steps 1–4:

- envelope: untagged or tag 18 only; an array of exactly 4; protected/payload/signature byte strings,
  unprotected a map; protected header exactly ``{1: -35}`` (ES384) with both numbers CBOR integers
  (``{true: -35}``, ``{1.0: -35}`` are refused); signature exactly 96 bytes (r ‖ s);
- payload: a map, definite or indefinite length; no duplicate keys; no trailing bytes; unknown keys ignored
  whatever well-formed value they carry;
- the 9 fields typed (CBOR type and value, never Python equality) and bounded: module_id non-empty text;
  digest exactly the text ``"SHA384"``; timestamp > 0 (ms); ``pcrs`` (Nitro Enclaves) or ``nitrotpm_pcrs``
  (NitroTPM), exactly one of them, 1..32 entries, integer index 0..31, values of 32/48/64 bytes; certificate
  and every cabundle entry 1..1024 bytes; cabundle non-empty; public_key, user_data, nonce ``null`` or byte
  strings small enough to fit together in one NSM Attestation request (:data:`MAX_NSM_REQUEST` bytes, the
  only limit the NSM enforces).

The document's *kind* (:class:`DocumentKind`) is the PCR map it carries; :attr:`AttestationDocument.pcrs` holds
only enclave PCRs (empty for a NitroTPM document) and :attr:`AttestationDocument.nitrotpm_pcrs` only NitroTPM
PCRs, so code that reads ``pcrs`` can never mistake a TPM's PCR for an enclave's. Decoding does not refuse a
NitroTPM document or one whose module id contradicts its PCR map (``inspect`` shows them); the verifier does.

Not checked here: signatures, the certificate chain, validity times, or whether the DER certificates parse.
That is :mod:`enclavekit.attestation.verifier`'s job.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from enclavekit import _cbor
from enclavekit.errors import MalformedInput

#: NSM responses are at most 12288 bytes (nsm spec); real documents are 4.4-5 KB. Cap before decoding.
MAX_DOCUMENT_SIZE = 16 * 1024
#: AWS CDDL: payload bstr 1..16384 bytes.
MAX_PAYLOAD_SIZE = 16 * 1024
#: AWS CDDL: certificates are 1..1024 bytes each.
MAX_CERT_SIZE = 1024
#: Chains longer than this are refused (real chains have 4 CA certificates; Sui caps at 10).
MAX_CABUNDLE = 10
#: The NSM refuses requests larger than this (InputTooLarge; = ``nsm.messages.MAX_REQUEST_SIZE``). It is the
#: only limit on user_data, nonce and public_key: AWS's CDDL says 1024 bytes, but the NSM signs more (a
#: 1025-byte nonce was accepted, hf/nitrite#3). A document is refused only when its three fields cannot
#: fit in any Attestation request the NSM accepts (see :func:`smallest_attestation_request`).
MAX_NSM_REQUEST = 0x1000
#: module_id is 39 characters on real documents; a generous cap bounds what we store and print.
MAX_MODULE_ID = 256
#: The last millisecond of year 9999: later timestamps cannot be represented (and are not real).
MAX_TIMESTAMP_MS = 253_402_300_799_999
PCR_COUNT = 32
PCR_LENGTHS = frozenset({32, 48, 64})
COSE_TAG = 18
PROTECTED_ES384 = {1: -35}
PROTECTED_ES384_BYTES = b"\xa1\x01\x38\x22"
SIGNATURE_SIZE = 96
#: The text keys of an NSM Attestation request (serde field names) and the request's fixed part: a one-entry
#: map ``{"Attestation": {...}}`` whose inner map has at most 3 entries (1-byte headers).
_REQUEST_FIELDS = {"user_data": 10, "nonce": 6, "public_key": 11}  # encoded key: 1 header + name
_REQUEST_FIXED = 1 + 12 + 1  # map(1), "Attestation" (1 + 11), inner map(≤3)


class DocumentKind(enum.Enum):
    """Which AWS module signed the document, by the PCR map it carries."""

    #: A Nitro Enclave's NSM: ``pcrs``, module id ``i-…-enc…``.
    ENCLAVE = "enclave"
    #: An EC2 instance's NitroTPM: ``nitrotpm_pcrs``, module id ``i-…-tpm…``. Its PCRs are the TPM's, which
    #: the instance's operating system extends and resets at will: they are not enclave measurements.
    NITROTPM = "nitrotpm"


_MANDATORY = ("module_id", "digest", "timestamp", "certificate", "cabundle")
_HEX_RE = re.compile(rb"\A[0-9a-fA-F\s]+\Z")
_B64_RE = re.compile(rb"\A[A-Za-z0-9+/=_\-\s]+\Z")


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """A structurally valid, **unverified** attestation document."""

    module_id: str
    digest: str
    timestamp_ms: int
    #: Enclave PCRs (``pcrs``); empty for a NitroTPM document.
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    #: True when anything marks the document as NitroTPM: a ``nitrotpm_pcrs`` map or a ``-tpm`` module id.
    is_nitrotpm: bool
    #: The wire bytes the COSE signature covers, kept exactly as received (never re-encoded).
    protected: bytes
    payload: bytes
    signature: bytes
    tagged: bool
    #: The PCR map the payload carries; decides :attr:`kind`.
    kind: DocumentKind = DocumentKind.ENCLAVE
    #: NitroTPM PCRs (``nitrotpm_pcrs``); empty for an enclave document.
    nitrotpm_pcrs: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def module_id_kind(self) -> DocumentKind | None:
        """The kind the module id names (a ``-enc…`` or ``-tpm…`` part after the first), or None.

        Every ``-``-separated part after the first is looked at, so an id naming both kinds is reported as
        inconsistent by :attr:`kind_inconsistency` rather than read by its first match."""
        return _module_id_kinds(self.module_id)[0]

    @property
    def kind_inconsistency(self) -> str | None:
        """Why the module id contradicts the PCR map, or None when they agree (or the id names no kind)."""
        named, both = _module_id_kinds(self.module_id)
        map_key = "nitrotpm_pcrs" if self.kind is DocumentKind.NITROTPM else "pcrs"
        if both:
            return (
                f"module_id {self.module_id!r} names both an enclave (-enc) and a NitroTPM (-tpm)"
            )
        if named is not None and named is not self.kind:
            suffix = "-tpm" if named is DocumentKind.NITROTPM else "-enc"
            return (
                f"module_id {self.module_id!r} says {suffix} ({named.value}) but the payload carries "
                f"{map_key!r} ({self.kind.value})"
            )
        return None

    @property
    def timestamp(self) -> datetime:
        """The document's own creation time (UTC)."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    @property
    def is_debug(self) -> bool:
        """True when PCR0, PCR1 and PCR2 are all zero: the enclave runs in debug mode (spec §1.7)."""
        image = [self.pcrs.get(i) for i in (0, 1, 2)]
        return all(v is not None and not any(v) for v in image)

    @property
    def instance_id(self) -> str | None:
        """The parent EC2 instance id (the part of module_id before ``-enc``/``-tpm``), if recognisable."""
        match = re.match(r"^(i-[0-9a-f]+)-(?:enc|tpm)[0-9a-f]+$", self.module_id)
        return match.group(1) if match else None

    def sig_structure(self) -> bytes:
        """The exact bytes the ES384 signature covers (attestation spec §1.2)."""
        return _encode_sig_structure(self.protected, self.payload)

    @classmethod
    def from_cbor(cls, data: bytes) -> AttestationDocument:
        """Decode a COSE_Sign1 attestation document; raise :class:`MalformedInput` on any deviation."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise MalformedInput("attestation document is empty; expected a COSE_Sign1 CBOR array")
        if len(data) > MAX_DOCUMENT_SIZE:
            raise MalformedInput(
                f"attestation document is {len(data)} bytes; expected at most {MAX_DOCUMENT_SIZE} "
                "(NSM documents are under 12288 bytes)"
            )
        # 1. Envelope.
        outer = _cbor.loads(data, what="COSE_Sign1 envelope")
        tagged = False
        if isinstance(outer, _cbor.Tagged):
            if outer.tag != COSE_TAG:
                raise MalformedInput(
                    f"COSE envelope has CBOR tag {outer.tag}; expected no tag or tag 18 (COSE_Sign1)"
                )
            outer, tagged = outer.value, True
        if not isinstance(outer, list) or len(outer) != 4:
            found = f"an array of {len(outer)}" if isinstance(outer, list) else _kind(outer)
            raise MalformedInput(f"COSE_Sign1 must be an array of 4 items; found {found}")
        protected, unprotected, payload, signature = outer
        _require(isinstance(protected, bytes), "COSE protected header", "a byte string", protected)
        _require(isinstance(unprotected, dict), "COSE unprotected header", "a map", unprotected)
        _require(isinstance(payload, bytes), "COSE payload", "a byte string", payload)
        _require(isinstance(signature, bytes), "COSE signature", "a byte string", signature)
        # 2. Protected header: exactly ES384. An all-zero signature is an unsigned document (QEMU's
        #    nitro-enclave NSM emits alg -1, 64 zero bytes of signature and certificate): say so.
        if isinstance(signature, bytes) and signature and not any(signature):
            raise MalformedInput(
                f"attestation document is unsigned: its COSE signature is {len(signature)} zero bytes; "
                "expected an ES384 signature by an NSM certificate. Emulators such as QEMU's "
                "nitro-enclave machine produce such documents; they prove nothing about an enclave"
            )
        header = (
            PROTECTED_ES384
            if protected == PROTECTED_ES384_BYTES
            else _cbor.loads(protected, what="COSE protected header")
        )
        if not _is_es384_header(header):
            raise MalformedInput(
                f"COSE protected header must be exactly {{1: -35}} (alg ES384); found {header!r}"
            )
        if len(signature) != SIGNATURE_SIZE:
            raise MalformedInput(
                f"COSE signature is {len(signature)} bytes; expected 96 (ES384 r ‖ s, 48 bytes each)"
            )
        if not 1 <= len(payload) <= MAX_PAYLOAD_SIZE:
            raise MalformedInput(f"payload is {len(payload)} bytes; expected 1..{MAX_PAYLOAD_SIZE}")
        # 3. Payload map.
        body = _cbor.loads(payload, what="attestation payload")
        if not isinstance(body, dict):
            raise MalformedInput(f"attestation payload must be a map; found {_kind(body)}")
        return cls._from_payload(body, protected, payload, signature, tagged)

    @classmethod
    def _from_payload(
        cls, body: dict[Any, Any], protected: bytes, payload: bytes, signature: bytes, tagged: bool
    ) -> AttestationDocument:
        for key in _MANDATORY:
            if body.get(key) is None:
                raise MalformedInput(f"attestation payload lacks the mandatory field {key!r}")
        has_pcrs, has_tpm = body.get("pcrs") is not None, body.get("nitrotpm_pcrs") is not None
        if has_pcrs == has_tpm:
            raise MalformedInput(
                "attestation payload must carry exactly one of 'pcrs' (Nitro Enclaves) and "
                f"'nitrotpm_pcrs' (NitroTPM); found {'both' if has_pcrs else 'neither'}"
            )
        module_id = body["module_id"]
        _require(isinstance(module_id, str), "module_id", "a text string", module_id)
        if not 1 <= len(module_id) <= MAX_MODULE_ID:
            raise MalformedInput(
                f"module_id has {len(module_id)} characters; expected 1..{MAX_MODULE_ID}"
            )
        digest = body["digest"]
        if type(digest) is not str or digest != "SHA384":
            raise MalformedInput(f"digest must be 'SHA384'; found {digest!r}")
        timestamp = body["timestamp"]
        if (
            not isinstance(timestamp, int)
            or isinstance(timestamp, bool)
            or not 0 < timestamp < 2**64
        ):
            raise MalformedInput(f"timestamp must be a positive integer (ms); found {timestamp!r}")
        if timestamp > MAX_TIMESTAMP_MS:
            raise MalformedInput(
                f"timestamp {timestamp} ms is after 9999-12-31; expected milliseconds since 1970"
            )
        pcr_key = "pcrs" if has_pcrs else "nitrotpm_pcrs"
        pcrs = _pcrs(body[pcr_key], pcr_key)
        kind = DocumentKind.ENCLAVE if has_pcrs else DocumentKind.NITROTPM
        named, names_both = _module_id_kinds(module_id)
        certificate = _bytes_field(body["certificate"], "certificate", 1, MAX_CERT_SIZE)
        cabundle_raw = body["cabundle"]
        _require(isinstance(cabundle_raw, list), "cabundle", "an array", cabundle_raw)
        if not 1 <= len(cabundle_raw) <= MAX_CABUNDLE:
            raise MalformedInput(
                f"cabundle has {len(cabundle_raw)} certificates; expected 1..{MAX_CABUNDLE}"
            )
        cabundle = tuple(
            _bytes_field(c, f"cabundle[{i}]", 1, MAX_CERT_SIZE) for i, c in enumerate(cabundle_raw)
        )
        optional = {
            key: _optional(body.get(key), key) for key in ("public_key", "user_data", "nonce")
        }
        request = smallest_attestation_request(**optional)
        if request > MAX_NSM_REQUEST:
            sizes = ", ".join(f"{k} {'null' if v is None else len(v)}" for k, v in optional.items())
            raise MalformedInput(
                f"public_key, user_data and nonce ({sizes} bytes) need an NSM Attestation request of "
                f"at least {request} bytes; the NSM refuses requests over {MAX_NSM_REQUEST} bytes "
                "(InputTooLarge), so no NSM signed this document"
            )
        return cls(
            module_id=module_id,
            digest=digest,
            timestamp_ms=timestamp,
            pcrs=pcrs if kind is DocumentKind.ENCLAVE else _NO_PCRS,
            nitrotpm_pcrs=pcrs if kind is DocumentKind.NITROTPM else _NO_PCRS,
            kind=kind,
            certificate=certificate,
            cabundle=cabundle,
            public_key=optional["public_key"],
            user_data=optional["user_data"],
            nonce=optional["nonce"],
            is_nitrotpm=has_tpm or named is DocumentKind.NITROTPM or names_both,
            protected=protected,
            payload=payload,
            signature=signature,
            tagged=tagged,
        )


def read_document_bytes(data: bytes) -> bytes:
    """Accept raw CBOR, hex text or base64 text (as documents are often passed around); return raw bytes.

    Raw COSE starts with 0x84 (array of 4) or 0xd2 (tag 18), neither of which is printable ASCII, so the
    detection is unambiguous.
    """
    stripped = data.strip()
    if not stripped or stripped[0] in (0x84, 0xD2):
        return data
    if _HEX_RE.match(stripped):
        try:
            return binascii.unhexlify(b"".join(stripped.split()))
        except (binascii.Error, ValueError):
            pass
    if _B64_RE.match(stripped):
        compact = b"".join(stripped.split())
        try:
            if b"-" in compact or b"_" in compact:
                return base64.urlsafe_b64decode(compact + b"=" * (-len(compact) % 4))
            return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise MalformedInput(
        "input is neither raw CBOR (a COSE_Sign1 starting 0x84 or 0xd2), hex, nor base64 text"
    )


def _encode_sig_structure(protected: bytes, payload: bytes) -> bytes:
    # ["Signature1", protected, h'', payload] as a definite-length array (RFC 8152 §4.4).
    return (
        b"".join(
            (b"\x84\x6aSignature1", _bstr_head(len(protected)), protected, b"\x40"),
        )
        + _bstr_head(len(payload))
        + payload
    )


def _bstr_head(length: int) -> bytes:
    if length < 24:
        return bytes([0x40 | length])
    if length < 0x100:
        return bytes([0x58, length])
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big")
    return b"\x5a" + length.to_bytes(4, "big")


def _kind(value: object) -> str:
    names: dict[type, str] = {
        bytes: "a byte string",
        str: "a text string",
        list: "an array",
        dict: "a map",
    }
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    return names.get(type(value), type(value).__name__)


def _require(ok: bool, field: str, expected: str, value: object) -> None:
    if not ok:
        raise MalformedInput(f"{field} must be {expected}; found {_kind(value)}")


def _bytes_field(value: object, field: str, low: int, high: int) -> bytes:
    _require(isinstance(value, bytes), field, "a byte string", value)
    assert isinstance(value, bytes)
    if not low <= len(value) <= high:
        raise MalformedInput(f"{field} is {len(value)} bytes; expected {low}..{high}")
    return value


def _optional(value: object, field: str) -> bytes | None:
    if value is None:
        return None
    return _bytes_field(value, field, 0, MAX_NSM_REQUEST)


def smallest_attestation_request(
    public_key: bytes | None, user_data: bytes | None, nonce: bytes | None
) -> int:
    """The size of the smallest NSM Attestation request that yields these fields.

    That request omits absent fields (serde reads a missing field as ``None``) and uses minimal CBOR heads:
    ``{"Attestation": {"user_data": h'…', …}}``. The NSM signs any request up to :data:`MAX_NSM_REQUEST`
    bytes, so a document whose fields need more was not signed by an NSM."""
    size = _REQUEST_FIXED
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None:
            size += _REQUEST_FIELDS[name] + len(_bstr_head(len(value))) + len(value)
    return size


def _is_es384_header(header: object) -> bool:
    """Exactly ``{1: -35}``, both CBOR integers (Python's ``True == 1 == 1.0`` must not pass)."""
    if type(header) is not dict or len(header) != 1:
        return False
    ((key, value),) = header.items()
    return type(key) is int and key == 1 and type(value) is int and value == -35


def _module_id_kinds(module_id: str) -> tuple[DocumentKind | None, bool]:
    """(the kind the module id names, whether it names both). Parts after the first ``-`` are looked at:
    ``enc…`` names an enclave, ``tpm…`` a NitroTPM (AWS: ``i-<hex>-enc<hex>`` / ``i-<hex>-tpm<hex>``)."""
    named = {
        kind
        for part in module_id.split("-")[1:]
        for prefix, kind in (("enc", DocumentKind.ENCLAVE), ("tpm", DocumentKind.NITROTPM))
        if part.startswith(prefix)
    }
    if len(named) == 2:
        return None, True
    return (named.pop() if named else None), False


_NO_PCRS: Mapping[int, bytes] = MappingProxyType({})


def _pcrs(value: object, field: str) -> Mapping[int, bytes]:
    _require(isinstance(value, dict), field, "a map", value)
    assert isinstance(value, dict)
    if not 1 <= len(value) <= PCR_COUNT:
        raise MalformedInput(f"{field} has {len(value)} entries; expected 1..{PCR_COUNT}")
    for index, digest in value.items():
        if type(index) is not int or not 0 <= index < PCR_COUNT:
            raise MalformedInput(f"{field} index {index!r} is invalid; expected an integer 0..31")
        if type(digest) is not bytes:
            raise MalformedInput(f"{field}[{index}] must be a byte string; found {_kind(digest)}")
        if len(digest) not in PCR_LENGTHS:
            raise MalformedInput(
                f"{field}[{index}] is {len(digest)} bytes; expected 32, 48 or 64 bytes"
            )
    return MappingProxyType(dict(sorted(value.items())))

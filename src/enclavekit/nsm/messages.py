"""NSM request and response messages and their exact CBOR encodings.

The NSM speaks serde's externally tagged enums in CBOR (``nsm.md`` §3): a unit variant is a bare
text string (``"DescribeNSM"``), a struct variant is a one-entry map ``{"Name": {field: value,
...}}`` with the fields in declaration order, and an error is ``{"Error": "<ErrorCode>"}``.
:func:`encode_request` and :func:`encode_response` produce exactly the bytes the Rust reference
implementation produces.

Decoding uses the strict decoder of :mod:`enclavekit._cbor` (no duplicate keys, no trailing bytes).
Requests are decoded with serde's tolerance (missing attestation fields mean ``None``, field order
is free, unknown fields are ignored); anything else that does not fit one of the seven requests is
:class:`UnknownRequest`, which an NSM answers with ``InvalidOperation``. What is *not* checked here:
PCR index ranges (``InvalidIndex`` is the NSM's decision) and the contents of ``public_key``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import cbor2

from enclavekit._cbor import loads
from enclavekit.errors import MalformedInput

#: The kernel driver refuses requests larger than this (``NSM_REQUEST_MAX_SIZE``); the NSM says
#: InputTooLarge.
MAX_REQUEST_SIZE = 0x1000
#: The driver hands the device a response buffer of this size (``NSM_RESPONSE_MAX_SIZE``).
MAX_RESPONSE_SIZE = 0x3000
#: The NSM has 32 PCRs; 0-15 are locked at boot, 16-31 belong to the application.
MAX_PCRS = 32
#: Every PCR is a SHA-384 value.
PCR_LENGTH = 48
#: GetRandom returns this many bytes (QEMU's model; nsm-lib documents "up to 256").
RANDOM_LENGTH = 256
_U16_MAX = 0xFFFF


class ErrorCode(enum.Enum):
    """NSM error codes: the value is the wire name; :attr:`c_value` is the nsm-lib C ABI number."""

    SUCCESS = "Success"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"

    @property
    def c_value(self) -> int:
        """The number of this code in the C ABI (``#[repr(C)]`` declaration order)."""
        return list(ErrorCode).index(self)


# -- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DescribePcr:
    """Read one PCR and its lock state."""

    index: int


@dataclass(frozen=True, slots=True)
class ExtendPcr:
    """``pcr = SHA-384(pcr || data)``; the NSM answers with the new value."""

    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LockPcr:
    """Lock one PCR for the rest of the enclave's life."""

    index: int


@dataclass(frozen=True, slots=True)
class LockPcrs:
    """Lock PCRs ``[0, range)``; already locked ones are not an error."""

    range: int


@dataclass(frozen=True, slots=True)
class DescribeNsm:
    """Ask for the module's version, id and PCR layout."""


@dataclass(frozen=True, slots=True)
class Attestation:
    """Ask for a signed attestation document; ``None`` fields become ``null`` in the document."""

    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetRandom:
    """Ask for random bytes from the NSM."""


@dataclass(frozen=True, slots=True)
class UnknownRequest:
    """A well-formed CBOR item that is not one of the seven requests (answered with
    InvalidOperation).
    """

    reason: str


Request: TypeAlias = (
    DescribePcr | ExtendPcr | LockPcr | LockPcrs | DescribeNsm | Attestation | GetRandom
)

# -- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcrDescription:
    """Answer to DescribePCR."""

    lock: bool
    data: bytes

    def __iter__(self) -> Iterator[bool | bytes]:
        """Unpack as ``locked, value = nsm.describe_pcr(i)``."""
        return iter((self.lock, self.data))


@dataclass(frozen=True, slots=True)
class PcrExtended:
    """Answer to ExtendPCR: the PCR's new value."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PcrLocked:
    """Answer to LockPCR (the bare string ``"LockPCR"`` on the wire)."""


@dataclass(frozen=True, slots=True)
class PcrsLocked:
    """Answer to LockPCRs (the bare string ``"LockPCRs"`` on the wire)."""


@dataclass(frozen=True, slots=True)
class NsmDescription:
    """Answer to DescribeNSM."""

    version_major: int
    version_minor: int
    version_patch: int
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """Answer to Attestation: the raw COSE_Sign1 document (not decoded, not verified)."""

    document: bytes


@dataclass(frozen=True, slots=True)
class RandomBytes:
    """Answer to GetRandom."""

    random: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The NSM refused the request."""

    code: ErrorCode


Response: TypeAlias = (
    PcrDescription
    | PcrExtended
    | PcrLocked
    | PcrsLocked
    | NsmDescription
    | AttestationDocument
    | RandomBytes
    | ErrorResponse
)

# -- encoding ----------------------------------------------------------------------------------


def _request_obj(request: Request) -> Any:
    match request:
        case DescribePcr(index):
            return {"DescribePCR": {"index": index}}
        case ExtendPcr(index, data):
            return {"ExtendPCR": {"index": index, "data": bytes(data)}}
        case LockPcr(index):
            return {"LockPCR": {"index": index}}
        case LockPcrs(range_):
            return {"LockPCRs": {"range": range_}}
        case DescribeNsm():
            return "DescribeNSM"
        case Attestation(user_data, nonce, public_key):
            return {
                "Attestation": {
                    "user_data": _opt_bytes(user_data),
                    "nonce": _opt_bytes(nonce),
                    "public_key": _opt_bytes(public_key),
                }
            }
        case GetRandom():
            return "GetRandom"
    raise TypeError(f"not an NSM request: {request!r}")


def _opt_bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


def encode_request(request: Request) -> bytes:
    """The CBOR bytes serde would send for ``request`` (``nsm.md`` §3.1).

    Raises ``ValueError`` for an index or range that does not fit the wire type ``u16``.
    """
    for name in ("index", "range"):
        value = getattr(request, name, None)
        if value is not None and not 0 <= value <= _U16_MAX:
            raise ValueError(f"PCR {name} must be 0..65535, got {value}")
    out: bytes = cbor2.dumps(_request_obj(request))
    return out


def encode_response(response: Response) -> bytes:
    """The CBOR bytes the NSM sends for ``response`` (``nsm.md`` §3.2)."""
    obj: Any
    match response:
        case PcrDescription(lock, data):
            obj = {"DescribePCR": {"lock": lock, "data": bytes(data)}}
        case PcrExtended(data):
            obj = {"ExtendPCR": {"data": bytes(data)}}
        case PcrLocked():
            obj = "LockPCR"
        case PcrsLocked():
            obj = "LockPCRs"
        case NsmDescription():
            obj = {
                "DescribeNSM": {
                    "version_major": response.version_major,
                    "version_minor": response.version_minor,
                    "version_patch": response.version_patch,
                    "module_id": response.module_id,
                    "max_pcrs": response.max_pcrs,
                    "locked_pcrs": sorted(response.locked_pcrs),
                    "digest": response.digest,
                }
            }
        case AttestationDocument(document):
            obj = {"Attestation": {"document": bytes(document)}}
        case RandomBytes(random):
            obj = {"GetRandom": {"random": bytes(random)}}
        case ErrorResponse(code):
            obj = {"Error": code.value}
        case _:
            raise TypeError(f"not an NSM response: {response!r}")
    out: bytes = cbor2.dumps(obj)
    return out


# -- decoding ----------------------------------------------------------------------------------

_UNIT_REQUESTS: dict[str, Request] = {"DescribeNSM": DescribeNsm(), "GetRandom": GetRandom()}


def decode_request(raw: bytes) -> Request | UnknownRequest:
    """Decode a request the way a serde-based NSM does.

    Raises :class:`MalformedInput` for bytes that are not one CBOR item; returns
    :class:`UnknownRequest` for a CBOR item that is not a request. The size limit (InputTooLarge) is
    the caller's job.
    """
    obj = loads(raw, what="NSM request")
    if isinstance(obj, str):
        unit = _UNIT_REQUESTS.get(obj)
        return unit if unit is not None else UnknownRequest(f"unknown unit request {obj!r}")
    if not isinstance(obj, dict) or len(obj) != 1:
        return UnknownRequest("a request is a text string or a map with exactly one entry")
    ((name, body),) = obj.items()
    if name in _UNIT_REQUESTS:
        return UnknownRequest(f"{name!r} takes no fields")
    if not isinstance(body, dict):
        return UnknownRequest(f"the body of {name!r} must be a map")
    try:
        if name == "DescribePCR":
            return DescribePcr(_u16(body, "index"))
        if name == "ExtendPCR":
            return ExtendPcr(_u16(body, "index"), _field_bytes(body, "data", optional=False) or b"")
        if name == "LockPCR":
            return LockPcr(_u16(body, "index"))
        if name == "LockPCRs":
            return LockPcrs(_u16(body, "range"))
        if name == "Attestation":
            return Attestation(
                user_data=_field_bytes(body, "user_data", optional=True),
                nonce=_field_bytes(body, "nonce", optional=True),
                public_key=_field_bytes(body, "public_key", optional=True),
            )
    except _BadField as exc:
        return UnknownRequest(f"{name}: {exc}")
    return UnknownRequest(f"unknown request {name!r}")


class _BadField(Exception):
    pass


def _u16(body: dict[Any, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U16_MAX:
        raise _BadField(f"field {name!r} must be an unsigned 16-bit integer, found {value!r}")
    return value


def _field_bytes(body: dict[Any, Any], name: str, *, optional: bool) -> bytes | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # serde_bytes' ByteBuf also accepts a text string
        return value.encode("utf-8")
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return bytes(value)  # ... and a sequence of small integers
    raise _BadField(f"field {name!r} must be a byte string, found {type(value).__name__}")


def decode_response(raw: bytes) -> Response:
    """Decode an NSM response; raise :class:`MalformedInput` for anything that is not one.

    The result is not matched against the request here (that is
    :class:`~enclavekit.nsm.client.Nsm`'s job).
    """
    obj = loads(raw, what="NSM response")
    if obj == "LockPCR":
        return PcrLocked()
    if obj == "LockPCRs":
        return PcrsLocked()
    if not isinstance(obj, dict) or len(obj) != 1:
        raise MalformedInput(
            f"NSM response: expected a map with one entry or a unit string, found {_kind(obj)}"
        )
    ((name, body),) = obj.items()
    if name == "Error":
        try:
            return ErrorResponse(ErrorCode(body))
        except ValueError:
            raise MalformedInput(f"NSM response: unknown error code {body!r}") from None
    if not isinstance(body, dict):
        raise MalformedInput(f"NSM response {name!r}: expected a map body, found {_kind(body)}")
    try:
        if name == "DescribePCR":
            return PcrDescription(_get(body, "lock", bool), _get(body, "data", bytes))
        if name == "ExtendPCR":
            return PcrExtended(_get(body, "data", bytes))
        if name == "Attestation":
            return AttestationDocument(_get(body, "document", bytes))
        if name == "GetRandom":
            return RandomBytes(_get(body, "random", bytes))
        if name == "DescribeNSM":
            locked = _get(body, "locked_pcrs", list)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in locked):
                raise _BadField("locked_pcrs must be a list of integers")
            return NsmDescription(
                version_major=_get(body, "version_major", int),
                version_minor=_get(body, "version_minor", int),
                version_patch=_get(body, "version_patch", int),
                module_id=_get(body, "module_id", str),
                max_pcrs=_get(body, "max_pcrs", int),
                locked_pcrs=tuple(locked),
                digest=_get(body, "digest", str),
            )
    except _BadField as exc:
        raise MalformedInput(f"NSM response {name!r}: {exc}") from None
    raise MalformedInput(f"NSM response: unknown response {name!r}")


def _get(body: dict[Any, Any], name: str, kind: type[Any]) -> Any:
    value = body.get(name)
    if kind is int and isinstance(value, bool):
        raise _BadField(f"field {name!r} must be an integer, found a boolean")
    if not isinstance(value, kind):
        raise _BadField(f"field {name!r} must be {kind.__name__}, found {_kind(value)}")
    return value


def _kind(obj: Any) -> str:
    return "null" if obj is None else type(obj).__name__


#: The request each response answers (used to detect InvalidResponse).
RESPONSE_FOR: dict[type[Any], type[Any]] = {
    DescribePcr: PcrDescription,
    ExtendPcr: PcrExtended,
    LockPcr: PcrLocked,
    LockPcrs: PcrsLocked,
    DescribeNsm: NsmDescription,
    Attestation: AttestationDocument,
    GetRandom: RandomBytes,
}

"""The NSM client: one API over the real device, an emulator over a socket, or an emulator in this
process.

:meth:`Nsm.open` picks the backend: ``$ENCLAVEKIT_NSM`` (``unix:///path`` or ``tcp://host:port``, an
``enclavekit nsm serve`` emulator) if set, else ``/dev/nsm`` if it exists, else a
:class:`UsageError` that says how to get one. Every backend exchanges the same CBOR request/response
bytes (``nsm.md`` §3).

The client sends exactly what serde sends, refuses requests over 4096 bytes locally (InputTooLarge,
like the Rust driver), turns ``{"Error": ...}`` answers into :class:`NsmError` with the NSM's code,
and a response that does not match the request into ``InvalidResponse``. It does *not* verify
attestation documents: hand them to :mod:`enclavekit.attestation`.
"""

from __future__ import annotations

import os
import socket
import threading
from types import TracebackType
from typing import Protocol, TypeVar

from enclavekit.errors import MalformedInput, NsmError, UsageError
from enclavekit.nsm import _wire
from enclavekit.nsm.device import DEVICE_PATH, DeviceTransport
from enclavekit.nsm.emulator import NsmEmulator
from enclavekit.nsm.messages import (
    MAX_REQUEST_SIZE,
    RESPONSE_FOR,
    Attestation,
    AttestationDocument,
    DescribeNsm,
    DescribePcr,
    ErrorCode,
    ErrorResponse,
    ExtendPcr,
    GetRandom,
    LockPcr,
    LockPcrs,
    NsmDescription,
    PcrDescription,
    PcrExtended,
    RandomBytes,
    Request,
    Response,
    decode_response,
    encode_request,
)

#: The environment variable that points clients at an emulator.
ENV_VAR = "ENCLAVEKIT_NSM"

_R = TypeVar("_R")

_ERROR_HINTS = {
    ErrorCode.INVALID_INDEX: "PCR indices are 0..31 and a LockPCRs range at most 32",
    ErrorCode.READ_ONLY_INDEX: "the PCR is locked (PCR0-15 always are); locked PCRs cannot change",
    ErrorCode.INVALID_OPERATION: "the NSM did not recognise the request",
    ErrorCode.INPUT_TOO_LARGE: f"the encoded request must be at most {MAX_REQUEST_SIZE} bytes",
}


def _describe(request: Request) -> str:
    for name in ("index", "range"):
        if hasattr(request, name):
            return f"{type(request).__name__}({name}={getattr(request, name)})"
    return type(request).__name__


class Transport(Protocol):
    """Carries one CBOR request to an NSM and brings back its CBOR response."""

    def exchange(self, request: bytes) -> bytes: ...

    def close(self) -> None: ...


class InProcessTransport:
    """Calls an :class:`NsmEmulator` directly (no socket, no copy of the state)."""

    def __init__(self, emulator: NsmEmulator) -> None:
        self.emulator = emulator

    def exchange(self, request: bytes) -> bytes:
        return self.emulator.handle_bytes(request)

    def close(self) -> None:
        pass


class SocketTransport:
    """Talks to ``enclavekit nsm serve`` over a unix or TCP socket (length-prefixed frames, see
    ``_wire``).

    Connects on first use. After a lost connection the failed request is reported, never resent
    (ExtendPCR is not idempotent), and the next request reconnects. One request at a time per
    transport (a lock); open several clients for parallelism.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self._family, self._address = _wire.parse_address(url)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        family = socket.AF_UNIX if self._family == "unix" else socket.AF_INET
        if self._family == "tcp":
            assert isinstance(self._address, tuple)
            try:
                return socket.create_connection(self._address, timeout=self._timeout)
            except OSError as exc:
                raise self._unreachable(exc) from None
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self._address)
        except OSError as exc:
            sock.close()
            raise self._unreachable(exc) from None
        return sock

    def _unreachable(self, exc: OSError) -> NsmError:
        return NsmError(
            ErrorCode.INTERNAL_ERROR.value,
            f"cannot reach the NSM emulator at {self.url} ({exc.strerror or exc}); start one with "
            f"`enclavekit nsm serve --listen {self.url}` or fix {ENV_VAR}",
        )

    def exchange(self, request: bytes) -> bytes:
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            try:
                return self._roundtrip(self._sock, request)
            except (OSError, _Closed) as exc:
                # Never resend: the emulator may have executed the request (ExtendPCR is not
                # idempotent). The next call opens a new connection.
                self._drop()
                raise NsmError(
                    ErrorCode.INTERNAL_ERROR.value,
                    f"lost the connection to the NSM emulator at {self.url} ({exc}); the request "
                    "may or may not have been executed",
                ) from None

    @staticmethod
    def _roundtrip(sock: socket.socket, request: bytes) -> bytes:
        sock.sendall(_wire.HEADER.pack(len(request)) + request)
        (length,) = _wire.HEADER.unpack(_recv_exactly(sock, _wire.HEADER.size))
        if length > _wire.MAX_FRAME:
            raise _Closed(f"response frame of {length} bytes exceeds {_wire.MAX_FRAME}")
        return _recv_exactly(sock, length)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class _Closed(Exception):
    pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise _Closed(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


class Nsm:
    """A client for an NSM; use :meth:`open`, :meth:`in_process`, :meth:`connect` or :meth:`device`.

    Methods raise :class:`NsmError` (``.code`` = the NSM's error name) when the NSM refuses a
    request. Usable as a context manager.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    # -- backends ------------------------------------------------------------------------------

    @classmethod
    def open(cls, environ: dict[str, str] | None = None) -> Nsm:
        """``$ENCLAVEKIT_NSM`` if set, else ``/dev/nsm`` if present, else UsageError."""
        env = os.environ if environ is None else environ
        url = env.get(ENV_VAR, "").strip()
        if url:
            return cls.connect(url)
        if os.path.exists(DEVICE_PATH):
            return cls.device()
        raise UsageError(
            f"no NSM available: {DEVICE_PATH} does not exist (not inside a Nitro Enclave) and "
            f"{ENV_VAR} is not set. Start an emulator with "
            f"`enclavekit nsm serve --listen unix:///tmp/nsm.sock` and set "
            f"{ENV_VAR}=unix:///tmp/nsm.sock"
        )

    @classmethod
    def in_process(cls, emulator: NsmEmulator) -> Nsm:
        """A client bound directly to an emulator object in this process."""
        return cls(InProcessTransport(emulator))

    @classmethod
    def connect(cls, url: str) -> Nsm:
        """A client of an emulator served at ``unix:///path`` or ``tcp://host:port``."""
        return cls(SocketTransport(url))

    @classmethod
    def device(cls, path: str = DEVICE_PATH) -> Nsm:
        """A client of the real NSM device."""
        return cls(DeviceTransport.open(path))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Nsm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------

    def request(self, request: Request) -> Response:
        """Send one request, return the matching response; raise NsmError for an error answer."""
        raw = encode_request(request)
        if len(raw) > MAX_REQUEST_SIZE:
            raise NsmError(
                ErrorCode.INPUT_TOO_LARGE.value,
                f"the {type(request).__name__} request encodes to {len(raw)} bytes; the NSM "
                f"accepts at most {MAX_REQUEST_SIZE} (shorten user_data/nonce/public_key or the "
                "PCR data)",
            )
        try:
            response: Response = decode_response(self.transport.exchange(raw))
        except MalformedInput as exc:
            raise NsmError(
                ErrorCode.INTERNAL_ERROR.value, f"undecodable NSM response: {exc}"
            ) from None
        if isinstance(response, ErrorResponse):
            hint = _ERROR_HINTS.get(response.code)
            raise NsmError(
                response.code.value,
                f"NSM refused {_describe(request)}: {response.code.value}"
                + (f" ({hint})" if hint else ""),
            )
        expected = RESPONSE_FOR[type(request)]
        matches = isinstance(response, expected)
        if not matches:
            raise NsmError(
                ErrorCode.INVALID_RESPONSE.value,
                f"NSM answered {type(request).__name__} with {type(response).__name__}",
            )
        return response

    def _ask(self, request: Request, kind: type[_R]) -> _R:
        response = self.request(request)
        assert isinstance(response, kind)
        return response

    def describe_nsm(self) -> NsmDescription:
        """Version, module id, number of PCRs and locked PCRs."""
        return self._ask(DescribeNsm(), NsmDescription)

    def describe_pcr(self, index: int) -> PcrDescription:
        """``(lock, data)`` of one PCR (unpacks as a 2-tuple)."""
        return self._ask(DescribePcr(index), PcrDescription)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend a PCR with ``data``; returns its new value."""
        return self._ask(ExtendPcr(index, bytes(data)), PcrExtended).data

    def lock_pcr(self, index: int) -> None:
        """Lock one PCR (ReadOnlyIndex if it already is)."""
        self.request(LockPcr(index))

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``[0, range_)``."""
        self.request(LockPcrs(range_))

    def get_random(self, length: int | None = None) -> bytes:
        """Random bytes from the NSM: one answer (256 bytes) by default, or exactly ``length``
        bytes.
        """
        if length is None:
            return self._ask(GetRandom(), RandomBytes).random
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        out = bytearray()
        while len(out) < length:
            chunk = self._ask(GetRandom(), RandomBytes).random
            if not chunk:
                raise NsmError(ErrorCode.INTERNAL_ERROR.value, "NSM GetRandom returned no bytes")
            out += chunk
        return bytes(out[:length])

    def attestation(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A raw attestation document (COSE_Sign1 bytes; *not* verified here)."""
        request = Attestation(
            user_data=None if user_data is None else bytes(user_data),
            nonce=None if nonce is None else bytes(nonce),
            public_key=None if public_key is None else bytes(public_key),
        )
        return self._ask(request, AttestationDocument).document

"""The attestation CA as an HTTP service (FastAPI; OpenAPI document at ``/openapi.json``).

Endpoints (JSON unless noted):

* ``POST /v1/challenges`` → ``201 {"nonce": hex, "expires_at": RFC 3339}``
* ``POST /v1/certificates`` ``{"service", "csr": PEM, "attestation_document": base64}`` →
  ``201 {"serial": hex, "certificate": PEM, "chain": PEM, "not_before", "not_after"}``;
  400 malformed input, 403 refused (verification or policy; ``failures`` lists every failed check)
* ``GET /v1/certificates/{serial}`` → the record (404 if unknown)
* ``POST /v1/certificates/{serial}/revoke`` ``{"reason"}``, header ``Authorization: Bearer <token>``
  (admin token: ``<state-dir>/admin-token``; without one, revocation over HTTP is off)
* ``GET /v1/events?limit=N`` → the audit log, newest first (admin token)
* ``GET /v1/crl`` → DER CRL (``application/pkix-crl``); ``GET /v1/root`` → the root, PEM
* ``GET /healthz``

Hostile clients (limits in :mod:`.limits`): every request body is counted while it streams,
chunked or not, and refused with 413 as soon as it passes ``max_body`` (or its Content-Length
does), before the rest is read; a body not complete within ``body_timeout`` gets 408. Issuance
attempts pass per-client and total token buckets before their body is read (429 with
``Retry-After``); challenges are capped per client and in total (429). Error responses never quote
the request: validation errors name the field and the problem only, and refusal details are
capped at ``max_error_detail`` characters.

TLS for the endpoint: :func:`start_in_thread` ``tls=`` / ``ca serve --tls`` (:mod:`.ca_tls`);
metrics: :class:`.metrics.CaMetrics` adds ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from enclavekit.atls.ca import Issuer
from enclavekit.atls.extension import MAX_DOCUMENT_SIZE
from enclavekit.atls.limits import (
    LINGER_BYTES,
    LINGER_SECONDS,
    MAX_BODY,
    CaLimits,
    LimitExceeded,
    TokenBuckets,
    client_key,
    retry_after_header,
)
from enclavekit.atls.store import CertificateRecord
from enclavekit.errors import Error, MalformedInput, PolicyViolation, UsageError

API_TITLE = "enclavekit attestation CA"
__all__ = ["MAX_BODY", "RunningService", "create_app", "start_in_thread"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Threads that run issuances in one process when the store is a database server, so that its round
#: trips overlap (see :func:`create_app`).
ISSUER_THREADS = 4

#: The request paths whose attempts pass the issuance token buckets.
_RATE_LIMITED = frozenset({("POST", "/v1/certificates")})


class CertificateRequest(BaseModel):
    service: str = Field(
        min_length=1, max_length=253, description="Service name from the CA policy"
    )
    csr: str = Field(min_length=1, max_length=16 * 1024, description="PKCS#10 request, PEM")
    attestation_document: str = Field(
        min_length=1,
        max_length=(MAX_DOCUMENT_SIZE * 4) // 3 + 4,
        description="Attestation document (COSE_Sign1), base64",
    )


class RevokeRequest(BaseModel):
    reason: str = Field(default="unspecified", max_length=64)


def _iso(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


def _record_json(rec: CertificateRecord, cert: Any = None) -> dict[str, Any]:
    from cryptography import x509

    if cert is None:  # a record from the store; a fresh issuance passes its certificate
        cert = x509.load_der_x509_certificate(rec.certificate_der)
    return {
        "serial": format(rec.serial, "x"),
        "service": rec.service,
        "not_before": _iso(rec.not_before),
        "not_after": _iso(rec.not_after),
        "issued_at": _iso(rec.issued_at),
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "revoked": rec.revoked_at is not None,
        "revoked_at": None if rec.revoked_at is None else _iso(rec.revoked_at),
        "revocation_reason": rec.revocation_reason,
    }


def _error(status: int, exc: Error, limit: int) -> JSONResponse:
    body: dict[str, Any] = {"error": type(exc).__name__, "detail": _cap(exc.diagnostics(), limit)}
    if isinstance(exc, PolicyViolation):
        body["failures"] = [
            {"check": f.check, "expected": _cap(f.expected, 200), "found": _cap(f.found, 200)}
            for f in exc.failures[:64]
        ]
    headers = None
    if isinstance(exc, LimitExceeded) and exc.retry_after is not None:
        headers = {"Retry-After": retry_after_header(exc.retry_after)}
    return JSONResponse(body, status_code=status, headers=headers)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_serial(serial: str) -> int:
    if not 1 <= len(serial) <= 40 or not all(c in "0123456789abcdefABCDEF" for c in serial):
        raise MalformedInput("serial: expected 1-40 hex digits")
    return int(serial, 16)


def _validation_problems(exc: RequestValidationError, fields: frozenset[str]) -> list[Any]:
    """Pydantic's errors without the input they quote: where (declared names only) and what."""
    out: list[Any] = []
    for err in exc.errors()[:16]:
        loc = [
            part if isinstance(part, int) or part in fields else "…"
            for part in err.get("loc", ())[:4]
        ]
        out.append({"loc": loc, "type": str(err.get("type", ""))[:64], "msg": _msg(err)})
    return out


def _msg(err: Any) -> str:
    # Pydantic's messages for these field types state the rule, not the value ("String should
    # have at most 16384 characters"); JSON syntax errors are reported without position or text.
    if err.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return _cap(str(err.get("msg", "")), 200)


async def _refuse(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    drain: Receive | None = None,
) -> None:
    """Send a JSON refusal and close. With ``drain``, the response is written first, then up to
    :data:`~.limits.LINGER_BYTES` of the unread body are read and discarded (for at most
    :data:`~.limits.LINGER_SECONDS`) before closing, so a client still sending can read the answer
    instead of a reset connection (nginx's lingering close)."""
    payload = json.dumps(body).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": drain is not None})
    if drain is None:
        return
    loop = asyncio.get_running_loop()
    deadline, discarded = loop.time() + LINGER_SECONDS, 0
    while discarded < LINGER_BYTES:
        try:
            message = await asyncio.wait_for(drain(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            break
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
        discarded += len(message.get("body", b""))
    await send({"type": "http.response.body", "body": b""})


class _HostileClientGuard:
    """ASGI middleware: issuance rate limit before any body byte is read, then the body bounded
    in size and time while it streams (chunked or not); the app sees the body already read."""

    def __init__(self, app: ASGIApp, limits: CaLimits) -> None:
        self.app = app
        self.limits = limits
        self.buckets = TokenBuckets.for_issuance(limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body
        too_large = {
            "error": "TooLarge",
            "detail": f"request bodies are limited to {limit} bytes",
        }
        # 1. Issuance attempts: a token for this client, and one of the total, or 429.
        if (scope.get("method"), scope.get("path")) in _RATE_LIMITED:
            client = client_key((scope.get("client") or (None,))[0])
            wait = self.buckets.acquire(client)
            if wait > 0:
                await _refuse(
                    send,
                    429,
                    {
                        "error": "TooManyRequests",
                        "detail": "too many certificate requests; retry after Retry-After seconds",
                    },
                    {"Retry-After": retry_after_header(wait)},
                    drain=receive,
                )
                return
        # 2. A declared length over the limit: refused before reading.
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _refuse(send, 413, too_large, drain=receive)
                return
        # 3. Read the body, counting while it streams.
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        while True:
            try:
                # One deadline for the whole body (asyncio.timeout_at: no task per chunk, unlike
                # wait_for on Python 3.11).
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await _refuse(
                    send,
                    408,
                    {
                        "error": "Timeout",
                        "detail": f"request body not complete within {self.limits.body_timeout} s",
                    },
                )
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _refuse(send, 413, too_large, drain=receive)
                return
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: list[Message] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replay() -> Message:
            if buffered:
                return buffered.pop()
            return await receive()

        await self.app(scope, replay, send)


def create_app(issuer: Issuer, *, admin_token: str | None = None) -> FastAPI:
    """The CA's ASGI application; its limits are ``issuer.limits``.

    Where an issuance runs: against a local store (SQLite), on the event loop. Its ~2.5 ms are
    cryptography and a short local transaction, and a worker whose loop is busy is not waiting in
    ``accept``, so the kernel hands new connections to a worker that is: with ``ca serve --workers 2``
    that served 1.82x one worker's issuances at 2.4 ms of CPU each, against 1.44x and 3.0 ms with
    the issuance on threads (the thread hand-offs and the workers' shared write lock, taken by a
    thread that must then win back its process's GIL, cost more than they overlap; issue 18).
    Against a database server (PostgreSQL), on :data:`ISSUER_THREADS` threads, so that its round
    trips overlap: there threads measured 7 % more issuances per second than the loop.
    """
    app = FastAPI(title=API_TITLE, version="1", description=__doc__)
    limits = issuer.limits
    issuer_threads = (
        ThreadPoolExecutor(ISSUER_THREADS, thread_name_prefix="issuer")
        if issuer.store.over_network
        else None
    )
    app.add_middleware(_HostileClientGuard, limits=limits)
    fields = frozenset(
        {"body", "query", "path", "header"}
        | set(CertificateRequest.model_fields)
        | set(RevokeRequest.model_fields)
    )

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_problems(exc, fields)}, status_code=422)

    @app.exception_handler(Error)
    async def _on_error(request: Request, exc: Error) -> JSONResponse:
        if isinstance(exc, LimitExceeded):
            return _error(exc.status, exc, limits.max_error_detail)
        if isinstance(exc, MalformedInput | UsageError):
            return _error(400, exc, limits.max_error_detail)
        return _error(403, exc, limits.max_error_detail)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/challenges", status_code=201)
    def new_challenge(request: Request) -> dict[str, str]:
        challenge = issuer.new_challenge(
            client_key(request.client.host if request.client else None)
        )
        return {"nonce": challenge.nonce.hex(), "expires_at": _iso(challenge.expires_at)}

    def issue_json(body: CertificateRequest) -> bytes:
        try:
            document = base64.b64decode(body.attestation_document, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedInput("attestation_document: expected base64") from exc
        issued = issuer.issue(body.service, body.csr.encode(), document)
        out = _record_json(issued.record, issued.certificate)
        out["chain"] = issued.chain_pem.decode()
        return json.dumps(out).encode()

    @app.post(
        "/v1/certificates",
        status_code=201,
        response_model=None,
        responses={201: {"description": "The certificate, its record and the chain (JSON)"}},
    )
    async def issue(body: CertificateRequest) -> Response:
        if issuer_threads is None:
            payload = issue_json(body)
        else:
            loop = asyncio.get_running_loop()
            payload = await loop.run_in_executor(issuer_threads, issue_json, body)
        return Response(payload, status_code=201, media_type="application/json")

    @app.get("/v1/certificates/{serial}", response_model=None)
    def get_certificate(serial: str) -> dict[str, Any] | JSONResponse:
        number = _parse_serial(serial)
        rec = issuer.get(number)
        if rec is None:
            return JSONResponse({"error": "NotFound", "detail": f"no certificate {number:x}"}, 404)
        return _record_json(rec)

    def _authorized(authorization: str | None) -> bool:
        expected = f"Bearer {admin_token}" if admin_token else None
        return expected is not None and hmac.compare_digest(
            (authorization or "").encode(), expected.encode()
        )

    @app.get("/v1/events", response_model=None)
    def events(
        limit: int = 100, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any] | JSONResponse:
        """The audit log, newest first (issuances, refusals with reasons, revocations)."""
        if not _authorized(authorization):
            return JSONResponse(
                {"error": "Forbidden", "detail": "the audit log needs the CA admin token"}, 403
            )
        return {
            "events": [
                {
                    "at": _iso(e.at),
                    "kind": e.kind,
                    "service": e.service,
                    "serial": None if e.serial is None else format(e.serial, "x"),
                    "detail": e.detail,
                }
                for e in issuer.store.events(max(1, min(limit, 1000)))
            ]
        }

    @app.post("/v1/certificates/{serial}/revoke", response_model=None)
    def revoke(
        serial: str,
        body: RevokeRequest,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any] | JSONResponse:
        if not _authorized(authorization):
            return JSONResponse(
                {"error": "Forbidden", "detail": "revocation needs the CA admin token (Bearer)"},
                403,
            )
        number = _parse_serial(serial)
        if issuer.get(number) is None:
            return JSONResponse({"error": "NotFound", "detail": f"no certificate {number:x}"}, 404)
        changed = issuer.revoke(number, body.reason)
        return {"serial": format(number, "x"), "revoked": True, "changed": changed}

    @app.get("/v1/crl")
    def crl() -> Response:
        der = issuer.crl().public_bytes(serialization.Encoding.DER)
        return Response(der, media_type="application/pkix-crl")

    @app.get("/v1/root")
    def root() -> Response:
        return Response(issuer.keys.root_pem, media_type="application/x-pem-file")

    return app


@dataclass
class RunningService:
    """A CA service on a background thread (tests, demos, ``run``); stop with :meth:`stop`."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_in_thread(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: tuple[Any, Sequence[Any]] | None = None,
) -> RunningService:
    """Serve ``app`` with uvicorn on a background thread; ``port=0`` picks a free port.

    ``tls=(key, chain)`` serves HTTPS (see :mod:`.ca_tls`; the key stays in memory).
    """
    import uvicorn

    from enclavekit.atls.ca_tls import in_memory_pem_files

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    with contextlib.ExitStack() as files:
        keyfile = certfile = None
        if tls is not None:
            keyfile, certfile = files.enter_context(in_memory_pem_files(*tls))
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_keyfile=keyfile,
            ssl_certfile=certfile,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("CA service did not start")
            time.sleep(0.01)
    return RunningService(host, bound_port, server, thread, "https" if tls else "http")

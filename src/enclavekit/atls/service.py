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

TLS for the endpoint: :func:`start_in_thread` ``tls=`` / ``ca serve --tls`` (:mod:`.ca_tls`);
metrics: :class:`.metrics.CaMetrics` adds ``GET /metrics``. Not provided: rate limiting.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from enclavekit.atls.ca import Issuer
from enclavekit.atls.extension import MAX_DOCUMENT_SIZE
from enclavekit.atls.store import CertificateRecord
from enclavekit.errors import Error, MalformedInput, PolicyViolation, UsageError

API_TITLE = "enclavekit attestation CA"
#: A request is a CSR plus a base64 document: well under 128 KiB.
MAX_BODY = 128 * 1024


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


def _record_json(rec: CertificateRecord) -> dict[str, Any]:
    from cryptography import x509

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


def _error(status: int, exc: Error) -> JSONResponse:
    body: dict[str, Any] = {"error": type(exc).__name__, "detail": exc.diagnostics()}
    if isinstance(exc, PolicyViolation):
        body["failures"] = [
            {"check": f.check, "expected": f.expected, "found": f.found} for f in exc.failures
        ]
    return JSONResponse(body, status_code=status)


def _parse_serial(serial: str) -> int:
    if not 1 <= len(serial) <= 40:
        raise MalformedInput("serial: expected 1-40 hex digits")
    try:
        return int(serial, 16)
    except ValueError as exc:
        raise MalformedInput(f"serial: expected hex digits, found {serial[:40]!r}") from exc


def create_app(issuer: Issuer, *, admin_token: str | None = None) -> FastAPI:
    """The CA's ASGI application."""
    app = FastAPI(title=API_TITLE, version="1", description=__doc__)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Response:
        # Refuse oversized bodies before they are read (fields have their own limits too).
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse(
                {"error": "TooLarge", "detail": f"request body limit is {MAX_BODY} bytes"}, 413
            )
        response: Response = await call_next(request)
        return response

    @app.exception_handler(Error)
    async def _on_error(request: Request, exc: Error) -> JSONResponse:
        if isinstance(exc, MalformedInput | UsageError):
            return _error(400, exc)
        return _error(403, exc)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/challenges", status_code=201)
    def new_challenge() -> dict[str, str]:
        challenge = issuer.new_challenge()
        return {"nonce": challenge.nonce.hex(), "expires_at": _iso(challenge.expires_at)}

    @app.post("/v1/certificates", status_code=201)
    def issue(body: CertificateRequest) -> dict[str, Any]:
        try:
            document = base64.b64decode(body.attestation_document, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedInput("attestation_document: expected base64") from exc
        issued = issuer.issue(body.service, body.csr.encode(), document)
        out = _record_json(issued.record)
        out["chain"] = issued.chain_pem.decode()
        return out

    @app.get("/v1/certificates/{serial}", response_model=None)
    def get_certificate(serial: str) -> dict[str, Any] | JSONResponse:
        rec = issuer.get(_parse_serial(serial))
        if rec is None:
            return JSONResponse({"error": "NotFound", "detail": f"no certificate {serial}"}, 404)
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
            return JSONResponse({"error": "NotFound", "detail": f"no certificate {serial}"}, 404)
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

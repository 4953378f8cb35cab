"""Enclave side of attested TLS: an in-memory key, a CA-issued attested certificate, renewal, and a
TLS-terminating proxy in front of any TCP application (the role nitriding plays).

Flow of :meth:`EnclaveIdentity.obtain`:

1. generate a fresh P-384 key in memory (a new key for every certificate);
2. ``POST /v1/challenges`` to the CA for a single-use nonce;
3. ask the NSM for a document with ``public_key`` = the key's DER SubjectPublicKeyInfo and
   ``nonce`` = the challenge;
4. ``POST /v1/certificates`` with a CSR for the key and the document; install the returned chain.

:meth:`EnclaveIdentity.renew_if_due` replaces the certificate once ``renew_fraction`` (2/3) of the
time between obtaining it and its notAfter has passed; :meth:`EnclaveIdentity.start_renewal` runs that on a background thread and
retries failures with backoff while the old certificate is still valid.

The proxy answers ``GET /.well-known/attestation?nonce=HEX`` itself when it is the **first** request on
a connection (16-64 byte nonce) with ``{"document": base64, "certificate_sha256": hex, "nonce": hex}``
where the document has ``public_key`` = the serving key, ``nonce`` = the client's nonce and
``user_data`` = :data:`ATTESTATION_CONTEXT` ‖ SHA-256(serving certificate DER) ‖ nonce; then it
closes the connection. Everything else is relayed byte for byte to the upstream. Only
client-speaks-first protocols are supported.

Anyone who reaches the proxy can obtain such a document for a nonce of their choosing. The fixed
context label (37 bytes, ending in NUL) first in ``user_data`` is the domain separation: the
document says it answers an enclavekit fresh-attestation request for this certificate, so a
protocol that checks ``user_data`` cannot be answered with it. A protocol that checks only the
``nonce`` field of a document from this enclave is not protected by the label.

The private key never touches a file system: Python's ``ssl`` loads keys only from paths, so the key
is handed to OpenSSL through an anonymous ``memfd`` (Linux) and the descriptor is closed at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit.atls.ca import Clock, utc_now
from enclavekit.atls.client_auth import (
    BadRequestHead,
    ClientAuthPolicy,
    ClientIdentity,
    ClientRefused,
    rewrite_request_head,
)
from enclavekit.errors import Error, MalformedInput, UsageError, VerificationError

if TYPE_CHECKING:
    from enclavekit.atls.metrics import ProxyMetrics

log = logging.getLogger(__name__)

WELL_KNOWN_PATH = "/.well-known/attestation"
MIN_NONCE, MAX_NONCE = 16, 64
#: Longest request head the proxy reads before deciding where a connection goes.
MAX_HEAD = 16 * 1024
RELAY_CHUNK = 64 * 1024


class Attester(Protocol):
    """The NSM interface the enclave side needs (:class:`enclavekit.nsm.Nsm` satisfies it)."""

    def attestation(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...


#: Domain-separation label, first in the ``user_data`` of every ``/.well-known/attestation``
#: document (fixed length; the NUL ends it). A new format gets a new label (``v2``).
ATTESTATION_CONTEXT = b"enclavekit/atls/v1/fresh-attestation\x00"


def attestation_user_data(certificate_der: bytes, nonce: bytes) -> bytes:
    """The ``user_data`` of a ``/.well-known/attestation`` document:
    :data:`ATTESTATION_CONTEXT` ‖ SHA-256(certificate DER) ‖ nonce (37 + 32 + 16..64 bytes)."""
    return ATTESTATION_CONTEXT + hashlib.sha256(certificate_der).digest() + nonce


# ------------------------------------------------------------------------------------- CA client


class CaClient:
    """A small HTTP client for the CA service (httpx, from the ``service`` extra)."""

    def __init__(
        self, url: str, *, timeout: float = 10.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        """``verify``: the TLS trust for an ``https://`` CA (:func:`.ca_tls.ca_client_context`)."""
        import httpx

        self.url = url.rstrip("/")
        # One connection per request: the CA is called twice per certificate, and reusing a
        # keep-alive connection to uvicorn measured ~40 ms extra per request on loopback.
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=verify,
        )

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = self._http.post(path, json=body or {})
        except httpx.HTTPError as exc:
            raise UsageError(f"cannot reach the CA at {self.url}: {exc}; check --ca") from exc
        try:
            data = r.json()
        except ValueError as exc:
            raise MalformedInput(f"CA {path}: expected JSON, got HTTP {r.status_code}") from exc
        if r.status_code >= 400:
            detail = data.get("detail") if isinstance(data, dict) else None
            raise VerificationError(f"the CA refused {path} (HTTP {r.status_code}): {detail}")
        if not isinstance(data, dict):
            raise MalformedInput(f"CA {path}: expected a JSON object")
        return data

    def challenge(self) -> bytes:
        data = self._post("/v1/challenges")
        try:
            return bytes.fromhex(str(data["nonce"]))
        except (KeyError, ValueError) as exc:
            raise MalformedInput("CA challenge: expected a hex 'nonce'") from exc

    def issue(self, service: str, csr_pem: bytes, document: bytes) -> list[x509.Certificate]:
        data = self._post(
            "/v1/certificates",
            {
                "service": service,
                "csr": csr_pem.decode(),
                "attestation_document": base64.b64encode(document).decode(),
            },
        )
        try:
            chain = x509.load_pem_x509_certificates(str(data["chain"]).encode())
        except (KeyError, ValueError) as exc:
            raise MalformedInput("CA certificate: expected a PEM 'chain'") from exc
        return chain

    def close(self) -> None:
        self._http.close()


# ------------------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class ServingIdentity:
    """One key + certificate, and the server-side SSL context that presents them."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    context: ssl.SSLContext = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def certificate_der(self) -> bytes:
        return self.chain[0].public_bytes(serialization.Encoding.DER)

    @property
    def public_key_der(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_identity(
    ctx: ssl.SSLContext, key: ec.EllipticCurvePrivateKey, chain: tuple[x509.Certificate, ...]
) -> None:
    """Load ``key`` + ``chain`` into ``ctx`` without writing the key to a file system."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("enclavekit-atls-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux development machines
        with tempfile.NamedTemporaryFile(mode="wb") as f:
            os.chmod(f.name, 0o600)
            f.write(pem)
            f.flush()
            ctx.load_cert_chain(f.name)


def server_context(
    key: ec.EllipticCurvePrivateKey, chain: tuple[x509.Certificate, ...]
) -> ssl.SSLContext:
    """A TLS (≥ 1.2) server context presenting ``key`` + ``chain``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_identity(ctx, key, chain)
    return ctx


class EnclaveIdentity:
    """Obtains and renews the enclave's attested certificate for one service name."""

    def __init__(
        self,
        ca: CaClient | str,
        service: str,
        nsm: Attester,
        *,
        clock: Clock = utc_now,
        renew_fraction: float = 2 / 3,
    ) -> None:
        if not 0 < renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        self.ca = CaClient(ca) if isinstance(ca, str) else ca
        self.service = service
        self.nsm = nsm
        self.clock = clock
        self.renew_fraction = renew_fraction
        self._current: ServingIdentity | None = None
        self._obtained_at: datetime | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[ServingIdentity], None]] = []

    def add_listener(self, callback: Callable[[ServingIdentity], None]) -> None:
        """Call ``callback(identity)`` after every successful :meth:`obtain` (any thread)."""
        self._listeners.append(callback)

    @property
    def current(self) -> ServingIdentity:
        """The identity in use; :meth:`obtain` must have succeeded once."""
        current = self._current
        if current is None:
            raise RuntimeError("no certificate yet; call obtain() first")
        return current

    def obtain(self) -> ServingIdentity:
        """Steps 1-4 of the module docstring; installs and returns the new identity."""
        key = ec.generate_private_key(ec.SECP384R1())
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        nonce = self.ca.challenge()
        document = self.nsm.attestation(nonce=nonce, public_key=spki)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.service)]))
            .sign(key, hashes.SHA384())
        )
        chain = tuple(
            self.ca.issue(self.service, csr.public_bytes(serialization.Encoding.PEM), document)
        )
        return self._install(key, chain)

    def _install(
        self, key: ec.EllipticCurvePrivateKey, chain: tuple[x509.Certificate, ...]
    ) -> ServingIdentity:
        """Check that ``chain`` is for ``key``, make it current and tell the listeners."""
        if not chain or chain[0].public_key() != key.public_key():
            raise VerificationError("the CA returned a certificate for another key; refusing it")
        identity = ServingIdentity(key, chain, server_context(key, chain))
        with self._lock:
            renewal = self._current is not None
            self._current = identity
            self._obtained_at = self.clock()
        for callback in list(self._listeners):
            callback(identity)
        log.info(
            "certificate %x for %r valid until %s",
            chain[0].serial_number,
            self.service,
            chain[0].not_valid_after_utc.isoformat(),
            extra={
                "event": "renewed" if renewal else "obtained",
                "fields": {
                    "service": self.service,
                    "serial": format(chain[0].serial_number, "x"),
                    "not_after": chain[0].not_valid_after_utc.isoformat(),
                },
            },
        )
        return identity

    def renew_at(self) -> datetime:
        """When the current certificate is due for renewal: ``renew_fraction`` of the way from the
        moment it was obtained (by our clock; the CA backdates notBefore) to its notAfter."""
        not_after = self.current.certificate.not_valid_after_utc
        start = min(self._obtained_at or not_after, not_after)
        return start + (not_after - start) * self.renew_fraction

    def renew_if_due(self) -> bool:
        """Obtain a new certificate if the renewal time has come; True if renewed."""
        if self._current is not None and self.clock() < self.renew_at():
            return False
        self.obtain()
        return True

    def start_renewal(self, *, poll: float = 30.0) -> None:
        """Renew in the background until :meth:`stop`; failures retry with backoff (≤ ``poll`` s)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            backoff = 1.0
            while not self._stop.is_set():
                try:
                    self.renew_if_due()
                    backoff = 1.0
                    wait = min(poll, max(0.5, (self.renew_at() - self.clock()).total_seconds()))
                except Error as exc:
                    log.warning(
                        "certificate renewal failed (retrying in %.0f s): %s",
                        backoff,
                        exc,
                        extra={"event": "renewal_failed", "fields": {"reason": str(exc)}},
                    )
                    wait, backoff = backoff, min(backoff * 2, poll)
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="atls-renewal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def attestation_for(self, nonce: bytes) -> dict[str, str]:
        """A fresh document binding ``nonce`` and the serving certificate (the well-known answer)."""
        if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
            raise UsageError(f"nonce must be {MIN_NONCE}-{MAX_NONCE} bytes, got {len(nonce)}")
        current = self.current
        document = self.nsm.attestation(
            user_data=attestation_user_data(current.certificate_der, nonce),
            nonce=nonce,
            public_key=current.public_key_der,
        )
        return {
            "document": base64.b64encode(document).decode(),
            "certificate_sha256": hashlib.sha256(current.certificate_der).hexdigest(),
            "nonce": nonce.hex(),
        }


# ---------------------------------------------------------------------------------------- proxy


def _http_response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class AttestedTlsProxy:
    """Terminates TLS with the enclave's attested certificate and relays to ``upstream``."""

    def __init__(
        self,
        identity: EnclaveIdentity,
        upstream: tuple[str, int],
        *,
        handshake_timeout: float = 10.0,
        client_auth: ClientAuthPolicy | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        """``client_auth``: demand attested client certificates (:mod:`.client_auth`).
        ``metrics``: count handshakes, attestations, refusals, bytes (:mod:`.metrics`)."""
        self.identity = identity
        self.upstream = upstream
        self.handshake_timeout = handshake_timeout
        self.client_auth = client_auth
        self.metrics = metrics
        current = identity.current
        # One context for the listener; renewals reload it on the event loop's thread, so OpenSSL
        # never sees the context change while it creates a connection.
        self.context = server_context(current.key, current.chain)
        if client_auth is not None:
            client_auth.configure(self.context)
        if metrics is not None:
            metrics.set_certificate(current.certificate.not_valid_after_utc)
            # Called for every ClientHello (server_name None without SNI): handshakes started.
            self.context.sni_callback = lambda *_: metrics.handshakes.labels("started").inc()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The connections' tasks, held here: asyncio keeps a task alive only through what it waits
        # on, and a connection whose sockets are both paused is referenced by nothing else, so the
        # garbage collector would close its coroutine mid-relay ("coroutine ignored GeneratorExit").
        self._connections: set[asyncio.Task[Any]] = set()
        identity.add_listener(self._on_renewal)

    def _on_renewal(self, new: ServingIdentity) -> None:
        if self.metrics is not None:
            self.metrics.set_certificate(new.certificate.not_valid_after_utc)
        loop = self._loop
        if loop is None or loop.is_closed():
            load_identity(self.context, new.key, new.chain)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(load_identity, self.context, new.key, new.chain)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        try:
            if self.metrics is not None:
                self.metrics.handshakes.labels("ok").inc()
            client: ClientIdentity | None = None
            if self.client_auth is not None:
                client = await self._check_client(writer)
                if client is None:
                    return
            first = await reader.read(RELAY_CHUNK)
            if not first:
                return
            prefix = b"GET " + WELL_KNOWN_PATH.encode()
            if first.startswith(prefix) and first[len(prefix) : len(prefix) + 1] in (b"?", b" "):
                await asyncio.wait_for(
                    self._attestation(first, reader, writer), self.handshake_timeout
                )
                return
            if client is not None and self.client_auth and self.client_auth.forward_identity:
                await self._relay_with_identity(first, reader, writer, client)
                return
            await self._relay(first, reader, writer)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _check_client(self, writer: asyncio.StreamWriter) -> ClientIdentity | None:
        """The verified client (mutual TLS), or None after refusing it (nothing read or relayed)."""
        assert self.client_auth is not None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.client_auth.check, der
            )
        except ClientRefused as exc:
            if self.metrics is not None:
                self.metrics.client_refusals.labels(exc.reason).inc()
            peer = writer.get_extra_info("peername")
            log.warning("refused client %s (%s): %s", peer, exc.reason, exc)
            return None

    async def _relay_with_identity(
        self,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: ClientIdentity,
    ) -> None:
        """One request: its head rewritten (:func:`.client_auth.rewrite_request_head`), its
        Content-Length body, then only the upstream's answer."""
        head = first
        while b"\r\n\r\n" not in head:
            if len(head) > MAX_HEAD:
                writer.write(_http_response("431 Request Header Fields Too Large", b""))
                await writer.drain()
                return
            more = await reader.read(RELAY_CHUNK)
            if not more:
                return
            head += more
        raw_head, _, rest = head.partition(b"\r\n\r\n")
        if len(raw_head) > MAX_HEAD:
            writer.write(_http_response("431 Request Header Fields Too Large", b""))
            await writer.drain()
            return
        try:
            new_head, length = rewrite_request_head(raw_head, client)
        except BadRequestHead as exc:
            body = json.dumps({"error": str(exc)}).encode()
            writer.write(_http_response(exc.status, body))
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            body = rest[:length]
            up_writer.write(new_head + body)
            remaining = length - len(body)
            while remaining > 0:
                data = await reader.read(min(RELAY_CHUNK, remaining))
                if not data:
                    return
                up_writer.write(data)
                await up_writer.drain()
                remaining -= len(data)
            self._count("up", len(new_head) + length)
            with contextlib.suppress(OSError):
                if up_writer.can_write_eof():
                    up_writer.write_eof()
            while data := await up_reader.read(RELAY_CHUNK):
                writer.write(data)
                await writer.drain()
                self._count("down", len(data))
        finally:
            up_writer.close()
            # Wait for the close, so a stopping event loop leaves no upstream socket behind.
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    def _count(self, direction: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.bytes_relayed.labels(direction).inc(n)

    async def _attestation(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
            more = await reader.read(RELAY_CHUNK)
            if not more:
                return
            head += more
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        try:
            query = parse_qs(urlsplit(parts[1]).query, strict_parsing=False)
            nonce = bytes.fromhex(query["nonce"][0])
            body = json.dumps(
                await asyncio.get_running_loop().run_in_executor(
                    None, self.identity.attestation_for, nonce
                )
            ).encode()
            writer.write(_http_response("200 OK", body))
            self._attested("ok")
        except (IndexError, KeyError, ValueError, UsageError):
            self._attested("bad_request")
            msg = f"expected ?nonce= with {MIN_NONCE}-{MAX_NONCE} bytes as hex"
            writer.write(_http_response("400 Bad Request", json.dumps({"error": msg}).encode()))
        except Error as exc:
            self._attested("failed")
            log.warning("attestation failed: %s", exc)
            writer.write(
                _http_response("503 Service Unavailable", json.dumps({"error": str(exc)}).encode())
            )
        await writer.drain()

    def _attested(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.attestation_requests.labels(result).inc()

    async def _relay(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        up_writer.write(first)
        self._count("up", len(first))

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
        ) -> None:
            try:
                while data := await src.read(RELAY_CHUNK):
                    dst.write(data)
                    await dst.drain()
                    self._count(direction, len(data))
            finally:
                # Half-close where the transport can (TCP to the upstream); TLS cannot, so a
                # finished upstream closes the client connection.
                with contextlib.suppress(Exception):
                    if dst.can_write_eof():
                        dst.write_eof()
                    else:
                        dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, "up"), pump(up_reader, writer, "down"))
        finally:
            up_writer.close()
            # Wait for the close, so a stopping event loop leaves no upstream socket behind.
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        self._loop = asyncio.get_running_loop()
        return await asyncio.start_server(
            self.handle,
            host,
            port,
            limit=MAX_HEAD * 4,
            ssl=self.context,
            ssl_handshake_timeout=self.handshake_timeout,
        )


@dataclass
class RunningProxy:
    """A proxy on a background event loop (tests, demos, ``run``); stop with :meth:`stop`."""

    host: str
    port: int
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _server: asyncio.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def start_proxy_in_thread(
    proxy: AttestedTlsProxy, host: str = "127.0.0.1", port: int = 0
) -> RunningProxy:
    """Run ``proxy`` on its own event loop thread; ``port=0`` picks a free port."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["server"] = loop.run_until_complete(proxy.serve(host, port))
        except OSError as exc:
            started["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        # Stopped: end every open connection, then close the loop. A TLS handshake that completes
        # while the first tasks wind down starts a new connection task: repeat until none is left
        # (a task left pending would be destroyed with the loop, mid-``finally``).
        for _ in range(100):
            tasks = asyncio.all_tasks(loop)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="atls-proxy", daemon=True)
    thread.start()
    ready.wait(10)
    if "error" in started:
        raise UsageError(f"cannot listen on {host}:{port}: {started['error']}")
    server: asyncio.Server = started["server"]
    bound = server.sockets[0].getsockname()
    return RunningProxy(bound[0], bound[1], loop, server, thread)


def run_proxy(
    identity: EnclaveIdentity,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    *,
    on_ready: Callable[[str, int], None] | None = None,
    client_auth: ClientAuthPolicy | None = None,
    metrics: ProxyMetrics | None = None,
    metrics_listen: tuple[str, int] | None = None,
) -> None:
    """Obtain a certificate, start renewal and serve until interrupted (the CLI's ``atls proxy``).

    ``metrics_listen``: also serve ``metrics`` (a :class:`.metrics.ProxyMetrics`) at ``/metrics``.
    """
    identity.obtain()
    identity.start_renewal()
    proxy = AttestedTlsProxy(identity, upstream, client_auth=client_auth, metrics=metrics)
    if metrics is not None and metrics_listen is not None:
        try:
            metrics.serve(*metrics_listen)
        except OSError as exc:
            identity.stop()
            raise UsageError(f"--metrics-listen: cannot listen on {metrics_listen}: {exc}") from exc

    async def main() -> None:
        server = await proxy.serve(*listen)
        if on_ready is not None:
            sock = server.sockets[0].getsockname()
            on_ready(sock[0], sock[1])
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(main())
    finally:
        identity.stop()

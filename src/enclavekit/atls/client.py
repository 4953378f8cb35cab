"""Client side of attested TLS: verify the peer's attested certificate before sending a byte.

:meth:`AttestedClient.attest` does, in order, on a connection where nothing has been sent yet:

1. a TLS handshake that trusts **only** the attestation CA root (hostname checked) — or, with no
   root given, the system trust store (ACME certificates; then ``fresh`` is required);
2. take the peer's leaf certificate (DER), extract the embedded attestation document
   (:mod:`.extension`) and verify it with :class:`enclavekit.attestation.Verifier` against the
   configured NSM roots, at the time the CA issued the certificate (its notBefore + the CA's
   backdating), under ``policy`` + ``public_key`` = the certificate's key;
3. with ``fresh=True``: send ``GET /.well-known/attestation?nonce=<32 random bytes>`` (the only bytes
   ever sent to an unverified peer) and verify the new document at the current time under the
   same policy + the nonce + ``public_key`` = the certificate's key + ``user_data`` =
   the context label ``enclavekit/atls/v1/fresh-attestation\0`` ‖ SHA-256(certificate) ‖ nonce
   (:func:`enclavekit.atls.server.attestation_user_data`; a document without the label is refused).

Application requests then go over a **new** connection whose context pins exactly that leaf
certificate (:meth:`AttestedPeer.pinned_context`), so a request can only reach the verified key.
:meth:`AttestedClient.httpx_client` and :meth:`AttestedClient.request` build on that.

Revocation is checked only when a CRL is given (``crl=``; its signature by the CA root and its
nextUpdate are checked when the client is built). Not checked: anything about the upstream
application behind the enclave's proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavekit.atls.ca import CLOCK_SKEW, Clock, utc_now
from enclavekit.atls.extension import document_from_certificate, has_attestation_extension
from enclavekit.atls.server import (
    WELL_KNOWN_PATH,
    EnclaveIdentity,
    ServingIdentity,
    attestation_user_data,
    load_identity,
)
from enclavekit.attestation.policy import (
    AllOf,
    NonceEquals,
    NotDebug,
    Policy,
    PublicKeyEquals,
    UserDataEquals,
)
from enclavekit.attestation.verifier import VerifiedAttestation, Verifier
from enclavekit.errors import MalformedInput, UsageError, VerificationError

#: The fresh attestation answer is small JSON; anything larger is refused.
MAX_ATTESTATION_RESPONSE = 64 * 1024
FRESH_NONCE_LENGTH = 32


@dataclass(frozen=True, slots=True)
class AttestedPeer:
    """A verified server: its certificate and the verified documents."""

    host: str
    port: int
    server_hostname: str
    certificate: x509.Certificate
    #: The document embedded in the certificate; None for a certificate without one (ACME), which
    #: is accepted only with ``fresh``.
    embedded: VerifiedAttestation | None
    fresh: VerifiedAttestation | None = None
    _root_pem: bytes = field(default=b"", repr=False)
    _client: ServingIdentity | None = field(default=None, repr=False)

    @property
    def attestation(self) -> VerifiedAttestation:
        """The fresh document if one was verified, else the embedded one."""
        verified = self.fresh or self.embedded
        assert verified is not None  # attest() never returns a peer with neither
        return verified

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def certificate_sha256(self) -> bytes:
        return hashlib.sha256(self.certificate_der).digest()

    def pinned_context(self) -> ssl.SSLContext:
        """An SSL context that accepts only this exact leaf (and checks the host name)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(
            cadata=self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        )
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if self._client is not None:
            load_identity(ctx, self._client.key, self._client.chain)
        return ctx

    def summary(self) -> dict[str, Any]:
        """A JSON-able report of what was verified."""
        out: dict[str, Any] = {
            "server": f"{self.host}:{self.port}",
            "certificate_serial": format(self.certificate.serial_number, "x"),
            "certificate_sha256": self.certificate_sha256.hex(),
            "not_after": self.certificate.not_valid_after_utc.isoformat(),
            "module_id": self.attestation.module_id,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.attestation.pcrs.items())},
            "fresh": self.fresh is not None,
            "embedded": self.embedded is not None,
        }
        if self.fresh is not None:
            out["fresh_timestamp"] = self.fresh.timestamp.isoformat()
        return out


def _ca_context(ca_root: x509.Certificate | None) -> ssl.SSLContext:
    if ca_root is None:  # an ACME (publicly trusted) certificate: the system trust store
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=ca_root.public_bytes(serialization.Encoding.PEM).decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class AttestedClient:
    """Verifies enclaves that present certificates from one attestation CA.

    ``ca_root``: the CA's root (the TLS trust anchor). ``verifier``: pins the NSM roots (AWS by
    default via :meth:`Verifier.aws`). ``policy``: what the enclave must be (PCRs, …; default
    ``NotDebug()`` only — policy files from :func:`~enclavekit.attestation.policy.load_policy`
    refuse debug enclaves unless they say ``allow_debug``); the key binding is always added.
    ``fresh``: also demand a new document for our own nonce — required for a certificate that
    embeds no document (an ACME certificate; ``ca_root`` None trusts the system store for it).
    ``identity``: the client's own attested certificate (an :class:`~.server.EnclaveIdentity` for
    a ``usage: client`` service), presented on every connection (mutual attested TLS).
    """

    def __init__(
        self,
        ca_root: x509.Certificate | None,
        *,
        identity: EnclaveIdentity | None = None,
        verifier: Verifier | None = None,
        policy: Policy | None = None,
        fresh: bool = False,
        clock: Clock = utc_now,
        timeout: float = 10.0,
        crl: x509.CertificateRevocationList | None = None,
    ) -> None:
        self.ca_root = ca_root
        if crl is not None and ca_root is None:
            raise UsageError("a CRL needs the CA root that signs it (--ca-cert)")
        self.crl = check_crl(crl, ca_root, clock()) if crl is not None and ca_root else None
        self.verifier = verifier if verifier is not None else Verifier.aws()
        self.policy = policy
        self.fresh = fresh
        self.clock = clock
        self.timeout = timeout
        self._context = _ca_context(ca_root)
        self.identity = identity
        if identity is not None:
            if identity._current is None:
                identity.obtain()
            current = identity.current
            load_identity(self._context, current.key, current.chain)
            identity.add_listener(self._on_identity)

    def _on_identity(self, new: ServingIdentity) -> None:
        load_identity(self._context, new.key, new.chain)

    def _policy(self, *extra: Policy) -> Policy:
        return AllOf([*extra, self.policy if self.policy is not None else NotDebug()])

    def attest(self, host: str, port: int, *, server_hostname: str | None = None) -> AttestedPeer:
        """Steps 1-3 of the module docstring; raises before anything else is sent."""
        name = server_hostname or host
        try:
            raw = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise UsageError(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            # 1. TLS to the CA root only.
            try:
                tls = self._context.wrap_socket(raw, server_hostname=name)
            except ssl.SSLCertVerificationError as exc:
                raise VerificationError(
                    f"TLS certificate of {name} does not chain to the attestation CA root"
                    f" ({exc.verify_message}); it was not issued to an attested enclave"
                ) from exc
            except (ssl.SSLError, OSError) as exc:
                raise VerificationError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
            with tls:
                der = tls.getpeercert(binary_form=True)
                if der is None:  # pragma: no cover - CERT_REQUIRED guarantees a certificate
                    raise VerificationError("the server sent no certificate")
                cert = x509.load_der_x509_certificate(der)
                if self.crl is not None:
                    entry = self.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                    if entry is not None:
                        raise VerificationError(
                            f"the server's certificate {cert.serial_number:x} was revoked by the CA"
                            f" on {entry.revocation_date_utc.isoformat()}"
                        )
                spki = cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                # 2. The embedded document, at issuance time (absent from ACME certificates).
                embedded = None
                if has_attestation_extension(cert):
                    document = document_from_certificate(cert)
                    issued_at = cert.not_valid_before_utc + CLOCK_SKEW
                    embedded = self.verifier.verify(
                        document, self._policy(PublicKeyEquals(spki)), at=issued_at
                    )
                elif not self.fresh:
                    raise VerificationError(
                        f"the certificate of {name} embeds no attestation document (an ACME or"
                        " other public certificate); only a fresh document can show what runs"
                        " behind it: use --fresh (fresh=True)"
                    )
                # 3. Optionally a fresh one for our nonce, on this same connection.
                fresh = self._fresh(tls, name, der, spki) if self.fresh else None
        finally:
            raw.close()
        client = self.identity.current if self.identity is not None else None
        return AttestedPeer(host, port, name, cert, embedded, fresh, _client=client)

    def _fresh(self, tls: ssl.SSLSocket, name: str, der: bytes, spki: bytes) -> VerifiedAttestation:
        nonce = secrets.token_bytes(FRESH_NONCE_LENGTH)
        request = (
            f"GET {WELL_KNOWN_PATH}?nonce={nonce.hex()} HTTP/1.1\r\nHost: {name}\r\n"
            "Accept: application/json\r\nConnection: close\r\n\r\n"
        )
        tls.sendall(request.encode())
        data = b""
        while len(data) <= MAX_ATTESTATION_RESPONSE:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 200"):
            raise VerificationError(
                f"fresh attestation: expected HTTP 200 from {WELL_KNOWN_PATH}, got"
                f" {status[:60]!r}; is the server an enclavekit attested-TLS proxy?"
            )
        try:
            document = base64.b64decode(json.loads(body)["document"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedInput(
                "fresh attestation: expected JSON with a base64 'document'"
            ) from exc
        policy = self._policy(
            NonceEquals(nonce),
            PublicKeyEquals(spki),
            UserDataEquals(attestation_user_data(der, nonce)),
        )
        return self.verifier.verify(document, policy, at=self.clock())

    # -- requests over a pinned connection ---------------------------------------------------

    def httpx_client(self, base_url: str, **kwargs: Any) -> Any:
        """Attest the server of ``base_url``, then return an ``httpx.Client`` pinned to it."""
        import httpx

        host, port = _host_port(base_url)
        peer = self.attest(host, port)
        return httpx.Client(base_url=base_url, verify=peer.pinned_context(), **kwargs)

    def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[AttestedPeer, Any]:
        """Attest, then send one request over a pinned connection; returns (peer, httpx.Response)."""
        import httpx

        host, port = _host_port(url)
        peer = self.attest(host, port)
        with httpx.Client(verify=peer.pinned_context(), timeout=self.timeout) as http:
            try:
                response = http.request(method, url, content=content, headers=headers)
            except httpx.ConnectError as exc:
                raise VerificationError(
                    f"the server's certificate changed after attestation ({exc}); retry"
                ) from exc
        return peer, response


def check_crl(
    crl: x509.CertificateRevocationList, ca_root: x509.Certificate, now: datetime
) -> x509.CertificateRevocationList:
    """``crl`` if it is signed by ``ca_root`` and current at ``now``; else VerificationError."""
    if crl.issuer != ca_root.subject or not crl.is_signature_valid(
        ca_root.public_key()  # type: ignore[arg-type]
    ):
        raise VerificationError(
            "the CRL is not signed by the attestation CA root; fetch it from the CA (/v1/crl)"
        )
    next_update = crl.next_update_utc
    if next_update is not None and now > next_update:
        raise VerificationError(
            f"the CRL expired at {next_update.isoformat()}; fetch a current one from /v1/crl"
        )
    return crl


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from DER or PEM bytes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise MalformedInput(f"CRL: expected DER or PEM ({exc})") from exc


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"expected an https:// URL, got {url!r}")
    return parts.hostname, parts.port or 443


def load_ca_root(pem: bytes) -> x509.Certificate:
    """The CA root from PEM (the first certificate)."""
    try:
        certs: Sequence[x509.Certificate] = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise MalformedInput(f"CA certificate: expected PEM ({exc})") from exc
    return certs[0]

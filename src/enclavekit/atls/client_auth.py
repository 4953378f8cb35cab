"""Mutual attested TLS, server side: the proxy demands an attested client certificate.

:class:`ClientAuthPolicy` configures the proxy's TLS context and checks each client, in this order:

1. during the handshake (OpenSSL): a presented certificate must chain to ``--client-ca`` and be
   valid now, with the ``sslclient`` purpose (EKU clientAuth); a bad one fails the handshake;
2. right after it, before a byte is read from or sent to the upstream (:meth:`ClientAuthPolicy.check`):
   a certificate must be present (``no_certificate``), carry EKU clientAuth (``usage``), embed an
   attestation document that verifies against the NSM roots at issuance time (its notBefore + the
   CA's backdating) with ``public_key`` = the certificate's key (``attestation``), and satisfy the
   client policy (``policy``; default: not debug); its common name must be a plain service name
   (``identity``).

The verified identity goes to the upstream only with ``forward_identity`` (``--forward-client-identity``):
every request head then gets the header :data:`CLIENT_IDENTITY_HEADER` (format:
:meth:`ClientIdentity.header_value`); any header of that name the client sent is removed first.
In that mode the proxy relays **one request per connection** (``Connection: close`` to the upstream),
with a ``Content-Length`` body or none; ``Transfer-Encoding`` is refused (411), so no second,
unrewritten request can follow on the same connection.

Not checked: revocation of client certificates (no CRL), and a fresh document from the client (the
embedded one is verified at issuance time; client certificates are short-lived instead).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavekit.atls.ca import CLOCK_SKEW
from enclavekit.atls.extension import document_from_certificate
from enclavekit.attestation.policy import AllOf, NotDebug, Policy, PublicKeyEquals
from enclavekit.attestation.verifier import Verifier
from enclavekit.errors import Error, PolicyViolation

#: The header that carries the verified client identity to the upstream.
CLIENT_IDENTITY_HEADER = "X-Enclavekit-Client-Identity"
#: PCRs named in the header (image, kernel, application, IAM role, instance, signing certificate).
IDENTITY_PCRS = (0, 1, 2, 3, 4, 8)
#: Client-certificate verdicts kept by :meth:`ClientAuthPolicy.check`.
VERDICT_CACHE_SIZE = 1024
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_MODULE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class ClientRefused(Error):
    """A mutual-TLS client did not prove an acceptable attested identity."""

    exit_code = 1

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """A client verified by :meth:`ClientAuthPolicy.check`."""

    service: str
    certificate_sha256: bytes
    module_id: str
    pcrs: Mapping[int, bytes]

    def header_value(self) -> str:
        """``service=NAME; cert-sha256=HEX; module-id=ID; pcr0=HEX; pcr1=HEX; …`` (PCRs 0-4, 8 that
        the document has), ``;``-separated ``key=value`` pairs, lower-case hex."""
        parts = [f"service={self.service}", f"cert-sha256={self.certificate_sha256.hex()}"]
        if _MODULE_ID.fullmatch(self.module_id):
            parts.append(f"module-id={self.module_id}")
        parts += [f"pcr{i}={self.pcrs[i].hex()}" for i in IDENTITY_PCRS if i in self.pcrs]
        return "; ".join(parts)


class ClientAuthPolicy:
    """What a mutual-TLS client must prove (see the module docstring)."""

    def __init__(
        self,
        client_ca: Sequence[x509.Certificate],
        verifier: Verifier,
        policy: Policy | None = None,
        *,
        forward_identity: bool = False,
    ) -> None:
        if not client_ca:
            raise ValueError("client_ca must hold at least one CA certificate")
        self.client_ca = tuple(client_ca)
        self.verifier = verifier
        self.policy = policy
        self.forward_identity = forward_identity
        self._verdicts: dict[bytes, ClientIdentity | ClientRefused] = {}
        self._lock = threading.Lock()

    def configure(self, ctx: ssl.SSLContext) -> None:
        """Ask for a client certificate and trust only ``client_ca`` for it.

        ``CERT_OPTIONAL``: a client without a certificate completes the handshake and is refused by
        :meth:`check` (so the refusal is counted and logged with its reason); a certificate that
        does not verify still fails the handshake.
        """
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(
            cadata="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in self.client_ca
            )
        )

    def check(self, certificate_der: bytes | None) -> ClientIdentity:
        """The verified identity of a client whose handshake passed; :class:`ClientRefused` else.

        Verdicts are cached by the certificate's exact DER (at most :data:`VERDICT_CACHE_SIZE`,
        oldest dropped first): :meth:`verify_certificate` depends only on those bytes and this
        policy — never on the current time (the document is checked at issuance time; expiry is
        checked by OpenSSL in every handshake) — so a cached verdict is the verdict.
        """
        if not certificate_der:
            return self.verify_certificate(certificate_der)
        digest = hashlib.sha256(certificate_der).digest()
        with self._lock:
            cached = self._verdicts.get(digest)
        if cached is None:
            try:
                cached = self.verify_certificate(certificate_der)
            except ClientRefused as exc:
                cached = exc
            with self._lock:
                self._verdicts[digest] = cached
                while len(self._verdicts) > VERDICT_CACHE_SIZE:
                    self._verdicts.pop(next(iter(self._verdicts)))
        if isinstance(cached, ClientRefused):
            raise ClientRefused(cached.reason, str(cached))
        return cached

    def verify_certificate(self, certificate_der: bytes | None) -> ClientIdentity:
        """:meth:`check` without the cache."""
        if not certificate_der:
            raise ClientRefused(
                "no_certificate",
                "the client presented no certificate; expected an attested client certificate"
                " from the attestation CA (a service with usage: client)",
            )
        cert = x509.load_der_x509_certificate(certificate_der)
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise ClientRefused(
                "usage",
                "the client certificate is not for client authentication (no EKU clientAuth);"
                " expected a certificate of a service with usage: client",
            )
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        policy = AllOf([PublicKeyEquals(spki), self.policy or NotDebug()])
        try:
            document = document_from_certificate(cert)
            verified = self.verifier.verify(
                document, policy, at=cert.not_valid_before_utc + CLOCK_SKEW
            )
        except PolicyViolation as exc:
            raise ClientRefused("policy", f"client attestation: {exc.diagnostics()}") from exc
        except Error as exc:
            raise ClientRefused("attestation", f"client attestation: {exc}") from exc
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        service = str(names[0].value) if names else ""
        if not _SERVICE_NAME.fullmatch(service):
            raise ClientRefused(
                "identity", "the client certificate's common name is not a plain service name"
            )
        return ClientIdentity(
            service=service,
            certificate_sha256=hashlib.sha256(certificate_der).digest(),
            module_id=verified.module_id,
            pcrs=verified.pcrs,
        )


class BadRequestHead(Error):
    """A request head the identity-forwarding mode cannot pass on safely."""

    def __init__(self, status: str, message: str) -> None:
        self.status = status
        super().__init__(message)


_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"upgrade"})


def rewrite_request_head(head: bytes, identity: ClientIdentity) -> tuple[bytes, int]:
    """``head`` (up to and excluding the blank line) with the client's :data:`CLIENT_IDENTITY_HEADER`
    removed, ours and ``Connection: close`` added; returns (new head + blank line, body length).

    Refused (:class:`BadRequestHead`): a malformed request line or header line, obsolete line
    folding, ``Transfer-Encoding`` (411), a bad or conflicting ``Content-Length`` (400).
    Decides on the parsed header names (case-insensitive), never on substrings.
    """
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or not _TOKEN.fullmatch(request_line[0]) or not request_line[1]:
        raise BadRequestHead("400 Bad Request", "malformed request line")
    if not request_line[2].startswith(b"HTTP/1."):
        raise BadRequestHead("505 HTTP Version Not Supported", "expected HTTP/1.x")
    own = CLIENT_IDENTITY_HEADER.lower().encode()
    kept: list[bytes] = [lines[0]]
    lengths: set[bytes] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequestHead("400 Bad Request", "malformed header line (or obsolete folding)")
        lname = name.lower()
        if lname == own or lname in _HOP_BY_HOP:
            continue
        if lname == b"transfer-encoding":
            raise BadRequestHead(
                "411 Length Required",
                "this proxy forwards client identities and accepts only Content-Length bodies",
            )
        if lname == b"content-length":
            lengths.add(value.strip())
        kept.append(line)
    if len(lengths) > 1 or any(not v.isdigit() or len(v) > 18 for v in lengths):
        raise BadRequestHead("400 Bad Request", "bad or conflicting Content-Length")
    length = int(next(iter(lengths))) if lengths else 0
    kept.append(f"{CLIENT_IDENTITY_HEADER}: {identity.header_value()}".encode())
    kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n", length

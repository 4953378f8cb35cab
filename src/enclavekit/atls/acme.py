"""Publicly trusted certificates for the attested-TLS proxy, by ACME (RFC 8555), bound to
attestation by the proxy's ``/.well-known/attestation`` answer.

The protocol is certbot's ``acme`` library (with ``josepy``; extra ``acme``), not our own code.
:class:`AcmeIdentity` is an :class:`~.server.EnclaveIdentity` whose :meth:`~AcmeIdentity.obtain`:

1. generates a fresh P-384 key in memory (a new key for every certificate);
2. orders a certificate for ``domains`` with a CSR for that key;
3. answers each authorization's **http-01** challenge on :class:`Http01Responder` (the
   ``--acme-http-listen`` address the parent forwards port 80 to), then finalizes the order;
4. installs the full chain it gets back (the leaf must be for our key).

Renewal and its backoff are the parent's (2/3 of the lifetime, retries doubling up to
:data:`RENEWAL_POLL`). The account key lives in memory too: every start registers a **new ACME
account** (acceptable to Let's Encrypt; it means account-level rate limits are per start, and no
account survives a restart to revoke with — revoke by certificate key instead, which also never
leaves the enclave, so in practice: let the short-lived certificate expire).

What binds the certificate to the enclave is not the ACME CA (it vouches only for control of the
domain's port 80) but the fresh attestation document: ``public_key`` = the certificate's key and
``user_data`` = :func:`~.server.attestation_user_data` (certificate DER, nonce), exactly as for a
CA-issued certificate. The ACME certificate embeds no document, so clients must ask for a fresh one
(``atls get --fresh``).

Not supported: wildcard names (they need dns-01), tls-alpn-01, external account binding.
"""

from __future__ import annotations

import datetime as _dt
import http.server
import logging
import threading
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.atls.ca import Clock, utc_now
from enclavekit.atls.server import Attester, EnclaveIdentity, ServingIdentity
from enclavekit.errors import MalformedInput, UsageError, VerificationError

log = logging.getLogger(__name__)

PIP_LINE = "pip install 'enclavekit[acme]'"
#: Longest wait for an order (validation + finalization).
ORDER_TIMEOUT = 90.0
#: Renewal checks at least this often (seconds); failed renewals back off up to it.
RENEWAL_POLL = 600.0
#: An http-01 request (line + headers) must arrive within this many seconds.
HTTP01_TIMEOUT = 5.0
#: A request the ACME server refuses with ``badNonce`` is sent again with a fresh nonce this many
#: times (RFC 8555 section 6.5: the client should retry; Let's Encrypt and Pebble reject some valid
#: nonces on purpose). ``acme``'s own client retries once.
BAD_NONCE_RETRIES = 8
_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


def _require_acme() -> None:
    """UsageError (exit 2) naming the pip line when the ``acme`` extra is missing."""
    try:
        import acme.client  # noqa: F401
        import josepy  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"ACME certificates need certbot's acme library; {PIP_LINE}") from exc


class Http01Responder:
    """Serves ``/.well-known/acme-challenge/TOKEN`` for the challenges of a pending order, 404 for
    everything else (including tokens of no pending order). Plain HTTP, by design of http-01.

    Bounded: the request line and headers are read by :mod:`http.server` (64 KiB line, 100
    headers) within :data:`HTTP01_TIMEOUT` seconds; no request body is read; at most the pending
    order's tokens are held.
    """

    def __init__(self, host: str, port: int) -> None:
        self._tokens: dict[str, bytes] = {}
        self._lock = threading.Lock()
        tokens, lock = self._tokens, self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = HTTP01_TIMEOUT
            server_version = "enclavekit-http01"
            sys_version = ""

            def do_GET(self) -> None:
                with lock:
                    body = tokens.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http-01: " + format, *args)

        try:
            self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise UsageError(f"--acme-http-listen: cannot listen on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Http01Responder:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="acme-http01", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread = None

    def publish(self, path: str, key_authorization: str) -> None:
        if not path.startswith(_CHALLENGE_PREFIX):
            raise MalformedInput(f"http-01 path {path[:80]!r} is outside {_CHALLENGE_PREFIX}")
        with self._lock:
            self._tokens[path] = key_authorization.encode()

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


def _patient_network(*args: Any, **kwargs: Any) -> Any:
    """``acme.client.ClientNetwork`` that retries a ``badNonce`` refusal up to
    :data:`BAD_NONCE_RETRIES` times, each time with a new nonce (the refusal's ``Replay-Nonce``
    or a fresh one from ``newNonce``); any other error, and the last ``badNonce``, propagate."""
    import acme.client
    import acme.messages

    class PatientNetwork(acme.client.ClientNetwork):
        def post(self, *a: Any, **kw: Any) -> Any:
            for _ in range(BAD_NONCE_RETRIES):
                try:
                    return self._post_once(*a, **kw)
                except acme.messages.Error as error:
                    if error.code != "badNonce":
                        raise
                    log.debug("ACME server refused the nonce; retrying with a new one")
            return self._post_once(*a, **kw)

    return PatientNetwork(*args, **kwargs)


def _check_domains(domains: Sequence[str]) -> tuple[str, ...]:
    if not domains:
        raise UsageError("--acme needs at least one --domain")
    for domain in domains:
        if domain.startswith("*."):
            raise UsageError(f"--domain {domain}: wildcard names need dns-01; http-01 cannot")
        if not domain or len(domain) > 253 or any(not part for part in domain.split(".")):
            raise UsageError(f"--domain: expected a DNS name, found {domain[:80]!r}")
    return tuple(dict.fromkeys(domains))


class AcmeIdentity(EnclaveIdentity):
    """An :class:`~.server.EnclaveIdentity` whose certificate comes from an ACME CA (module
    docstring). ``ca_bundle``: PEM file of the roots for the ACME server's own TLS (default: the
    system store). ``email``: the account's contact (optional)."""

    def __init__(
        self,
        directory_url: str,
        domains: Sequence[str],
        nsm: Attester,
        responder: Http01Responder,
        *,
        ca_bundle: str | None = None,
        email: str | None = None,
        clock: Clock = utc_now,
        renew_fraction: float = 2 / 3,
        timeout: float = ORDER_TIMEOUT,
    ) -> None:
        _require_acme()
        self.domains = _check_domains(domains)
        # No enclavekit CA: the parent's ``ca`` stays None; obtain() is ours.
        super().__init__(
            None,  # type: ignore[arg-type]
            self.domains[0],
            nsm,
            clock=clock,
            renew_fraction=renew_fraction,
        )
        self.directory_url = directory_url
        self.responder = responder
        self.ca_bundle = ca_bundle
        self.email = email
        self.timeout = timeout
        self._client: Any = None
        self._account_key: Any = None
        self._acme_lock = threading.Lock()

    def _account(self) -> Any:
        """The ACME client with a registered account (a new in-memory account per instance)."""
        if self._client is not None:
            return self._client
        import acme.client
        import acme.messages
        import josepy

        account_key = josepy.jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        net = _patient_network(
            account_key,
            alg=josepy.jwa.ES256,
            # requests takes a CA bundle path (acme annotates verify_ssl as bool).
            verify_ssl=self.ca_bundle if self.ca_bundle else True,
            user_agent="enclavekit-atls",
            timeout=int(self.timeout),
        )
        directory = acme.client.ClientV2.get_directory(self.directory_url, net)
        client = acme.client.ClientV2(directory, net)
        client.new_account(
            acme.messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
        )
        self._client, self._account_key = client, account_key
        return client

    def obtain(self) -> ServingIdentity:
        """Steps 1-4 of the module docstring; installs and returns the new identity."""
        import acme.challenges
        import acme.crypto_util
        import acme.errors
        import requests

        try:
            with self._acme_lock:
                key = ec.generate_private_key(ec.SECP384R1())
                key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                csr_pem = acme.crypto_util.make_csr(key_pem, list(self.domains))
                client = self._account()
                order = client.new_order(csr_pem)
                try:
                    for authz in order.authorizations:
                        if authz.body.status.name == "valid":
                            continue
                        challb = next(
                            (
                                c
                                for c in authz.body.challenges
                                if isinstance(c.chall, acme.challenges.HTTP01)
                            ),
                            None,
                        )
                        if challb is None:
                            raise VerificationError(
                                f"the ACME server offers no http-01 challenge for"
                                f" {authz.body.identifier.value}; expected http-01"
                            )
                        response, validation = challb.response_and_validation(self._account_key)
                        self.responder.publish(challb.chall.path, validation)
                        client.answer_challenge(challb, response)
                    deadline = _dt.datetime.now() + _dt.timedelta(seconds=self.timeout)
                    order = client.poll_and_finalize(order, deadline=deadline)
                finally:
                    self.responder.clear()
                    # Renewals are months apart: keep no idle connection to the ACME server.
                    client.net.session.close()
                chain = tuple(x509.load_pem_x509_certificates(order.fullchain_pem.encode()))
        except requests.RequestException as exc:
            raise UsageError(
                f"cannot reach the ACME server {self.directory_url}: {exc}; check --acme and"
                " --acme-ca-bundle"
            ) from exc
        except acme.errors.ValidationError as exc:
            raise VerificationError(
                f"the ACME server could not validate http-01 for {', '.join(self.domains)}: {exc};"
                " check that port 80 of each --domain reaches --acme-http-listen"
            ) from exc
        except acme.errors.TimeoutError as exc:
            raise VerificationError(
                f"the ACME order did not complete within {self.timeout:.0f} s"
            ) from exc
        except acme.errors.Error as exc:
            raise VerificationError(f"the ACME server refused: {exc}") from exc
        except ValueError as exc:
            raise MalformedInput(f"ACME certificate chain: expected PEM ({exc})") from exc
        return self._install(key, chain)

    def start_renewal(self, *, poll: float = RENEWAL_POLL) -> None:
        super().start_renewal(poll=poll)

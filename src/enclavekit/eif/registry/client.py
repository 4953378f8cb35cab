"""A thin OCI distribution (v1.1) client over httpx: ``/v2/`` ping, manifests, blobs.

Why our own layer over httpx rather than a registry library: the build needs every blob hashed while
it streams into a content-addressed cache, bounded memory, retries that restart a blob cleanly, and
Docker's credential sources (config.json, credential helpers, ECR); oras-py covers the protocol but
buffers and verifies differently and knows none of Docker's credential helpers. The protocol part we
use is small (three GET endpoints and the token dance); httpx (extra ``registry``) does HTTP/TLS.

Transport rules (Docker's): HTTPS with certificate checking against the system trust store (and
``SSL_CERT_FILE``), plus ``ca.crt``/``*.crt`` from ``/etc/docker/certs.d/<host[:port]>/`` and
``/etc/containers/certs.d/<host[:port]>/``. Registries on loopback may fall back to plain HTTP when
they do not speak TLS. ``insecure`` hosts (``--insecure-registry``) may use plain HTTP or unchecked
TLS, with a warning. Retries: 5xx, 429 (``Retry-After`` honoured up to :data:`MAX_RETRY_AFTER` s) and
transport failures, :data:`DEFAULT_ATTEMPTS` attempts with exponential backoff.

Bounds: manifests and token answers at most :data:`MAX_MANIFEST_BYTES`; blobs exactly the size their
descriptor names (checked while streaming, in :mod:`~enclavekit.eif.registry.cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavekit.eif.registry.auth import Credentials, parse_challenge
from enclavekit.eif.registry.reference import ImageReference
from enclavekit.errors import MalformedInput, UsageError

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 << 20
DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF = 0.5
MAX_RETRY_AFTER = 10.0
CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
_RETRY_STATUS = {429, 500, 502, 503, 504}


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise UsageError(
            "pulling from a registry needs httpx, a dependency of enclavekit that is missing: "
            "reinstall it (pip install --force-reinstall enclavekit)"
        ) from None
    return httpx


class RegistryUnavailable(UsageError):
    """The registry could not be reached or kept failing (exit 2)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    data: bytes
    digest: str


class RegistryClient:
    """Pull-side client for one repository (``reference.repository`` on ``reference.api_host``)."""

    def __init__(
        self,
        reference: ImageReference,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        certs_dirs: Sequence[Path] = CERTS_DIRS,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        timeout: float = 60.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        httpx = _httpx()
        self.reference = reference
        self.credentials = credentials
        self.insecure = insecure
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.host = reference.api_host
        self._auth: str | None = None
        self._base: str | None = None
        self._warn = warn or (lambda message: log.warning("%s", message))
        context = ssl.create_default_context()
        for base in certs_dirs:
            directory = base / self.host
            if directory.is_dir():
                for cert in sorted(directory.glob("*.crt")):
                    context.load_verify_locations(cafile=str(cert))
        if insecure:
            self._warn(
                f"--insecure-registry {reference.registry}: TLS certificates of this registry are "
                "not checked and plain HTTP is allowed; anyone on the network path can change "
                "what is pulled (digests still are checked)"
            )
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._http = httpx.Client(
            verify=context,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            follow_redirects=True,
            trust_env=True,
            headers={"User-Agent": "enclavekit"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection and auth ---------------------------------------------------------------------

    def _ping(self) -> str:
        """Choose the scheme by GET /v2/ (and remember a challenge); returns the base URL."""
        if self._base is not None:
            return self._base
        httpx = _httpx()
        plain_ok = self.insecure or self.reference.is_loopback
        errors = []
        for scheme in ("https", "http") if plain_ok else ("https",):
            base = f"{scheme}://{self.host}"
            try:
                response = self._http.get(f"{base}/v2/")
            except httpx.TransportError as exc:
                text = str(exc)
                if "CERTIFICATE_VERIFY_FAILED" in text:
                    raise UsageError(
                        f"the registry {self.host} presented a TLS certificate that is not trusted "
                        f"({text}); add its CA to /etc/docker/certs.d/{self.host}/ca.crt or "
                        "SSL_CERT_FILE, or pass --insecure-registry "
                        f"{self.reference.registry} (unsafe)"
                    ) from None
                errors.append(f"{scheme}: {text or type(exc).__name__}")
                continue
            if response.status_code in (200, 401):
                if response.status_code == 401:
                    self._answer_challenge(response)
                self._base = base
                return base
            errors.append(f"{scheme}: HTTP {response.status_code}")
            break
        raise RegistryUnavailable(
            f"cannot reach the registry {self.host} ({'; '.join(errors)}); check the host and "
            "port in --docker-uri and that the registry is up"
        )

    def _answer_challenge(self, response: Any) -> None:
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        source = f" from {self.credentials.source}" if self.credentials else ""
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise UsageError(
                f"the registry {self.host} asks for an unsupported authentication scheme "
                f"({response.headers.get('www-authenticate', 'none')!r})"
            )
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise UsageError(
                    f"the registry {self.host} needs credentials; log in (docker login "
                    f"{self.reference.registry}) or add them to ~/.docker/config.json"
                )
            self._auth = self.credentials.basic_header()
            return
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise UsageError(
                f"the registry {self.host} sent a bearer challenge without a realm URL"
            )
        if realm.startswith("http://") and not (self.insecure or self.reference.is_loopback):
            raise UsageError(
                f"the registry {self.host} sends its token realm over plain HTTP ({realm}); refused"
            )
        params = {"scope": f"repository:{self.reference.repository}:pull"}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic_header()
        token_response = self._send("GET", realm, params=params, headers=headers, auth=False)
        if token_response.status_code in (401, 403):
            raise UsageError(
                f"the registry {self.host}'s token service refused the credentials{source} "
                f"(HTTP {token_response.status_code}); check the user name and password"
            )
        if token_response.status_code != 200:
            raise UsageError(
                f"the token service of {self.host} answered HTTP {token_response.status_code}"
            )
        body = token_response.content
        if len(body) > MAX_MANIFEST_BYTES:
            raise MalformedInput(f"the token answer of {self.host} is too large")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise MalformedInput(f"the token service of {self.host} answered no token")
        self._auth = f"Bearer {token}"

    # -- requests ----------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Any:
        """A request with retries on 5xx/429/transport errors (body read fully: small answers)."""
        httpx = _httpx()
        for attempt in range(self.attempts):
            all_headers = dict(headers or {})
            if auth and self._auth is not None:
                all_headers["Authorization"] = self._auth
            try:
                response = self._http.request(method, url, params=params, headers=all_headers)
            except httpx.TransportError as exc:
                if attempt + 1 == self.attempts:
                    raise RegistryUnavailable(
                        f"the registry {self.host} stopped answering ({exc or type(exc).__name__}) "
                        f"after {self.attempts} attempts; try again when it is up"
                    ) from None
                self._sleep(attempt, None)
                continue
            if response.status_code in _RETRY_STATUS and attempt + 1 < self.attempts:
                self._sleep(attempt, response.headers.get("retry-after"))
                continue
            return response
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2**attempt)
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
        time.sleep(delay)

    def _get(self, path: str, *, accept: str | None = None) -> Any:
        base = self._ping()
        headers = {"Accept": accept} if accept else {}
        response = self._send("GET", f"{base}{path}", headers=headers)
        if response.status_code == 401:
            self._answer_challenge(response)
            response = self._send("GET", f"{base}{path}", headers=headers)
        if response.status_code in (401, 403):
            source = f" from {self.credentials.source}" if self.credentials else " (anonymous)"
            raise UsageError(
                f"the registry {self.host} refused access to {self.reference.repository} with "
                f"the credentials{source} (HTTP {response.status_code}); check the user name, "
                "password and that they may pull this repository"
            )
        if response.status_code in _RETRY_STATUS:
            raise RegistryUnavailable(
                f"the registry {self.host} kept failing (HTTP {response.status_code}) after "
                f"{self.attempts} attempts; try again later"
            )
        return response

    def manifest(self, reference: str, accept: Sequence[str]) -> Manifest:
        """The manifest (or index) named by a tag or digest, its digest checked when by digest."""
        response = self._get(
            f"/v2/{self.reference.repository}/manifests/{reference}", accept=", ".join(accept)
        )
        if response.status_code == 404:
            raise UsageError(
                f"{self.reference}: the registry {self.host} has no manifest "
                f"{reference!r} in {self.reference.repository} (manifest unknown); check the tag "
                "or digest"
            )
        if response.status_code != 200:
            raise UsageError(
                f"the registry {self.host} answered HTTP {response.status_code} for the manifest "
                f"of {self.reference}"
            )
        data = response.content
        if len(data) > MAX_MANIFEST_BYTES:
            raise MalformedInput(
                f"{self.reference}: the manifest is {len(data)} bytes; refusing more than "
                f"{MAX_MANIFEST_BYTES}"
            )
        by_digest = reference.startswith(("sha256:", "sha512:"))  # tags never hold a ':'
        algorithm = reference.partition(":")[0] if by_digest else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if by_digest and digest != reference:
            raise MalformedInput(
                f"{self.reference}: the registry sent a manifest that hashes to {digest}, not to "
                f"the requested {reference}; refused"
            )
        claimed = response.headers.get("docker-content-digest")
        if (
            claimed
            and claimed.startswith("sha256:")
            and algorithm == "sha256"
            and claimed != digest
        ):
            raise MalformedInput(
                f"{self.reference}: the manifest hashes to {digest} but the registry says "
                f"{claimed}; refused"
            )
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return Manifest(media_type, data, digest)

    def blob_bytes(self, digest: str, size: int, what: str) -> bytes:
        """A small blob (a config) read into memory and checked against ``digest`` and ``size``."""
        if size > MAX_MANIFEST_BYTES * 2:
            raise MalformedInput(
                f"{what} is {size} bytes; refusing more than {MAX_MANIFEST_BYTES * 2}"
            )
        response = self._get(f"/v2/{self.reference.repository}/blobs/{digest}")
        if response.status_code != 200:
            raise UsageError(
                f"{what}: the registry {self.host} answered HTTP {response.status_code} for "
                f"blob {digest}"
            )
        data = response.content
        found = (
            f"{digest.partition(':')[0]}:{hashlib.new(digest.partition(':')[0], data).hexdigest()}"
        )
        if found != digest or len(data) != size:
            raise MalformedInput(
                f"{what}: the registry sent {len(data)} bytes hashing to {found}, not {size} bytes "
                f"hashing to {digest}; refused"
            )
        return bytes(data)

    @contextlib.contextmanager
    def blob_stream(self, digest: str, what: str) -> Iterator[Iterator[bytes]]:
        """The bytes of blob ``digest`` as they arrive (one attempt: the caller retries whole blobs).
        Transport failures mid-stream raise :class:`RegistryUnavailable`."""
        httpx = _httpx()
        base = self._ping()
        url = f"{base}/v2/{self.reference.repository}/blobs/{digest}"
        headers = {"Authorization": self._auth} if self._auth else {}
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code == 401:
                    response.read()
                    self._answer_challenge(response)
                    raise _Retry("unauthorised")
                if response.status_code in _RETRY_STATUS:
                    raise _Retry(
                        f"HTTP {response.status_code}", response.headers.get("retry-after")
                    )
                if response.status_code != 200:
                    raise UsageError(
                        f"{what}: the registry {self.host} answered HTTP {response.status_code} "
                        f"for blob {digest}"
                    )
                # No re-chunking: the pieces as the connection delivers them (no extra copy).
                yield _guarded(response.iter_bytes(), self.host)
        except httpx.TransportError as exc:
            raise _Retry(str(exc) or type(exc).__name__) from None

    def retrying(self, attempt_blob: Callable[[], Path], what: str) -> Path:
        """Run ``attempt_blob`` (which streams one blob to the cache) with retries."""
        last = ""
        for attempt in range(self.attempts):
            try:
                return attempt_blob()
            except _Retry as exc:
                last = exc.reason
                if attempt + 1 < self.attempts:
                    self._sleep(attempt, exc.retry_after)
        raise RegistryUnavailable(
            f"{what}: the registry {self.host} stopped answering mid-pull ({last}) after "
            f"{self.attempts} attempts; nothing was built and the cache holds only verified blobs"
        )


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _guarded(chunks: Iterator[bytes], host: str) -> Iterator[bytes]:
    httpx = _httpx()
    try:
        yield from chunks
    except httpx.TransportError as exc:
        raise _Retry(str(exc) or type(exc).__name__) from None

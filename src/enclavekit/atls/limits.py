"""Every limit the attestation CA service enforces on its clients, in one place.

The CA answers unauthenticated clients, so each resource a request can consume has a bound here:
request bodies (size and time, counted while they stream), live challenges (per client and in
total), issuance attempts (token buckets per client and in total, in a bounded table), the audit
log and the certificate records (retention), connections. :class:`CaLimits` carries them as one
configuration object; the module constants are its defaults (documented with their numbers in the
CA service documentation).

A *client* is the peer address of the TCP connection: an IPv4 address, or the /64 network of an
IPv6 address (one host can hold a whole /64). Behind a reverse proxy every request has the proxy's
address; run the CA where it sees its clients' addresses, or raise the per-client limits.

Several worker processes (``ca serve --workers N``): the live-challenge caps are counted in the
shared store, so they hold for all workers together. The token buckets live in each process; to keep
the *totals* bounds for the whole service, each worker gets 1/N of the total issuance rate and burst
and of the connection limit (:meth:`CaLimits.per_worker`), so all workers together never exceed the
configured totals (a worker whose share is used up refuses, even while another still has tokens).
The per-client buckets are not divided: a client's keep-alive connection stays with one worker, and
dividing would halve what a well-behaved single-connection client gets; a client that opens
connections to several workers can reach up to N times its per-client rate, still within the total.
CA replicas on separate hosts (PostgreSQL) each enforce their own limits.

Not handled here: authentication (challenges and issuance are open to anyone who can reach the CA;
the attestation document is the credential).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import timedelta

from enclavekit.errors import UsageError

#: Largest request body: a CSR (≤ 16 KiB PEM) plus a base64 document (≤ 64 KiB raw, ≈ 86 KiB).
MAX_BODY = 128 * 1024
#: Seconds a client may take to send a whole request body (slow senders hold a connection).
BODY_TIMEOUT_SECONDS = 10.0
#: After refusing a body (413, 429), at most this much more of it is read and discarded, for at
#: most this long, so the client can read the refusal before the connection closes.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0
#: Largest ``detail`` text in an error response (refusal diagnostics, never request input).
MAX_ERROR_DETAIL = 1024
#: Live (unexpired) challenges one client may hold; an enclave needs one per certificate.
MAX_LIVE_CHALLENGES_PER_CLIENT = 32
#: Live challenges in total: with the default 60 s lifetime, ≈ 166 new challenges a second.
MAX_LIVE_CHALLENGES = 10_000
#: Issuance attempts (``POST /v1/certificates``) per client: a burst, then a steady rate.
ISSUANCE_BURST = 10
ISSUANCE_RATE_PER_SECOND = 1.0
#: Issuance attempts of all clients together (bounds the CA's CPU spent on verification).
ISSUANCE_BURST_TOTAL = 50
ISSUANCE_RATE_TOTAL_PER_SECOND = 25.0
#: Clients tracked by the issuance rate limiter; the least recently seen is forgotten first.
RATE_LIMIT_TABLE_SIZE = 10_000
#: Audit events older than this are deleted, and at most this many are kept.
AUDIT_RETENTION = timedelta(days=90)
AUDIT_MAX_EVENTS = 100_000
#: Certificate records (with their documents) are deleted this long after their notAfter.
CERTIFICATE_RETENTION = timedelta(days=90)
#: How often (at most) expired challenges, old events and old certificates are deleted.
PRUNE_INTERVAL = timedelta(seconds=10)
#: Concurrent connections the HTTP server accepts; beyond that it answers 503.
MAX_CONNECTIONS = 256
#: Certificates in a document's cabundle: the AWS root + up to 4 intermediates (real: 1 + 3).
MAX_CABUNDLE = 5


class LimitExceeded(UsageError):
    """A client exceeded one of the CA's limits (HTTP 413 or 429); ``retry_after`` in seconds."""

    def __init__(self, message: str, *, status: int = 429, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class CaLimits:
    """The CA service's limits (defaults: the module constants)."""

    max_body: int = MAX_BODY
    body_timeout: float = BODY_TIMEOUT_SECONDS
    max_error_detail: int = MAX_ERROR_DETAIL
    max_live_challenges_per_client: int = MAX_LIVE_CHALLENGES_PER_CLIENT
    max_live_challenges: int = MAX_LIVE_CHALLENGES
    issuance_burst: int = ISSUANCE_BURST
    issuance_rate: float = ISSUANCE_RATE_PER_SECOND
    issuance_burst_total: int = ISSUANCE_BURST_TOTAL
    issuance_rate_total: float = ISSUANCE_RATE_TOTAL_PER_SECOND
    rate_limit_table_size: int = RATE_LIMIT_TABLE_SIZE
    audit_retention: timedelta = AUDIT_RETENTION
    audit_max_events: int = AUDIT_MAX_EVENTS
    certificate_retention: timedelta = CERTIFICATE_RETENTION
    prune_interval: timedelta = PRUNE_INTERVAL
    max_connections: int = MAX_CONNECTIONS
    max_cabundle: int = MAX_CABUNDLE

    def __post_init__(self) -> None:
        positive = {
            "max_body": self.max_body,
            "body_timeout": self.body_timeout,
            "max_error_detail": self.max_error_detail,
            "max_live_challenges_per_client": self.max_live_challenges_per_client,
            "max_live_challenges": self.max_live_challenges,
            "issuance_burst": self.issuance_burst,
            "issuance_rate": self.issuance_rate,
            "issuance_burst_total": self.issuance_burst_total,
            "issuance_rate_total": self.issuance_rate_total,
            "rate_limit_table_size": self.rate_limit_table_size,
            "audit_max_events": self.audit_max_events,
            "max_connections": self.max_connections,
            "max_cabundle": self.max_cabundle,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"CaLimits.{name} must be positive, got {value}")
        if self.audit_retention <= timedelta(0) or self.certificate_retention <= timedelta(0):
            raise ValueError("CaLimits retention periods must be positive")

    def per_worker(self, workers: int) -> CaLimits:
        """The limits one of ``workers`` processes enforces so that all together keep the totals:
        the total issuance rate and burst and the connection limit divided by ``workers``
        (at least 1 each); everything else unchanged."""
        if workers <= 1:
            return self
        return replace(
            self,
            issuance_rate_total=self.issuance_rate_total / workers,
            issuance_burst_total=max(1, self.issuance_burst_total // workers),
            max_connections=max(1, self.max_connections // workers),
        )


#: The :class:`CaLimits` fields a limits file (``ca serve --limits``) may set; the retention
#: periods have their own options.
LIMITS_FILE_FIELDS = frozenset(
    f.name
    for f in fields(CaLimits)
    if f.name not in ("audit_retention", "audit_max_events", "certificate_retention")
)


def limits_from_mapping(obj: object, base: CaLimits, *, source: str) -> CaLimits:
    """``base`` with the numbers of a parsed limits file (YAML/JSON mapping of field names;
    ``prune_interval`` in seconds). ``source`` names the file in errors."""
    if not isinstance(obj, dict):
        raise UsageError(f"{source}: expected a mapping of limit names to numbers")
    unknown = sorted(str(k) for k in obj if k not in LIMITS_FILE_FIELDS)
    if unknown:
        raise UsageError(
            f"{source}: unknown limit(s) {unknown}; expected some of {sorted(LIMITS_FILE_FIELDS)}"
        )
    changes: dict[str, object] = {}
    for name, value in obj.items():
        current = getattr(base, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{source}: {name} must be a number, found {type(value).__name__}")
        if isinstance(current, timedelta):
            changes[name] = timedelta(seconds=value)
        elif isinstance(current, int) and not isinstance(value, int):
            raise UsageError(f"{source}: {name} must be a whole number, found {value}")
        else:
            changes[name] = value
    try:
        return replace(base, **changes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


def client_key(host: str | None) -> str:
    """The rate-limiting identity of a peer address: IPv4 as is, IPv6 as its /64 network."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class TokenBuckets:
    """Token buckets per client plus one shared by all clients, in a table of bounded size.

    A request is allowed when both its client's bucket and the total bucket hold a token; then one
    token is taken from each. When the table is full, the client seen least recently is forgotten
    (it starts again with a full bucket: the total bucket still bounds everyone together).
    Thread-safe.
    """

    def __init__(
        self,
        *,
        burst: int,
        rate: float,
        burst_total: int,
        rate_total: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.rate = float(burst), rate
        self.burst_total, self.rate_total = float(burst_total), rate_total
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._total = (self.burst_total, clock())

    @classmethod
    def for_issuance(cls, limits: CaLimits) -> TokenBuckets:
        return cls(
            burst=limits.issuance_burst,
            rate=limits.issuance_rate,
            burst_total=limits.issuance_burst_total,
            rate_total=limits.issuance_rate_total,
            max_clients=limits.rate_limit_table_size,
        )

    def __len__(self) -> int:
        return len(self._clients)

    @staticmethod
    def _refill(state: tuple[float, float], burst: float, rate: float, now: float) -> float:
        tokens, last = state
        return min(burst, tokens + max(0.0, now - last) * rate)

    def acquire(self, client: str) -> float:
        """Take a token for ``client``: 0.0 if allowed, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            state = self._clients.get(client)
            mine = self.burst if state is None else self._refill(state, self.burst, self.rate, now)
            total = self._refill(self._total, self.burst_total, self.rate_total, now)
            if mine < 1.0 or total < 1.0:
                wait = max(
                    (1.0 - mine) / self.rate if mine < 1.0 else 0.0,
                    (1.0 - total) / self.rate_total if total < 1.0 else 0.0,
                )
                return max(wait, 1e-3)
            self._total = (total - 1.0, now)
            self._clients[client] = (mine - 1.0, now)
            self._clients.move_to_end(client)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return 0.0


def retry_after_header(seconds: float) -> str:
    """An HTTP ``Retry-After`` value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))

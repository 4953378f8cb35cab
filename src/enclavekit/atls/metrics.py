"""Prometheus metrics (text exposition format, ``prometheus-client``) for the CA and the proxy.

Each :class:`CaMetrics` / :class:`ProxyMetrics` has its own registry (several CAs or proxies in one
process never share counters). Label values come only from small fixed sets (refusal reasons are
exception class names, endpoints are route templates, directions ``up``/``down``): no client input
ever becomes a label, so no client can grow a time series. Service names are not labels either (the
CA does not tell unauthenticated clients which services it knows).

CA (``GET /metrics`` on ``ca serve``, unauthenticated):

* ``enclavekit_ca_issuances_total`` — certificates issued;
* ``enclavekit_ca_refusals_total{reason}`` — refused issuances (``malformed_input``, ``verification``,
  ``policy_violation``, ``unknown_service``, ``usage``, …: the snake-cased exception class);
* ``enclavekit_ca_challenges{state}`` — unconsumed challenges, ``live`` or ``expired`` (not yet
  purged), counted in the store at scrape time;
* ``enclavekit_ca_request_seconds{endpoint}`` — request latency histogram;
* ``enclavekit_ca_database_errors_total`` — store exceptions (SQLite or PostgreSQL) seen by requests.

Proxy (``atls proxy --metrics-listen HOST:PORT``, off by default):

* ``enclavekit_atls_handshakes_total{result}`` — TLS handshakes, ``ok`` or ``failed``;
* ``enclavekit_atls_attestation_requests_total{result}`` — ``/.well-known/attestation`` answers
  (``ok``, ``bad_request``, ``failed``);
* ``enclavekit_atls_client_refusals_total{reason}`` — mutual TLS refusals (``no_certificate``,
  ``usage``, ``attestation``, ``policy``, ``identity``);
* ``enclavekit_atls_bytes_relayed_total{direction}`` — ``up`` (client → app) and ``down``;
* ``enclavekit_atls_certificate_not_after_seconds`` — notAfter of the serving certificate (Unix
  time; alert on ``… - time() < 86400``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from enclavekit.errors import Error, PolicyViolation, UsageError

#: prometheus-client is a core dependency; missing means a broken install.
PIP_LINE = "pip install --force-reinstall enclavekit"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the installed extra
        raise UsageError(f"metrics need prometheus-client; {PIP_LINE}") from exc
    return prometheus_client


def refusal_reason(exc: Error) -> str:
    """The ``reason`` label of a refused issuance: the snake-cased class, or ``unknown_service``."""
    if isinstance(exc, PolicyViolation) and any(f.check == "service" for f in exc.failures):
        return "unknown_service"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower().removesuffix("_error")


def _is_database_error(exc: BaseException) -> bool:
    import sqlite3

    if isinstance(exc, sqlite3.Error):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the installed extra
        return False
    return isinstance(exc, psycopg.Error)


class CaMetrics:
    """The CA's counters; :meth:`install` wires them into a FastAPI app and an :class:`Issuer`."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        pc = _prometheus()
        self.registry = pc.CollectorRegistry()
        self._clock = clock
        self.issuances = pc.Counter(
            "enclavekit_ca_issuances", "Certificates issued", registry=self.registry
        )
        self.refusals = pc.Counter(
            "enclavekit_ca_refusals", "Refused issuances", ["reason"], registry=self.registry
        )
        self.latency = pc.Histogram(
            "enclavekit_ca_request_seconds",
            "CA request latency",
            ["endpoint"],
            registry=self.registry,
        )
        self.database_errors = pc.Counter(
            "enclavekit_ca_database_errors",
            "Store exceptions seen by requests",
            registry=self.registry,
        )
        self._store: Any = None

    def observe_issuance(self, exc: Error | None) -> None:
        """Issuer observer: ``None`` for an issued certificate, else the refusal."""
        if exc is None:
            self.issuances.inc()
        else:
            self.refusals.labels(refusal_reason(exc)).inc()

    def _collect_challenges(self) -> Iterator[Any]:
        _prometheus()
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "enclavekit_ca_challenges", "Unconsumed challenges", labels=["state"]
        )
        count = getattr(self._store, "count_challenges", None)
        if count is not None:
            from enclavekit.atls.ca import utc_now

            now = (self._clock or utc_now)()
            try:
                live, expired = count(now)
            except Exception as exc:
                if not _is_database_error(exc):
                    raise
                self.database_errors.inc()
            else:
                family.add_metric(["live"], live)
                family.add_metric(["expired"], expired)
        yield family

    def install(self, app: Any, issuer: Any) -> None:
        """Add ``GET /metrics``, the latency/database-error middleware and the issuance observer."""
        from fastapi.responses import Response

        pc = _prometheus()
        self._store = issuer.store
        self._clock = self._clock or issuer.clock
        issuer.add_observer(self.observe_issuance)
        metrics = self

        class _Challenges:
            def collect(self) -> Iterator[Any]:
                return metrics._collect_challenges()

        self.registry.register(_Challenges())

        app.add_middleware(_MeasuredRequests, metrics=self)

        def metrics_endpoint() -> Response:
            return Response(pc.generate_latest(self.registry), media_type=pc.CONTENT_TYPE_LATEST)

        app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    def render(self) -> bytes:
        return bytes(_prometheus().generate_latest(self.registry))


class _MeasuredRequests:
    """ASGI middleware: each HTTP request's latency by route template, and store exceptions counted.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``), which runs
    every request through an extra task group and memory streams: a third of the event loop's CPU per
    issuance in a profile of ``ca serve``. Latency runs from the request to the end of its response
    (or the exception)."""

    def __init__(self, app: Any, metrics: CaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if _is_database_error(exc):
                self.metrics.database_errors.inc()
            raise
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class ProxyMetrics:
    """The proxy's counters (see the module docstring)."""

    def __init__(self) -> None:
        pc = _prometheus()
        self.registry = pc.CollectorRegistry()
        self.handshakes = pc.Counter(
            "enclavekit_atls_handshakes", "TLS handshakes", ["result"], registry=self.registry
        )
        self.attestation_requests = pc.Counter(
            "enclavekit_atls_attestation_requests",
            "Fresh attestation requests",
            ["result"],
            registry=self.registry,
        )
        self.client_refusals = pc.Counter(
            "enclavekit_atls_client_refusals",
            "Refused mutual-TLS clients",
            ["reason"],
            registry=self.registry,
        )
        self.bytes_relayed = pc.Counter(
            "enclavekit_atls_bytes_relayed", "Bytes relayed", ["direction"], registry=self.registry
        )
        self.certificate_not_after = pc.Gauge(
            "enclavekit_atls_certificate_not_after_seconds",
            "notAfter of the serving certificate (Unix time)",
            registry=self.registry,
        )
        for result in ("ok", "failed"):
            self.handshakes.labels(result)
        for direction in ("up", "down"):
            self.bytes_relayed.labels(direction)

    def set_certificate(self, not_after: datetime) -> None:
        self.certificate_not_after.set(not_after.timestamp())

    def render(self) -> bytes:
        return bytes(_prometheus().generate_latest(self.registry))

    def serve(self, host: str, port: int) -> Any:
        """Serve ``GET /metrics`` on ``host:port`` (a background thread); returns the server."""
        server, _thread = _prometheus().start_http_server(port, addr=host, registry=self.registry)
        return server

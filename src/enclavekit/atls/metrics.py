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
* ``enclavekit_ca_database_errors_total`` — store exceptions (SQLite or PostgreSQL) seen by requests;
* ``enclavekit_ca_workers`` — worker processes serving (1 for a single process).

Several workers (``ca serve --workers N``, N > 1): prometheus-client's multiprocess mode, set up by
:class:`MultiprocessDir`. Each worker writes its counters and histograms to its own files in one
directory of the run, and ``/metrics`` (whichever worker answers) merges every file with
prometheus-client's ``MultiProcessCollector``: counters and histograms are the totals of all the
workers that ever served in this run, a replaced worker's counts included; ``enclavekit_ca_workers``
is a ``livesum`` gauge (live workers only: the parent marks exited ones dead); the challenges gauge
is counted in the shared store by the answering worker (the same for all, not summed).

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

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from enclavekit.errors import Error, PolicyViolation, UsageError

#: prometheus-client is a core dependency; missing means a broken install.
PIP_LINE = "pip install --force-reinstall enclavekit"
#: The environment variable prometheus-client's multiprocess mode reads (at each metric's creation).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


def _slot(index: int) -> str:
    """The process identifier of worker slot ``index`` in file names (no ``_``: it splits them)."""
    return f"worker{index}"


class MultiprocessDir:
    """The prometheus-client multiprocess directory of one ``ca serve --workers N`` run (N > 1).

    :meth:`create` (in the parent, before any worker forks) makes a new directory with
    :func:`tempfile.mkdtemp` (mode 0700, under ``$TMPDIR`` or ``/tmp``): its name was never used, so
    it starts empty and no file of an earlier run (say one killed with SIGKILL, whose directory stays
    behind) is ever counted. Hooks for :func:`enclavekit.atls.workers.serve`: :meth:`worker_init`
    (in each worker, before its application and :class:`CaMetrics` are built) points the worker's
    prometheus-client at the directory; :meth:`on_worker_exit` (in the parent) marks an exited
    worker dead (its ``live*`` gauge files go; its counters stay in the totals). :meth:`close` (the
    end of the ``with`` block, after every worker has exited) removes the directory.

    Bound: files are named by worker *slot* (``worker0`` … ``worker{N-1}``), not by PID. A
    replacement worker takes the slot of the one it replaces and reopens its files, counting on from
    its totals (nothing lost, nothing counted twice), so the directory holds at most 3 files per
    slot — counters, histograms, the ``livesum`` gauge; 64 KiB each, the label sets being fixed —
    whatever the number of respawns. prometheus-client requires distinct identifiers for processes
    alive at the same time: a slot has one process at a time, because the supervisor starts the
    replacement only after it has reaped the dead worker.

    Not handled: the directory of a run whose parent was killed with SIGKILL stays in the temp dir
    (its workers exit by themselves); processes a worker forks must not use the metrics (they would
    share the worker's files).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path | None = None) -> MultiprocessDir:
        """A new, empty directory (0700) in ``parent`` (default: the system temp dir)."""
        return cls(Path(tempfile.mkdtemp(prefix="enclavekit-ca-metrics-", dir=parent)))

    def worker_init(self, index: int) -> None:
        """In worker ``index``, before its metrics exist: multiprocess mode on this directory.

        prometheus-client chooses its value class when first imported, from the environment: this
        process may have imported it before (in the parent, before the fork), so the class is
        replaced here too, with this slot as the process identifier.
        """
        _prometheus()
        from prometheus_client import values

        os.environ[MULTIPROC_ENV] = str(self.path)
        slot = _slot(index)
        values.ValueClass = values.MultiProcessValue(lambda: slot)  # type: ignore[no-untyped-call]

    def on_worker_exit(self, _pid: int, index: int) -> None:
        """In the parent, when worker ``index`` has exited (before its replacement starts)."""
        _prometheus()
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(_slot(index), str(self.path))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> MultiprocessDir:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


def _require_multiprocess(path: Path) -> None:
    from prometheus_client import values

    found = os.environ.get(MULTIPROC_ENV)
    if found != str(path) or not getattr(values.ValueClass, "_multiprocess", False):
        raise ValueError(
            f"CaMetrics(multiprocess_dir={str(path)!r}) needs prometheus-client in multiprocess"
            f" mode on that directory ({MULTIPROC_ENV}={found!r}); call"
            " MultiprocessDir.worker_init in this process before creating the metrics"
        )


class CaMetrics:
    """The CA's counters; :meth:`install` wires them into a FastAPI app and an :class:`Issuer`.

    ``multiprocess_dir`` (a :class:`MultiprocessDir` path, after its ``worker_init`` in this
    process): the values go to that directory's files and :attr:`registry` collects all of them,
    i.e. every worker's; without it, this object's own counts (a registry of its own).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        multiprocess_dir: Path | None = None,
    ) -> None:
        pc = _prometheus()
        self.registry = pc.CollectorRegistry()
        own: Any = self.registry
        if multiprocess_dir is not None:
            _require_multiprocess(multiprocess_dir)
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
            own = None  # registered, they would be counted twice: the collector reads their files
        self._clock = clock
        self.issuances = pc.Counter("enclavekit_ca_issuances", "Certificates issued", registry=own)
        self.refusals = pc.Counter(
            "enclavekit_ca_refusals", "Refused issuances", ["reason"], registry=own
        )
        self.latency = pc.Histogram(
            "enclavekit_ca_request_seconds", "CA request latency", ["endpoint"], registry=own
        )
        self.database_errors = pc.Counter(
            "enclavekit_ca_database_errors", "Store exceptions seen by requests", registry=own
        )
        self.workers = pc.Gauge(
            "enclavekit_ca_workers",
            "Worker processes serving",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.workers.set(1)
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

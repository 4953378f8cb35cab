"""``enclavekit ca init | root | serve | revoke | prune``: the attestation certificate authority."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives import serialization

from enclavekit.atls.ca import (
    Issuer,
    NitroEvidenceVerifier,
    init_state_dir,
    load_admin_token,
    load_ca_keys,
    load_ca_policy,
    prune_store,
    revoke_certificate,
)
from enclavekit.atls.limits import (
    AUDIT_MAX_EVENTS,
    AUDIT_RETENTION,
    CaLimits,
    limits_from_mapping,
)
from enclavekit.atls.store import open_store
from enclavekit.cli._common import bind_error, host_port, nsm_verifier, root_option
from enclavekit.cli._files import MAX_POLICY_FILE, read_input, require_text
from enclavekit.cli._log import event, log_format_option, service_logging
from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.errors import UsageError
from enclavekit.pki.roots import fingerprint

_state_dir = click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the CA key, root, admin token and (by default) its SQLite database.",
)
_database = click.option(
    "--database",
    metavar="URL",
    help="postgresql://… to share state between CA replicas (default: SQLite in --state-dir).",
)

F = TypeVar("F", bound=Callable[..., Any])


def _retention(func: F) -> F:
    """``--audit-retention-days`` and ``--audit-max-events`` (``ca serve`` and ``ca prune``)."""
    func = click.option(
        "--audit-max-events",
        type=click.IntRange(1000, 100_000_000),
        default=AUDIT_MAX_EVENTS,
        show_default=True,
        help="Keep at most this many audit events (the newest).",
    )(func)
    return click.option(
        "--audit-retention-days",
        type=click.IntRange(1, 36500),
        default=AUDIT_RETENTION.days,
        show_default=True,
        help="Delete audit events (and certificate records expired) older than this many days.",
    )(func)


def _retention_limits(audit_retention_days: int, audit_max_events: int) -> CaLimits:
    retention = timedelta(days=audit_retention_days)
    return CaLimits(
        audit_retention=retention,
        certificate_retention=retention,
        audit_max_events=audit_max_events,
    )


@click.group("ca")
def ca_group() -> None:
    """Attestation CA: issues short-lived TLS certificates to attested enclaves."""


@ca_group.command("init")
@_state_dir
@click.option("--common-name", default="enclavekit attestation CA", show_default=True)
@json_option
def init(state_dir: Path, common_name: str, as_json: bool) -> None:
    """Create the CA key (P-384), its self-signed root and an admin token in --state-dir."""
    keys = init_state_dir(state_dir, common_name=common_name)
    info = {
        "state_dir": str(state_dir),
        "root_sha256": fingerprint(keys.root),
        "root_pem": keys.root_pem.decode(),
    }
    if as_json:
        emit_json(info)
    else:
        stderr.print(f"CA created in {state_dir}; root SHA-256 {info['root_sha256']}")


@ca_group.command("root")
@_state_dir
@json_option
def root(state_dir: Path, as_json: bool) -> None:
    """Print the CA root certificate (PEM) — the trust anchor for clients (curl --cacert)."""
    keys = load_ca_keys(state_dir)
    if as_json:
        emit_json({"root_sha256": fingerprint(keys.root), "root_pem": keys.root_pem.decode()})
    else:
        click.echo(keys.root.public_bytes(serialization.Encoding.PEM).decode(), nl=False)


@ca_group.command("serve")
@click.option(
    "--listen",
    required=True,
    metavar="HOST:PORT",
    help="Address of the HTTP API: HOST:PORT or tcp://HOST:PORT (port 0: any free port).",
)
@_state_dir
@click.option(
    "--policy",
    "policy_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA policy (YAML/JSON): services, their DNS names and PCR allowlists.",
)
@root_option
@_database
@_retention
@click.option(
    "--tls",
    is_flag=True,
    help="Serve HTTPS with a certificate from the CA's own root (key in memory, new each start).",
)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    metavar="NAME",
    help="DNS name or IP address for the --tls certificate (repeatable; what clients connect to).",
)
@click.option(
    "--unsafe-plain-http",
    is_flag=True,
    help="Allow plain HTTP on a non-loopback address (admin token and issuance in clear).",
)
@log_format_option
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Worker processes sharing the listening socket and the store [default: CPU count].",
)
@click.option(
    "--sqlite-synchronous",
    type=click.Choice(["normal", "full"]),
    default="normal",
    show_default=True,
    help="SQLite durability: full syncs the disk at every issuance (survives power loss).",
)
@click.option(
    "--limits",
    "limits_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML/JSON mapping overriding limits on clients (names and defaults: CA documentation).",
)
def serve(
    listen: str,
    state_dir: Path,
    policy_file: Path,
    roots: tuple[str, ...],
    database: str | None,
    audit_retention_days: int,
    audit_max_events: int,
    tls: bool,
    tls_names: tuple[str, ...],
    unsafe_plain_http: bool,
    log_format: str,
    workers: int | None,
    sqlite_synchronous: str,
    limits_file: Path | None,
) -> None:
    """Serve the CA HTTP API (OpenAPI at /openapi.json, Prometheus at /metrics) until interrupted.

    Plain HTTP only on loopback, unless --unsafe-plain-http; elsewhere use --tls. Limits on
    clients (body size, challenges, issuance rate, connections) are listed in the CA service
    documentation; with several workers, the total limits are shared out among them. Logs one
    line on stderr per start, issuance, refusal (with its reason) and stop.
    """
    import contextlib

    from enclavekit.atls import workers as ca_workers
    from enclavekit.atls.ca_tls import in_memory_pem_files, is_loopback, issue_ca_tls_certificate
    from enclavekit.atls.metrics import CaMetrics, MultiprocessDir
    from enclavekit.atls.service import create_app

    host, port = host_port(listen, "--listen")
    count = workers if workers is not None else ca_workers.default_workers()
    if tls_names and not tls:
        raise UsageError("--tls-name goes with --tls")
    if tls and unsafe_plain_http:
        raise UsageError("--tls and --unsafe-plain-http contradict each other; choose one")
    if not tls and not is_loopback(host):
        if not unsafe_plain_http:
            raise UsageError(
                f"--listen {listen} is not a loopback address: plain HTTP would send the admin"
                " token and issuance in clear. Use --tls --tls-name NAME (or --unsafe-plain-http)"
            )
        warn(
            f"serving the CA over plain HTTP on {listen} (--unsafe-plain-http): the admin token,"
            " challenges and certificates cross the network in clear"
        )
    logger = service_logging(log_format)
    keys = load_ca_keys(state_dir)
    require_text(
        read_input(policy_file, "--policy", limit=MAX_POLICY_FILE),
        policy_file,
        "--policy",
        "a YAML or JSON CA policy",
    )
    policy = load_ca_policy(policy_file)
    verifier = nsm_verifier(roots)
    tls_identity = issue_ca_tls_certificate(keys, tls_names, now=datetime.now(UTC)) if tls else None
    limits = _retention_limits(audit_retention_days, audit_max_events)
    if limits_file is not None:
        limits = limits_from_mapping(
            _load_mapping(limits_file, "--limits"), limits, source=f"--limits {limits_file}"
        )
    # Connect and migrate once, before any worker starts.
    open_store(state_dir, database, sqlite_synchronous=sqlite_synchronous).close()
    admin_token = load_admin_token(state_dir)
    mine = limits.per_worker(count)
    # With several workers, /metrics merges every worker's files in this run's directory.
    metrics_dir: MultiprocessDir | None = None

    def make_app() -> object:  # in each worker: its own store connection and metrics
        issuer = Issuer(
            keys,
            policy,
            open_store(state_dir, database, sqlite_synchronous=sqlite_synchronous),
            NitroEvidenceVerifier(verifier, max_cabundle=limits.max_cabundle),
            limits=mine,
        )
        app = create_app(issuer, admin_token=admin_token)
        shared = metrics_dir.path if metrics_dir is not None else None
        CaMetrics(multiprocess_dir=shared).install(app, issuer)
        return app

    try:  # bound here, so that a busy port is exit 2 naming --listen, before any announcement
        sock = socket.create_server((host, port), family=_family(host), backlog=ca_workers.BACKLOG)
    except OSError as exc:
        raise bind_error("--listen", listen, exc) from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    scheme = "https" if tls else "http"
    url = f"{scheme}://{shown}:{bound_port}"
    services = sorted(policy.services)
    status = 0
    with contextlib.ExitStack() as files, sock:
        options: dict[str, object] = {
            "access_log": False,
            "limit_concurrency": mine.max_connections,
            "timeout_keep_alive": 5,
        }
        if tls_identity is not None:
            key, cert = tls_identity
            keyfile, certfile = files.enter_context(in_memory_pem_files(key, [cert]))
            options |= {"ssl_keyfile": keyfile, "ssl_certfile": certfile}
        try:
            event(
                logger,
                "start",
                f"attestation CA listening on {url} with {count} worker(s)"
                f" (services: {', '.join(services)})",
                listen=url,
                services=services,
                workers=count,
            )
            if count > 1:  # removed when the ExitStack closes, after every worker has exited
                metrics_dir = files.enter_context(MultiprocessDir.create())
            status = ca_workers.serve(
                make_app,
                sock,
                workers=count,
                uvicorn_options=options,
                worker_init=metrics_dir.worker_init if metrics_dir is not None else None,
                on_worker_exit=metrics_dir.on_worker_exit if metrics_dir is not None else None,
            )
        finally:
            event(logger, "stop", f"attestation CA on {url} stopped", listen=url)
    if status:
        raise SystemExit(status)


def _load_mapping(path: Path, option: str) -> object:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{option} {path}: not YAML/JSON ({exc})") from exc


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@ca_group.command("revoke")
@click.argument("serial")
@_state_dir
@_database
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    type=click.Choice(
        [
            "unspecified",
            "key_compromise",
            "affiliation_changed",
            "superseded",
            "cessation_of_operation",
        ]
    ),
)
@json_option
def revoke(serial: str, state_dir: Path, database: str | None, reason: str, as_json: bool) -> None:
    """Revoke certificate SERIAL (hex); it appears on the next CRL."""
    try:
        number = int(serial, 16)
    except ValueError as exc:
        raise UsageError(f"SERIAL: expected hex digits, found {serial!r}") from exc
    load_ca_keys(state_dir)  # refuse a directory that holds no CA
    store = open_store(state_dir, database)
    try:
        if store.get_certificate(number) is None:
            raise UsageError(f"no certificate with serial {serial} in this CA's store")
        changed = revoke_certificate(store, number, reason, at=datetime.now(UTC))
    finally:
        store.close()
    if as_json:
        emit_json({"serial": format(number, "x"), "revoked": True, "changed": changed})
    else:
        stderr.print(f"{serial}: {'revoked' if changed else 'already revoked'} ({reason})")


@ca_group.command("prune")
@_state_dir
@_database
@_retention
@json_option
def prune(
    state_dir: Path,
    database: str | None,
    audit_retention_days: int,
    audit_max_events: int,
    as_json: bool,
) -> None:
    """Delete expired challenges, old audit events and long-expired certificate records now.

    `ca serve` does the same every few seconds with the same options; this is for a CA that is
    not running, or after lowering the retention.
    """
    load_ca_keys(state_dir)  # refuse a directory that holds no CA
    limits = _retention_limits(audit_retention_days, audit_max_events)
    store = open_store(state_dir, database)
    try:
        counts = prune_store(store, limits, at=datetime.now(UTC))
    finally:
        store.close()
    deleted = {
        "challenges": counts.challenges,
        "events": counts.events,
        "certificates": counts.certificates,
    }
    if as_json:
        emit_json({"deleted": deleted})
    else:
        stderr.print(
            f"deleted {counts.challenges} expired challenge(s), {counts.events} audit event(s),"
            f" {counts.certificates} certificate record(s)"
        )


def register(group: click.Group) -> None:
    group.add_command(ca_group)

"""``enclavekit ca init | root | serve | revoke``: the attestation certificate authority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from enclavekit.atls.ca import (
    Issuer,
    NitroEvidenceVerifier,
    init_state_dir,
    load_admin_token,
    load_ca_keys,
    load_ca_policy,
    revoke_certificate,
)
from enclavekit.atls.limits import AUDIT_MAX_EVENTS, AUDIT_RETENTION, CaLimits
from enclavekit.atls.store import open_store
from enclavekit.cli._common import host_port, nsm_verifier, root_option
from enclavekit.cli._render import emit_json, json_option, stderr
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
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address of the HTTP API.")
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
@click.option(
    "--audit-retention-days",
    type=click.IntRange(1, 36500),
    default=AUDIT_RETENTION.days,
    show_default=True,
    help="Delete audit events (and certificate records expired) older than this many days.",
)
@click.option(
    "--audit-max-events",
    type=click.IntRange(1000, 100_000_000),
    default=AUDIT_MAX_EVENTS,
    show_default=True,
    help="Keep at most this many audit events (the newest).",
)
def serve(
    listen: str,
    state_dir: Path,
    policy_file: Path,
    roots: tuple[str, ...],
    database: str | None,
    audit_retention_days: int,
    audit_max_events: int,
) -> None:
    """Serve the CA HTTP API (OpenAPI at /openapi.json) until interrupted.

    Limits on clients (body size, challenges, issuance rate, connections) are listed in the CA
    service documentation.
    """
    import uvicorn

    from enclavekit.atls.service import create_app

    host, port = host_port(listen, "--listen")
    keys = load_ca_keys(state_dir)
    policy = load_ca_policy(policy_file)
    verifier = nsm_verifier(roots)
    retention = timedelta(days=audit_retention_days)
    limits = CaLimits(
        audit_retention=retention,
        certificate_retention=retention,
        audit_max_events=audit_max_events,
    )
    store = open_store(state_dir, database)
    issuer = Issuer(
        keys,
        policy,
        store,
        NitroEvidenceVerifier(verifier, max_cabundle=limits.max_cabundle),
        limits=limits,
    )
    app = create_app(issuer, admin_token=load_admin_token(state_dir))
    stderr.print(
        f"attestation CA on http://{host}:{port} (services: {', '.join(sorted(policy.services))})"
    )
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            limit_concurrency=limits.max_connections,
            timeout_keep_alive=5,
        )
    finally:
        store.close()


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


def register(group: click.Group) -> None:
    group.add_command(ca_group)

"""``enclavekit atls proxy | get``: the enclave and client sides of attested TLS."""

from __future__ import annotations

import base64
import errno
import socket
import sys

import click

from enclavekit.cli._common import (
    bind_error,
    endpoint_url,
    host_port,
    nsm_verifier,
    root_option,
)
from enclavekit.cli._files import read_policy
from enclavekit.cli._log import event, log_format_option, service_logging
from enclavekit.cli._render import emit_json, json_option, stderr
from enclavekit.errors import UsageError


@click.group("atls")
def atls_group() -> None:
    """Attested TLS: serve behind a CA-issued attested certificate, or verify one as a client."""


@atls_group.command("proxy")
@click.option(
    "--ca",
    "ca_url",
    required=True,
    metavar="URL",
    help="The attestation CA: http(s)://HOST:PORT, or HOST:PORT / tcp://HOST:PORT for http.",
)
@click.option("--name", required=True, help="Service name in the CA policy.")
@click.option(
    "--listen",
    required=True,
    metavar="HOST:PORT",
    help="TLS listening address (or tcp://HOST:PORT).",
)
@click.option(
    "--upstream",
    required=True,
    metavar="HOST:PORT",
    help="The app behind the proxy (or tcp://HOST:PORT).",
)
@click.option(
    "--nsm",
    "nsm_url",
    metavar="URL",
    help="NSM emulator (unix:///path, HOST:PORT or tcp://HOST:PORT). Default: $ENCLAVEKIT_NSM, "
    "else /dev/nsm.",
)
@log_format_option
def proxy(
    ca_url: str, name: str, listen: str, upstream: str, nsm_url: str | None, log_format: str
) -> None:
    """Obtain an attested certificate and terminate TLS in front of --upstream (renews itself).

    Logs one line on stderr per start, certificate obtained or renewed, failed renewal (with its
    reason) and stop.
    """
    from enclavekit.atls.server import EnclaveIdentity, run_proxy
    from enclavekit.nsm import Nsm

    listen_at = host_port(listen, "--listen")
    upstream_at = host_port(upstream, "--upstream")
    ca_base = _ca_url(ca_url)
    _check_bind(listen, listen_at)  # before asking the CA for anything
    nsm = Nsm.connect(endpoint_url(nsm_url, "--nsm")) if nsm_url else Nsm.open()
    identity = EnclaveIdentity(ca_base, name, nsm)
    logger = service_logging(log_format)  # certificates obtained and renewed: atls.server logs them
    where: list[str] = []

    def ready(host: str, port: int) -> None:
        where.append(f"{host}:{port}")
        event(
            logger,
            "start",
            f"attested TLS on {host}:{port} → {upstream}",
            listen=where[0],
            upstream=upstream,
            service=name,
        )

    try:
        run_proxy(identity, listen_at, upstream_at, on_ready=ready)
    except OSError as exc:
        if exc.errno in _BIND_ERRNOS:  # taken between the check and the bind
            raise bind_error("--listen", listen, exc) from None
        raise
    finally:
        if where:
            event(logger, "stop", f"attested TLS on {where[0]} stopped", listen=where[0])


_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _check_bind(value: str, address: tuple[str, int]) -> None:
    """Fail fast (exit 2 naming --listen) when the listening address cannot be bound."""
    host, port = address
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        raise bind_error("--listen", value, exc) from None


def _ca_url(value: str) -> str:
    """``--ca``: an http(s):// URL as is; HOST:PORT or tcp://HOST:PORT means http://HOST:PORT."""
    if value.lower().startswith(("http://", "https://")):
        return value
    host, port = host_port(value, "--ca")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@atls_group.command("get")
@click.argument("url")
@click.option(
    "--ca-cert",
    required=True,
    type=click.Path(dir_okay=False),
    help="The attestation CA root (PEM): the only TLS trust anchor.",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    help="What the enclave must be (JSON/YAML or nitro-cli measurements); default: not debug.",
)
@click.option("--fresh", is_flag=True, help="Also demand a new document for our own nonce.")
@root_option
@click.option(
    "--crl",
    "crl_source",
    metavar="FILE|URL",
    help="The CA's CRL (DER/PEM file, or http(s) URL such as <CA>/v1/crl): refuse revoked servers.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per network step.")
@json_option
def get(
    url: str,
    ca_cert: str,
    policy_file: str | None,
    fresh: bool,
    roots: tuple[str, ...],
    timeout: float,
    as_json: bool,
    crl_source: str | None,
) -> None:
    """GET URL after verifying the server's attestation; the body goes to stdout.

    Exit 1, with nothing sent to the application, when the certificate, the embedded document,
    the policy or the fresh document fails.
    """
    from enclavekit.atls.client import AttestedClient, load_ca_root, load_crl

    try:
        with open(ca_cert, "rb") as f:
            root = load_ca_root(f.read())
    except OSError as exc:
        raise UsageError(f"cannot read --ca-cert {ca_cert}: {exc.strerror}") from exc
    client = AttestedClient(
        root,
        verifier=nsm_verifier(roots),
        policy=read_policy(policy_file) if policy_file else None,
        fresh=fresh,
        timeout=timeout,
        crl=load_crl(_read_source(crl_source, timeout)) if crl_source else None,
    )
    peer, response = client.request("GET", url)
    if as_json:
        report = peer.summary() | {
            "url": url,
            "status": response.status_code,
            "body_base64": base64.b64encode(response.content).decode(),
        }
        emit_json(report)
    else:
        stderr.print(
            f"attested: {peer.embedded.module_id}, certificate {peer.certificate_sha256.hex()[:16]}…"
            f"{', fresh document verified' if peer.fresh else ''}; HTTP {response.status_code}"
        )
        sys.stdout.buffer.write(response.content)
        sys.stdout.buffer.flush()
    if response.status_code >= 400:
        sys.exit(1)


def _read_source(source: str, timeout: float) -> bytes:
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(source, timeout=timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise UsageError(f"cannot fetch {source}: {exc}") from exc
        return response.content
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from exc


def register(group: click.Group) -> None:
    group.add_command(atls_group)

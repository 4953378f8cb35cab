"""``enclavekit atls proxy | get``: the enclave and client sides of attested TLS."""

from __future__ import annotations

import base64
import errno
import socket
import sys
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from enclavekit.atls.client_auth import ClientAuthPolicy
    from enclavekit.atls.server import CaClient


@click.group("atls")
def atls_group() -> None:
    """Attested TLS: serve behind a CA-issued attested certificate, or verify one as a client."""


@atls_group.command("proxy")
@click.option(
    "--ca",
    "ca_url",
    metavar="URL",
    help="The attestation CA: http(s)://HOST:PORT, or HOST:PORT / tcp://HOST:PORT for http.",
)
@click.option(
    "--ca-cert",
    "ca_cert",
    type=click.Path(dir_okay=False),
    help="Trust this PEM root for an https:// --ca (`ca root`); default: the system store.",
)
@click.option("--name", help="Service name in the CA policy (with --ca).")
@click.option(
    "--acme",
    "acme_url",
    metavar="DIRECTORY_URL",
    help="Get the certificate from this ACME directory (http-01) instead of --ca.",
)
@click.option(
    "--domain", "domains", multiple=True, help="DNS name to certify by ACME (repeatable)."
)
@click.option(
    "--acme-http-listen",
    metavar="HOST:PORT",
    help="Where to answer http-01 challenges (what the parent forwards port 80 to).",
)
@click.option(
    "--acme-ca-bundle",
    type=click.Path(dir_okay=False),
    help="PEM roots for the ACME server's own TLS; default: the system store.",
)
@click.option(
    "--acme-email", metavar="ADDR", help="Contact address of the (in-memory) ACME account."
)
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
@click.option(
    "--client-ca",
    type=click.Path(dir_okay=False),
    help="Demand client certificates chained to this PEM CA root (mutual attested TLS).",
)
@click.option(
    "--client-policy",
    type=click.Path(dir_okay=False),
    help="What a client's embedded document must satisfy (with --client-ca; default: not debug).",
)
@root_option
@click.option(
    "--forward-client-identity",
    is_flag=True,
    help="Pass the verified client identity upstream in X-Enclavekit-Client-Identity.",
)
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics here (off by default).",
)
@log_format_option
def proxy(
    ca_url: str | None,
    ca_cert: str | None,
    name: str | None,
    acme_url: str | None,
    domains: tuple[str, ...],
    acme_http_listen: str | None,
    acme_ca_bundle: str | None,
    acme_email: str | None,
    listen: str,
    upstream: str,
    nsm_url: str | None,
    client_ca: str | None,
    client_policy: str | None,
    roots: tuple[str, ...],
    forward_client_identity: bool,
    metrics_listen: str | None,
    log_format: str,
) -> None:
    """Obtain a certificate (attested by the CA, or by ACME) and terminate TLS in front of
    --upstream (renews itself).

    Logs one line on stderr per start, certificate obtained or renewed, failed renewal (with its
    reason) and stop.
    """
    from enclavekit.atls.server import EnclaveIdentity, run_proxy
    from enclavekit.nsm import Nsm

    listen_at = host_port(listen, "--listen")
    upstream_at = host_port(upstream, "--upstream")
    metrics_at = host_port(metrics_listen, "--metrics-listen") if metrics_listen else None
    if (ca_url is None) == (acme_url is None):
        raise UsageError("give exactly one of --ca URL (attestation CA) or --acme DIRECTORY_URL")
    if (client_policy or forward_client_identity) and not client_ca:
        raise UsageError("--client-policy and --forward-client-identity need --client-ca")
    if roots and not client_ca:
        raise UsageError("--root verifies client documents; it needs --client-ca")
    client_auth = _client_auth(client_ca, client_policy, roots, forward_client_identity)
    nsm_address = endpoint_url(nsm_url, "--nsm") if nsm_url else None
    metrics = None
    if metrics_at is not None:
        from enclavekit.atls.metrics import ProxyMetrics

        metrics = ProxyMetrics()
    identity: EnclaveIdentity
    if acme_url is not None:
        if ca_cert or name:
            raise UsageError("--ca-cert and --name go with --ca, not --acme")
        if not acme_http_listen:
            raise UsageError("--acme needs --acme-http-listen HOST:PORT (the http-01 listener)")
        from enclavekit.atls.acme import AcmeIdentity, Http01Responder

        http_at = host_port(acme_http_listen, "--acme-http-listen")
        _check_bind(listen, listen_at)  # before asking the ACME server for anything
        nsm = Nsm.connect(nsm_address) if nsm_address else Nsm.open()
        responder = Http01Responder(*http_at).start()
        identity = AcmeIdentity(
            acme_url, domains, nsm, responder, ca_bundle=acme_ca_bundle, email=acme_email
        )
    else:
        assert ca_url is not None
        if domains or acme_http_listen or acme_ca_bundle or acme_email:
            raise UsageError("--domain and --acme-* options go with --acme, not --ca")
        if not name:
            raise UsageError("--ca needs --name (the service name in the CA policy)")
        ca_client = _ca_client(_ca_url(ca_url), ca_cert, "--ca-cert")
        _check_bind(listen, listen_at)  # before asking the CA for anything
        nsm = Nsm.connect(nsm_address) if nsm_address else Nsm.open()
        identity = EnclaveIdentity(ca_client, name, nsm)

    logger = service_logging(log_format)  # certificates obtained and renewed: atls.server logs them
    where: list[str] = []

    def ready(host: str, port: int) -> None:
        where.append(f"{host}:{port}")
        cert = identity.current.certificate
        extra = ", mutual TLS" if client_auth else ""
        extra += f", metrics on {metrics_listen}" if metrics_listen else ""
        event(
            logger,
            "start",
            f"attested TLS on {host}:{port} → {upstream}; certificate"
            f" {cert.serial_number:x} valid until {cert.not_valid_after_utc.isoformat()}{extra}",
            listen=where[0],
            upstream=upstream,
            service=name or ",".join(domains),
        )

    try:
        run_proxy(
            identity,
            listen_at,
            upstream_at,
            on_ready=ready,
            client_auth=client_auth,
            metrics=metrics,
            metrics_listen=metrics_at,
        )
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        if exc.errno in _BIND_ERRNOS:  # taken between the check and the bind
            raise bind_error("--listen", listen, exc) from None
        raise
    finally:
        if where:
            event(logger, "stop", f"attested TLS on {where[0]} stopped", listen=where[0])


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror}") from exc


def _ca_client(url: str, ca_cert: str | None, option: str) -> CaClient:
    """A CA client; an ``https://`` URL trusts ``ca_cert`` (PEM) only, else the system store."""
    from enclavekit.atls.ca_tls import ca_client_context
    from enclavekit.atls.client import load_ca_root
    from enclavekit.atls.server import CaClient

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"expected an http:// or https:// CA URL, found {url!r}")
    if url.startswith("http://") and ca_cert:
        raise UsageError(f"{option} is for an https:// CA; {url} is plain HTTP")
    root = load_ca_root(_read(ca_cert, option)) if ca_cert else None
    return CaClient(url, verify=ca_client_context(root))


def _client_auth(
    client_ca: str | None, client_policy: str | None, roots: tuple[str, ...], forward: bool
) -> ClientAuthPolicy | None:
    if not client_ca:
        return None
    from cryptography import x509

    from enclavekit.atls.client_auth import ClientAuthPolicy

    try:
        cas = x509.load_pem_x509_certificates(_read(client_ca, "--client-ca"))
    except ValueError as exc:
        raise UsageError(f"--client-ca {client_ca}: expected PEM certificates ({exc})") from exc
    policy = read_policy(client_policy, "--client-policy") if client_policy else None
    return ClientAuthPolicy(cas, nsm_verifier(roots), policy, forward_identity=forward)


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
    type=click.Path(dir_okay=False),
    help="The attestation CA root (PEM): the only TLS trust anchor. Default: the system trust"
    " store (ACME certificates; they embed no document, so --fresh is needed).",
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
@click.option(
    "--identity-ca",
    metavar="URL",
    help="Present an attested client certificate from this CA (mutual TLS; we are an enclave).",
)
@click.option(
    "--identity-name", help="The client service name (usage: client) in that CA's policy."
)
@click.option(
    "--identity-ca-cert",
    type=click.Path(dir_okay=False),
    help="Trust this PEM root for an https:// --identity-ca; default: the system store.",
)
@click.option(
    "--nsm",
    "nsm_url",
    metavar="URL",
    help="NSM for --identity-ca (unix:///path, tcp://host:port). Default: $ENCLAVEKIT_NSM, else /dev/nsm.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per network step.")
@json_option
def get(
    url: str,
    ca_cert: str | None,
    policy_file: str | None,
    fresh: bool,
    roots: tuple[str, ...],
    timeout: float,
    as_json: bool,
    crl_source: str | None,
    identity_ca: str | None,
    identity_name: str | None,
    identity_ca_cert: str | None,
    nsm_url: str | None,
) -> None:
    """GET URL after verifying the server's attestation; the body goes to stdout.

    Exit 1, with nothing sent to the application, when the certificate, the embedded document,
    the policy or the fresh document fails.
    """
    from enclavekit.atls.client import AttestedClient, load_ca_root, load_crl

    root = load_ca_root(_read(ca_cert, "--ca-cert")) if ca_cert else None
    if crl_source and root is None:
        raise UsageError("--crl needs --ca-cert (the CA root that signs the CRL)")
    if (identity_ca is None) != (identity_name is None):
        raise UsageError("--identity-ca and --identity-name go together")
    if identity_ca_cert and not identity_ca:
        raise UsageError("--identity-ca-cert needs --identity-ca")
    identity = None
    if identity_ca is not None and identity_name is not None:
        from enclavekit.atls.server import EnclaveIdentity
        from enclavekit.nsm import Nsm

        nsm = Nsm.connect(endpoint_url(nsm_url, "--nsm")) if nsm_url else Nsm.open()
        identity = EnclaveIdentity(
            _ca_client(_ca_url(identity_ca), identity_ca_cert, "--identity-ca-cert"),
            identity_name,
            nsm,
        )
    elif nsm_url:
        raise UsageError("--nsm is for --identity-ca (the client's own attestation)")
    try:
        client = AttestedClient(
            root,
            identity=identity,
            verifier=nsm_verifier(roots),
            policy=read_policy(policy_file) if policy_file else None,
            fresh=fresh,
            timeout=timeout,
            crl=load_crl(_read_source(crl_source, timeout)) if crl_source else None,
        )
        peer, response = client.request("GET", url)
    finally:
        if identity is not None:  # the client certificate is in hand (or failed): done with both
            identity.ca.close()
            close = getattr(identity.nsm, "close", None)
            if close is not None:
                close()
    if as_json:
        report = peer.summary() | {
            "url": url,
            "status": response.status_code,
            "body_base64": base64.b64encode(response.content).decode(),
        }
        emit_json(report)
    else:
        stderr.print(
            f"attested: {peer.attestation.module_id}, certificate {peer.certificate_sha256.hex()[:16]}…"
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

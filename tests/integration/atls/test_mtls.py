"""Mutual attested TLS enclave to enclave, with the CA itself on TLS, and the metrics it counts.

Enclave A: a proxy that demands attested client certificates (client policy: PCRS_B). Enclave B:
an AttestedClient with its own attested client certificate from the same CA (over HTTPS).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from enclavekit.atls.ca import (
    CaPolicy,
    Issuer,
    NitroEvidenceVerifier,
    ServicePolicy,
    init_state_dir,
)
from enclavekit.atls.ca_tls import ca_client_context, issue_ca_tls_certificate
from enclavekit.atls.client import AttestedClient
from enclavekit.atls.client_auth import CLIENT_IDENTITY_HEADER, ClientAuthPolicy
from enclavekit.atls.metrics import CaMetrics, ProxyMetrics
from enclavekit.atls.server import (
    AttestedTlsProxy,
    CaClient,
    EnclaveIdentity,
    RunningProxy,
    start_proxy_in_thread,
)
from enclavekit.atls.service import RunningService, create_app, start_in_thread
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.errors import VerificationError
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

PCRS_A = {0: b"\x30" * 48, 1: b"\x31" * 48, 2: b"\x32" * 48}
PCRS_B = {0: b"\x40" * 48, 1: b"\x41" * 48, 2: b"\x42" * 48}
PCRS_ROGUE = {0: b"\x50" * 48, 1: b"\x41" * 48, 2: b"\x42" * 48}
BODY = b"enclave A's app\n"


@dataclass
class Mesh:
    tmp: Path
    pki: EmulatedAwsPki
    ca: RunningService
    ca_metrics: CaMetrics
    issuer: Issuer
    proxy: RunningProxy
    proxy_metrics: ProxyMetrics
    requests: list[tuple[str, list[str]]]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.proxy.port}/"

    def verifier(self) -> Verifier:
        return Verifier([self.pki.root_certificate()])

    def ca_client(self) -> CaClient:
        return CaClient(self.ca.url, verify=ca_client_context(self.issuer.keys.root))

    def identity(self, service: str, pcrs: dict[int, bytes]) -> EnclaveIdentity:
        nsm = Nsm.in_process(NsmEmulator(pcrs=pcrs, pki=self.pki))
        return EnclaveIdentity(self.ca_client(), service, nsm)

    def client(self, identity: EnclaveIdentity | None, **kw: object) -> AttestedClient:
        return AttestedClient(
            self.issuer.keys.root,
            identity=identity,
            verifier=self.verifier(),
            policy=PcrsEqual(PCRS_A),
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mtls")
    pki = EmulatedAwsPki.ephemeral()
    keys = init_state_dir(tmp / "state")
    store = SqliteStore(tmp / "state" / "ca.sqlite3")
    policy = CaPolicy(
        services={
            "web-a": ServicePolicy("web-a", ("localhost",), (dict(PCRS_A),)),
            "caller-b": ServicePolicy("caller-b", (), (dict(PCRS_B),), usage="client"),
            "server-b": ServicePolicy("server-b", ("localhost",), (dict(PCRS_B),)),
            "rogue": ServicePolicy("rogue", (), (dict(PCRS_ROGUE),), usage="client"),
        }
    )
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(Verifier([pki.root_certificate()])))
    app = create_app(issuer)
    ca_metrics = CaMetrics()
    ca_metrics.install(app, issuer)
    ca = start_in_thread(
        app,
        tls=_as_chain(
            issue_ca_tls_certificate(keys, ["localhost", "127.0.0.1"], now=datetime.now(UTC))
        ),
    )
    requests: list[tuple[str, list[str]]] = []

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append((self.path, self.headers.get_all(CLIENT_IDENTITY_HEADER) or []))
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    mesh = Mesh(tmp, pki, ca, ca_metrics, issuer, None, ProxyMetrics(), requests)  # type: ignore[arg-type]
    a = mesh.identity("web-a", PCRS_A)
    a.obtain()
    client_auth = ClientAuthPolicy(
        [keys.root], mesh.verifier(), PcrsEqual(PCRS_B), forward_identity=True
    )
    mesh.proxy = start_proxy_in_thread(
        AttestedTlsProxy(
            a,
            ("127.0.0.1", upstream.server_address[1]),
            client_auth=client_auth,
            metrics=mesh.proxy_metrics,
        )
    )
    try:
        yield mesh
    finally:
        mesh.proxy.stop()
        upstream.shutdown()
        upstream.server_close()
        ca.stop()
        store.close()


def _as_chain(pair: tuple[object, object]) -> tuple[object, list[object]]:
    key, cert = pair
    return key, [cert]


@pytest.fixture
def m(mesh: Mesh) -> Mesh:
    mesh.requests.clear()
    return mesh


def test_enclave_b_calls_enclave_a_with_its_attested_client_certificate(m: Mesh) -> None:
    b = m.identity("caller-b", PCRS_B)
    peer, response = m.client(b, fresh=True).request("GET", m.url + "hello")
    assert response.status_code == 200 and response.content == BODY
    assert peer.fresh is not None
    [(path, headers)] = m.requests
    assert path == "/hello"
    [value] = headers
    assert value.startswith("service=caller-b; cert-sha256=")
    assert f"pcr0={PCRS_B[0].hex()}" in value


def test_attack_client_supplied_identity_header_is_replaced(m: Mesh) -> None:
    b = m.identity("caller-b", PCRS_B)
    _, response = m.client(b).request(
        "GET",
        m.url + "spoof",
        headers={CLIENT_IDENTITY_HEADER: "service=admin; pcr0=" + "00" * 48},
    )
    assert response.status_code == 200
    [(_, headers)] = m.requests
    assert len(headers) == 1 and headers[0].startswith("service=caller-b;")


def test_attack_client_without_certificate_is_refused_before_the_app(m: Mesh) -> None:
    before = m.proxy_metrics.client_refusals.labels("no_certificate")._value.get()
    with pytest.raises((VerificationError, httpx.TransportError)):
        m.client(None).request("GET", m.url + "anonymous")
    assert m.requests == []
    after = m.proxy_metrics.client_refusals.labels("no_certificate")._value.get()
    assert after > before  # the attestation connection and the request connection


def test_attack_server_usage_certificate_as_client_is_refused(m: Mesh) -> None:
    """B presents a valid, attested certificate of the CA — but issued for server use."""
    wrong_usage = m.identity("server-b", PCRS_B)
    with pytest.raises((VerificationError, httpx.TransportError)):
        m.client(wrong_usage).request("GET", m.url + "wrong-usage")
    assert m.requests == []


def test_attack_client_whose_document_fails_the_client_policy_is_refused(m: Mesh) -> None:
    """The CA certifies the rogue client (its own policy allows it); A's client policy does not."""
    rogue = m.identity("rogue", PCRS_ROGUE)
    with pytest.raises((VerificationError, httpx.TransportError)):
        m.client(rogue).request("GET", m.url + "rogue")
    assert m.requests == []
    assert m.proxy_metrics.client_refusals.labels("policy")._value.get() >= 1


def test_client_certificates_carry_client_auth_and_no_dns_names(m: Mesh) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    b = m.identity("caller-b", PCRS_B)
    cert = b.obtain().certificate
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_ca_on_tls_refuses_clients_that_do_not_trust_its_root(m: Mesh) -> None:
    assert m.ca.url.startswith("https://")
    with pytest.raises(httpx.ConnectError):
        httpx.post(m.ca.url + "/v1/challenges", verify=True)
    r = httpx.post(m.ca.url + "/v1/challenges", verify=ca_client_context(m.issuer.keys.root))
    assert r.status_code == 201


def test_metrics_count_what_happened(m: Mesh) -> None:
    m.client(m.identity("caller-b", PCRS_B), fresh=True).request("GET", m.url + "m")
    proxy_text = m.proxy_metrics.render().decode()
    assert 'enclavekit_atls_handshakes_total{result="ok"}' in proxy_text
    assert 'enclavekit_atls_attestation_requests_total{result="ok"}' in proxy_text
    assert 'enclavekit_atls_bytes_relayed_total{direction="up"}' in proxy_text
    assert "enclavekit_atls_certificate_not_after_seconds" in proxy_text
    r = httpx.get(m.ca.url + "/metrics", verify=ca_client_context(m.issuer.keys.root))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "enclavekit_ca_issuances_total" in r.text
    assert 'enclavekit_ca_challenges{state="live"}' in r.text
    assert 'enclavekit_ca_request_seconds_bucket{endpoint="/v1/certificates"' in r.text
    # The rogue client's certificate was issued; a refused issuance is counted by reason:
    nsm = Nsm.in_process(NsmEmulator(pcrs=PCRS_ROGUE, pki=m.pki))
    with pytest.raises(VerificationError):
        EnclaveIdentity(m.ca_client(), "caller-b", nsm).obtain()
    r = httpx.get(m.ca.url + "/metrics", verify=ca_client_context(m.issuer.keys.root))
    assert 'enclavekit_ca_refusals_total{reason="policy_violation"}' in r.text

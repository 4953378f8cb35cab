"""ACME certificates (Pebble, real http-01 validation) bound to the enclave by fresh attestation."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclavekit.atls.acme import AcmeIdentity, Http01Responder
from enclavekit.atls.client import AttestedClient, load_ca_root
from enclavekit.atls.server import AttestedTlsProxy, RunningProxy, start_proxy_in_thread
from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.cli import cli
from enclavekit.errors import PolicyViolation, VerificationError
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator
from tests.integration.atls.pebble import Pebble, run_pebble

PCRS = {0: b"\x20" * 48, 1: b"\x21" * 48, 2: b"\x22" * 48}
OTHER_PCRS = {0: b"\x66" * 48, 1: b"\x21" * 48, 2: b"\x22" * 48}
BODY = b"hello from the ACME-certified enclave app\n"


def _upstream(requests: list[str]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class AcmeSetup:
    tmp: Path
    pebble: Pebble
    pki: EmulatedAwsPki
    responder: Http01Responder
    identity: AcmeIdentity
    proxy: RunningProxy
    requests: list[str]
    stops: list[object] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.proxy.port}/"

    def verifier(self) -> Verifier:
        return Verifier([self.pki.root_certificate()])

    def enclave(self, pcrs: dict[int, bytes]) -> tuple[AcmeIdentity, RunningProxy, list[str]]:
        """Another enclave (own NSM, own ACME account and certificate for localhost) + app."""
        requests: list[str] = []
        upstream = _upstream(requests)
        identity = AcmeIdentity(
            self.pebble.directory,
            ["localhost"],
            Nsm.in_process(NsmEmulator(pcrs=pcrs, pki=self.pki)),
            self.responder,
            ca_bundle=str(self.pebble.listener_ca),
        )
        identity.obtain()
        proxy = start_proxy_in_thread(
            AttestedTlsProxy(identity, ("127.0.0.1", upstream.server_address[1]))
        )
        self.stops += [proxy.stop, upstream.shutdown, upstream.server_close]
        return identity, proxy, requests


@pytest.fixture(scope="module")
def acme_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeSetup]:
    tmp = tmp_path_factory.mktemp("acme")
    responder = Http01Responder("127.0.0.1", 0).start()
    pki = EmulatedAwsPki.ephemeral()
    (tmp / "nsm-root.pem").write_bytes(pki.root_pem())
    with run_pebble(tmp, responder.port) as pebble:
        requests: list[str] = []
        upstream = _upstream(requests)
        identity = AcmeIdentity(
            pebble.directory,
            ["localhost"],
            Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=pki)),
            responder,
            ca_bundle=str(pebble.listener_ca),
        )
        identity.obtain()
        proxy = start_proxy_in_thread(
            AttestedTlsProxy(identity, ("127.0.0.1", upstream.server_address[1]))
        )
        setup = AcmeSetup(tmp, pebble, pki, responder, identity, proxy, requests)
        try:
            yield setup
        finally:
            for stop in setup.stops:
                stop()  # type: ignore[operator]
            proxy.stop()
            upstream.shutdown()
            upstream.server_close()
            responder.stop()


@pytest.fixture
def acme(acme_setup: AcmeSetup) -> AcmeSetup:
    acme_setup.requests.clear()
    return acme_setup


def _policy(tmp: Path, pcrs: dict[int, bytes]) -> str:
    path = tmp / f"policy-{len(list(tmp.iterdir()))}.json"
    path.write_text(json.dumps({"pcrs": {str(i): v.hex() for i, v in pcrs.items()}}))
    return str(path)


def _get(acme: AcmeSetup, url: str, *extra: str) -> object:
    return CliRunner().invoke(
        cli,
        [
            "atls", "get", url, "--ca-cert", str(acme.pebble.root),
            "--root", str(acme.tmp / "nsm-root.pem"), *extra,
        ],
    )  # fmt: skip


def test_acme_certificate_is_publicly_shaped(acme: AcmeSetup) -> None:
    """Pebble issued a leaf for our in-memory key, with the domain, chained under Pebble's root."""
    chain = acme.identity.current.chain
    assert len(chain) >= 2
    assert chain[0].public_key() == acme.identity.current.key.public_key()
    assert "localhost" in str(chain[0].extensions)
    assert acme.identity.ca is None


def test_curl_with_the_pebble_root_reaches_the_app(acme: AcmeSetup) -> None:
    """An ordinary client (curl) just works: only the ACME root is needed, no private CA."""
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(acme.pebble.root), acme.url + "curl"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == BODY
    assert acme.requests == ["/curl"]


def test_atls_get_fresh_with_the_right_policy(acme: AcmeSetup) -> None:
    r = _get(acme, acme.url + "ok", "--policy", _policy(acme.tmp, PCRS), "--fresh", "--json")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    report = json.loads(r.stdout)  # type: ignore[attr-defined]
    assert report["fresh"] is True and report["embedded"] is False
    assert report["pcrs"]["0"] == PCRS[0].hex()
    assert acme.requests == ["/ok"]


def test_attack_wrong_policy_exits_1_and_the_app_sees_nothing(acme: AcmeSetup) -> None:
    r = _get(acme, acme.url + "x", "--policy", _policy(acme.tmp, OTHER_PCRS), "--fresh")
    assert r.exit_code == 1  # type: ignore[attr-defined]
    assert "PCR0" in r.output  # type: ignore[attr-defined]
    assert acme.requests == []


def test_attack_acme_certificate_without_fresh_is_not_attestation(acme: AcmeSetup) -> None:
    """A public certificate proves only the domain: without --fresh, exit 1 saying why."""
    r = _get(acme, acme.url + "x", "--policy", _policy(acme.tmp, PCRS))
    assert r.exit_code == 1  # type: ignore[attr-defined]
    assert "--fresh" in r.output  # type: ignore[attr-defined]
    assert "embeds no attestation" in r.output  # type: ignore[attr-defined]
    assert acme.requests == []


def test_attack_valid_acme_certificate_on_the_wrong_enclave_gets_no_request(
    acme: AcmeSetup,
) -> None:
    """Another enclave gets a perfectly valid ACME certificate for the same domain; its PCRs fail
    the policy, so the client never sends it the request."""
    _identity, proxy, requests = acme.enclave(OTHER_PCRS)
    client = AttestedClient(
        load_ca_root(acme.pebble.root.read_bytes()),
        verifier=acme.verifier(),
        policy=PcrsEqual(PCRS),
        fresh=True,
    )
    with pytest.raises(PolicyViolation):
        client.request("GET", f"https://localhost:{proxy.port}/secret")
    assert requests == []


def test_attack_attestation_relayed_from_the_genuine_enclave_is_refused(acme: AcmeSetup) -> None:
    """A server with its own valid ACME certificate relays the nonce to the genuine enclave: the
    genuine document binds the genuine certificate, not the one in this handshake."""
    relay, proxy, requests = acme.enclave(OTHER_PCRS)
    relay.attestation_for = acme.identity.attestation_for  # type: ignore[method-assign]
    client = AttestedClient(
        load_ca_root(acme.pebble.root.read_bytes()),
        verifier=acme.verifier(),
        policy=PcrsEqual(PCRS),
        fresh=True,
    )
    with pytest.raises(PolicyViolation) as info:
        client.request("GET", f"https://localhost:{proxy.port}/secret")
    checks = {f.check for f in info.value.failures}
    assert "public_key" in checks and "user_data" in checks
    assert requests == []


def test_http01_is_really_validated(acme: AcmeSetup) -> None:
    """No "always valid" shortcut: a responder Pebble cannot reach gets no certificate."""
    elsewhere = Http01Responder("127.0.0.1", 0).start()
    try:
        identity = AcmeIdentity(
            acme.pebble.directory,
            ["localhost"],
            Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=acme.pki)),
            elsewhere,
            ca_bundle=str(acme.pebble.listener_ca),
            timeout=30,
        )
        with pytest.raises(VerificationError, match="http-01"):
            identity.obtain()
    finally:
        elsewhere.stop()


def test_renewal_replaces_the_certificate_and_the_binding_follows(acme: AcmeSetup) -> None:
    before = acme.identity.current.certificate_der
    acme.identity.obtain()  # what renew_if_due does when due
    assert acme.identity.current.certificate_der != before
    client = AttestedClient(
        load_ca_root(acme.pebble.root.read_bytes()),
        verifier=acme.verifier(),
        policy=PcrsEqual(PCRS),
        fresh=True,
    )
    deadline = time.monotonic() + 10
    while True:  # the proxy reloads its context on its own event loop, soon after obtain()
        peer = client.attest("localhost", acme.proxy.port)
        if peer.certificate_der != before or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert peer.certificate_der == acme.identity.current.certificate_der
    assert peer.fresh is not None


def _obtain_with_nonce_reject(tmp: Path, percent: int) -> AcmeIdentity:
    responder = Http01Responder("127.0.0.1", 0).start()
    try:
        with run_pebble(tmp, responder.port, nonce_reject=percent) as pebble:
            identity = AcmeIdentity(
                pebble.directory,
                ["localhost"],
                Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=EmulatedAwsPki.ephemeral())),
                responder,
                ca_bundle=str(pebble.listener_ca),
                timeout=30,
            )
            identity.obtain()
            return identity
    finally:
        responder.stop()


def test_refused_nonces_are_retried_with_fresh_ones(tmp_path: Path) -> None:
    """Let's Encrypt may refuse a valid nonce (RFC 8555 6.5); with 30 % refused, every request of
    the order still gets through (each one fails only if all 9 tries are refused: 2e-5)."""
    identity = _obtain_with_nonce_reject(tmp_path, 30)
    assert identity.current.certificate_der


def test_attack_a_server_refusing_every_nonce_ends_in_a_clear_error(tmp_path: Path) -> None:
    """The retries are bounded: a server that refuses every nonce gets a VerificationError naming
    badNonce, not an endless loop."""
    started = time.monotonic()
    with pytest.raises(VerificationError, match="badNonce"):
        _obtain_with_nonce_reject(tmp_path, 100)
    assert time.monotonic() - started < 30

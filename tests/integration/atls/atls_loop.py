"""The whole attested-TLS loop on loopback: emulated NSM, CA service, enclave proxy, an upstream.

Imported by conftest.py (the fixture) and the tests (the constants).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from enclavekit.atls.ca import (
    CaPolicy,
    Issuer,
    NitroEvidenceVerifier,
    ServicePolicy,
    init_state_dir,
)
from enclavekit.atls.server import (
    AttestedTlsProxy,
    EnclaveIdentity,
    RunningProxy,
    start_proxy_in_thread,
)
from enclavekit.atls.service import RunningService, create_app, start_in_thread
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
UPSTREAM_BODY = b"hello from the enclave app\n"


class _Upstream(http.server.BaseHTTPRequestHandler):
    requests: list[str]  # set on the subclass per server

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(UPSTREAM_BODY)))
        self.end_headers()
        self.wfile.write(UPSTREAM_BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Loop:
    """Handles to every running piece."""

    tmp: Path
    emulator: NsmEmulator
    nsm_root: x509.Certificate
    issuer: Issuer
    ca: RunningService
    identity: EnclaveIdentity
    proxy: RunningProxy
    upstream_requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.proxy.port}/"

    @property
    def ca_root_path(self) -> Path:
        return self.tmp / "state" / "ca-root.pem"

    def verifier(self) -> Verifier:
        return Verifier([self.nsm_root])


@pytest.fixture(scope="module")
def shared_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """One running loop per test module (starting one takes about a second)."""
    tmp_path = tmp_path_factory.mktemp("atls-loop")
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    nsm_root = pki.root_certificate()
    keys = init_state_dir(tmp_path / "state")
    (tmp_path / "nsm-root.pem").write_bytes(pki.root_pem())
    store = SqliteStore(tmp_path / "state" / "ca.sqlite3")
    policy = CaPolicy(services={"web": ServicePolicy("web", ("localhost",), (dict(PCRS),))})
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(Verifier([nsm_root])))
    ca = start_in_thread(create_app(issuer))

    requests: list[str] = []
    handler = type("Upstream", (_Upstream,), {"requests": requests})
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    up_thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    up_thread.start()

    identity = EnclaveIdentity(ca.url, "web", Nsm.in_process(emulator))
    identity.obtain()
    proxy = start_proxy_in_thread(
        AttestedTlsProxy(identity, ("127.0.0.1", upstream.server_address[1]))
    )
    try:
        yield Loop(tmp_path, emulator, nsm_root, issuer, ca, identity, proxy, requests)
    finally:
        proxy.stop()
        identity.stop()
        identity.ca.close()
        upstream.shutdown()
        upstream.server_close()
        ca.stop()
        store.close()


@pytest.fixture
def loop(shared_loop: Loop) -> Iterator[Loop]:
    """The module's loop with a fresh record of upstream requests and the CA policy restored."""
    shared_loop.upstream_requests.clear()
    policy = shared_loop.issuer.policy
    yield shared_loop
    shared_loop.issuer.policy = policy

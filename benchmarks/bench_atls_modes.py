"""Attested-TLS modes, each against its baseline measured in the same run (loopback, emulated NSM):

* ACME: ``AttestedClient(fresh=True).request`` against a proxy with a Pebble-issued certificate
  (handshake, fresh attestation, pinned connection, GET) vs a plain TLS handshake + GET through the
  same proxy to the same upstream (what curl does);
* mutual: ``AttestedClient(identity=…).request`` against a proxy that demands attested client
  certificates vs the same client without identity against a one-sided proxy (same upstream).

Needs Pebble (``apt-get install pebble``) for the ACME part; skipped with a note otherwise.
Usage: ``python benchmarks/bench_atls_modes.py [--n 30]``.
"""

from __future__ import annotations

import argparse
import http.server
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers (Pebble)

from _results import record

from enclavekit.atls.ca import (
    CaPolicy,
    Issuer,
    NitroEvidenceVerifier,
    ServicePolicy,
    init_state_dir,
)
from enclavekit.atls.ca_tls import ca_client_context, issue_ca_tls_certificate
from enclavekit.atls.client import AttestedClient, load_ca_root
from enclavekit.atls.client_auth import ClientAuthPolicy
from enclavekit.atls.server import (
    AttestedTlsProxy,
    CaClient,
    EnclaveIdentity,
    start_proxy_in_thread,
)
from enclavekit.atls.service import create_app, start_in_thread
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}


def _upstream() -> int:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


def _plain_get(ctx: ssl.SSLContext, port: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass


def _paired(
    base: Callable[[], object], measured: Callable[[], object], n: int
) -> tuple[float, float]:
    """Medians of ``base`` and ``measured``, run alternately (so load on a shared machine hits
    both alike)."""
    base(), measured()  # warm-up
    a, b = [], []
    for _ in range(n):
        for fn, times in ((base, a), (measured, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def bench_acme(n: int, tmp: Path, pki: EmulatedAwsPki, up: int) -> None:
    from enclavekit.atls.acme import AcmeIdentity, Http01Responder

    try:
        from tests.integration.atls.pebble import run_pebble
    except ImportError:
        print("ACME: tests/ helpers not found; run from a clone")
        return
    import shutil

    if shutil.which("pebble") is None:
        print("ACME: skipped (pebble not installed)")
        return
    responder = Http01Responder("127.0.0.1", 0).start()
    with run_pebble(tmp, responder.port) as pebble:
        identity = AcmeIdentity(
            pebble.directory,
            ["localhost"],
            Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=pki)),
            responder,
            ca_bundle=str(pebble.listener_ca),
        )
        identity.obtain()
        proxy = start_proxy_in_thread(AttestedTlsProxy(identity, ("127.0.0.1", up)))
        plain_ctx = ssl.create_default_context(cafile=str(pebble.root))
        client = AttestedClient(
            load_ca_root(pebble.root.read_bytes()),
            verifier=Verifier([pki.root_certificate()]),
            policy=PcrsEqual(PCRS),
            fresh=True,
        )
        url = f"https://localhost:{proxy.port}/"
        plain, attested = _paired(
            lambda: _plain_get(plain_ctx, proxy.port), lambda: client.request("GET", url), n
        )
        proxy.stop()
    responder.stop()
    print(
        f"ACME: plain TLS + GET {plain * 1e3:.2f} ms; handshake + fresh attestation + GET"
        f" {attested * 1e3:.2f} ms; ratio {attested / plain:.2f}x"
    )
    record(
        bench="bench_atls_modes",
        figure="ACME: fresh attested request time / plain TLS + GET time",
        value=attested / plain,
        unit="ratio",
        baseline=f"plain TLS handshake + GET through the same proxy ({plain * 1e3:.2f} ms), same run, median of {n}",
        headline=True,
    )


def bench_mutual(n: int, tmp: Path, pki: EmulatedAwsPki, up: int) -> None:
    keys = init_state_dir(tmp / "state")
    store = SqliteStore(tmp / "state" / "ca.sqlite3")
    policy = CaPolicy(
        services={
            "web": ServicePolicy("web", ("localhost",), (dict(PCRS),)),
            "caller": ServicePolicy("caller", (), (dict(PCRS),), usage="client"),
        }
    )
    nsm_roots = Verifier([pki.root_certificate()])
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(nsm_roots))
    key, cert = issue_ca_tls_certificate(keys, ["127.0.0.1"], now=datetime.now(UTC))
    ca = start_in_thread(create_app(issuer), tls=(key, [cert]))

    def identity(service: str) -> EnclaveIdentity:
        nsm = Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=pki))
        return EnclaveIdentity(CaClient(ca.url, verify=ca_client_context(keys.root)), service, nsm)

    server = identity("web")
    server.obtain()
    one_sided = start_proxy_in_thread(AttestedTlsProxy(server, ("127.0.0.1", up)))
    mutual = start_proxy_in_thread(
        AttestedTlsProxy(
            server,
            ("127.0.0.1", up),
            client_auth=ClientAuthPolicy([keys.root], nsm_roots, PcrsEqual(PCRS)),
        )
    )
    plain_client = AttestedClient(keys.root, verifier=nsm_roots, policy=PcrsEqual(PCRS))
    mutual_client = AttestedClient(
        keys.root, verifier=nsm_roots, policy=PcrsEqual(PCRS), identity=identity("caller")
    )
    base, both = _paired(
        lambda: plain_client.request("GET", f"https://localhost:{one_sided.port}/"),
        lambda: mutual_client.request("GET", f"https://localhost:{mutual.port}/"),
        n,
    )
    print(
        f"mutual: one-sided attested TLS + GET {base * 1e3:.2f} ms; mutual {both * 1e3:.2f} ms;"
        f" ratio {both / base:.2f}x"
    )
    record(
        bench="bench_atls_modes",
        figure="mutual attested request time / one-sided attested request time",
        value=both / base,
        unit="ratio",
        baseline=f"the same client without identity, one-sided proxy ({base * 1e3:.2f} ms), same run, median of {n}",
        headline=True,
    )
    one_sided.stop()
    mutual.stop()
    ca.stop()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    pki = EmulatedAwsPki.ephemeral()
    up = _upstream()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "acme").mkdir()
        (Path(tmp) / "mtls").mkdir()
        bench_acme(args.n, Path(tmp) / "acme", pki, up)
        bench_mutual(args.n, Path(tmp) / "mtls", pki, up)


if __name__ == "__main__":
    main()

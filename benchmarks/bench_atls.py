"""Attested-TLS benchmarks: CA issuances per second, and attested vs plain TLS handshake time.

Everything runs on loopback with the emulated NSM, in one process, in one run:

* issuance (in-process): ``Issuer.issue`` for pre-made (CSR, document) pairs — verification of the
  document, atomic nonce consumption, signing and recording in SQLite;
* issuance (HTTP, end to end): ``EnclaveIdentity.obtain`` — key generation, challenge, NSM document,
  CSR, ``POST /v1/certificates``;
* handshakes: a plain TLS handshake trusting the CA root (the baseline) vs
  ``AttestedClient.attest`` (handshake + embedded-document verification), and with ``fresh=True``.

Usage: ``python benchmarks/bench_atls.py [--n 50]`` (default finishes in well under a minute).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from _results import record
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit.atls.ca import (
    CaPolicy,
    Issuer,
    NitroEvidenceVerifier,
    ServicePolicy,
    init_state_dir,
)
from enclavekit.atls.client import AttestedClient
from enclavekit.atls.limits import CaLimits
from enclavekit.atls.server import AttestedTlsProxy, EnclaveIdentity, start_proxy_in_thread
from enclavekit.atls.service import create_app, start_in_thread
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}


def _csr_and_doc(issuer: Issuer, emulator: NsmEmulator) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .sign(key, hashes.SHA384())
        .public_bytes(serialization.Encoding.PEM)
    )
    return csr, emulator.attest(nonce=issuer.new_challenge().nonce, public_key=spki)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}/s  ({seconds / n * 1000:7.2f} ms each)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="operations per measurement")
    args = parser.parse_args()
    n = args.n

    tmp = Path(tempfile.mkdtemp(prefix="bench-atls-"))
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    nsm_verifier = Verifier([pki.root_certificate()])
    keys = init_state_dir(tmp / "ca")
    store = SqliteStore(tmp / "ca" / "ca.sqlite3")
    policy = CaPolicy(services={"web": ServicePolicy("web", ("localhost",), (dict(PCRS),))})
    # Limits wide enough for one benchmarking client (the defaults allow a burst of 10 per client).
    wide = CaLimits(
        issuance_burst=1_000_000,
        issuance_rate=1_000_000.0,
        issuance_burst_total=1_000_000,
        issuance_rate_total=1_000_000.0,
        max_live_challenges_per_client=1_000_000,
    )
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(nsm_verifier), limits=wide)

    # 1. In-process issuance.
    pairs = [_csr_and_doc(issuer, emulator) for _ in range(n)]
    start = time.perf_counter()
    for csr, doc in pairs:
        issuer.issue("web", csr, doc)
    in_process = time.perf_counter() - start

    # 2. End-to-end issuance over HTTP.
    ca = start_in_thread(create_app(issuer))
    identity = EnclaveIdentity(ca.url, "web", Nsm.in_process(emulator))
    start = time.perf_counter()
    for _ in range(n):
        identity.obtain()
    over_http = time.perf_counter() - start

    # 3. Handshakes against the enclave proxy (no upstream needed: nothing is sent).
    proxy = start_proxy_in_thread(AttestedTlsProxy(identity, ("127.0.0.1", 9)))
    plain_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain_ctx.load_verify_locations(cadata=keys.root_pem.decode())

    def plain() -> None:
        with (
            socket.create_connection(("127.0.0.1", proxy.port)) as raw,
            plain_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.getpeercert(binary_form=True)

    attested_client = AttestedClient(keys.root, verifier=nsm_verifier, policy=PcrsEqual(PCRS))
    fresh_client = AttestedClient(
        keys.root, verifier=nsm_verifier, policy=PcrsEqual(PCRS), fresh=True
    )

    def timed(fn: object, count: int) -> list[float]:
        out = []
        for _ in range(count):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            out.append(time.perf_counter() - t)
        return out

    plain()  # warm-up
    attested_client.attest("localhost", proxy.port)
    plain_t, attested_t, fresh_t = [], [], []
    for _ in range(n):  # interleaved, so load changes hit all three alike
        plain_t += timed(plain, 1)
        attested_t += timed(lambda: attested_client.attest("localhost", proxy.port), 1)
        fresh_t += timed(lambda: fresh_client.attest("localhost", proxy.port), 1)
    proxy.stop()
    ca.stop()
    identity.ca.close()
    store.close()

    p, a, f = (statistics.median(x) * 1000 for x in (plain_t, attested_t, fresh_t))
    print(f"attested TLS benchmark (n={n}, emulated NSM, loopback)")
    print(f"  issuance, in-process        {_rate(n, in_process)}")
    print(f"  issuance, HTTP end to end   {_rate(n, over_http)}")
    print(f"  handshake, plain TLS        {p:7.2f} ms median (baseline)")
    print(f"  handshake, attested         {a:7.2f} ms median  ratio {a / p:5.2f}x plain")
    print(f"  handshake, attested+fresh   {f:7.2f} ms median  ratio {f / p:5.2f}x plain")
    same = f"same run, n={n}, median"
    record(
        bench="bench_atls",
        figure="issuance, in-process",
        value=n / in_process,
        unit="issuances/s",
        baseline=None,
    )
    record(
        bench="bench_atls",
        figure="issuance, HTTP end to end",
        value=n / over_http,
        unit="issuances/s",
        baseline=None,
    )
    record(
        bench="bench_atls",
        figure="attested handshake time / plain TLS handshake time",
        value=a / p,
        unit="ratio",
        baseline=f"plain TLS handshake trusting the CA root ({p:.2f} ms), {same}",
        headline=True,
    )
    record(
        bench="bench_atls",
        figure="attested + fresh handshake time / plain TLS handshake time",
        value=f / p,
        unit="ratio",
        baseline=f"plain TLS handshake trusting the CA root ({p:.2f} ms), {same}",
    )


if __name__ == "__main__":
    main()

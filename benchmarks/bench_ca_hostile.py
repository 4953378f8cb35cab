"""CPU time the attestation CA spends on one hostile issuance request, against raw P-384 verification.

Measured in one run, CPU time (``time.process_time``) per request of ``Issuer.issue`` (the HTTP layer
adds the same small parsing cost to every request and is left out):

* ``raw verify``: one ``EllipticCurvePublicKey.verify`` (P-384, SHA-384) — the baseline;
* ``genuine issuance (cold)``: an emulated-NSM document, a fresh verifier each time (no chain cache):
  CSR check, path building over root + 3 intermediates, COSE signature, signing the certificate;
* ``amplifier, verifier first``: what the CA did before it checked cheap things first — the
  pinned AWS root plus nine self-issued CAs sharing one key, handed to path building;
* ``amplifier, refused by shape``: the same document through ``Issuer.issue`` now;
* ``nonce not a live challenge``: a genuine document whose nonce the CA never issued;
* ``worst accepted shape``: the most expensive document the shape checks let through to
  verification — a live challenge, a valid CSR, the pinned root and 4 forged intermediates chained
  by name with distinct keys, each signature valid except the first intermediate's (so path
  building checks every link before failing).

The worst case, multiplied by the total issuance rate limit, bounds the CA's verification CPU.

Usage: python benchmarks/bench_ca_hostile.py [--n 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from _results import record
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavekit.atls.ca import (
    CaPolicy,
    Issuer,
    NitroEvidenceVerifier,
    ServicePolicy,
    create_ca_keys,
)
from enclavekit.atls.limits import ISSUANCE_RATE_TOTAL_PER_SECOND, CaLimits
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.errors import Error
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator
from enclavekit.pki.roots import aws_root

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
DER = serialization.Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    now: datetime,
) -> x509.Certificate:
    usage = x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(signer, hashes.SHA384())
    )


def _document(
    leaf_key: ec.EllipticCurvePrivateKey,
    leaf: x509.Certificate,
    bundle: list[bytes],
    *,
    nonce: bytes,
    public_key: bytes,
    now: datetime,
) -> bytes:
    payload = cbor2.dumps(
        {
            "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
            "digest": "SHA384",
            "timestamp": int(now.timestamp() * 1000),
            "pcrs": {i: PCRS.get(i, bytes(48)) for i in range(16)},
            "certificate": leaf.public_bytes(DER),
            "cabundle": bundle,
            "public_key": public_key,
            "user_data": None,
            "nonce": nonce,
        }
    )
    protected = cbor2.dumps({1: -35})
    sig = leaf_key.sign(
        cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(hashes.SHA384())
    )
    r, s = decode_dss_signature(sig)
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def amplifier(root: x509.Certificate, nonce: bytes, public_key: bytes, now: datetime) -> bytes:
    """The pinned root + nine self-issued CAs sharing one key; the leaf signed by that key."""
    key = ec.generate_private_key(ec.SECP384R1())
    cas = [
        _cert(_name("amp"), key, _name("amp"), key, ca=True, now=now - timedelta(seconds=i))
        for i in range(9)
    ]
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert(_name("leaf"), leaf_key, _name("amp"), key, ca=False, now=now)
    bundle = [root.public_bytes(DER)] + [c.public_bytes(DER) for c in cas]
    return _document(leaf_key, leaf, bundle, nonce=nonce, public_key=public_key, now=now)


def worst_shape(root: x509.Certificate, nonce: bytes, public_key: bytes, now: datetime) -> bytes:
    """Root + 4 forged intermediates chained by name (distinct keys), every link valid but the first."""
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(5)]
    names = [_name(f"forged {i}") for i in range(4)]
    certs = []
    issuer_name, signer = root.subject, keys[0]  # keys[0] is not the root's key
    for i in range(4):
        certs.append(_cert(names[i], keys[i + 1], issuer_name, signer, ca=True, now=now))
        issuer_name, signer = names[i], keys[i + 1]
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert(_name("leaf"), leaf_key, issuer_name, signer, ca=False, now=now)
    bundle = [root.public_bytes(DER)] + [c.public_bytes(DER) for c in certs]
    return _document(leaf_key, leaf, bundle, nonce=nonce, public_key=public_key, now=now)


def cpu_per_call(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def refused(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Error:
            return
        raise AssertionError("expected a refusal")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="requests per measurement")
    args = parser.parse_args()
    n = args.n
    now = datetime.now(UTC)

    pki = EmulatedAwsPki.ephemeral()
    nsm = Nsm.in_process(NsmEmulator(pcrs=PCRS, pki=pki))
    nsm_root = pki.root_certificate()
    keys = create_ca_keys(now=now - timedelta(days=1))
    policy = CaPolicy(services={"web": ServicePolicy("web", ("localhost",), (dict(PCRS),))})
    limits = CaLimits(max_live_challenges=10 * n + 100, max_live_challenges_per_client=10 * n + 100)
    tmp = Path(tempfile.mkdtemp())
    store = SqliteStore(tmp / "ca.sqlite3")
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(Verifier([nsm_root])), limits=limits)
    aws_issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(Verifier.aws()), limits=limits)

    csr_key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("web"))
        .sign(csr_key, hashes.SHA384())
        .public_bytes(serialization.Encoding.PEM)
    )
    spki = csr_key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    # Baseline: one raw P-384 verification.
    message = os.urandom(512)
    signature = csr_key.sign(message, ec.ECDSA(hashes.SHA384()))
    public = csr_key.public_key()
    raw = cpu_per_call(lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA384())), n * 5)

    # Genuine issuance, cold: a fresh verifier for every request.
    genuine = [
        nsm.attestation(nonce=issuer.new_challenge().nonce, public_key=spki) for _ in range(n + 1)
    ]
    docs = iter(genuine)

    def issue_genuine() -> None:
        issuer.verifier = NitroEvidenceVerifier(Verifier([nsm_root]))
        issuer.issue("web", csr, next(docs))

    cold = cpu_per_call(issue_genuine, n)

    amp = amplifier(aws_root(), os.urandom(32), spki, now)
    aws_verifier = Verifier.aws()
    amp_verify = cpu_per_call(
        refused(lambda: aws_verifier.verify_signature_and_chain(amp, at=now)), max(20, n // 5)
    )
    amp_live = [
        amplifier(aws_root(), aws_issuer.new_challenge().nonce, spki, now) for _ in range(3)
    ]
    amp_issuer = cpu_per_call(refused(lambda: aws_issuer.issue("web", csr, amp_live[0])), n)

    stranger = nsm.attestation(nonce=os.urandom(32), public_key=spki)
    unknown = cpu_per_call(refused(lambda: issuer.issue("web", csr, stranger)), n)

    worst_docs = [worst_shape(nsm_root, issuer.new_challenge().nonce, spki, now) for _ in range(4)]
    worst = cpu_per_call(refused(lambda: issuer.issue("web", csr, worst_docs[0])), n)

    rows = [
        ("raw verify (baseline)", raw),
        ("genuine issuance (cold)", cold),
        ("amplifier, verifier first (before)", amp_verify),
        ("amplifier, refused by shape", amp_issuer),
        ("nonce not a live challenge", unknown),
        ("worst accepted shape", worst),
    ]
    print(f"CPU per request, n={n} (ratio = time / one raw P-384 verify)")
    for label, seconds in rows:
        print(f"  {label:38s} {seconds * 1e3:8.3f} ms  {seconds / raw:7.1f} x raw")
    print(f"  amplifier before / after              {amp_verify / amp_issuer:8.1f} x")
    for label, seconds in rows[1:]:
        record(
            bench="bench_ca_hostile",
            figure=f"CPU per request: {label}",
            value=seconds / raw,
            unit="x raw verify",
            baseline=f"one raw P-384 verify, CPU time ({raw * 1e3:.3f} ms), same run, n={n}",
            headline=label == "worst accepted shape",
        )
    record(
        bench="bench_ca_hostile",
        figure="amplifier CPU, verifier first / refused by shape",
        value=amp_verify / amp_issuer,
        unit="x",
        baseline="the amplifier document refused by the shape checks (Issuer.issue now), same run",
    )
    worst_request = max(cold, worst, amp_issuer, unknown)
    print(
        f"worst case per request {worst_request * 1e3:.2f} ms CPU; at the total issuance limit of"
        f" {ISSUANCE_RATE_TOTAL_PER_SECOND:g}/s: {worst_request * ISSUANCE_RATE_TOTAL_PER_SECOND:.2f}"
        " CPU-seconds per second"
    )
    record(
        bench="bench_ca_hostile",
        figure=f"worst-case CPU at the total issuance limit ({ISSUANCE_RATE_TOTAL_PER_SECOND:g}/s)",
        value=worst_request * ISSUANCE_RATE_TOTAL_PER_SECOND,
        unit="CPU-s/s",
        baseline=None,
    )
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

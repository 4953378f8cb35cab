"""Hostile clients of the CA service, each attack reproduced against the real server (uvicorn on
127.0.0.1, an ephemeral port) or the real Issuer + store."""

from __future__ import annotations

import base64
import os
import select
import socket
import stat
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import cbor2
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enclavekit.atls.ca import CaKeys, Issuer, NitroEvidenceVerifier, init_state_dir
from enclavekit.atls.limits import CaLimits, TokenBuckets, client_key
from enclavekit.atls.service import create_app, start_in_thread
from enclavekit.atls.store import SqliteStore, Store
from enclavekit.errors import Error
from tests.unit.atls.atls_support import (
    PCRS,
    T0,
    Clock,
    DocumentFactory,
    _cert,
    ca_policy,
    make_csr,
    spki,
)

MARKER = b"HOSTILE-INPUT-7f3a"


@pytest.fixture
def service(issuer: Issuer) -> Iterator[str]:
    running = start_in_thread(create_app(issuer, admin_token="t0ken"))
    yield running.url
    running.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _stream_chunked(port: int, path: str, total: int) -> tuple[int, bytes]:
    """Send a chunked POST of a ``total``-byte JSON body (one huge string field) in 64 KiB chunks;
    stop sending as soon as a response arrives.

    Returns (body bytes sent when the response began, the response bytes)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    filler = (MARKER * 4000)[: 64 * 1024]

    def frame(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    pending = frame(b'{"service": "web", "csr": "' + filler)
    sent, response, finished = len(filler), b"", False
    sock.setblocking(False)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            want_write = [sock] if pending else []
            readable, writable, _ = select.select([sock], want_write, [], 1)
            if readable:
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if not data:
                    break
                response += data
                continue
            if response:
                break
            if writable:
                try:
                    pending = pending[sock.send(pending) :]
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    continue
                if not pending and not finished:
                    if sent < total:
                        pending = frame(filler)
                        sent += len(filler)
                    else:
                        pending, finished = (
                            frame(b'", "attestation_document": "AA"}') + b"0\r\n\r\n",
                            True,
                        )
    finally:
        sock.close()
    return sent, response


def test_attack_chunked_body_is_buffered_whole_and_echoed(service: str) -> None:
    """A chunked 8 MiB POST (no Content-Length) is refused with 413 long before it is all sent,
    and the refusal carries none of the input."""
    total = 8 * 1024 * 1024
    sent, response = _stream_chunked(_port(service), "/v1/certificates", total)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < total // 2, f"{sent} bytes were sent before the refusal"
    assert MARKER not in response
    assert len(response) < 4096


def test_attack_content_length_lie_is_bounded(service: str) -> None:
    """A Content-Length over the limit is refused before any body byte is read."""
    with socket.create_connection(("127.0.0.1", _port(service))) as sock:
        sock.sendall(
            b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 314572800\r\n\r\n"
        )
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_attack_validation_error_echoes_input(service: str) -> None:
    """A body under the limit but invalid for the schema: the refusal does not quote it."""
    body = {
        "service": "web",
        "csr": MARKER.decode() * 1500,  # over the CSR field limit
        "attestation_document": {"nested": MARKER.decode()},
        MARKER.decode(): MARKER.decode(),
    }
    r = httpx.post(service + "/v1/certificates", json=body)
    assert r.status_code == 422
    assert MARKER.decode() not in r.text
    assert len(r.content) < 4096
    r = httpx.post(
        service + "/v1/certificates",
        content=b"{" + MARKER * 100,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert MARKER.decode() not in r.text


def test_attack_unknown_service_refusal_lists_configured_services(
    service: str, factory: DocumentFactory
) -> None:
    csr, key = make_csr()
    nonce = bytes.fromhex(httpx.post(service + "/v1/challenges").json()["nonce"])
    doc = factory.make(public_key=spki(key), nonce=nonce)
    r = httpx.post(
        service + "/v1/certificates",
        json={
            "service": MARKER.decode(),
            "csr": csr.decode(),
            "attestation_document": base64.b64encode(doc).decode(),
        },
    )
    assert r.status_code == 403
    assert "web" not in r.text.lower()
    assert MARKER.decode() not in r.text


def test_attack_challenge_flood_fills_the_table(service: str, issuer: Issuer) -> None:
    """Unauthenticated challenges from one client stop with 429 at the per-client cap."""
    limit = issuer.limits.max_live_challenges_per_client
    codes = [httpx.post(service + "/v1/challenges").status_code for _ in range(limit + 5)]
    assert codes[:limit] == [201] * limit
    assert set(codes[limit:]) == {429}
    assert _count(issuer.store, "challenges") == limit


def test_attack_expired_challenges_are_never_deleted(issuer: Issuer, clock: Clock) -> None:
    for _ in range(20):
        issuer.new_challenge("10.0.0.1")
    clock.advance(seconds=issuer.policy.challenge_ttl.total_seconds() + 1)
    issuer.new_challenge("10.0.0.1")
    assert _count(issuer.store, "challenges") == 1


def test_attack_issuance_attempts_are_not_rate_limited(
    ca_keys: CaKeys, store: SqliteStore, factory: DocumentFactory
) -> None:
    """Many issuance attempts from one client: 429 after the burst, before the body is read."""
    burst = 3
    limits = CaLimits(issuance_burst=burst, issuance_rate=0.01)
    issuer = Issuer(
        ca_keys, ca_policy(), store, NitroEvidenceVerifier(factory.verifier()), limits=limits
    )
    running = start_in_thread(create_app(issuer))
    service = running.url
    junk = {"service": "web", "csr": "x", "attestation_document": "AAAA"}
    codes = [
        httpx.post(service + "/v1/certificates", json=junk).status_code for _ in range(burst + 3)
    ]
    assert 429 not in codes[:burst]
    assert codes[burst:] == [429] * 3
    r = httpx.post(service + "/v1/certificates", json=junk)
    running.stop()
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1


class CountingVerifier(NitroEvidenceVerifier):
    """The real verifier, counting how often the expensive verification runs."""

    calls = 0

    def verify(self, document: bytes, *, at: object) -> object:  # type: ignore[override]
        self.calls += 1
        return super().verify(document, at=at)  # type: ignore[arg-type]


@pytest.fixture
def counting(
    ca_keys: CaKeys, store: SqliteStore, factory: DocumentFactory, clock: Clock
) -> tuple[Issuer, CountingVerifier]:
    verifier = CountingVerifier(factory.verifier())
    return Issuer(ca_keys, ca_policy(), store, verifier, clock=clock), verifier


def test_attack_document_is_verified_before_its_nonce_is_checked(
    counting: tuple[Issuer, CountingVerifier], factory: DocumentFactory
) -> None:
    issuer, verifier = counting
    csr, key = make_csr()
    doc = factory.make(public_key=spki(key), nonce=os.urandom(32))
    with pytest.raises(Error, match="challenge"):
        issuer.issue("web", csr, doc)
    assert verifier.calls == 0


def _amplifier(factory: DocumentFactory, nonce: bytes, public_key: bytes, count: int = 9) -> bytes:
    """The pinned root + ``count`` self-issued CAs sharing one key, a leaf signed by that key."""
    key = ec.generate_private_key(ec.SECP384R1())
    cas = [
        _cert(
            "amplifier",
            key,
            "amplifier",
            key,
            ca=True,
            not_before=T0 - timedelta(days=1 + i),
            not_after=T0 + timedelta(days=1),
        )
        for i in range(count)
    ]
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert(
        "i-0123456789abcdef0-enc0123456789abcdef",
        leaf_key,
        "amplifier",
        key,
        ca=False,
        not_before=T0 - timedelta(hours=1),
        not_after=T0 + timedelta(hours=1),
    )
    der = serialization.Encoding.DER
    payload = cbor2.dumps(
        {
            "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
            "digest": "SHA384",
            "timestamp": int(T0.timestamp() * 1000),
            "pcrs": dict(PCRS),
            "certificate": leaf.public_bytes(der),
            "cabundle": [factory.root.public_bytes(der)] + [c.public_bytes(der) for c in cas],
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


@pytest.mark.parametrize("count", [9, 4, 1])
def test_attack_cabundle_amplifier_reaches_path_building(
    counting: tuple[Issuer, CountingVerifier], factory: DocumentFactory, count: int
) -> None:
    """A live challenge, but a cabundle no NSM produces (too long, or self-issued CAs sharing a
    key): refused before any path building."""
    issuer, verifier = counting
    csr, key = make_csr()
    nonce = issuer.new_challenge("10.0.0.1").nonce
    doc = _amplifier(factory, nonce, spki(key), count)
    with pytest.raises(Error, match="cabundle"):
        issuer.issue("web", csr, doc)
    assert verifier.calls == 0
    # The challenge was not consumed by the refusal: a genuine document still gets its certificate.
    assert issuer.issue("web", csr, factory.make(public_key=spki(key), nonce=nonce))


def test_attack_state_dir_and_database_readable_by_local_users(
    tmp_path: Path, ca_keys: CaKeys, factory: DocumentFactory
) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "state"
        init_state_dir(state)
        store = SqliteStore(state / "ca.sqlite3")
        issuer = Issuer(ca_keys, ca_policy(), store, NitroEvidenceVerifier(factory.verifier()))
        issuer.new_challenge("10.0.0.1")
        files = sorted(state.glob("ca.sqlite3*"))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {"ca.sqlite3", "ca.sqlite3-wal"} <= set(modes)
    assert all(mode == 0o600 for mode in modes.values()), modes


def _count(store: Store, table: str) -> int:
    with store._tx() as cur:  # type: ignore[attr-defined]
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cur.fetchone()[0])


def test_certificate_for_a_real_client_still_works(service: str, factory: DocumentFactory) -> None:
    csr, key = make_csr()
    nonce = bytes.fromhex(httpx.post(service + "/v1/challenges").json()["nonce"])
    doc = factory.make(public_key=spki(key), nonce=nonce)
    r = httpx.post(
        service + "/v1/certificates",
        json={
            "service": "web",
            "csr": csr.decode(),
            "attestation_document": base64.b64encode(doc).decode(),
        },
    )
    assert r.status_code == 201, r.text
    assert x509.load_pem_x509_certificates(r.json()["chain"].encode())


def test_attack_rate_limit_table_grows_with_every_address() -> None:
    """Token buckets for a million addresses: the table stays at its bound; the total bucket
    still limits everyone together."""
    now = [0.0]
    buckets = TokenBuckets(
        burst=2, rate=1.0, burst_total=1000, rate_total=10.0, max_clients=100, clock=lambda: now[0]
    )
    allowed = sum(
        buckets.acquire(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") == 0 for i in range(5000)
    )
    assert len(buckets) == 100
    assert allowed == 1000
    assert buckets.acquire("192.0.2.1") > 0
    now[0] += 1.0
    assert buckets.acquire("192.0.2.1") == 0


def test_rate_limit_per_client() -> None:
    now = [0.0]
    buckets = TokenBuckets(
        burst=2, rate=0.5, burst_total=100, rate_total=100.0, max_clients=10, clock=lambda: now[0]
    )
    assert [buckets.acquire("a") == 0 for _ in range(3)] == [True, True, False]
    assert buckets.acquire("a") == pytest.approx(2.0)
    assert buckets.acquire("b") == 0
    now[0] += 2.0
    assert buckets.acquire("a") == 0


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
    ],
)
def test_client_key_groups_ipv6_by_64(host: str | None, key: str) -> None:
    assert client_key(host) == key


REAL = sorted(
    p
    for p in (Path(__file__).parents[2] / "assets/attestation/real").glob("*.cbor")
    if "MOCKROOT" not in p.name
)


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_genuine_aws_cabundles_pass_the_shape_check(path: Path) -> None:
    """The shape check only refuses what the NSM never sends: every genuine AWS document passes."""
    from enclavekit.atls.ca import check_cabundle_shape
    from enclavekit.attestation.document import AttestationDocument
    from enclavekit.pki.roots import aws_root

    doc = AttestationDocument.from_cbor(path.read_bytes())
    check_cabundle_shape(doc, {aws_root().public_bytes(serialization.Encoding.DER)})

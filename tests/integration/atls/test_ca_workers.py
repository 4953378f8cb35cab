"""``enclavekit ca serve --workers 2`` as a process: exactly-once challenges across workers, on
SQLite and PostgreSQL, and a clean stop (SIGTERM, SIGINT, the parent killed: no worker left)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit.nsm import EmulatedAwsPki, NsmEmulator

PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
EXE = str(Path(sys.executable).parent / "enclavekit")
#: Limits wide enough that the races below are decided by the store, not by the rate limiter.
WIDE_LIMITS = {
    "issuance_burst": 10_000,
    "issuance_rate": 10_000,
    "issuance_burst_total": 10_000,
    "issuance_rate_total": 10_000,
    "max_live_challenges_per_client": 10_000,
}


@dataclass
class CaProcess:
    proc: subprocess.Popen[bytes]
    url: str
    emulator: NsmEmulator

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def request(self) -> tuple[str, str]:
        """(CSR PEM, base64 document) for a fresh challenge of this CA."""
        import base64

        nonce = bytes.fromhex(httpx.post(self.url + "/v1/challenges").json()["nonce"])
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
        doc = self.emulator.attest(nonce=nonce, public_key=spki)
        return csr.decode(), base64.b64encode(doc).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a subreaper) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _start(tmp: Path, *extra: str, workers: int = 2) -> CaProcess:
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    (tmp / "nsm-root.pem").write_bytes(pki.root_pem())
    (tmp / "policy.yaml").write_text(
        json.dumps({"services": {"web": {"dns_names": ["localhost"], "pcrs": [
            {str(i): v.hex() for i, v in PCRS.items()}
        ]}}})
    )  # fmt: skip
    (tmp / "limits.yaml").write_text(json.dumps(WIDE_LIMITS))
    if not (tmp / "ca").exists():
        subprocess.run([EXE, "ca", "init", "--state-dir", str(tmp / "ca")], check=True,
                       capture_output=True)  # fmt: skip
    port = _free_port()
    proc = subprocess.Popen(
        [EXE, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp / "ca"),
         "--policy", str(tmp / "policy.yaml"), "--root", str(tmp / "nsm-root.pem"),
         "--limits", str(tmp / "limits.yaml"), "--workers", str(workers), *extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    ca = CaProcess(proc, f"http://127.0.0.1:{port}", emulator)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ca serve exited: {proc.stderr.read() if proc.stderr else b''!r}")
        try:
            if httpx.get(ca.url + "/healthz", timeout=2).status_code == 200 and (
                len(ca.workers()) == workers or workers == 1
            ):
                return ca
        except (httpx.HTTPError, FileNotFoundError):
            pass
        time.sleep(0.2)
    _stop(ca)
    raise AssertionError("ca serve did not start")


def _stop(ca: CaProcess, sig: int = signal.SIGTERM) -> int:
    if ca.proc.poll() is None:
        ca.proc.send_signal(sig)
    try:
        code = ca.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        ca.proc.kill()
        code = ca.proc.wait()
    if ca.proc.stderr is not None:
        ca.proc.stderr.close()
    return code


@pytest.fixture
def sqlite_ca(tmp_path: Path) -> Iterator[CaProcess]:
    ca = _start(tmp_path)
    yield ca
    _stop(ca)


def _pg_database() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    from tests.unit.atls.test_store import PG_URL, _pg_available

    if not _pg_available():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    name = f"ekt_workers_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_ca(tmp_path: Path) -> Iterator[CaProcess]:
    for url in _pg_database():
        ca = _start(tmp_path, "--database", url)
        yield ca
        _stop(ca)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _race(ca: CaProcess, racers: int = 12) -> list[int]:
    """``racers`` simultaneous requests, each on its own connection, for one challenge."""
    csr, doc = ca.request()
    body = {"service": "web", "csr": csr, "attestation_document": doc}
    barrier = threading.Barrier(racers)
    statuses: list[int] = []

    def attempt() -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            statuses.append(client.post(ca.url + "/v1/certificates", json=body).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def _events(tmp: Path, ca: CaProcess) -> list[str]:
    token = (tmp / "ca" / "admin-token").read_text().strip()
    answer = httpx.get(
        ca.url + "/v1/events?limit=1000", headers={"Authorization": f"Bearer {token}"}
    )
    return [e["kind"] for e in answer.json()["events"]]


def _check_races_across_workers(ca: CaProcess, tmp: Path) -> None:
    workers = ca.workers()
    assert len(workers) == 2
    before = {pid: _cpu_ticks(pid) for pid in workers}
    rounds = 4
    for _ in range(rounds):
        statuses = _race(ca)
        assert sorted(statuses) == [201] + [403] * (len(statuses) - 1), statuses
    kinds = _events(tmp, ca)
    assert kinds.count("issued") == rounds
    assert kinds.count("refused") == rounds * 11
    # Both workers verified documents (tens of milliseconds of CPU each), so the races really
    # crossed processes.
    spent = {pid: _cpu_ticks(pid) - before[pid] for pid in workers}
    assert all(t >= 2 for t in spent.values()), spent


def test_attack_replayed_challenge_races_across_sqlite_workers(
    sqlite_ca: CaProcess, tmp_path: Path
) -> None:
    """Twelve simultaneous requests with one challenge, spread over two worker processes sharing
    one SQLite file: one certificate, eleven refusals, each in the audit log."""
    _check_races_across_workers(sqlite_ca, tmp_path)


@pytest.mark.postgres
def test_attack_replayed_challenge_races_across_postgres_workers(
    postgres_ca: CaProcess, tmp_path: Path
) -> None:
    """The same race with two workers on PostgreSQL."""
    _check_races_across_workers(postgres_ca, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_every_worker(tmp_path: Path, sig: int) -> None:
    ca = _start(tmp_path)
    workers = ca.workers()
    assert _stop(ca, sig) == 0
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def test_attack_killed_supervisor_leaves_no_orphan_workers(tmp_path: Path) -> None:
    """SIGKILL to `ca serve` (no chance to clean up): its workers notice and exit by themselves,
    and the port is free again."""
    ca = _start(tmp_path)
    workers = ca.workers()
    ca.proc.kill()
    ca.proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    with pytest.raises(httpx.HTTPError):
        httpx.get(ca.url + "/healthz", timeout=2)
    assert ca.proc.stderr is not None
    ca.proc.stderr.close()


def test_crashed_worker_is_replaced(sqlite_ca: CaProcess) -> None:
    first = sqlite_ca.workers()
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = sqlite_ca.workers()
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the worker was not replaced")
    assert httpx.get(sqlite_ca.url + "/healthz").status_code == 200

"""``enclavekit ca serve --workers 2`` as a process: exactly-once challenges across workers, on
SQLite and PostgreSQL, a clean stop (SIGTERM, SIGINT, the parent killed: no worker left), and
``/metrics`` counting every worker (a crashed one's counts included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
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
from tests.unit.atls.test_metrics_workers import samples

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
    """``ca serve`` with ``$TMPDIR`` = ``tmp/tmp`` (where its metrics directory goes: a killed
    server's stays there, not in /tmp)."""
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    (tmp / "nsm-root.pem").write_bytes(pki.root_pem())
    (tmp / "policy.yaml").write_text(
        json.dumps({"services": {"web": {"dns_names": ["localhost"], "pcrs": [
            {str(i): v.hex() for i, v in PCRS.items()}
        ]}}})
    )  # fmt: skip
    (tmp / "limits.yaml").write_text(json.dumps(WIDE_LIMITS))
    (tmp / "tmp").mkdir(exist_ok=True)
    if not (tmp / "ca").exists():
        subprocess.run([EXE, "ca", "init", "--state-dir", str(tmp / "ca")], check=True,
                       capture_output=True)  # fmt: skip
    port = _free_port()
    proc = subprocess.Popen(
        [EXE, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp / "ca"),
         "--policy", str(tmp / "policy.yaml"), "--root", str(tmp / "nsm-root.pem"),
         "--limits", str(tmp / "limits.yaml"), "--workers", str(workers), *extra],
        stderr=subprocess.PIPE, env=os.environ | {"TMPDIR": str(tmp / "tmp")},
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


def _kill_one_worker(ca: CaProcess) -> None:
    """SIGKILL to one worker, then wait until the supervisor has started its replacement."""
    first = ca.workers()
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = ca.workers()
        if len(now) == 2 and first[0] not in now:
            return
        time.sleep(0.2)
    raise AssertionError("the worker was not replaced")


def test_crashed_worker_is_replaced(sqlite_ca: CaProcess) -> None:
    _kill_one_worker(sqlite_ca)
    assert httpx.get(sqlite_ca.url + "/healthz").status_code == 200


# -- /metrics with two workers ----------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ISSUED = ("enclavekit_ca_issuances_total", ())
WORKERS = ("enclavekit_ca_workers", ())


def _count(endpoint: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("enclavekit_ca_request_seconds_count", (("endpoint", endpoint),))


def _per_slot(metrics_dir: Path) -> dict[str, Samples]:
    """Each worker slot's own counts, read from its files (which worker served what)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    slots: dict[str, Samples] = {}
    for path in metrics_dir.glob("*.db"):
        if path.name.startswith("gauge_"):
            continue
        slot = slots.setdefault(path.stem.rsplit("_", 1)[1], {})
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                slot[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return slots


def _issue(ca: CaProcess, count: int) -> None:
    """``count`` issuances from 4 threads, each on a new connection (any worker may accept it)."""
    statuses: list[int] = []

    def one() -> None:
        csr, doc = ca.request()
        body = {"service": "web", "csr": csr, "attestation_document": doc}
        with httpx.Client(timeout=60) as client:
            statuses.append(client.post(ca.url + "/v1/certificates", json=body).status_code)

    for start in range(0, count, 4):
        threads = [threading.Thread(target=one) for _ in range(min(4, count - start))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [201] * count


def _issue_until_both_served(ca: CaProcess, metrics_dir: Path) -> int:
    """Issue certificates until each worker has issued some; returns how many were issued."""
    issued = 0
    while issued < 200:
        _issue(ca, 4)
        issued += 4
        slots = _per_slot(metrics_dir)
        if len(slots) == 2 and all(s.get(ISSUED, 0) > 0 for s in slots.values()):
            return issued
    raise AssertionError(f"one worker served all {issued} issuances: {_per_slot(metrics_dir)}")


def _scrape(ca: CaProcess) -> Samples:
    with httpx.Client(timeout=30) as client:  # a new connection: any worker may answer
        answer = client.get(ca.url + "/metrics")
    assert answer.status_code == 200
    return samples(answer.text)


def _check_scrapes(ca: CaProcess, metrics_dir: Path, issued: int) -> None:
    """Scrape (two at a time) until each worker has answered some, at least 10 times: every answer
    counts all ``issued`` issuances, their challenges and both workers."""
    scrapes = 0
    got: list[Samples] = []
    while scrapes < 400:
        got.clear()
        threads = [threading.Thread(target=lambda: got.append(_scrape(ca))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        scrapes += 2
        for s in got:
            assert s[ISSUED] == issued
            assert s[_count("/v1/certificates")] == issued
            assert s[_count("/v1/challenges")] == issued
            assert s[WORKERS] == 2
        answered = [s.get(_count("/metrics"), 0) for s in _per_slot(metrics_dir).values()]
        if scrapes >= 10 and len(answered) == 2 and all(answered):
            return
    raise AssertionError(f"one worker answered all {scrapes} scrapes")


def _start_with_metrics_dir(tmp: Path) -> tuple[CaProcess, Path]:
    ca = _start(tmp)
    (metrics_dir,) = (tmp / "tmp").glob("enclavekit-ca-metrics-*")
    return ca, metrics_dir


def test_metrics_count_the_requests_of_every_worker(tmp_path: Path) -> None:
    """Issuances served by both workers; every scrape, whichever worker answers, shows the total.
    The run's multiprocess directory is private (0700) and removed at the stop."""
    ca, metrics_dir = _start_with_metrics_dir(tmp_path)
    try:
        assert stat.S_IMODE(metrics_dir.stat().st_mode) == 0o700
        issued = _issue_until_both_served(ca, metrics_dir)
        _check_scrapes(ca, metrics_dir, issued)
    finally:
        assert _stop(ca) == 0
    assert not metrics_dir.exists()


def test_metrics_keep_the_counts_of_a_crashed_worker(tmp_path: Path) -> None:
    """A worker killed with SIGKILL after serving issuances: its replacement counts on from its
    totals (none lost, none doubled), and the directory keeps its 3 files per worker slot."""
    ca, metrics_dir = _start_with_metrics_dir(tmp_path)
    try:
        issued = _issue_until_both_served(ca, metrics_dir)
        _kill_one_worker(ca)
        deadline = time.monotonic() + 30
        while (s := _scrape(ca))[WORKERS] != 2:  # until the replacement has built its metrics
            assert s[ISSUED] == issued
            assert time.monotonic() < deadline, "the replacement never counted itself"
            time.sleep(0.1)
        _check_scrapes(ca, metrics_dir, issued)
        _issue(ca, 4)
        _check_scrapes(ca, metrics_dir, issued + 4)
        assert sorted(p.name for p in metrics_dir.iterdir()) == sorted(
            f"{kind}_worker{slot}.db"
            for kind in ("counter", "histogram", "gauge_livesum")
            for slot in (0, 1)
        )
    finally:
        assert _stop(ca) == 0
    assert not metrics_dir.exists()

"""CA state stores: SQLite (default) and PostgreSQL (marker ``postgres``), same contract."""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from enclavekit.atls.store import (
    CertificateRecord,
    ChallengeAdmission,
    ConsumeResult,
    Event,
    PostgresStore,
    SqliteStore,
    Store,
    open_store,
)
from enclavekit.errors import UsageError
from tests.unit.atls.atls_support import T0
from tests.unit.atls.conftest import PG_URL, _pg_available


def _record(serial: int = 0xABC) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        service="web",
        not_before=T0,
        not_after=T0 + timedelta(hours=1),
        certificate_der=b"\x30\x00",
        document=b"doc",
        issued_at=T0,
    )


def test_challenge_is_consumed_once(any_store: Store) -> None:
    any_store.add_challenge(b"n" * 32, T0, T0 + timedelta(seconds=60))
    assert any_store.consume_challenge(b"n" * 32, T0) is ConsumeResult.CONSUMED
    assert any_store.consume_challenge(b"n" * 32, T0) is ConsumeResult.ALREADY_USED
    assert any_store.consume_challenge(b"x" * 32, T0) is ConsumeResult.UNKNOWN


def test_challenge_expiry_boundary(any_store: Store) -> None:
    any_store.add_challenge(b"a" * 32, T0, T0 + timedelta(seconds=60))
    any_store.add_challenge(b"b" * 32, T0, T0 + timedelta(seconds=60))
    assert (
        any_store.consume_challenge(b"a" * 32, T0 + timedelta(seconds=60)) is ConsumeResult.EXPIRED
    )
    assert (
        any_store.consume_challenge(b"b" * 32, T0 + timedelta(seconds=59, milliseconds=999))
        is ConsumeResult.CONSUMED
    )


def test_concurrent_consumption_has_one_winner(any_store: Store) -> None:
    """Racing consumers of one nonce: exactly one CONSUMED."""
    any_store.add_challenge(b"r" * 32, T0, T0 + timedelta(seconds=60))
    results: list[ConsumeResult] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        barrier.wait()
        results.append(any_store.consume_challenge(b"r" * 32, T0))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(ConsumeResult.CONSUMED) == 1


def test_certificates_revocation_and_events(any_store: Store) -> None:
    rec = _record()
    any_store.add_certificate(rec)
    assert any_store.get_certificate(0xABC) == rec
    assert any_store.get_certificate(0xABD) is None
    assert any_store.revoke(0xABC, T0 + timedelta(minutes=1), "superseded")
    assert not any_store.revoke(0xABC, T0 + timedelta(minutes=2), "superseded")
    (revoked,) = any_store.revoked()
    assert revoked.revoked_at == T0 + timedelta(minutes=1)
    assert revoked.revocation_reason == "superseded"
    any_store.record_event(Event(T0, "issued", "web", 0xABC, "x"))
    any_store.record_event(Event(T0, "refused", None, None, "y"))
    assert [e.kind for e in any_store.events()] == ["refused", "issued"]
    assert any_store.events()[1].serial == 0xABC


def test_large_serial_roundtrip(any_store: Store) -> None:
    serial = (1 << 158) + 12345
    any_store.add_certificate(_record(serial))
    got = any_store.get_certificate(serial)
    assert got is not None
    assert got.serial == serial


@pytest.mark.postgres
def test_two_postgres_replicas_share_nonces() -> None:
    """Two CA replicas on one database: a nonce consumed by one is used for the other."""
    if not _pg_available():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    schema = f"ekt_{uuid.uuid4().hex[:12]}"
    a = PostgresStore(PG_URL, schema=schema)
    b = PostgresStore(PG_URL, schema=schema)
    try:
        a.add_challenge(b"s" * 32, T0, T0 + timedelta(seconds=60))
        assert b.consume_challenge(b"s" * 32, T0) is ConsumeResult.CONSUMED
        assert a.consume_challenge(b"s" * 32, T0) is ConsumeResult.ALREADY_USED
    finally:
        b.close()
        a.drop()
        a.close()


def test_open_store_selects_backend(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    assert isinstance(s, SqliteStore)
    s.close()
    s = open_store(tmp_path, f"sqlite:{tmp_path / 'other.db'}")
    assert isinstance(s, SqliteStore)
    s.close()
    with pytest.raises(UsageError, match="unsupported"):
        open_store(tmp_path, "mysql://x:secret@h/db")


def test_bad_postgres_url_is_a_usage_error_without_password() -> None:
    with pytest.raises(UsageError) as err:
        PostgresStore("postgresql://u:hunter2@127.0.0.1:1/none?connect_timeout=1")
    assert "hunter2" not in str(err.value)


@pytest.mark.postgres
def test_postgres_store_reconnects_after_a_dropped_connection() -> None:
    """A broken database connection fails one call; the next call reconnects."""
    if not _pg_available():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    import psycopg

    pg = PostgresStore(PG_URL, schema=f"ekt_{uuid.uuid4().hex[:12]}")
    try:
        pid = pg._conn.info.backend_pid
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            pg.add_challenge(b"c" * 32, T0, T0 + timedelta(seconds=60))
        pg.add_challenge(b"c" * 32, T0, T0 + timedelta(seconds=60))
        assert pg.consume_challenge(b"c" * 32, T0) is ConsumeResult.CONSUMED
    finally:
        pg.drop()
        pg.close()


def _rows(store: Store, table: str) -> int:
    with store._tx() as cur:  # type: ignore[attr-defined]
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cur.fetchone()[0])


def test_attack_challenge_flood_is_capped_per_client_and_in_total(any_store: Store) -> None:
    """Live challenges are capped per client and in total; expired ones are purged on insert."""
    ttl = timedelta(seconds=60)

    def add(n: int, client: str, at: datetime = T0) -> ChallengeAdmission:
        return any_store.add_challenge(
            n.to_bytes(32, "big"), at, at + ttl, client=client, max_live=5, max_live_per_client=3
        )

    assert [add(i, "a") for i in range(4)] == [ChallengeAdmission.ADDED] * 3 + [
        ChallengeAdmission.TOO_MANY_FOR_CLIENT
    ]
    assert [add(10 + i, "b") for i in range(3)] == [ChallengeAdmission.ADDED] * 2 + [
        ChallengeAdmission.TOO_MANY
    ]
    assert _rows(any_store, "challenges") == 5
    # Consumed challenges still count until they expire (they are the replay record).
    assert any_store.consume_challenge((0).to_bytes(32, "big"), T0) is ConsumeResult.CONSUMED
    assert add(20, "c") is ChallengeAdmission.TOO_MANY
    later = T0 + ttl
    assert add(21, "a", later) is ChallengeAdmission.ADDED
    assert _rows(any_store, "challenges") == 1


def test_attack_challenge_status_is_read_only(any_store: Store) -> None:
    any_store.add_challenge(b"q" * 32, T0, T0 + timedelta(seconds=60))
    assert any_store.challenge_status(b"q" * 32, T0) is None
    assert any_store.challenge_status(b"q" * 32, T0) is None
    assert any_store.challenge_status(b"z" * 32, T0) is ConsumeResult.UNKNOWN
    assert any_store.challenge_status(b"q" * 32, T0 + timedelta(seconds=60)) is (
        ConsumeResult.EXPIRED
    )
    assert any_store.consume_challenge(b"q" * 32, T0) is ConsumeResult.CONSUMED
    assert any_store.challenge_status(b"q" * 32, T0) is ConsumeResult.ALREADY_USED


def test_attack_audit_log_and_certificates_grow_without_bound(any_store: Store) -> None:
    """prune() keeps events younger than the retention, at most max_events of them, and deletes
    certificate records expired before the cut-off."""
    for i in range(30):
        any_store.record_event(Event(T0 + timedelta(days=i), "refused", "web", None, f"e{i}"))
    any_store.add_certificate(_record(1))
    old = _record(2)
    any_store.add_certificate(
        dataclasses.replace(
            old,
            not_before=T0 - timedelta(days=200),
            not_after=T0 - timedelta(days=100),
            issued_at=T0 - timedelta(days=200),
        )
    )
    counts = any_store.prune(
        T0 + timedelta(days=30),
        events_before=T0 + timedelta(days=10),
        max_events=15,
        certificates_expired_before=T0 - timedelta(days=90),
    )
    assert (counts.events, counts.certificates) == (15, 1)
    kept = any_store.events(1000)
    assert len(kept) == 15
    assert kept[-1].detail == "e15"
    assert any_store.get_certificate(1) is not None
    assert any_store.get_certificate(2) is None


def test_attack_old_database_gains_the_client_column(tmp_path: Path) -> None:
    """A database created before the per-client caps is migrated in place."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE challenges (nonce BLOB PRIMARY KEY, created_at BIGINT NOT NULL,"
        " expires_at BIGINT NOT NULL, consumed_at BIGINT)"
    )
    conn.commit()
    conn.close()
    os.chmod(path, 0o644)
    store = SqliteStore(path)
    try:
        assert (
            store.add_challenge(
                b"m" * 32, T0, T0 + timedelta(seconds=60), client="a", max_live_per_client=1
            )
            is ChallengeAdmission.ADDED
        )
    finally:
        store.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_attack_losing_racer_records_no_certificate(any_store: Store) -> None:
    """record_issuance adds the certificate and its event only when it consumed the challenge."""
    any_store.add_challenge(b"w" * 32, T0, T0 + timedelta(seconds=60))
    issued = Event(T0, "issued", "web", 1, "x")
    assert any_store.record_issuance(b"w" * 32, T0, _record(1), issued) is ConsumeResult.CONSUMED
    assert any_store.record_issuance(b"w" * 32, T0, _record(2), issued) is (
        ConsumeResult.ALREADY_USED
    )
    assert any_store.record_issuance(b"u" * 32, T0, _record(3), issued) is ConsumeResult.UNKNOWN
    assert any_store.get_certificate(1) is not None
    assert any_store.get_certificate(2) is None
    assert any_store.get_certificate(3) is None
    assert [e.serial for e in any_store.events()] == [1]


def _consume_in_process(path: str, nonce: bytes, gate: object, out: object) -> None:
    store = SqliteStore(path)
    gate.wait()  # type: ignore[attr-defined]
    out.put(store.consume_challenge(nonce, T0).value)  # type: ignore[attr-defined]
    store.close()


def test_attack_challenge_consumed_once_across_processes(tmp_path: Path) -> None:
    """Six processes, each with its own connection to one SQLite file, race to consume one nonce:
    exactly one wins (the workers of `ca serve --workers N` share the store this way)."""
    import multiprocessing

    path = str(tmp_path / "shared.sqlite3")
    store = SqliteStore(path)
    store.add_challenge(b"p" * 32, T0, T0 + timedelta(seconds=60))
    store.close()
    ctx = multiprocessing.get_context("spawn")
    gate = ctx.Barrier(6)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_consume_in_process, args=(path, b"p" * 32, gate, out)) for _ in range(6)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results.count(ConsumeResult.CONSUMED.value) == 1
    assert results.count(ConsumeResult.ALREADY_USED.value) == 5


def test_crl_query_lists_unexpired_revocations_from_the_index(any_store: Store) -> None:
    """revocations(valid_at) returns revoked, unexpired certificates only; on SQLite the query
    is answered from the partial index, not by scanning every certificate."""
    for serial, hours in ((1, 1), (2, -1), (3, 1)):
        any_store.add_certificate(
            dataclasses.replace(_record(serial), not_after=T0 + timedelta(hours=hours))
        )
    any_store.revoke(1, T0, "superseded")
    any_store.revoke(2, T0, "superseded")
    got = any_store.revocations(valid_at=T0)
    assert [(r.serial, r.reason) for r in got] == [(1, "superseded")]
    assert {r.serial for r in any_store.revocations()} == {1, 2}
    if isinstance(any_store, SqliteStore):
        with any_store._read() as cur:
            plan = " ".join(
                str(r[-1])
                for r in cur.execute(
                    "EXPLAIN QUERY PLAN SELECT serial, revoked_at, revocation_reason"
                    " FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?"
                    " ORDER BY revoked_at",
                    (0,),
                )
            )
        assert "certificates_revoked" in plan, plan


def test_sqlite_synchronous_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="synchronous"):
        SqliteStore(tmp_path / "x.sqlite3", synchronous="off")
    s = SqliteStore(tmp_path / "y.sqlite3", synchronous="full")
    with s._read() as cur:
        assert cur.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()

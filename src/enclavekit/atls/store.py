"""Persistent CA state: challenges (nonces), issued certificates, revocations and an audit log.

Two back ends behind one interface:

* :class:`SqliteStore` — embedded, the default (``<state-dir>/ca.sqlite3``, WAL mode);
* :class:`PostgresStore` — ``postgresql://`` URLs via psycopg, so CA replicas share one state.

Nonce consumption is one conditional ``UPDATE … WHERE consumed_at IS NULL AND expires_at > now``:
the database decides which of several racing requests wins, in one statement, on either back end,
whether the racers are threads of one CA process, worker processes of one ``ca serve --workers N``
or CA replicas. :meth:`record_issuance` runs that ``UPDATE`` and the inserts of the certificate
record and its audit event in one transaction: a certificate is recorded exactly when its nonce is
consumed, and an issuance costs one commit.

Locking: on SQLite every write transaction is ``BEGIN IMMEDIATE`` (it takes the database's write
lock first, so two processes never both read and then fail to upgrade), each process has its own
connection (never shared across ``fork``), writers queue on an ``flock`` of ``<db>-lock`` (woken at
once, instead of SQLite's polling busy handler) and wait up to ``busy_timeout`` (5 s) for any other
process's lock; reads take no write lock (WAL readers see the last committed state).
Times are stored as integer milliseconds since the Unix epoch (UTC); serials as lower-case hex text.

Every table is bounded: :meth:`add_challenge` deletes expired challenges and refuses a new one beyond
the caps on live challenges (per client and in total) in the same transaction (on PostgreSQL under a
transaction-scoped advisory lock, so replicas cannot race past the caps); :meth:`prune` deletes old
audit events (by age and count) and certificate records long expired. SQLite files are created
0600 (SQLite gives its ``-wal`` and ``-shm`` files the database file's mode).

Not handled here: authentication of callers, and anything cryptographic (see :mod:`.ca`).
"""

from __future__ import annotations

import enum
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from enclavekit.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: SQLite's busy_timeout alone
    fcntl = None  # type: ignore[assignment]


def to_ms(when: datetime) -> int:
    """Milliseconds since the epoch for an aware datetime."""
    if when.tzinfo is None:
        raise ValueError("naive datetime; pass an aware (UTC) datetime")
    return int(when.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class ConsumeResult(enum.Enum):
    """Outcome of consuming a challenge nonce."""

    CONSUMED = "consumed"
    UNKNOWN = "unknown or expired"
    ALREADY_USED = "already used"
    EXPIRED = "expired"


class ChallengeAdmission(enum.Enum):
    """Outcome of adding a challenge under the caps on live challenges."""

    ADDED = "added"
    TOO_MANY_FOR_CLIENT = "too many live challenges for this client"
    TOO_MANY = "too many live challenges"


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """Rows deleted by :meth:`Store.prune`."""

    challenges: int
    events: int
    certificates: int


@dataclass(frozen=True, slots=True)
class Revocation:
    """One CRL entry: what :meth:`Store.revocations` returns (no certificate or document bytes)."""

    serial: int
    revoked_at: datetime
    reason: str | None


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One issued certificate with the attestation document it was issued for."""

    serial: int
    service: str
    not_before: datetime
    not_after: datetime
    certificate_der: bytes
    document: bytes
    issued_at: datetime
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One audit-log entry: an issuance, a refusal or a revocation."""

    at: datetime
    kind: str
    service: str | None
    serial: int | None
    detail: str


class Store(Protocol):
    """What the CA needs from its persistent state."""

    #: Whether a call waits on the network (a database server) rather than on a local file: the CA
    #: service overlaps such waits on threads and runs issuances against a local store inline.
    over_network: bool

    def add_challenge(
        self,
        nonce: bytes,
        created_at: datetime,
        expires_at: datetime,
        *,
        client: str = "",
        max_live: int | None = None,
        max_live_per_client: int | None = None,
    ) -> ChallengeAdmission: ...

    def challenge_status(self, nonce: bytes, now: datetime) -> ConsumeResult | None:
        """None if ``nonce`` is a live, unused challenge at ``now``; else why it is not."""
        ...

    def consume_challenge(self, nonce: bytes, now: datetime) -> ConsumeResult: ...

    def record_issuance(
        self, nonce: bytes, now: datetime, record: CertificateRecord, event: Event
    ) -> ConsumeResult:
        """Consume ``nonce`` and, only if that succeeded, add ``record`` and ``event``: one
        transaction."""
        ...

    def add_certificate(self, record: CertificateRecord) -> None: ...

    def get_certificate(self, serial: int) -> CertificateRecord | None: ...

    def revoke(self, serial: int, at: datetime, reason: str) -> bool: ...

    def revoked(self) -> Sequence[CertificateRecord]: ...

    def revocations(self, *, valid_at: datetime | None = None) -> Sequence[Revocation]:
        """Revoked certificates (oldest revocation first), only those still valid at ``valid_at``
        if given; served by a partial index on revoked certificates."""
        ...

    def record_event(self, event: Event) -> None: ...

    def events(self, limit: int = 100) -> Sequence[Event]: ...

    def prune(
        self,
        now: datetime,
        *,
        events_before: datetime,
        max_events: int,
        certificates_expired_before: datetime,
    ) -> PruneCounts: ...

    def close(self) -> None: ...


def _ddl(blob: str, serial_pk: str) -> tuple[str, ...]:
    return (
        f"CREATE TABLE IF NOT EXISTS challenges (nonce {blob} PRIMARY KEY,"
        " created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, consumed_at BIGINT,"
        " client TEXT NOT NULL DEFAULT '')",
        f"CREATE TABLE IF NOT EXISTS certificates (serial TEXT PRIMARY KEY, service TEXT NOT NULL,"
        f" not_before BIGINT NOT NULL, not_after BIGINT NOT NULL, certificate {blob} NOT NULL,"
        f" document {blob} NOT NULL, issued_at BIGINT NOT NULL, revoked_at BIGINT,"
        " revocation_reason TEXT)",
        f"CREATE TABLE IF NOT EXISTS events (id {serial_pk}, at BIGINT NOT NULL,"
        " kind TEXT NOT NULL, service TEXT, serial TEXT, detail TEXT NOT NULL)",
    )


#: Indexes for the purges and caps (created after the columns exist; see ``_migrate``).
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS challenges_expiry ON challenges (expires_at)",
    "CREATE INDEX IF NOT EXISTS challenges_client ON challenges (client, expires_at)",
    "CREATE INDEX IF NOT EXISTS events_at ON events (at)",
    "CREATE INDEX IF NOT EXISTS certificates_not_after ON certificates (not_after)",
    # The CRL reads revoked certificates only: a partial index keeps that independent of how many
    # certificates were issued (SQLite and PostgreSQL both use it for ``revoked_at IS NOT NULL``).
    "CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (revoked_at, not_after)"
    " WHERE revoked_at IS NOT NULL",
)


_CERT_COLUMNS = (
    "serial, service, not_before, not_after, certificate, document, issued_at, revoked_at,"
    " revocation_reason"
)


def _cert_from_row(row: Sequence[Any]) -> CertificateRecord:
    return CertificateRecord(
        serial=int(row[0], 16),
        service=row[1],
        not_before=from_ms(row[2]),
        not_after=from_ms(row[3]),
        certificate_der=bytes(row[4]),
        document=bytes(row[5]),
        issued_at=from_ms(row[6]),
        revoked_at=None if row[7] is None else from_ms(row[7]),
        revocation_reason=row[8],
    )


class _SqlStore:
    """Shared SQL; subclasses provide a DB-API connection and the parameter marker."""

    _marker = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def _tx(self) -> AbstractContextManager[Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        """A cursor for read-only statements (default: a transaction)."""
        return self._tx()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self._marker)

    def _serialize_challenges(self, cur: Any) -> None:
        """Serialise concurrent :meth:`add_challenge` calls (SQLite: BEGIN IMMEDIATE already does)."""

    def add_challenge(
        self,
        nonce: bytes,
        created_at: datetime,
        expires_at: datetime,
        *,
        client: str = "",
        max_live: int | None = None,
        max_live_per_client: int | None = None,
    ) -> ChallengeAdmission:
        now_ms = to_ms(created_at)
        with self._tx() as cur:
            self._serialize_challenges(cur)
            cur.execute(self._sql("DELETE FROM challenges WHERE expires_at <= ?"), (now_ms,))
            if max_live_per_client is not None:
                cur.execute(
                    self._sql("SELECT COUNT(*) FROM challenges WHERE client = ?"), (client,)
                )
                if int(cur.fetchone()[0]) >= max_live_per_client:
                    return ChallengeAdmission.TOO_MANY_FOR_CLIENT
            if max_live is not None:
                cur.execute("SELECT COUNT(*) FROM challenges")
                if int(cur.fetchone()[0]) >= max_live:
                    return ChallengeAdmission.TOO_MANY
            cur.execute(
                self._sql(
                    "INSERT INTO challenges (nonce, created_at, expires_at, client)"
                    " VALUES (?, ?, ?, ?)"
                ),
                (nonce, now_ms, to_ms(expires_at), client),
            )
        return ChallengeAdmission.ADDED

    def challenge_status(self, nonce: bytes, now: datetime) -> ConsumeResult | None:
        with self._read() as cur:
            cur.execute(
                self._sql("SELECT consumed_at, expires_at FROM challenges WHERE nonce = ?"),
                (nonce,),
            )
            row = cur.fetchone()
        if row is None:
            return ConsumeResult.UNKNOWN
        if row[0] is not None:
            return ConsumeResult.ALREADY_USED
        if row[1] <= to_ms(now):
            return ConsumeResult.EXPIRED
        return None

    def consume_challenge(self, nonce: bytes, now: datetime) -> ConsumeResult:
        with self._tx() as cur:
            return self._consume(cur, nonce, to_ms(now))

    def _consume(self, cur: Any, nonce: bytes, now_ms: int) -> ConsumeResult:
        # The one atomic step: only one UPDATE can flip consumed_at from NULL.
        cur.execute(
            self._sql(
                "UPDATE challenges SET consumed_at = ? WHERE nonce = ? AND consumed_at IS NULL"
                " AND expires_at > ?"
            ),
            (now_ms, nonce, now_ms),
        )
        if cur.rowcount == 1:
            return ConsumeResult.CONSUMED
        cur.execute(
            self._sql("SELECT consumed_at, expires_at FROM challenges WHERE nonce = ?"),
            (nonce,),
        )
        row = cur.fetchone()
        if row is None:
            return ConsumeResult.UNKNOWN
        if row[0] is not None:
            return ConsumeResult.ALREADY_USED
        return ConsumeResult.EXPIRED

    def record_issuance(
        self, nonce: bytes, now: datetime, record: CertificateRecord, event: Event
    ) -> ConsumeResult:
        with self._tx() as cur:
            outcome = self._consume(cur, nonce, to_ms(now))
            if outcome is ConsumeResult.CONSUMED:
                self._insert_certificate(cur, record)
                self._insert_event(cur, event)
        return outcome

    def add_certificate(self, record: CertificateRecord) -> None:
        with self._tx() as cur:
            self._insert_certificate(cur, record)

    def _insert_certificate(self, cur: Any, record: CertificateRecord) -> None:
        cur.execute(
            self._sql(
                f"INSERT INTO certificates ({_CERT_COLUMNS})"  # noqa: S608 - constant columns
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            (
                format(record.serial, "x"),
                record.service,
                to_ms(record.not_before),
                to_ms(record.not_after),
                record.certificate_der,
                record.document,
                to_ms(record.issued_at),
                None if record.revoked_at is None else to_ms(record.revoked_at),
                record.revocation_reason,
            ),
        )

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        with self._read() as cur:
            cur.execute(
                self._sql(f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?"),  # noqa: S608
                (format(serial, "x"),),
            )
            row = cur.fetchone()
        return None if row is None else _cert_from_row(row)

    def revoke(self, serial: int, at: datetime, reason: str) -> bool:
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE certificates SET revoked_at = ?, revocation_reason = ?"
                    " WHERE serial = ? AND revoked_at IS NULL"
                ),
                (to_ms(at), reason, format(serial, "x")),
            )
            return bool(cur.rowcount == 1)

    def revoked(self) -> Sequence[CertificateRecord]:
        with self._read() as cur:
            cur.execute(
                f"SELECT {_CERT_COLUMNS} FROM certificates"  # noqa: S608 - constant columns
                " WHERE revoked_at IS NOT NULL"
                " ORDER BY revoked_at"
            )
            rows = cur.fetchall()
        return [_cert_from_row(r) for r in rows]

    def revocations(self, *, valid_at: datetime | None = None) -> Sequence[Revocation]:
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT serial, revoked_at, revocation_reason FROM certificates"
                    " WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY revoked_at"
                ),
                (-1 if valid_at is None else to_ms(valid_at),),
            )
            rows = cur.fetchall()
        return [Revocation(int(r[0], 16), from_ms(r[1]), r[2]) for r in rows]

    def record_event(self, event: Event) -> None:
        with self._tx() as cur:
            self._insert_event(cur, event)

    def _insert_event(self, cur: Any, event: Event) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO events (at, kind, service, serial, detail) VALUES (?, ?, ?, ?, ?)"
            ),
            (
                to_ms(event.at),
                event.kind,
                event.service,
                None if event.serial is None else format(event.serial, "x"),
                event.detail,
            ),
        )

    def events(self, limit: int = 100) -> Sequence[Event]:
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT at, kind, service, serial, detail FROM events ORDER BY id DESC LIMIT ?"
                ),
                (limit,),
            )
            rows = cur.fetchall()
        return [
            Event(
                at=from_ms(r[0]),
                kind=r[1],
                service=r[2],
                serial=None if r[3] is None else int(r[3], 16),
                detail=r[4],
            )
            for r in rows
        ]

    def count_challenges(self, now: datetime) -> tuple[int, int]:
        """Unconsumed challenges at ``now``: (live, expired but not yet purged) — for metrics."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "SELECT COALESCE(SUM(CASE WHEN expires_at > ? THEN 1 ELSE 0 END), 0),"
                    " COALESCE(SUM(CASE WHEN expires_at <= ? THEN 1 ELSE 0 END), 0)"
                    " FROM challenges WHERE consumed_at IS NULL"
                ),
                (to_ms(now), to_ms(now)),
            )
            row = cur.fetchone()
        return int(row[0]), int(row[1])

    def prune(
        self,
        now: datetime,
        *,
        events_before: datetime,
        max_events: int,
        certificates_expired_before: datetime,
    ) -> PruneCounts:
        with self._tx() as cur:
            cur.execute(self._sql("DELETE FROM challenges WHERE expires_at <= ?"), (to_ms(now),))
            challenges = max(0, cur.rowcount)
            cur.execute(self._sql("DELETE FROM events WHERE at < ?"), (to_ms(events_before),))
            events = max(0, cur.rowcount)
            cur.execute(
                self._sql(
                    "DELETE FROM events WHERE id <="
                    " (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)"
                ),
                (max_events,),
            )
            events += max(0, cur.rowcount)
            cur.execute(
                self._sql("DELETE FROM certificates WHERE not_after < ?"),
                (to_ms(certificates_expired_before),),
            )
            certificates = max(0, cur.rowcount)
        return PruneCounts(challenges, events, certificates)


#: ``PRAGMA synchronous`` settings :class:`SqliteStore` accepts. In WAL mode, ``normal`` (the
#: default) syncs the log at checkpoints, not at each commit: never corrupts the database, loses
#: nothing when a CA process crashes, but a power loss or kernel crash can lose the issuances
#: committed since the last checkpoint (their records and audit events; their challenges become
#: unconsumed again, still bound to the enclave key that asked). ``full`` syncs at every commit —
#: durable against power loss, at one disk sync per issuance, which several workers wait for in
#: turn. PostgreSQL (``--database``) is durable and groups concurrent commits.
SQLITE_SYNCHRONOUS = frozenset({"normal", "full"})


class SqliteStore(_SqlStore):
    """The embedded default. One connection, serialised by a lock; safe across threads. Several
    processes may open the same file (each its own :class:`SqliteStore`, opened after ``fork``)."""

    over_network = False

    def __init__(self, path: Path | str, *, synchronous: str = "normal") -> None:
        super().__init__()
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise UsageError(
                f"SQLite synchronous mode must be one of {sorted(SQLITE_SYNCHRONOUS)},"
                f" found {synchronous!r}"
            )
        self.path = str(path)
        self._lock_fd: int | None = None
        if self.path != ":memory:":
            _private_file(Path(path))
            if fcntl is not None:
                lock = Path(self.path + "-lock")
                _private_file(lock)
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        for stmt in _ddl("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"):
            self._conn.execute(stmt)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(challenges)")}
        if "client" not in columns:  # a database from before the per-client caps
            self._conn.execute("ALTER TABLE challenges ADD COLUMN client TEXT NOT NULL DEFAULT ''")
        for stmt in _INDEXES:
            self._conn.execute(stmt)
        for suffix in ("-wal", "-shm"):  # older databases: SQLite keeps the files' modes
            if self.path != ":memory:":
                _private_file(Path(self.path + suffix), create=False)
        # Reads get their own connection (WAL: readers and the writer do not block each other), so
        # a thread waiting for another process's write lock does not hold up this process's reads.
        self._read_lock = threading.Lock() if self.path != ":memory:" else self._lock
        self._read_conn = (
            sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:"
            else self._conn
        )
        self._read_conn.execute("PRAGMA busy_timeout=5000")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock, self._writer():
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    @contextmanager
    def _writer(self) -> Iterator[None]:
        # Writers of this file queue on an exclusive flock(2) of ``<db>-lock`` before BEGIN
        # IMMEDIATE: the kernel wakes the next one as soon as the lock is released, where SQLite's
        # busy handler would poll with sleeps of up to 100 ms. Processes that do not take it (the
        # sqlite3 shell) still meet SQLite's own lock and busy_timeout: correctness never depends
        # on the flock.
        if self._lock_fd is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        # Autocommit SELECTs: no write lock, so readers never wait for another process's writer.
        with self._read_lock:
            cur = self._read_conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock, self._read_lock if self._read_lock is not self._lock else nullcontext():
            self._conn.close()
            if self._read_conn is not self._conn:
                self._read_conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


class PostgresStore(_SqlStore):
    """PostgreSQL via psycopg 3. ``schema`` isolates one CA (or one test run) inside a database."""

    _marker = "%s"
    over_network = True

    def __init__(self, url: str, *, schema: str = "enclavekit_ca") -> None:
        super().__init__()
        try:
            import psycopg  # noqa: F401 - fail early with a clear message
        except ImportError as exc:  # pragma: no cover - depends on the installed extra
            raise UsageError(
                "--database postgresql://… needs psycopg, which is not installed; install it with:"
                " pip install 'enclavekit[postgres]'"
            ) from exc
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema name must be alphanumeric/underscore, got {schema!r}")
        self.schema = schema
        self._url = url
        self._conn = self._connect()
        with self._tx() as cur:
            cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            cur.execute(f'SET search_path TO "{schema}"')
            for stmt in _ddl("BYTEA", "BIGSERIAL PRIMARY KEY"):
                cur.execute(stmt)
            cur.execute(
                "ALTER TABLE challenges ADD COLUMN IF NOT EXISTS client TEXT NOT NULL DEFAULT ''"
            )
            for stmt in _INDEXES:
                cur.execute(stmt)

    def _serialize_challenges(self, cur: Any) -> None:
        # Replicas share the caps: one add_challenge at a time per schema, until COMMIT.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema + ".challenges",))

    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(self._url, autocommit=True)
            conn.execute(f'SET search_path TO "{self.schema}"')
        except psycopg.Error as exc:
            raise UsageError(
                f"cannot connect to the CA database {_redact(self._url)}: {exc}; check --database"
            ) from exc
        return conn

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            if self._conn.closed or self._conn.broken:
                # The server restarted or the network dropped: the failed request got an error,
                # the next one reconnects.
                self._conn = self._connect()
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur

    def drop(self) -> None:
        """Remove this store's schema and every row in it (tests, decommissioning)."""
        with self._tx() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _private_file(path: Path, *, create: bool = True) -> None:
    """Make ``path`` owner-only (0600), creating it empty if asked and missing."""
    if create:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise UsageError(f"cannot create the CA database {path}: {exc.strerror}") from exc
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot make {path} private (chmod 600): {exc.strerror}") from exc


def _redact(url: str) -> str:
    """A database URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def open_store(
    state_dir: Path, database: str | None = None, *, sqlite_synchronous: str = "normal"
) -> Store:
    """The CA's store: ``database`` (a PostgreSQL URL) if given, else SQLite in ``state_dir``."""
    if database is None or database.startswith("sqlite:"):
        if database is None:
            return SqliteStore(state_dir / "ca.sqlite3", synchronous=sqlite_synchronous)
        return SqliteStore(Path(database[len("sqlite:") :]), synchronous=sqlite_synchronous)
    if database.startswith(("postgresql://", "postgres://")):
        return PostgresStore(database)
    raise UsageError(
        f"unsupported --database URL {_redact(database)!r}; expected postgresql://… or sqlite:PATH"
    )

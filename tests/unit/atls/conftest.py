"""Fixtures for attested-TLS unit tests (the document factory lives in atls_support.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from enclavekit.atls.ca import CaKeys, Issuer, NitroEvidenceVerifier, create_ca_keys
from enclavekit.atls.store import PostgresStore, SqliteStore, Store
from tests.unit.atls.atls_support import T0, Clock, DocumentFactory, ca_policy


@pytest.fixture(scope="session")
def factory() -> DocumentFactory:
    return DocumentFactory()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def ca_keys() -> CaKeys:
    return create_ca_keys(now=T0 - timedelta(days=1))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "ca.sqlite3")
    yield s
    s.close()


@pytest.fixture
def issuer(ca_keys: CaKeys, store: SqliteStore, factory: DocumentFactory, clock: Clock) -> Issuer:
    return Issuer(
        ca_keys, ca_policy(), store, NitroEvidenceVerifier(factory.verifier()), clock=clock
    )


#: The CI database (trust auth); override with ENCLAVEKIT_TEST_DATABASE_URL.
PG_URL = os.environ.get("ENCLAVEKIT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=2).close()
    except Exception:
        return False
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "s.sqlite3")
        yield s
        s.close()
        return
    if not _pg_available():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    pg = PostgresStore(PG_URL, schema=f"ekt_{uuid.uuid4().hex[:12]}")
    try:
        yield pg
    finally:
        pg.drop()
        pg.close()

"""Fixtures for attested-TLS unit tests (the document factory lives in atls_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from enclavekit.atls.ca import CaKeys, Issuer, NitroEvidenceVerifier, create_ca_keys
from enclavekit.atls.store import SqliteStore
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

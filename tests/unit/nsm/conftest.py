"""Fixtures for the NSM tests: one emulated PKI per session (key generation is the slow part)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from enclavekit.nsm import Nsm, NsmEmulator
from enclavekit.pki.emulated import EmulatedAwsPki

#: A fixed instant so that documents and certificates are reproducible in shape.
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def pki() -> EmulatedAwsPki:
    return EmulatedAwsPki.ephemeral(clock=lambda: NOW)


@pytest.fixture
def emulator(pki: EmulatedAwsPki) -> NsmEmulator:
    return NsmEmulator(pcrs={0: b"\x00" * 47 + b"\x01"}, pki=pki, clock=lambda: NOW)


@pytest.fixture
def nsm(emulator: NsmEmulator) -> Iterator[Nsm]:
    with Nsm.in_process(emulator) as client:
        yield client


@pytest.fixture
def now() -> datetime:
    """The emulator clock's fixed instant."""
    return NOW

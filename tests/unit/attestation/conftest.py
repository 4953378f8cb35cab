from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.attestation.factory import TestPki

REAL = Path(__file__).resolve().parents[2] / "assets" / "attestation" / "real"

#: file → (expected outcome, debug?) from tests/assets/attestation/real/INDEX.md
REAL_VECTORS: dict[str, tuple[str, bool]] = {
    "evervault-2022-10-prod.cbor": ("valid", False),
    "evervault-2022-10-debug.cbor": ("valid", True),
    "evervault-2022-11-san-debug.cbor": ("valid", True),
    "evervault-2023-01-san-prod.cbor": ("valid", False),
    "evervault-2023-01-san-debug.cbor": ("valid", True),
    "evervault-2023-09-ga-debug.cbor": ("valid", True),
    "uid2-2021-04-debug.cbor": ("valid", True),
    "marlin-2024-08-prod.cbor": ("valid", False),
    "marlin-2024-08-prod-b.cbor": ("valid", False),
    "marlin-2024-12-prod.cbor": ("valid", False),
    "marlin-2024-12-MOCKROOT.cbor": ("mock-root", False),
    "eternis-2024-07-prod.cbor": ("valid", False),
    "eternis-2024-09-debug.cbor": ("valid", True),
    "base-2024-11-prod.cbor": ("valid", False),
}


def real(name: str) -> bytes:
    return (REAL / name).read_bytes()


@pytest.fixture(scope="session")
def pki() -> TestPki:
    return TestPki()

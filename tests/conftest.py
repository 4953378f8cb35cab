"""Shared pytest configuration. Area-specific fixtures live in each tests/unit/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """The folder of test data carried by the repository (see tests/assets/*/README.md for provenance)."""
    return ASSETS

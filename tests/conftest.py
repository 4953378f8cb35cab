"""Shared pytest configuration. Area-specific fixtures live in each tests/unit/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """The folder of test data carried by the repository (see tests/assets/*/README.md for provenance)."""
    return ASSETS


def _hypothesis_profiles() -> None:
    """CI runs Hypothesis derandomized so a red build is reproducible; locally it explores."""
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()

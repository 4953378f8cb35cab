"""Shared pytest configuration. Area-specific fixtures live in each tests/unit/<area>/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _reset_service_logging() -> Iterator[None]:
    """A service command run in process (CliRunner) configures the package logger and the warning format
    for the rest of its process; a CLI process runs one command, a test process many: undo it."""
    yield
    import logging

    from enclavekit.cli import _log

    _log.active_format = None
    package = logging.getLogger("enclavekit")
    package.handlers = []
    package.propagate = True
    package.setLevel(logging.NOTSET)

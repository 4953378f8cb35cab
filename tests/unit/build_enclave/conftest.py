"""Fixtures for build-enclave tests: a blobs directory with a synthetic kernel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.build_enclave.factory import kernel_bytes


@pytest.fixture(scope="session")
def blobs_dir(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """nitro-cli's x86_64 blobs (tests/assets/build) plus a synthetic ``bzImage``."""
    directory = tmp_path_factory.mktemp("blobs")
    for name in ("init", "nsm.ko", "cmdline", "bzImage.config"):
        shutil.copy(assets / "build" / name, directory / name)
    (directory / "bzImage").write_bytes(kernel_bytes())
    return directory

"""Fixtures for tests that drive the real ``enclavekit`` command in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.build_enclave.factory import base_layer, docker_archive, kernel_bytes

#: The console script of this venv (what a user runs).
EXE = [str(Path(sys.executable).parent / "enclavekit")]


def run(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run ``enclavekit ARGS`` and capture stdout and stderr as bytes."""
    return subprocess.run(
        [*EXE, *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        input=input,
        timeout=timeout,
    )


def wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate()`` until true (a file appearing, a process ending); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def cli_blobs(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """nitro-cli's x86_64 blobs (tests/assets/build) plus a synthetic ``bzImage``."""
    directory = tmp_path_factory.mktemp("blobs")
    for name in ("init", "nsm.ko", "cmdline", "bzImage.config"):
        shutil.copy(assets / "build" / name, directory / name)
    (directory / "bzImage").write_bytes(kernel_bytes())
    return directory


@pytest.fixture(scope="session")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return docker_archive(tmp_path_factory.mktemp("image") / "img.tar", [base_layer()])


@pytest.fixture(scope="session")
def built_eif(tmp_path_factory: pytest.TempPathFactory, cli_blobs: Path, image_tar: Path) -> Path:
    out = tmp_path_factory.mktemp("eif") / "app.eif"
    done = run(
        "build-enclave",
        "--image",
        str(image_tar),
        "--output-file",
        str(out),
        "--blobs",
        str(cli_blobs),
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def nsm_emulator(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A running ``enclavekit nsm serve`` on a Unix socket; yields the environment that selects it
    (``ENCLAVEKIT_NSM``) plus ``root`` (its root PEM path) and ``state`` (its state directory)."""
    state = tmp_path / "nsm-state"
    sock = state / "nsm.sock"
    log = tmp_path / "nsm-serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*EXE, "nsm", "serve", "--state-dir", str(state), "--listen", f"unix://{sock}"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, "the NSM emulator's socket")
        assert proc.poll() is None, log.read_text()
        yield {
            "ENCLAVEKIT_NSM": f"unix://{sock}",
            "root": str(state / "root.pem"),
            "state": str(state),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)

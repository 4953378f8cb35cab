"""python -m enclavekit.vm: describe-enclaves, terminate-enclave, console, option parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclavekit.errors import UsageError
from enclavekit.vm.commands import _parse_forward, _parse_listen, main
from enclavekit.vm.state import EnclaveRecord, write_record


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENCLAVEKIT_STATE_DIR", str(tmp_path))
    return tmp_path / "vm"


def test_describe_enclaves_lists_live_records(state: Path) -> None:
    write_record(
        EnclaveRecord(
            "app",
            "i-1-enc1",
            os.getpid(),
            os.getpid(),
            16,
            2,
            512,
            True,
            "/a.eif",
            None,
            {"PCR0": "00"},
        ),
        state,
    )
    result = CliRunner().invoke(main, ["describe-enclaves", "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)
    assert entry["EnclaveID"] == "i-1-enc1"
    assert entry["State"] == "RUNNING"
    assert entry["Measurements"] == {"PCR0": "00"}


def test_terminate_needs_one_target(state: Path) -> None:
    result = CliRunner().invoke(main, ["terminate-enclave"])
    assert isinstance(result.exception, UsageError)
    result = CliRunner().invoke(main, ["terminate-enclave", "--enclave-id", "i-9-enc9"])
    assert isinstance(result.exception, UsageError)
    assert "describe-enclaves" in str(result.exception)


def test_console_without_debug_mode_is_refused(state: Path) -> None:
    write_record(
        EnclaveRecord(
            "app", "i-1-enc1", os.getpid(), os.getpid(), 16, 2, 512, False, "/a.eif", None
        ),
        state,
    )
    result = CliRunner().invoke(main, ["console", "--enclave-id", "i-1-enc1"])
    assert isinstance(result.exception, UsageError)
    assert "--debug-mode" in str(result.exception)


def test_forward_and_listen_parsing() -> None:
    assert _parse_forward(("8000=127.0.0.1:9000", "8001=/run/k.sock", "8002=[::1]:1")) == {
        8000: ("127.0.0.1", 9000),
        8001: "/run/k.sock",
        8002: ("::1", 1),
    }
    assert _parse_listen(("127.0.0.1:5005=5005",)) == {("127.0.0.1", 5005): 5005}
    with pytest.raises(UsageError):
        _parse_forward(("x=1",))
    with pytest.raises(UsageError):
        _parse_listen(("5005",))
    for bad_forward in ("8000=127.0.0.1:70000", "8000=:9000", "-1=127.0.0.1:9000", "8000=host"):
        with pytest.raises(UsageError):
            _parse_forward((bad_forward,))
    for bad_listen in ("127.0.0.1:99999=5005", "127.0.0.1:5005=x", "127.0.0.1:5005=4294967296"):
        with pytest.raises(UsageError):
            _parse_listen((bad_listen,))


def test_module_reports_user_errors_without_traceback(tmp_path: Path) -> None:
    eif = tmp_path / "a.eif"
    eif.write_bytes(b"x")
    env = {
        **os.environ,
        "PATH": str(tmp_path),
        "ENCLAVEKIT_QEMU_NITRO_CACHE": str(tmp_path / "none"),
        "ENCLAVEKIT_STATE_DIR": str(tmp_path),
    }
    env.pop("ENCLAVEKIT_QEMU", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "enclavekit.vm",
            "run-enclave",
            "--eif-path",
            str(eif),
            "--memory",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr

"""run_enclave_vm's lifecycle against a fake QEMU that speaks vhost-user and sends the init heartbeat."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from enclavekit.errors import UsageError
from enclavekit.vm.runner import EnclaveBootError, run_enclave_vm, terminate_recorded
from enclavekit.vm.state import list_records

FAKE = Path(__file__).with_name("fake_qemu.py")


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    path = tmp_path / "app.eif"
    path.write_bytes(b"not checked: precheck=False")
    return path


def run(eif: Path, qemu: Path, tmp_path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    return run_enclave_vm(
        eif,
        qemu=qemu,
        precheck=False,
        records=tmp_path / "records",
        boot_timeout=20,
        **kwargs,  # type: ignore[arg-type]
    )


def test_boot_heartbeat_console_record_and_terminate(
    eif: Path, fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_ARGV", str(tmp_path / "argv"))
    seen: list[str] = []
    enclave = run(
        eif,
        fake_qemu,
        tmp_path,
        debug_mode=True,
        console=seen.append,
        parent_id="i-0123456789abcdef0",
        enclave_cid=21,
    )
    try:
        assert enclave.backend.heartbeat_seen.is_set()
        assert not enclave.restarted.is_set()
        (record,) = list_records(tmp_path / "records")
        assert record.enclave_id.startswith("i-0123456789abcdef0-enc")
        assert record.describe_json()["Flags"] == "DEBUG_MODE"
        assert record.describe_json()["EnclaveCID"] == 21
        deadline = time.monotonic() + 5
        while "hello from the fake enclave" not in "".join(seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "hello from the fake enclave" in "".join(seen)
        argv = (tmp_path / "argv").read_text().splitlines()
        machine = argv[argv.index("-M") + 1]
        assert "acpi=on" in machine
        assert f"id={record.enclave_id}" in machine
        assert "parent-id=i-0123456789abcdef0" in machine
    finally:
        enclave.terminate()
    assert not enclave.is_running()
    assert list_records(tmp_path / "records") == []


def test_without_debug_mode_there_is_no_console(eif: Path, fake_qemu: Path, tmp_path: Path) -> None:
    seen: list[str] = []
    with run(eif, fake_qemu, tmp_path, console=seen.append) as enclave:
        assert enclave.console_log is None
        assert enclave.record.describe_json()["Flags"] == "NONE"
    assert seen == []


def test_terminate_recorded_stops_an_enclave(eif: Path, fake_qemu: Path, tmp_path: Path) -> None:
    enclave = run(eif, fake_qemu, tmp_path)
    assert terminate_recorded(enclave.record.enclave_id, tmp_path / "records")
    assert enclave.process.wait(5) is not None
    enclave.close()
    assert not terminate_recorded("i-0-encdeadbeef", tmp_path / "records")


def test_enclave_end_is_seen_by_wait(
    eif: Path, fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "exit")
    enclave = run(eif, fake_qemu, tmp_path)
    assert enclave.wait(10) == 0
    assert list_records(tmp_path / "records") == []


def test_a_second_boot_ends_the_vm(
    eif: Path, fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The QEMU vsock test's hang: the guest kernel restarted through the firmware (QEMU's -no-reboot never
    saw a reset), booted the EIF again and waited forever. Its second init heartbeat now ends the VM, as
    Nitro ends an enclave whose kernel reboots."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "reboot")
    enclave = run(eif, fake_qemu, tmp_path)
    try:
        assert enclave.wait(10) == 0  # without the check: TimeoutExpired, the fake waits for ever
    finally:
        enclave.terminate()
    assert enclave.restarted.is_set()
    assert list_records(tmp_path / "records") == []


def test_qemu_refusal_is_reported_with_qemus_words(
    eif: Path, fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "refuse")
    with pytest.raises(EnclaveBootError, match="QEMU exited with status 1.*CRC mismatch"):
        run(eif, fake_qemu, tmp_path)
    assert list_records(tmp_path / "records") == []


def test_missing_heartbeat_times_out(
    eif: Path, fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "silent")
    with pytest.raises(EnclaveBootError, match="no heartbeat.*--debug-mode"):
        run_enclave_vm(
            eif, qemu=fake_qemu, precheck=False, records=tmp_path / "r", boot_timeout=1.5
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"cpu_count": 0}, "cpu-count"), ({"memory_mib": 16}, "memory")],
)
def test_bad_resources_are_usage_errors(eif: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run_enclave_vm(eif, precheck=False, **kwargs)  # type: ignore[arg-type]


def test_missing_eif_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        run_enclave_vm(tmp_path / "nope.eif")


def test_memory_below_four_times_the_eif_is_refused(tmp_path: Path) -> None:
    """nitro-cli's rule; checked after the EIF itself (a non-EIF is refused first)."""
    from enclavekit.errors import EifError

    junk = tmp_path / "junk.eif"
    junk.write_bytes(os.urandom(600))
    with pytest.raises(EifError):
        run_enclave_vm(junk, memory_mib=64)

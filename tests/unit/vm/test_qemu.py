"""QEMU discovery, the command line, the TSC hint, and the state records."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from enclavekit.vm.qemu import QemuConfig, QemuNotFound, find_qemu, host_tsc_khz, qemu_command
from enclavekit.vm.state import EnclaveRecord, list_records, write_record


def config(**overrides: object) -> QemuConfig:
    base: dict[str, object] = {
        "qemu": Path("/q"),
        "eif_path": Path("/a.eif"),
        "vhost_socket": Path("/run/x.sock"),
        "memory_mib": 512,
        "cpu_count": 2,
        "module_id": "i-1-enc2",
        "serial": "null",
        "firmware_dirs": (),
    }
    base.update(overrides)
    return QemuConfig(**base)  # type: ignore[arg-type]


def test_command_line_names_the_machine_and_backend() -> None:
    argv = qemu_command(
        config(parent_role="arn:aws:iam::1:role/a,b", parent_id="i-9", append="x=1")
    )
    machine = argv[argv.index("-M") + 1]
    assert machine.split(",")[0] == "nitro-enclave"
    assert "vsock=vsock0" in machine
    assert "acpi=on" in machine
    assert "parent-role=arn:aws:iam::1:role/a,,b" in machine  # QEMU escapes commas by doubling
    assert argv[argv.index("-chardev") + 1] == "socket,id=vsock0,path=/run/x.sock"
    assert argv[argv.index("-kernel") + 1] == "/a.eif"
    assert argv[argv.index("-m") + 1] == "512M"
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-append") + 1] == "x=1"
    assert "-no-reboot" in argv


def test_missing_qemu_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(QemuNotFound, match="scripts/qemu-nitro/setup.sh"):
        find_qemu({"PATH": str(tmp_path)}, start=tmp_path)


def test_a_qemu_without_the_machine_is_skipped(tmp_path: Path) -> None:
    plain = tmp_path / "qemu-system-x86_64"
    plain.write_text("#!/bin/sh\necho 'microvm  microvm (i386)'\n")
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(QemuNotFound, match="tried"):
        find_qemu({"PATH": str(tmp_path), "ENCLAVEKIT_QEMU": str(plain)}, start=tmp_path)


def test_qemu_in_the_cache_is_found(tmp_path: Path) -> None:
    binary = tmp_path / ".cache" / "qemu-nitro" / "qemu" / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'nitro-enclave        AWS Nitro Enclave'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    deeper = tmp_path / "a" / "b"
    deeper.mkdir(parents=True)
    assert find_qemu({"PATH": ""}, start=deeper) == binary


def test_host_tsc_khz_reads_constant_tsc_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCLAVEKIT_VM_TSC_KHZ", raising=False)
    info = "processor: 0\ncpu MHz\t\t: 2445.402\nflags\t\t: fpu tsc constant_tsc\n\nprocessor: 1\n"
    assert host_tsc_khz(info) == 2445402
    assert host_tsc_khz(info.replace("constant_tsc", "")) is None
    assert host_tsc_khz("cpu MHz : oops\nflags : constant_tsc\n") is None
    monkeypatch.setenv("ENCLAVEKIT_VM_TSC_KHZ", "0")
    assert host_tsc_khz(info) is None


def record(enclave_id: str, pid: int) -> EnclaveRecord:
    return EnclaveRecord("app", enclave_id, os.getpid(), pid, 16, 2, 512, False, "/a.eif", None)


def test_records_round_trip_and_stale_ones_vanish(tmp_path: Path) -> None:
    write_record(record("i-1-enc1", os.getpid()), tmp_path)
    write_record(record("i-1-enc2", 2**22 + 12345), tmp_path)  # no such process
    (tmp_path / "i-1-enc3.json").write_text("{not json")
    assert [r.enclave_id for r in list_records(tmp_path)] == ["i-1-enc1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i-1-enc1.json"]
    shape = list_records(tmp_path)[0].run_json()
    assert list(shape) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
    ]


def test_record_path_traversal_is_refused(tmp_path: Path) -> None:
    """An enclave id never names a file outside the state folder."""
    with pytest.raises(ValueError, match="not an enclave id"):
        write_record(record("../../etc/x", os.getpid()), tmp_path)

"""The run-enclave / describe-enclaves / console / terminate-enclave commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclavekit.cli import cli
from tests.unit.run.conftest import make_eif


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_lifecycle_through_the_cli(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "cli.eif", cmd=["/bin/sh", "-c", "echo console-line; exec sleep 60"])
    state = str(tmp_path / "state")
    code, out, err = _invoke(
        "run-enclave", "--eif-path", str(eif), "--isolation", "process", "--cpu-count", "1",
        "--memory", "64", "--enclave-cid", "42", "--state-dir", state,
    )  # fmt: skip
    assert code == 0, err
    run_info = json.loads(out)
    assert list(run_info) == [
        "EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs",
        "MemoryMiB",
    ]  # fmt: skip
    assert run_info["EnclaveCID"] == 42 and run_info["EnclaveName"] == "cli"
    assert "WARNING" in err

    code, out, _ = _invoke("describe-enclaves", "--state-dir", state, "--metadata")
    [described] = json.loads(out)
    assert described["EnclaveID"] == run_info["EnclaveID"] and described["State"] == "RUNNING"
    assert described["ImageName"] == "test-app"

    code, out, _ = _invoke(
        "console", "--enclave-id", run_info["EnclaveID"], "--disconnect-timeout", "3",
        "--state-dir", state,
    )  # fmt: skip
    assert code == 0 and "console-line" in out

    code, out, _ = _invoke("terminate-enclave", "--all", "--state-dir", state, "--json")
    assert code == 0
    assert json.loads(out) == [
        {"EnclaveName": "cli", "EnclaveID": run_info["EnclaveID"], "Terminated": True}
    ]
    code, out, _ = _invoke("describe-enclaves", "--state-dir", state)
    assert json.loads(out) == []


def test_unknown_enclave_and_bad_flags_exit_2(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    code, _, err = _invoke("terminate-enclave", "--enclave-id", "i-x-enc0", "--state-dir", state)
    assert code == 2 and "no running enclave" in err
    code, _, err = _invoke("terminate-enclave", "--state-dir", state)
    assert code == 2 and "exactly one" in err
    code, _, err = _invoke("console", "--state-dir", state)
    assert code == 2
    code, _, err = _invoke("run-enclave", "--eif-path", str(tmp_path / "none.eif"))
    assert code == 2 and "no such file" in err


def test_vm_flag_hands_over_to_the_qemu_runner(tmp_path: Path) -> None:
    import importlib.util

    eif = make_eif(tmp_path / "vm.eif", cmd=["/bin/true"])
    code, _, err = _invoke("run-enclave", "--eif-path", str(eif), "--vm", "--isolation", "process")
    assert code == 2 and "apply to the local runner" in err
    if importlib.util.find_spec("enclavekit.vm") is None:
        code, _, err = _invoke("run-enclave", "--eif-path", str(eif), "--vm")
        assert code == 2 and "enclavekit.vm" in err
        return
    from enclavekit.vm import QemuNotFound, find_qemu

    try:
        find_qemu()
    except QemuNotFound:
        code, _, err = _invoke("run-enclave", "--eif-path", str(eif), "--vm")
        assert (
            code == 2 and "QEMU" in err
        )  # handed over to the QEMU runner, which says what is missing
    else:
        pytest.skip("a QEMU with the nitro-enclave machine is present; the vm tests boot EIFs")


def test_damaged_eif_exits_1(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "bad.eif", cmd=["/bin/true"])
    raw = bytearray(eif.read_bytes())
    raw[-600] ^= 0xFF
    eif.write_bytes(bytes(raw))
    code, out, err = _invoke(
        "run-enclave", "--eif-path", str(eif), "--isolation", "process",
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert code == 1 and "CRC" in err and out == ""


def test_config_file_like_nitro_cli(tmp_path: Path) -> None:
    import os

    eif = make_eif(tmp_path / "conf.eif", cmd=["/bin/sh", "-c", "echo configured; exec sleep 60"])
    cpu = sorted(os.sched_getaffinity(0))[0]
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "eif_path": str(eif),
                "memory_mib": 64,
                "cpu_ids": [cpu],
                "enclave_cid": 33,
                "enclave_name": "from-config",
                "debug_mode": True,
            }
        )
    )
    state = str(tmp_path / "state")
    code, out, err = _invoke(
        "run-enclave", "--config", str(config), "--isolation", "process", "--state-dir", state
    )
    assert code == 0, err
    info = json.loads(out)
    assert (info["EnclaveName"], info["EnclaveCID"], info["CPUIDs"]) == ("from-config", 33, [cpu])
    [described] = json.loads(_invoke("describe-enclaves", "--state-dir", state)[1])
    assert described["Flags"] == "DEBUG_MODE"
    _invoke("terminate-enclave", "--all", "--state-dir", state)


def test_attach_console_follows_until_the_enclave_ends(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "att.eif", cmd=["/bin/sh", "-c", "echo attached-line"])
    code, out, err = _invoke(
        "run-enclave", "--eif-path", str(eif), "--isolation", "process", "--debug-mode",
        "--attach-console", "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert code == 0, err
    assert "attached-line" in out and "exited with status 0" in out


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        ({"eif_path": "x.eif"}, [], "memory_mib are required"),
        ({"eif_path": "x.eif", "memory_mib": "512"}, [], "memory_mib must be a int"),
        ({"eif_path": "x.eif", "memory_mib": 512, "gpus": 1}, [], "unknown key"),
        ({"eif_path": "x.eif", "memory_mib": 512}, ["--debug-mode"], "cannot be combined"),
        ([1, 2], [], "JSON object"),
    ],
)
def test_bad_config_files_exit_2(
    tmp_path: Path, config: object, extra: list[str], message: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code, _, err = _invoke("run-enclave", "--config", str(path), *extra)
    assert code == 2 and message in err


def test_cpu_ids_must_be_available(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "c.eif", cmd=["/bin/true"])
    code, _, err = _invoke(
        "run-enclave", "--eif-path", str(eif), "--cpu-ids", "9999",
        "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2 and "not available: [9999]" in err
    code, _, err = _invoke("run-enclave", "--eif-path", str(eif), "--cpu-ids", "a b")
    assert code == 2 and "expected CPU numbers" in err


def test_relative_state_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    eif = make_eif(tmp_path / "rel.eif", cmd=["/bin/sh", "-c", "exec sleep 60"])
    code, out, err = _invoke(
        "run-enclave", "--eif-path", "rel.eif", "--isolation", "process", "--state-dir", "st"
    )
    assert code == 0, err
    assert json.loads(_invoke("describe-enclaves", "--state-dir", "st")[1])[0]["State"] == (
        "RUNNING"
    )
    code, out, _ = _invoke("terminate-enclave", "--all", "--state-dir", "st", "--json")
    assert json.loads(out)[0]["Terminated"] is True
    assert eif.exists()


def test_vm_only_options_are_refused_without_vm(tmp_path: Path) -> None:
    eif = make_eif(tmp_path / "novm.eif", cmd=["/bin/true"])
    code, _, err = _invoke("run-enclave", "--eif-path", str(eif), "--forward", "8000=127.0.0.1:1")
    assert code == 2
    assert "--forward apply to --vm only" in err


def test_describe_and_terminate_see_enclaves_running_in_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VM enclaves (run-enclave --vm) show up next to local ones, with nitro-cli's shapes."""
    import subprocess

    from enclavekit.vm.state import EnclaveRecord, write_record

    monkeypatch.setenv("ENCLAVEKIT_STATE_DIR", str(tmp_path / "state"))
    stand_in = subprocess.Popen(["sleep", "60"])  # stands in for the QEMU process
    try:
        write_record(
            EnclaveRecord(
                enclave_name="in-qemu",
                enclave_id="i-0123456789abcdef0-enc0000000000000001",
                process_id=stand_in.pid,
                qemu_pid=stand_in.pid,
                enclave_cid=17,
                cpu_count=2,
                memory_mib=512,
                debug_mode=False,
                eif_path="/x.eif",
                console_log=None,
            )
        )
        code, out, _ = _invoke("describe-enclaves")
        assert code == 0
        [described] = json.loads(out)
        assert described["EnclaveName"] == "in-qemu"
        assert described["EnclaveCID"] == 17
        assert described["Flags"] == "NONE"
        code, _, err = _invoke("console", "--enclave-name", "in-qemu")
        assert code == 2
        assert "no console" in err
        code, out, _ = _invoke("terminate-enclave", "--enclave-name", "in-qemu")
        assert code == 0
        assert json.loads(out)["EnclaveID"] == "i-0123456789abcdef0-enc0000000000000001"
    finally:
        stand_in.kill()
        stand_in.wait()


@pytest.mark.parametrize(
    "form",
    [
        ["--cpu-ids", "9998", "9999"],
        ["--cpu-ids=9998", "9999"],
        ["--cpu-ids", "9998 9999"],
        ["--cpu-ids", "9998,9999"],
    ],
)
def test_cpu_ids_take_several_values_without_eating_the_next_flag(
    tmp_path: Path, form: list[str]
) -> None:
    eif = make_eif(tmp_path / "c.eif", cmd=["/bin/true"])
    code, _, err = _invoke(
        "run-enclave", "--eif-path", str(eif), *form, "--memory", "64",
        "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 2 and "not available: [9998, 9999]" in err

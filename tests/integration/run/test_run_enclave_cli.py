"""run-enclave / describe-enclaves / console / terminate-enclave driven as a user drives them: the
real ``enclavekit`` executable in a subprocess, images crafted with the runner tests' EIF factory.

Chroot-mode tests need root and mount namespaces (skipped otherwise; CI runs as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.run.runner import chroot_supported
from tests.unit.run.conftest import d, f, link, make_crafted_eif, make_eif

ENCLAVEKIT = str(Path(sys.executable).parent / "enclavekit")
needs_chroot = pytest.mark.skipif(not chroot_supported(), reason="needs root and mount namespaces")
ZERO = "00" * 48
PRINT_PCR0 = (
    '"$ENCLAVEKIT_PYTHON" -c "from enclavekit.nsm import Nsm;'
    " print('PCR0', Nsm.open().describe_pcr(0).data.hex())\""
)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[str]:
    directory = str(tmp_path / "state")
    yield directory
    subprocess.run(
        [ENCLAVEKIT, "terminate-enclave", "--all", "--state-dir", directory],
        capture_output=True,
        timeout=60,
    )


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENCLAVEKIT, *args], capture_output=True, text=True, timeout=timeout)


def run(eif: Path, state: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "run-enclave", "--eif-path", str(eif), "--memory", "64", "--state-dir", state, *extra
    )


def running(state: str) -> list[dict[str, object]]:
    proc = cli("describe-enclaves", "--state-dir", state, "--json")
    assert proc.returncode == 0, proc.stderr
    value = json.loads(proc.stdout)
    assert isinstance(value, list)
    return value


def wait_until_none_run(state: str) -> None:
    deadline = time.monotonic() + 20
    while running(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(state) == []


def nothing_left(state: str) -> bool:
    enclaves = Path(state) / "enclaves"
    return not enclaves.exists() or not any(enclaves.iterdir())


# --- issue 14 item 8: the runner never writes through or reads through the image's links -------


def _cmd_env() -> list[tuple[str, int, bytes]]:
    return [f("cmd", b"/bin/sh\n-c\nexec sleep 60\n"), f("env", b"PATH=/bin\n")]


@needs_chroot
def test_attack_rootfs_symlink_to_host_directory_gets_no_mount_points_and_no_chroot(
    tmp_path: Path, state: str
) -> None:
    host = tmp_path / "host-directory"
    host.mkdir()
    eif = make_crafted_eif(tmp_path / "evil.eif", [link("rootfs", str(host)), *_cmd_env()])
    proc = run(eif, state, "--isolation", "chroot")
    assert proc.returncode == 1, proc.stderr
    assert "/rootfs is a symbolic link to " + str(host) in proc.stderr
    assert list(host.iterdir()) == []  # no dev/ proc/ run/ sys/ tmp/ created there
    assert proc.stdout == "" and nothing_left(state)


@needs_chroot
@pytest.mark.parametrize("entry", ["etc", "proc", "dev", "tmp", "run", "sys"])
def test_attack_rootfs_entry_symlink_to_host_directory_gets_no_mount_point(
    tmp_path: Path, state: str, entry: str
) -> None:
    """``rootfs/etc`` → a host directory plus ``--mount-host /etc/ssl``; or a mount point the
    runner itself creates and mounts on (``/proc``, ``/tmp``, ...) linked to a host directory."""
    host = tmp_path / "host-directory"
    host.mkdir()
    eif = make_crafted_eif(
        tmp_path / "evil.eif", [d("rootfs"), link(f"rootfs/{entry}", str(host)), *_cmd_env()]
    )
    proc = run(eif, state, "--isolation", "chroot", "--mount-host", "/etc/ssl")
    assert proc.returncode == 1, proc.stderr
    assert f"/rootfs/{entry} is a symbolic link to {host}" in proc.stderr
    assert list(host.iterdir()) == []
    assert proc.stdout == "" and nothing_left(state)


@needs_chroot
def test_attack_mount_host_target_that_is_a_file_link_is_refused(
    tmp_path: Path, state: str
) -> None:
    host_file = tmp_path / "host-file"
    host_file.write_text("host content")
    eif = make_crafted_eif(
        tmp_path / "evil.eif",
        [d("rootfs"), d("rootfs/etc"), link("rootfs/etc/hostname", str(host_file)), *_cmd_env()],
    )
    proc = run(eif, state, "--isolation", "chroot", "--mount-host", "/etc/hostname")
    assert proc.returncode == 1, proc.stderr
    assert "/rootfs/etc/hostname is a symbolic link" in proc.stderr
    assert host_file.read_text() == "host content" and nothing_left(state)


@pytest.mark.parametrize("isolation", ["process", pytest.param("chroot", marks=needs_chroot)])
@pytest.mark.parametrize("name", ["cmd", "env"])
def test_attack_cmd_or_env_symlink_to_host_file_is_not_read(
    tmp_path: Path, state: str, isolation: str, name: str
) -> None:
    host_file = tmp_path / "host-file"
    host_file.write_text("/bin/sh\n-c\necho READ-FROM-THE-HOST; exec sleep 60\n")
    entries = [d("rootfs"), f("cmd", b"/bin/sh\n-c\nexec sleep 60\n"), f("env", b"PATH=/bin\n")]
    entries = [e for e in entries if e[0] != name] + [link(name, str(host_file))]
    eif = make_crafted_eif(tmp_path / "evil.eif", entries)
    proc = run(eif, state, "--isolation", isolation)
    assert proc.returncode == 1, proc.stderr
    assert f"/{name} is a symbolic link to {host_file}" in proc.stderr
    assert proc.stdout == "" and nothing_left(state)


@needs_chroot
def test_image_with_real_directories_still_runs_with_host_mounts(
    tmp_path: Path, state: str
) -> None:
    """The refusals above do not refuse the ordinary case (an image's own /etc, host binds)."""
    eif = make_eif(
        tmp_path / "ok.eif",
        cmd=["/bin/sh", "-c", "ls /etc/ssl >/dev/null && echo SSL-BOUND; exec sleep 60"],
        files=[d("rootfs/etc")],
    )
    proc = run(
        eif, state, "--isolation", "chroot",
        "--mount-host", "/usr", "--mount-host", "/bin", "--mount-host", "/lib",
        "--mount-host", "/lib64", "--mount-host", "/etc/ssl",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    enclave_id = json.loads(proc.stdout)["EnclaveID"]
    text = cli(
        "console", "--enclave-id", enclave_id, "--disconnect-timeout", "3", "--state-dir", state
    ).stdout
    assert "SSL-BOUND" in text


# --- issue 15: honest outcomes -------------------------------------------------------------------

_UNRUNNABLE = {
    "missing binary": (["no-such-program", "arg"], [], "no-such-program: not found"),
    "not executable": (["/app"], [f("rootfs/app", b"#!/bin/sh\necho hi\n", 0o644)], "/app"),
    "missing /bin/sh": (["/bin/sh", "-c", "echo hi"], [], "/bin/sh"),
}


@pytest.mark.parametrize(
    ("isolation", "case"),
    [
        ("process", "missing binary"),
        ("process", "not executable"),
        pytest.param("chroot", "missing binary", marks=needs_chroot),
        pytest.param("chroot", "not executable", marks=needs_chroot),
        pytest.param("chroot", "missing /bin/sh", marks=needs_chroot),
    ],
)
def test_command_that_cannot_be_executed_exits_1_with_the_reason_and_the_log(
    tmp_path: Path, state: str, isolation: str, case: str
) -> None:
    """Process mode looks the command up in the rootfs, then on this machine: a /bin/sh missing
    from the image is the host's there, so "missing /bin/sh" is a chroot-mode case."""
    cmd, files, reason = _UNRUNNABLE[case]
    eif = make_eif(tmp_path / "broken.eif", cmd=cmd, files=files)
    proc = run(eif, state, "--isolation", isolation, "--enclave-name", "broken")
    assert proc.returncode == 1, proc.stderr
    assert "could not be started" in proc.stderr and reason in proc.stderr
    assert "Started enclave" not in proc.stderr and proc.stdout == ""
    log = Path(proc.stderr.split("console log: ", 1)[1].split()[0])
    assert reason in log.read_text()
    assert running(state) == [] and nothing_left(state)
    console = cli("console", "--enclave-name", "broken", "--state-dir", state)
    assert console.returncode == 0, console.stderr
    assert reason in console.stdout  # the kept console says why
    assert "could not run" in console.stderr and str(log) in console.stderr


def test_console_and_describe_of_an_ended_enclave_show_its_exit_status_and_log(
    tmp_path: Path, state: str
) -> None:
    eif = make_eif(tmp_path / "short.eif", cmd=["/bin/sh", "-c", "echo goodbye; exit 3"])
    proc = run(eif, state, "--isolation", "process", "--enclave-name", "short")
    assert proc.returncode == 0, proc.stderr
    enclave_id = json.loads(proc.stdout)["EnclaveID"]
    wait_until_none_run(state)
    for selector in (["--enclave-id", enclave_id], ["--enclave-name", "short"]):
        console = cli("console", *selector, "--state-dir", state)
        assert console.returncode == 0, console.stderr
        assert "goodbye" in console.stdout
        assert "exited with status 3" in console.stderr
        assert f"logs/{enclave_id}.log" in console.stderr
    described = cli("describe-enclaves", "--state-dir", state)
    assert json.loads(described.stdout) == []
    assert enclave_id in described.stderr and "exited with status 3" in described.stderr
    gone = cli("terminate-enclave", "--enclave-id", enclave_id, "--state-dir", state)
    assert gone.returncode == 2 and "exited with status 3" in gone.stderr


def test_two_running_enclaves_with_one_name_are_refused(tmp_path: Path, state: str) -> None:
    eif = make_eif(tmp_path / "app.eif", cmd=["/bin/sh", "-c", "exec sleep 60"])
    first = run(eif, state, "--isolation", "process", "--enclave-name", "web")
    assert first.returncode == 0, first.stderr
    second = run(eif, state, "--isolation", "process", "--enclave-name", "web")
    assert second.returncode == 2
    assert "--enclave-name web" in second.stderr and second.stdout == ""
    assert [e["EnclaveName"] for e in running(state)] == ["web"]
    # Without --enclave-name the EIF's stem is made unique, as nitro-cli does (app, app_1).
    names = [json.loads(run(eif, state, "--isolation", "process").stdout)["EnclaveName"]]
    names.append(json.loads(run(eif, state, "--isolation", "process").stdout)["EnclaveName"])
    assert names == ["app", "app_1"]


@pytest.mark.parametrize("how", ["flag", "config"])
def test_attach_console_implies_debug_mode_as_in_nitro_cli(
    tmp_path: Path, state: str, how: str
) -> None:
    eif = make_eif(tmp_path / "att.eif", cmd=["/bin/sh", "-c", PRINT_PCR0])
    if how == "flag":
        proc = run(eif, state, "--isolation", "process", "--attach-console")
    else:
        config = tmp_path / "run.json"
        config.write_text(
            json.dumps({"eif_path": str(eif), "memory_mib": 64, "attach_console": True})
        )
        proc = cli(
            "run-enclave", "--config", str(config), "--isolation", "process", "--state-dir", state
        )
    assert proc.returncode == 0, proc.stderr
    assert f"PCR0 {ZERO}" in proc.stdout  # the NSM of a debug-mode enclave


def test_cpu_ids_takes_several_values_like_nitro_cli(tmp_path: Path, state: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    eif = make_eif(tmp_path / "cpus.eif", cmd=["/bin/sh", "-c", "exec sleep 60"])
    proc = run(eif, state, "--isolation", "process", "--cpu-ids", str(cpus[1]), str(cpus[0]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["CPUIDs"] == cpus[:2]


def test_describe_shows_zero_pcr0_1_2_for_a_debug_mode_enclave(tmp_path: Path, state: str) -> None:
    """What its attestation documents carry (nitro-cli shows the image's values,
    aws/aws-nitro-enclaves-cli#695)."""
    eif = make_eif(tmp_path / "dbg.eif", cmd=["/bin/sh", "-c", f"{PRINT_PCR0}; exec sleep 60"])
    proc = run(eif, state, "--isolation", "process", "--debug-mode")
    assert proc.returncode == 0, proc.stderr
    [described] = running(state)
    assert described["Flags"] == "DEBUG_MODE"
    measurements = described["Measurements"]
    assert isinstance(measurements, dict)
    assert [measurements[k] for k in ("PCR0", "PCR1", "PCR2")] == [ZERO] * 3
    assert measurements["HashAlgorithm"].startswith("Sha384")


def test_every_json_command_prints_exactly_one_json_value(tmp_path: Path, state: str) -> None:
    eif = make_eif(tmp_path / "js.eif", cmd=["/bin/sh", "-c", "echo on-the-console; sleep 60"])
    ids = []
    for _ in range(2):
        proc = run(eif, state, "--isolation", "process", "--json")
        assert proc.returncode == 0, proc.stderr
        ids.append(json.loads(proc.stdout)["EnclaveID"])
    assert len(running(state)) == 2
    attached = run(eif, state, "--isolation", "process", "--json", "--attach-console")
    assert attached.returncode == 2 and attached.stdout == ""
    one = cli("terminate-enclave", "--enclave-id", ids[0], "--state-dir", state, "--json")
    assert json.loads(one.stdout) == {"EnclaveName": "js", "EnclaveID": ids[0], "Terminated": True}
    every = cli("terminate-enclave", "--all", "--state-dir", state, "--json")
    assert every.returncode == 0, every.stderr
    assert json.loads(every.stdout) == [
        {"EnclaveName": "js_1", "EnclaveID": ids[1], "Terminated": True}
    ]
    none = cli("terminate-enclave", "--all", "--state-dir", state, "--json")
    assert json.loads(none.stdout) == []

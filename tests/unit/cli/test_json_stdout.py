"""Every ``--json`` command prints exactly one JSON value on stdout and nothing else there.

The run-enclave group (run-enclave, describe-enclaves, console, terminate-enclave) is tested with its
runner; ``atls get --json`` with the CA in tests/integration/atls; ``demo --json`` from a plain wheel
install in tests/integration/install.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.unit.build_enclave.factory import write_signing_files
from tests.unit.cli.conftest import EXE, run, wait_for


def one_json_value(stdout: bytes) -> Any:
    """``json.loads`` of the whole of stdout: a second value, a banner or a stray line all fail."""
    text = stdout.decode()
    assert text.endswith("\n"), text
    return json.loads(text)


def test_eif_commands_print_one_json_value(
    tmp_path: Path, built_eif: Path, cli_blobs: Path, image_tar: Path
) -> None:
    cert, key = write_signing_files(tmp_path)
    signed = tmp_path / "signed.eif"
    cases = [
        ["build-enclave", "--json", "--image", str(image_tar), "--output-file", str(tmp_path / "b.eif"),
         "--blobs", str(cli_blobs)],
        ["describe-eif", "--json", "--eif-path", str(built_eif)],
        ["pcr", "--json", "--input", str(built_eif)],
        ["pcr", "--json", "--instance-id", "i-0123456789abcdef0"],
        ["sign-eif", "--json", "--eif-path", str(built_eif), "--signing-certificate", str(cert),
         "--private-key", str(key), "--output-file", str(signed)],
    ]  # fmt: skip
    for args in cases:
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        one_json_value(done.stdout)


def test_nsm_client_commands_print_one_json_value(
    tmp_path: Path, nsm_emulator: dict[str, str]
) -> None:
    env = {"ENCLAVEKIT_NSM": nsm_emulator["ENCLAVEKIT_NSM"]}
    doc = tmp_path / "doc.cbor"
    cases = [
        ["nsm", "describe-nsm", "--json"],
        ["nsm", "describe-pcr", "--json", "0"],
        ["nsm", "extend-pcr", "--json", "16", "--data", "00ff"],
        ["nsm", "lock-pcr", "--json", "16"],
        ["nsm", "attest", "--json", "--nonce", "abcd", "--output", str(doc)],
        ["nsm", "root", "--json", "--state-dir", nsm_emulator["state"]],
    ]
    for args in cases:
        done = run(*args, env=env)
        assert done.returncode == 0, (args, done.stderr)
        one_json_value(done.stdout)
    for args in (
        ["verify", "--json", "--allow-debug", "--root", nsm_emulator["root"], str(doc)],
        ["inspect", "--json", str(doc)],
    ):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        one_json_value(done.stdout)


def test_attack_describe_pcr_without_json_prints_nothing_on_stdout(
    nsm_emulator: dict[str, str],
) -> None:
    env = {"ENCLAVEKIT_NSM": nsm_emulator["ENCLAVEKIT_NSM"]}
    shown = run("nsm", "describe-pcr", "0", env=env)
    assert shown.returncode == 0, shown.stderr
    as_json = one_json_value(run("nsm", "describe-pcr", "0", "--json", env=env).stdout)
    assert shown.stdout.decode() == as_json["data"] + "\n"
    extended = run("nsm", "extend-pcr", "17", "--data", "01", env=env)
    assert extended.returncode == 0, extended.stderr
    assert len(extended.stdout.decode().strip()) == 96


def test_nsm_serve_json_prints_one_value_for_its_whole_life(tmp_path: Path) -> None:
    sock = tmp_path / "s" / "nsm.sock"
    out = tmp_path / "stdout.json"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [
                *EXE,
                "nsm",
                "serve",
                "--json",
                "--state-dir",
                str(tmp_path / "s"),
                "--listen",
                f"unix://{sock}",
            ],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
    # The JSON is printed once the emulator listens; wait for all of it, then stop the emulator.
    wait_for(
        lambda: out.read_bytes().endswith(b"}\n") or proc.poll() is not None, "the emulator's JSON"
    )
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert one_json_value(out.read_bytes())["listen"] == f"unix://{sock}"


def test_ca_and_kms_commands_print_one_json_value(tmp_path: Path, assets: Path) -> None:
    state = tmp_path / "ca"
    kms = assets / "kms"
    cases = [
        ["ca", "init", "--json", "--state-dir", str(state)],
        ["ca", "root", "--json", "--state-dir", str(state)],
        ["kms", "unwrap", "--json", "--private-key", str(kms / "enclaver-key.pem"),
         "--envelope", str(kms / "enclaver-hello.ber")],
    ]  # fmt: skip
    for args in cases:
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        one_json_value(done.stdout)

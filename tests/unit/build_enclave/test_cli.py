"""The ``build-enclave`` command: nitro-cli's JSON on stdout, progress on stderr, exit codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.cli import cli
from tests.unit.build_enclave.factory import (
    F,
    base_layer,
    docker_archive,
    layer,
    write_signing_files,
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_build_enclave_prints_nitro_cli_json(
    tmp_path: Path, blobs_dir: Path, runner: CliRunner
) -> None:
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    out = tmp_path / "app.eif"
    result = runner.invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert list(printed) == ["Measurements"]
    assert list(printed["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert printed["Measurements"]["HashAlgorithm"] == "Sha384 { ... }"
    assert all(len(printed["Measurements"][f"PCR{i}"]) == 96 for i in (0, 1, 2))
    assert "Start building the Enclave Image" in result.stderr
    described = runner.invoke(cli, ["describe-eif", "--eif-path", str(out), "--json"])
    assert described.exit_code == 0, described.output
    assert json.loads(described.stdout)["Measurements"] == printed["Measurements"]


def test_bad_image_exits_2_without_output(
    tmp_path: Path, blobs_dir: Path, runner: CliRunner
) -> None:
    image = docker_archive(tmp_path / "img.tar", [layer(F("a/../../x", b"x"))])
    out = tmp_path / "app.eif"
    result = runner.invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
        ],
    )
    assert result.exit_code == 2
    assert "path traversal" in result.stderr
    assert result.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--image", "x", "--docker-uri", "y"],
        ["--image", "x", "--signing-certificate", __file__],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(cli, ["build-enclave", "--output-file", str(tmp_path / "a.eif"), *args])
    assert result.exit_code == 2


def test_blobs_default_to_nitro_cli_blobs_env(
    tmp_path: Path, blobs_dir: Path, runner: CliRunner
) -> None:
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    result = runner.invoke(
        cli,
        ["build-enclave", "--image", str(image), "--output-file", str(tmp_path / "a.eif")],
        env={"NITRO_CLI_BLOBS": str(blobs_dir)},
    )
    assert result.exit_code == 0, result.output


def test_docker_uri_uses_docker_save(
    tmp_path: Path, blobs_dir: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a docker client on PATH, --docker-uri exports the image with docker save."""
    image = docker_archive(tmp_path / "img.tar", [base_layer()], tags=("registry.example/app:1.2",))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = version ]; then echo 27.0.0; exit 0; fi\n'  # a daemon answers
        'if [ "$1" = image ]; then exit 0; fi\n'
        f'if [ "$1" = save ]; then cp {image} "$3"; exit 0; fi\n'
        "exit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = runner.invoke(
        cli,
        [
            "build-enclave",
            "--docker-uri",
            "registry.example/app:1.2",
            "--output-file",
            str(tmp_path / "a.eif"),
            "--blobs",
            str(blobs_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    described = json.loads(
        runner.invoke(cli, ["describe-eif", "--eif-path", str(tmp_path / "a.eif"), "--json"]).stdout
    )
    assert (
        described["ImageName"] == "registry.example/app"
    )  # nitro-cli: the URI up to its first ':'


def test_docker_uri_without_docker_says_what_to_do(
    tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = runner.invoke(
        cli,
        [
            "build-enclave",
            "--docker-uri",
            "hello:v1",
            "--pull",
            "never",  # without it, no daemon means a registry pull (tests/unit/registry)
            "--output-file",
            str(tmp_path / "a.eif"),
        ],
    )
    assert result.exit_code == 2
    assert "docker save" in result.stderr


def test_custom_metadata_and_signing_options(
    tmp_path: Path, blobs_dir: Path, runner: CliRunner
) -> None:
    cert_path, key_path = write_signing_files(tmp_path, curve=ec.SECP256R1())
    (tmp_path / "meta.json").write_text('{"team": "enclaves", "build": 7}')
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    out = tmp_path / "s.eif"
    result = runner.invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
            "--signing-certificate",
            str(cert_path),
            "--private-key",
            str(key_path),
            "--metadata",
            str(tmp_path / "meta.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)["Measurements"]
    assert list(printed) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    described = json.loads(
        runner.invoke(cli, ["describe-eif", "--eif-path", str(out), "--json"]).stdout
    )
    assert described["Measurements"] == printed
    assert described["IsSigned"] is True and described["SignatureCheck"] is True
    assert described["Metadata"]["team"] == "enclaves"

"""build-enclave followed by the eif branch's sign-eif and describe-eif: the pieces agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from enclavekit.cli import cli
from tests.unit.build_enclave.factory import (
    F,
    base_layer,
    docker_archive,
    kernel_bytes,
    layer,
    write_signing_files,
)


def test_build_then_sign_eif_equals_signed_build(tmp_path: Path, assets: Path) -> None:
    """Signing after the build (sign-eif) gives the PCRs a signed build prints."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("init", "nsm.ko", "cmdline", "bzImage.config"):
        shutil.copy(assets / "build" / name, blobs / name)
    (blobs / "bzImage").write_bytes(kernel_bytes())
    image = docker_archive(tmp_path / "img.tar", [base_layer(), layer(F("app", b"payload"))])
    cert, key = write_signing_files(tmp_path)
    runner = CliRunner()
    base = ["build-enclave", "--image", str(image), "--blobs", str(blobs)]

    unsigned = runner.invoke(cli, [*base, "--output-file", str(tmp_path / "u.eif")])
    signed = runner.invoke(
        cli,
        [
            *base,
            "--output-file",
            str(tmp_path / "s.eif"),
            "--signing-certificate",
            str(cert),
            "--private-key",
            str(key),
        ],
    )
    assert unsigned.exit_code == 0 and signed.exit_code == 0, unsigned.output + signed.output
    resigned = runner.invoke(
        cli,
        [
            "sign-eif",
            "--eif-path",
            str(tmp_path / "u.eif"),
            "--output-file",
            str(tmp_path / "r.eif"),
            "--signing-certificate",
            str(cert),
            "--private-key",
            str(key),
            "--json",
        ],
    )
    assert resigned.exit_code == 0, resigned.output
    built = json.loads(signed.stdout)["Measurements"]
    described = json.loads(
        runner.invoke(cli, ["describe-eif", "--eif-path", str(tmp_path / "r.eif"), "--json"]).stdout
    )
    assert described["Measurements"] == built
    assert json.loads(unsigned.stdout)["Measurements"]["PCR0"] == built["PCR0"]
    assert described["IsSigned"] is True and described["SignatureCheck"] is True

"""``enclavekit nsm``: serve, root, attest, describe-*, extend/lock; exit codes and JSON, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclavekit.attestation.verifier import Verifier
from enclavekit.cli import cli
from enclavekit.nsm import NsmEmulator
from enclavekit.nsm.server import serve_in_background
from enclavekit.pki.emulated import EmulatedAwsPki

PCR_HEX = "ab" * 48


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def served(emulator: NsmEmulator) -> Iterator[dict[str, str]]:
    with serve_in_background(emulator) as url:
        yield {"ENCLAVEKIT_NSM": url}


def test_root_prints_the_persisted_pem(tmp_path: Path) -> None:
    code, out, _ = run("nsm", "root", "--state-dir", str(tmp_path), "--create")
    assert code == 0
    assert out == (tmp_path / "root.pem").read_text()
    code, again, _ = run("nsm", "root", "--state-dir", str(tmp_path), "--json")
    assert json.loads(again)["pem"] == out


def test_root_default_state_dir_follows_the_environment(tmp_path: Path) -> None:
    code, out, _ = run("nsm", "root", "--create", env={"ENCLAVEKIT_STATE_DIR": str(tmp_path)})
    assert code == 0
    assert (tmp_path / "nsm" / "root.pem").read_text() == out


def test_attest_writes_a_document_that_verifies_with_the_emulator_root(
    served: dict[str, str], tmp_path: Path, pki: EmulatedAwsPki, now: object
) -> None:
    output = tmp_path / "doc.cbor"
    code, out, err = run(
        "nsm",
        "attest",
        "--nonce",
        "0102",
        "--user-data",
        "aa",
        "--output",
        str(output),
        "--json",
        env=served,
    )
    assert code == 0, err
    assert "EMULATED" in err
    assert json.loads(out)["size"] == output.stat().st_size
    verified = Verifier([pki.root_certificate()]).verify_signature_and_chain(
        output.read_bytes(),
        at=now,  # type: ignore[arg-type]
    )
    assert verified.nonce == b"\x01\x02"
    assert verified.user_data == b"\xaa"


def test_attest_pem_public_key_is_embedded_as_der_spki(
    served: dict[str, str], tmp_path: Path, pki: EmulatedAwsPki
) -> None:
    key = x509.load_pem_x509_certificate(pki.root_pem()).public_key()
    (tmp_path / "key.pem").write_bytes(
        key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    code, _, err = run(
        "nsm",
        "attest",
        "--public-key",
        str(tmp_path / "key.pem"),
        "--output",
        str(tmp_path / "d"),
        env=served,
    )
    assert code == 0, err
    payload = cbor2.loads(cbor2.loads((tmp_path / "d").read_bytes())[2])
    assert payload["public_key"][:2] == b"\x30\x76"  # DER SEQUENCE of a P-384 SPKI


def test_attest_bad_hex_is_a_usage_error_and_writes_nothing(
    served: dict[str, str], tmp_path: Path
) -> None:
    code, _, err = run(
        "nsm", "attest", "--nonce", "zz", "--output", str(tmp_path / "x"), env=served
    )
    assert code == 2
    assert "hexadecimal" in err
    assert not (tmp_path / "x").exists()


def test_attest_without_any_nsm_explains_how_to_get_one(tmp_path: Path) -> None:
    if os.path.exists("/dev/nsm"):
        pytest.skip("a real NSM is present")
    code, _, err = run("nsm", "attest", "--output", str(tmp_path / "x"), env={"ENCLAVEKIT_NSM": ""})
    assert code == 2
    assert "enclavekit nsm serve" in err
    assert "Traceback" not in err


def test_describe_and_extend_and_lock(served: dict[str, str]) -> None:
    code, out, _ = run("nsm", "describe-pcr", "16", "--json", env=served)
    assert json.loads(out) == {"index": 16, "lock": False, "data": "00" * 48}
    code, out, _ = run("nsm", "extend-pcr", "16", "--data", "616263", "--json", env=served)
    assert json.loads(out)["data"].startswith("b1c16eb7")
    assert run("nsm", "lock-pcr", "16", env=served)[0] == 0
    code, _, err = run("nsm", "lock-pcr", "16", env=served)
    assert code == 1
    assert "ReadOnlyIndex" in err
    code, out, _ = run("nsm", "describe-nsm", "--json", env=served)
    assert json.loads(out)["locked_pcrs"] == [*range(17)]


def test_describe_pcr_out_of_range_is_invalid_index(served: dict[str, str]) -> None:
    code, _, err = run("nsm", "describe-pcr", "40", env=served)
    assert code == 1
    assert "InvalidIndex" in err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16=" + PCR_HEX, "PCR0-15"),
        ("0=abcd", "48 bytes"),
        ("x=" + PCR_HEX, "number"),
        ("0" + PCR_HEX, "N=HEX"),
        ("0=" + "zz" * 48, "hexadecimal"),
    ],
)
def test_serve_rejects_bad_pcr_values(value: str, message: str, tmp_path: Path) -> None:
    code, _, err = run("nsm", "serve", "--state-dir", str(tmp_path), "--pcr", value)
    assert code == 2
    assert message in err


def test_serve_runs_until_sigterm_and_serves_clients(tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "enclavekit"),
        "nsm",
        "serve",
        "--json",
        "--state-dir",
        str(tmp_path),
        "--listen",
        "tcp://127.0.0.1:0",
        "--pcr",
        f"0={PCR_HEX}",
        "--debug-mode",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        try:
            assert process.stdout is not None
            lines = []
            while True:
                line = process.stdout.readline().decode()
                assert line, "the server exited before printing its JSON"
                lines.append(line)
                if line.startswith("}"):
                    break
            info = json.loads("".join(lines))
            assert info["debug_mode"] is True
            assert info["pcrs"]["0"] == "00" * 48  # debug mode wins over --pcr 0
            env = {"ENCLAVEKIT_NSM": info["listen"]}
            code, out, _ = run("nsm", "describe-nsm", "--json", env=env)
            assert json.loads(out)["module_id"] == info["module_id"]
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0


def test_serve_takes_image_pcrs_from_an_eif(tmp_path: Path) -> None:
    from enclavekit.cli.nsm import _eif_pcrs
    from enclavekit.eif.metadata import BuildInfo, IdentityInfo
    from enclavekit.eif.writer import write_eif_file

    written = write_eif_file(
        tmp_path / "app.eif",
        kernel=b"kernel" * 10,
        cmdline="console=ttyS0",
        ramdisks=[b"bootstrap", b"app"],
        metadata=IdentityInfo("app", "1.0", BuildInfo(build_time="2026-01-01T00:00:00Z")),
    )
    pcrs = _eif_pcrs(tmp_path / "app.eif")
    assert pcrs == written.measurements.pcrs
    emulator = NsmEmulator.from_eif(tmp_path / "app.eif", pcrs={3: b"\x03" * 48}, debug_mode=False)
    assert emulator.pcr(2) == (True, written.measurements.pcr2)
    assert emulator.pcr(3) == (True, b"\x03" * 48)


def test_serve_refuses_a_corrupt_eif(tmp_path: Path) -> None:
    (tmp_path / "bad.eif").write_bytes(b"not an eif at all")
    code, _, err = run(
        "nsm", "serve", "--state-dir", str(tmp_path), "--eif-path", str(tmp_path / "bad.eif")
    )
    assert code in (1, 2)
    assert "Traceback" not in err
    assert err.startswith("error:")


def test_enclavekit_verify_accepts_with_the_emulator_root_and_refuses_by_default(
    tmp_path: Path,
) -> None:
    """The acceptance criterion, through the CLI: `verify --root <emulator root>` 0, default root 1."""
    state = tmp_path / "state"
    pki = EmulatedAwsPki.load_or_create(state)
    emulator = NsmEmulator(pcrs={i: bytes([i + 1]) * 48 for i in range(3)}, pki=pki)
    with serve_in_background(emulator) as url:
        code, _, err = run(
            "nsm",
            "attest",
            "--nonce",
            "beef",
            "--output",
            str(tmp_path / "doc.cbor"),
            env={"ENCLAVEKIT_NSM": url},
        )
    assert code == 0, err
    code, root_pem, _ = run("nsm", "root", "--state-dir", str(state))
    (tmp_path / "root.pem").write_text(root_pem)
    doc = str(tmp_path / "doc.cbor")
    code, _, err = run("verify", "--root", str(tmp_path / "root.pem"), "--nonce", "beef", doc)
    assert code == 0, err
    assert "non-AWS root" in err
    code, _, err = run("verify", doc)
    assert code == 1
    assert "not a pinned trust root" in err

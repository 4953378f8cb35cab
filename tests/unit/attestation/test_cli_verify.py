"""``enclavekit verify`` / ``inspect``: exit codes, JSON schema, input forms, no tracebacks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from enclavekit.attestation import AttestationDocument
from enclavekit.cli import cli
from tests.unit.attestation.conftest import REAL
from tests.unit.attestation.factory import NOW, TestPki, default_pcrs, make_document

PROD = REAL / "marlin-2024-08-prod.cbor"
DEBUG = REAL / "eternis-2024-09-debug.cbor"
MOCK = REAL / "marlin-2024-12-MOCKROOT.cbor"


def run(*args: str, input: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_genuine_document_verifies_at_doc_time() -> None:
    code, out, err = run("verify", str(PROD), "--at", "doc")
    assert code == 0, err
    assert "OK" in err
    assert "i-084e1dd2f1b2c529b-enc0190fecc5b166251" in err


def test_genuine_document_is_expired_now() -> None:
    code, _, err = run("verify", str(PROD))
    assert code == 1
    assert "does not validate" in err


def test_explicit_iso_time_inside_the_leaf_window() -> None:
    assert run("verify", str(PROD), "--at", "2024-08-07T07:00:00Z")[0] == 0
    assert run("verify", str(PROD), "--at", "2024-08-07T09:38:10Z")[0] == 1


def test_json_output_schema() -> None:
    code, out, _ = run("verify", str(PROD), "--at", "doc", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "enclavekit.verify/v1"
    assert data["ok"] is True
    assert data["signature_and_chain_valid"] is True
    assert data["module_id"] == "i-084e1dd2f1b2c529b-enc0190fecc5b166251"
    assert data["pcrs"]["0"] == data["pcrs"]["0"].lower()
    assert len(data["pcrs"]["0"]) == 96
    assert len(data["chain"]) == 5
    assert data["chain"][-1]["sha256"].startswith("641a0321")
    assert data["failures"] == []
    assert data["error"] is None


def test_debug_document_exits_1_unless_allowed() -> None:
    code, out, _ = run("verify", str(DEBUG), "--at", "doc", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["signature_and_chain_valid"] is True
    assert data["policy_satisfied"] is False
    assert data["failures"][0]["check"] == "debug mode"
    code, _, err = run("verify", str(DEBUG), "--at", "doc", "--allow-debug")
    assert code == 0
    assert "WARNING" in err


def test_every_pcr_failure_is_printed() -> None:
    code, out, err = run(
        "verify", str(PROD), "--at", "doc", "--pcr", f"0={'00' * 48}", "--pcr", f"PCR1={'11' * 48}"
    )
    assert code == 1
    assert "PCR0: expected" in err
    assert "PCR1: expected" in err
    assert "2 failed check(s)" in err


def test_policy_file_and_nonce(tmp_path: Path) -> None:
    doc = AttestationDocument.from_cbor(PROD.read_bytes())
    policy = tmp_path / "build.json"
    policy.write_text(
        json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": doc.pcrs[0].hex()}})
    )
    assert run("verify", str(PROD), "--at", "doc", "--policy", str(policy))[0] == 0
    code, _, err = run("verify", str(PROD), "--at", "doc", "--nonce", "abcd")
    assert code == 1
    assert "nonce: expected abcd, found absent" in err


def test_max_age(tmp_path: Path) -> None:
    assert run("verify", str(PROD), "--at", "2024-08-07T06:38:19Z", "--max-age", "30")[0] == 0
    code, _, err = run("verify", str(PROD), "--at", "2024-08-07T06:40:00Z", "--max-age", "30")
    assert code == 1
    assert "max age" in err


def test_mock_root_fails_and_custom_root_warns(tmp_path: Path) -> None:
    code, _, err = run("verify", str(MOCK), "--at", "doc")
    assert code == 1
    assert "not a pinned trust root" in err
    pki = TestPki()
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(Encoding.PEM))
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(make_document(pki))
    code, _, err = run("verify", str(doc), "--root", str(root), "--at", NOW.isoformat())
    assert code == 0, err
    assert "non-AWS root" in err
    # The same document fails with the default AWS root.
    assert run("verify", str(doc), "--at", NOW.isoformat())[0] == 1


def test_hex_base64_and_stdin_inputs(tmp_path: Path) -> None:
    raw = PROD.read_bytes()
    hexfile = tmp_path / "doc.hex"
    hexfile.write_text(raw.hex() + "\n")
    b64file = tmp_path / "doc.b64"
    b64file.write_text(base64.b64encode(raw).decode())
    assert run("verify", str(hexfile), "--at", "doc")[0] == 0
    assert run("verify", str(b64file), "--at", "doc")[0] == 0
    assert run("verify", "-", "--at", "doc", input=raw)[0] == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage!!", b"\x84\x01\x02", b"\xd9\x01\x00" + b"\x80", PROD.read_bytes()[:-7]],
)
def test_undecodable_input_exits_2_without_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "doc"
    path.write_bytes(content)
    code, _, err = run("verify", str(path))
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("error:")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("verify", str(tmp_path / "missing"))[0] == 2
    assert run("verify", str(PROD), "--at", "yesterday")[0] == 2
    assert run("verify", str(PROD), "--pcr", "0")[0] == 2
    assert run("verify", str(PROD), "--pcr", "0=zz")[0] == 2
    assert run("verify", str(PROD), "--root", str(tmp_path / "none.pem"))[0] == 2
    assert run("verify")[0] == 2


def test_inspect_is_labelled_unverified() -> None:
    code, _, err = run("inspect", str(MOCK))
    assert code == 0
    assert "UNVERIFIED" in err
    code, out, _ = run("inspect", str(MOCK), "--json")
    data = json.loads(out)
    assert data["verified"] is False
    assert data["pcrs"]["1"] == "01" * 48
    assert data["certificate"]["subject"] == "CN=leaf"


def test_inspect_nitrotpm_and_indefinite_synthetic(tmp_path: Path) -> None:
    pki = TestPki()
    path = tmp_path / "doc"
    path.write_bytes(make_document(pki, pcrs=default_pcrs(debug=True)))
    code, out, _ = run("inspect", str(path), "--json")
    assert code == 0
    assert json.loads(out)["is_debug"] is True

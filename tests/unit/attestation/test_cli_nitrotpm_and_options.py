"""``enclavekit verify`` / ``inspect`` with NitroTPM documents (issue 14 item 1) and the options that
misled (item 9: ``--at doc --max-age``, no measurement policy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.unit.attestation.conftest import REAL
from tests.unit.attestation.factory import NOW, TestPki
from tests.unit.attestation.test_cli_verify import run
from tests.unit.attestation.test_nitrotpm import ENCLAVE_PCR8, forged_pcrs, tpm_document

PROD = REAL / "marlin-2024-08-prod.cbor"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    pki = TestPki()
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(Encoding.PEM))
    doc = tmp_path / "tpm.cbor"
    doc.write_bytes(tpm_document(pki, forged_pcrs()))
    return {"root": str(root), "doc": str(doc), "at": NOW.isoformat()}


def verify(files: dict[str, str], *args: str) -> tuple[int, str, str]:
    return run("verify", files["doc"], "--root", files["root"], "--at", files["at"], *args)


# -- item 1 ---------------------------------------------------------------------------------------


def test_attack_verify_accepts_nitrotpm_document_for_a_pcr8_policy(files: dict[str, str]) -> None:
    code, _, err = verify(files, "--pcr", f"8={ENCLAVE_PCR8.hex()}")
    assert code == 1
    assert "NitroTPM" in err
    assert "Traceback" not in err


def test_attack_verify_json_accepts_nitrotpm_document(files: dict[str, str]) -> None:
    code, out, _ = verify(files, "--pcr", f"8={ENCLAVE_PCR8.hex()}", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["signature_and_chain_valid"] is False
    assert "NitroTPM" in data["error"]
    assert data["kind"] == "nitrotpm"
    assert data["pcrs"] == {}


def test_allow_nitrotpm_with_enclave_pcr_check_still_fails(files: dict[str, str]) -> None:
    code, _, err = verify(files, "--allow-nitrotpm", "--pcr", f"8={ENCLAVE_PCR8.hex()}")
    assert code == 1
    assert "document kind" in err


def test_allow_nitrotpm_with_nitrotpm_pcr_check_passes(files: dict[str, str]) -> None:
    code, out, err = verify(
        files, "--allow-nitrotpm", "--nitrotpm-pcr", f"8={ENCLAVE_PCR8.hex()}", "--json"
    )
    assert code == 0, err
    assert "--allow-nitrotpm" in err  # warned
    data = json.loads(out)
    assert data["kind"] == "nitrotpm"
    assert data["nitrotpm_pcrs"]["8"] == ENCLAVE_PCR8.hex()
    assert data["policy"] == "explicit"
    code, _, err = verify(files, "--allow-nitrotpm", "--nitrotpm-pcr", f"8={'00' * 48}")
    assert code == 1
    assert "NitroTPM PCR8" in err


def test_nitrotpm_pcr_without_allow_nitrotpm_is_a_usage_error(files: dict[str, str]) -> None:
    code, _, err = verify(files, "--nitrotpm-pcr", f"8={ENCLAVE_PCR8.hex()}")
    assert code == 2
    assert "--allow-nitrotpm" in err


def test_nitrotpm_pcr_check_refuses_enclave_documents() -> None:
    code, _, err = run(
        "verify", str(PROD), "--at", "doc", "--allow-nitrotpm", "--nitrotpm-pcr", f"8={'00' * 48}"
    )
    assert code == 1
    assert "document kind" in err


def test_inspect_labels_nitrotpm_documents(files: dict[str, str]) -> None:
    code, _, err = run("inspect", files["doc"])
    assert code == 0
    assert "NitroTPM" in err
    assert "TPM PCR8" in err
    code, out, _ = run("inspect", files["doc"], "--json")
    data = json.loads(out)
    assert data["is_nitrotpm"] is True
    assert data["kind"] == "nitrotpm"
    assert data["nitrotpm_pcrs"]["16"] == forged_pcrs()[16].hex()


# -- item 9 ---------------------------------------------------------------------------------------


def test_attack_max_age_measured_against_the_documents_own_time() -> None:
    """--at doc makes the age 0: a 2024 document passed --max-age 60."""
    code, out, err = run("verify", str(PROD), "--at", "doc", "--max-age", "60")
    assert code == 2
    assert "--at doc" in err
    assert "--max-age" in err
    assert out == ""


def test_max_age_with_an_explicit_time_is_allowed() -> None:
    assert run("verify", str(PROD), "--at", "2024-08-07T06:38:19Z", "--max-age", "30")[0] == 0


def test_attack_verify_without_measurement_policy_passes_any_enclave() -> None:
    """No --pcr/--policy: still exit 0 (as before), but the user is told any genuine enclave passes."""
    code, out, err = run("verify", str(PROD), "--at", "doc")
    assert code == 0
    assert "no measurement policy" in err
    assert "any genuine" in err
    code, out, err = run("verify", str(PROD), "--at", "doc", "--json")
    assert code == 0
    assert json.loads(out)["policy"] == "none"
    assert "no measurement policy" in err
    code, out, _ = run("verify", str(PROD), "--at", "doc", "--nonce", "00", "--json")
    assert json.loads(out)["policy"] == "none"  # a nonce is not a measurement


def test_measurement_policy_silences_the_warning(tmp_path: Path) -> None:
    from enclavekit.attestation import AttestationDocument

    pcr0 = AttestationDocument.from_cbor(PROD.read_bytes()).pcrs[0].hex()
    code, out, err = run("verify", str(PROD), "--at", "doc", "--pcr", f"0={pcr0}", "--json")
    assert code == 0
    assert json.loads(out)["policy"] == "explicit"
    assert "no measurement policy" not in err


def test_attack_unicode_digit_pcr_index_on_the_command_line() -> None:
    code, _, err = run("verify", str(PROD), "--at", "doc", "--pcr", f"²={'00' * 48}")
    assert code == 2
    assert "not a PCR index" in err
    assert "Traceback" not in err

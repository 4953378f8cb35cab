"""Documents shaped like QEMU's nitro-enclave NSM output (alg -1, zero signature and certificate)."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner

from enclavekit.attestation.document import AttestationDocument
from enclavekit.cli import cli
from enclavekit.errors import MalformedInput


def qemu_shaped_document() -> bytes:
    """What QEMU 10.0's virtio-nsm returns: an unsigned COSE_Sign1 with zero certificate and CA bundle."""
    payload = cbor2.dumps(
        {
            "module_id": "i-234-enc5678",
            "digest": "SHA384",
            "timestamp": 1764000000000,
            "pcrs": {i: bytes(48) for i in range(16)},
            "certificate": bytes(64),
            "cabundle": [bytes(64)],
            "public_key": None,
            "user_data": b"user-data",
            "nonce": b"nonce-1234",
        }
    )
    return cbor2.dumps([cbor2.dumps({1: -1}), {}, payload, bytes(64)])


def test_unsigned_qemu_document_is_refused_as_unsigned() -> None:
    """A document with an all-zero signature must never pass for a signed one."""
    with pytest.raises(MalformedInput, match="unsigned"):
        AttestationDocument.from_cbor(qemu_shaped_document())


def test_verify_cli_refuses_a_qemu_document_with_a_clear_reason(tmp_path: Path) -> None:
    doc = tmp_path / "qemu.cbor"
    doc.write_bytes(qemu_shaped_document())
    result = CliRunner().invoke(cli, ["verify", str(doc)])
    assert result.exit_code == 2
    assert "unsigned" in result.output
    assert "QEMU" in result.output

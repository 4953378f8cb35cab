"""Every attested-TLS consumer of the verifier refuses NitroTPM documents (issue 14 item 1): the CA, ``seal``
and the attested client. The NitroTPM documents carry exactly the PCR values the enclave policy asks for, as
an EC2 instance's operating system can arrange on its TPM."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from enclavekit.atls.ca import Issuer, NitroEvidenceVerifier, create_ca_keys
from enclavekit.atls.client import AttestedClient
from enclavekit.atls.seal import generate_sealing_key, public_key_der
from enclavekit.atls.store import SqliteStore
from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.cli import cli
from enclavekit.errors import NitroTpmDocumentError
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from tests.unit.atls.atls_support import PCRS, DocumentFactory, ca_policy, make_csr, spki


def test_attack_ca_issues_certificate_to_nitrotpm_document(
    issuer: Issuer, factory: DocumentFactory
) -> None:
    csr, key = make_csr()
    nonce = issuer.new_challenge().nonce
    doc = factory.make(public_key=spki(key), nonce=nonce, nitrotpm=True)
    with pytest.raises(NitroTpmDocumentError, match="NitroTPM"):
        issuer.issue("web", csr, doc)
    assert issuer.store.events(1)[0].kind == "refused"


def test_attack_seal_to_nitrotpm_document(tmp_path: Path) -> None:
    pki = EmulatedAwsPki.ephemeral()
    tpm = NsmEmulator(pcrs=PCRS, pki=pki, nitrotpm=True)
    key = generate_sealing_key("p384")
    doc, root, policy, out = (tmp_path / n for n in ("doc", "root.pem", "policy.json", "sealed"))
    doc.write_bytes(tpm.attest(public_key=public_key_der(key)))
    root.write_bytes(pki.root_pem())
    policy.write_text(json.dumps({"pcrs": {str(i): v.hex() for i, v in PCRS.items()}}))
    args = ["seal", "--to", str(doc), "--policy", str(policy), "--root", str(root), "-o", str(out)]
    result = CliRunner().invoke(cli, args, input=b"top secret")
    assert result.exit_code == 1
    assert "NitroTPM" in result.stderr
    assert not out.exists()


@pytest.fixture
def tpm_server(tmp_path: Path) -> Iterator[tuple[int, AttestedClient]]:
    """A TLS server whose CA-issued certificate embeds a NitroTPM document (as a CA that did not refuse
    them issued), and a client pinned to that CA and the document's root."""
    now = datetime.now(UTC)
    pki = EmulatedAwsPki.ephemeral()
    tpm = NsmEmulator(pcrs=PCRS, pki=pki, nitrotpm=True)
    keys = create_ca_keys(now=now - timedelta(days=1))
    store = SqliteStore(tmp_path / "ca.sqlite3")
    issuer = Issuer(
        keys, ca_policy(), store, NitroEvidenceVerifier(Verifier([pki.root_certificate()]))
    )
    csr_pem, key = make_csr()
    from enclavekit.atls.ca import parse_csr

    document = tpm.attest(public_key=spki(key))
    cert = issuer._sign(ca_policy().services["web"], parse_csr(csr_pem), document, now)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                received.append(tls.recv(1024))
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = AttestedClient(
        keys.root,
        verifier=Verifier([pki.root_certificate()]),
        policy=PcrsEqual(PCRS),
        timeout=10,
    )
    try:
        yield listener.getsockname()[1], client
    finally:
        listener.close()
        thread.join(timeout=10)
        store.close()
        assert received in ([], [b""])  # nothing was sent to the unverified peer


def test_attack_attested_client_trusts_nitrotpm_peer(
    tpm_server: tuple[int, AttestedClient],
) -> None:
    port, client = tpm_server
    with pytest.raises(NitroTpmDocumentError):
        client.attest("127.0.0.1", port, server_hostname="localhost")

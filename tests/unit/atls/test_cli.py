"""CLI: ca init/root/revoke, seal/unseal — exit codes, JSON, and no partial output on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavekit.atls.seal import generate_sealing_key, public_key_der
from enclavekit.atls.store import CertificateRecord, SqliteStore
from enclavekit.cli import cli
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from tests.unit.atls.atls_support import T0

PCRS = {0: b"\x21" * 48, 1: b"\x22" * 48, 2: b"\x23" * 48}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_ca_init_root_and_revoke(runner: CliRunner, tmp_path: Path) -> None:
    state = tmp_path / "ca"
    r = runner.invoke(cli, ["ca", "init", "--state-dir", str(state), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    r = runner.invoke(cli, ["ca", "root", "--state-dir", str(state)])
    assert r.exit_code == 0
    assert r.stdout == info["root_pem"]
    x509.load_pem_x509_certificate(r.stdout.encode())
    again = runner.invoke(cli, ["ca", "init", "--state-dir", str(state)])
    assert again.exit_code == 2
    assert "refusing" in again.stderr

    store = SqliteStore(state / "ca.sqlite3")

    store.add_certificate(CertificateRecord(0xABC, "web", T0, T0, b"\x30\x00", b"doc", T0))
    store.close()
    r = runner.invoke(
        cli, ["ca", "revoke", "abc", "--state-dir", str(state), "--reason", "superseded", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["changed"] is True
    r = runner.invoke(cli, ["ca", "revoke", "abd", "--state-dir", str(state)])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["ca", "revoke", "xyz", "--state-dir", str(state)])
    assert r.exit_code == 2


def test_ca_root_without_state_is_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    r = runner.invoke(cli, ["ca", "root", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "ca init" in r.stderr


@pytest.fixture
def sealing(tmp_path: Path) -> dict[str, Path]:
    """An emulated enclave that attested an X25519 sealing key; its root, key and a policy."""
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    key = generate_sealing_key("p384")
    files = {
        "doc": tmp_path / "doc.cbor",
        "root": tmp_path / "root.pem",
        "key": tmp_path / "key.pem",
        "policy": tmp_path / "policy.json",
        "bad_policy": tmp_path / "bad.json",
    }
    files["doc"].write_bytes(emulator.attest(public_key=public_key_der(key)))
    files["root"].write_bytes(pki.root_pem())
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files["policy"].write_text(json.dumps({"pcrs": {str(i): v.hex() for i, v in PCRS.items()}}))
    files["bad_policy"].write_text(json.dumps({"pcrs": {"0": "99" * 48}}))
    return files


def test_seal_then_unseal(runner: CliRunner, sealing: dict[str, Path], tmp_path: Path) -> None:
    args = ["seal", "--to", str(sealing["doc"]), "--policy", str(sealing["policy"])]
    r = runner.invoke(cli, [*args, "--root", str(sealing["root"])], input=b"top secret")
    assert r.exit_code == 0, r.output
    assert "NOT from AWS" in r.stderr
    sealed = r.stdout_bytes
    assert sealed[0] == 1
    assert b"top secret" not in sealed
    out = tmp_path / "plain"
    r = runner.invoke(cli, ["unseal", "--key", str(sealing["key"]), "-o", str(out)], input=sealed)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == b"top secret"


def test_seal_refuses_wrong_policy_and_writes_nothing(
    runner: CliRunner, sealing: dict[str, Path], tmp_path: Path
) -> None:
    """A document that violates the policy gets nothing sealed to it."""
    out = tmp_path / "sealed"
    r = runner.invoke(
        cli,
        [
            "seal",
            "--to",
            str(sealing["doc"]),
            "--policy",
            str(sealing["bad_policy"]),
            "--root",
            str(sealing["root"]),
            "-o",
            str(out),
        ],
        input=b"top secret",
    )
    assert r.exit_code == 1
    assert "PCR0" in r.stderr
    assert not out.exists()


def test_seal_refuses_foreign_root(runner: CliRunner, sealing: dict[str, Path]) -> None:
    """Without --root the emulator's documents are not trusted (AWS root only)."""
    r = runner.invoke(
        cli, ["seal", "--to", str(sealing["doc"]), "--policy", str(sealing["policy"])], input=b"x"
    )
    assert r.exit_code == 1
    assert r.stdout_bytes == b""


def test_unseal_with_wrong_key_fails(
    runner: CliRunner, sealing: dict[str, Path], tmp_path: Path
) -> None:
    other = generate_sealing_key("p384")
    (tmp_path / "other.pem").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    r = runner.invoke(
        cli,
        [
            "seal",
            "--to",
            str(sealing["doc"]),
            "--policy",
            str(sealing["policy"]),
            "--root",
            str(sealing["root"]),
        ],
        input=b"x",
    )
    r = runner.invoke(cli, ["unseal", "--key", str(tmp_path / "other.pem")], input=r.stdout_bytes)
    assert r.exit_code == 1
    assert r.stdout_bytes == b""
    r = runner.invoke(cli, ["unseal", "--key", str(sealing["key"])], input=b"\x01garbage")
    assert r.exit_code == 2


def test_attack_ca_prune_bounds_a_stopped_cas_store(runner: CliRunner, tmp_path: Path) -> None:
    """`ca prune` applies the retention policy to the store of a CA that is not running: expired
    challenges, old audit events and long-expired certificate records go, the rest stays."""
    from datetime import UTC, datetime, timedelta

    from enclavekit.atls.store import Event

    state = tmp_path / "ca"
    assert runner.invoke(cli, ["ca", "init", "--state-dir", str(state)]).exit_code == 0
    now = datetime.now(UTC)
    store = SqliteStore(state / "ca.sqlite3")
    store.add_challenge(b"l" * 32, now, now + timedelta(hours=1))
    store.add_challenge(b"e" * 32, now - timedelta(hours=2), now - timedelta(hours=1))
    old = now - timedelta(days=40)
    store.add_certificate(CertificateRecord(1, "web", old, old, b"\x30\x00", b"doc", old))
    store.add_certificate(CertificateRecord(2, "web", now, now, b"\x30\x00", b"doc", now))
    for days in (40, 1):
        store.record_event(Event(now - timedelta(days=days), "issued", "web", None, "x"))
    store.close()
    r = runner.invoke(
        cli, ["ca", "prune", "--state-dir", str(state), "--audit-retention-days", "30", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"deleted": {"challenges": 1, "events": 1, "certificates": 1}}
    store = SqliteStore(state / "ca.sqlite3")
    try:
        assert store.get_certificate(1) is None
        assert store.get_certificate(2) is not None
        assert len(store.events()) == 1
        assert store.challenge_status(b"l" * 32, now) is None
    finally:
        store.close()
    r = runner.invoke(cli, ["ca", "prune", "--state-dir", str(tmp_path / "none")])
    assert r.exit_code == 2

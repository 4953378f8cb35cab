"""``enclavekit kms unwrap``: plaintext on stdout, exit 1 for another key, 2 for malformed input."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from click.testing import CliRunner

from enclavekit.cli import cli


def _run(*args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(cli, ["kms", "unwrap", *args], input=stdin)
    return result.exit_code, result.stdout_bytes, result.stderr


def test_unwrap_writes_plaintext(kms_assets: Path) -> None:
    code, out, _ = _run(
        "--private-key",
        str(kms_assets / "enclaver-key.pem"),
        "--envelope",
        str(kms_assets / "enclaver-hello.ber"),
    )
    assert (code, out) == (0, b"Hello, World")


def test_unwrap_accepts_base64_on_stdin(kms_assets: Path) -> None:
    b64 = base64.b64encode((kms_assets / "enclaver-hello.ber").read_bytes())
    code, out, _ = _run(
        "--private-key", str(kms_assets / "enclaver-key.pem"), "--envelope", "-", stdin=b64
    )
    assert (code, out) == (0, b"Hello, World")


def test_unwrap_json(kms_assets: Path) -> None:
    code, out, _ = _run(
        "--private-key",
        str(kms_assets / "recipient-key.pem"),
        "--envelope",
        str(kms_assets / "openssl-oaep-issuer.der"),
        "--certificate",
        str(kms_assets / "recipient-cert.pem"),
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    assert base64.b64decode(doc["Plaintext"]) == b"Hello from openssl cms -encrypt\n"
    assert doc["EnvelopeVersion"] == 0


def test_unwrap_with_another_key_exits_1(kms_assets: Path) -> None:
    code, out, err = _run(
        "--private-key",
        str(kms_assets / "recipient-key.pem"),
        "--envelope",
        str(kms_assets / "enclaver-hello.ber"),
    )
    assert code == 1
    assert out == b""
    assert "not addressed to this key" in err


def test_unwrap_malformed_exits_2(kms_assets: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.der"
    bad.write_bytes((kms_assets / "enclaver-hello.ber").read_bytes()[:100])
    code, out, err = _run(
        "--private-key", str(kms_assets / "enclaver-key.pem"), "--envelope", str(bad)
    )
    assert code == 2
    assert out == b""
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_unwrap_unsupported_padding_exits_2(kms_assets: Path) -> None:
    code, _, err = _run(
        "--private-key",
        str(kms_assets / "recipient-key.pem"),
        "--envelope",
        str(kms_assets / "openssl-pkcs1v15.der"),
    )
    assert code == 2
    assert "RSAES-OAEP" in err


def test_unwrap_missing_key_file_exits_2(kms_assets: Path, tmp_path: Path) -> None:
    code, _, err = _run(
        "--private-key",
        str(tmp_path / "nope.pem"),
        "--envelope",
        str(kms_assets / "enclaver-hello.ber"),
    )
    assert code == 2
    assert "--private-key" in err and "cannot read it" in err


def test_unwrap_non_rsa_key_exits_2(kms_assets: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, _, err = _run(
        "--private-key", str(path), "--envelope", str(kms_assets / "enclaver-hello.ber")
    )
    assert code == 2
    assert "expected an RSA key" in err

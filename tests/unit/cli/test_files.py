"""Errors about files name the user's path and the flag; encoded input says which encoding broke where;
one name per thing across commands (``--output-file``/``-o``, ``--private-key``)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from enclavekit.cli._files import text_encoding_error
from tests.unit.build_enclave.factory import write_signing_files
from tests.unit.cli.conftest import run

DOC = Path(__file__).parents[2] / "assets" / "nsm" / "marlin-2024-08-prod.cbor"


def _stderr(*args: str, env: dict[str, str] | None = None) -> str:
    done = run(*args, env=env)
    assert done.returncode == 2, done.stderr
    text = done.stderr.decode()
    assert "Traceback" not in text and "[Errno" not in text, text
    return text


def test_attack_policy_that_is_not_text_gives_a_codec_error(tmp_path: Path) -> None:
    policy = tmp_path / "policy.bin"
    policy.write_bytes(b"\x8f\x00binary")
    text = _stderr("verify", "--at", "doc", "--policy", str(policy), str(DOC))
    assert f"--policy {policy}: not a text file" in text
    assert "codec" not in text


def test_attack_missing_policy_is_a_bare_errno_string(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    text = _stderr("seal", "--to", str(DOC), "--policy", str(missing))
    assert f"--policy {missing}: cannot read it: No such file or directory" in text


def test_attack_hex_document_with_a_bad_digit_is_reported_as_bad_cbor(tmp_path: Path) -> None:
    digits = bytearray(DOC.read_bytes().hex().encode())
    digits[100] = ord("z")
    (tmp_path / "doc.hex").write_bytes(bytes(digits))
    text = _stderr("verify", "--at", "doc", str(tmp_path / "doc.hex"))
    assert "detected hex text; byte 100 (line 1, column 101) is 'z'" in text


def test_attack_base64_document_with_a_bad_character_is_not_located(tmp_path: Path) -> None:
    encoded = base64.encodebytes(DOC.read_bytes())  # 76-character lines
    lines = encoded.split(b"\n")
    lines[2] = lines[2][:10] + b"*" + lines[2][11:]
    (tmp_path / "doc.b64").write_bytes(b"\n".join(lines))
    text = _stderr("inspect", str(tmp_path / "doc.b64"))
    assert "detected base64 text; byte 164 (line 3, column 11) is '*'" in text


def test_attack_kms_envelope_bad_base64_is_not_located(tmp_path: Path, assets: Path) -> None:
    envelope = tmp_path / "envelope.b64"
    envelope.write_text(
        base64.b64encode((assets / "kms" / "enclaver-hello.ber").read_bytes()).decode()[:-3]
    )
    text = _stderr(
        "kms",
        "unwrap",
        "--private-key",
        str(assets / "kms" / "enclaver-key.pem"),
        "--envelope",
        str(envelope),
    )
    assert f"--envelope {envelope}: detected base64 text" in text


def test_attack_hex_option_error_does_not_say_where(tmp_path: Path) -> None:
    text = _stderr("nsm", "attest", "--nonce", "12z4", "-o", str(tmp_path / "d"))
    assert "--nonce: expected hexadecimal digits; character 3 of '12z4' is 'z'" in text


def test_attack_sign_eif_write_error_names_the_temp_file(tmp_path: Path, built_eif: Path) -> None:
    cert, key = write_signing_files(tmp_path)
    target = tmp_path / "missing-dir" / "signed.eif"
    text = _stderr(
        "sign-eif", "--eif-path", str(built_eif), "--signing-certificate", str(cert),
        "--private-key", str(key), "--output-file", str(target),
    )  # fmt: skip
    assert f"--output-file {target}: cannot write it: No such file or directory" in text
    assert ".tmp" not in text


def test_attack_nsm_attest_write_error_does_not_name_the_flag(
    tmp_path: Path, nsm_emulator: dict[str, str]
) -> None:
    target = tmp_path / "missing-dir" / "doc.cbor"
    env = {"ENCLAVEKIT_NSM": nsm_emulator["ENCLAVEKIT_NSM"]}
    text = _stderr("nsm", "attest", "--output-file", str(target), env=env)
    assert f"--output-file {target}: cannot write it" in text


def test_attack_nsm_root_for_a_missing_state_dir_prints_a_new_root(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    text = _stderr("nsm", "root", "--state-dir", str(missing))
    assert f"--state-dir {missing} does not exist" in text and "--create" in text
    assert not missing.exists()
    created = run("nsm", "root", "--state-dir", str(missing), "--create")
    assert created.returncode == 0 and created.stdout.startswith(b"-----BEGIN CERTIFICATE-----")
    again = run("nsm", "root", "--state-dir", str(missing))
    assert again.returncode == 0 and again.stdout == created.stdout


@pytest.mark.parametrize(
    ("command", "old"),
    [
        (["seal"], "--output"),
        (["unseal"], "--output"),
        (["unseal"], "--key"),
        (["nsm", "attest"], "--output"),
    ],
)
def test_attack_same_thing_under_two_names(command: list[str], old: str) -> None:
    """`--output-file`/`-o` for every output file and `--private-key` for every key; the old names
    still work but are not shown."""
    shown = run(*command, "--help").stdout.decode()
    assert f"{old} " not in shown.replace("--output-file", "")
    if old == "--key":
        assert "--private-key" in shown
    else:
        assert "-o, --output-file" in shown


def test_old_flag_names_still_work(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    text = _stderr("unseal", "--key", str(missing), "--output", str(tmp_path / "out"))
    assert f"--private-key {missing}: cannot read it" in text


@pytest.mark.parametrize(
    "command", [["build-enclave"], ["sign-eif"], ["seal"], ["unseal"], ["nsm", "attest"]]
)
def test_every_output_file_flag_is_output_file_with_o(command: list[str]) -> None:
    assert "-o, --output-file" in run(*command, "--help").stdout.decode()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=200), st.data())
def test_one_bad_hex_digit_is_found_where_it_is(raw: bytes, data: st.DataObject) -> None:
    """At least 64 digits: a shorter hex text with one stray letter is also valid base64."""
    text = bytearray(raw.hex().encode())
    assert text_encoding_error(bytes(text)) is None
    at = data.draw(st.integers(0, len(text) - 1))
    text[at] = ord("g")
    assert f"detected hex text; byte {at} " in (text_encoding_error(bytes(text)) or "")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=8, max_size=200), st.data())
def test_one_bad_base64_character_is_found_where_it_is(raw: bytes, data: st.DataObject) -> None:
    text = bytearray(base64.b64encode(raw))
    assert text_encoding_error(bytes(text)) is None  # valid base64 (or, if all hex digits, hex)
    at = data.draw(st.integers(0, len(text.rstrip(b"=")) - 1))
    text[at] = ord("*")
    # Detection is by alphabet: a base64 text of >= 90 % hex digits (low-entropy data) counts as hex.
    assume(sum(chr(c) in "0123456789abcdefABCDEF" for c in text) < 0.9 * len(text))
    problem = text_encoding_error(bytes(text))
    # A base64 text of mostly hex digits is (rightly) taken for hex; both name the byte.
    assert problem is not None and f"byte {at} " in problem


def test_attack_ca_policy_that_is_not_text_gives_a_traceback_or_codec_error(tmp_path: Path) -> None:
    assert run("ca", "init", "--state-dir", str(tmp_path / "ca")).returncode == 0
    policy = tmp_path / "ca-policy.yaml"
    policy.write_bytes(b"services:\n  \xff\xfe\n")
    text = _stderr(
        "ca",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path / "ca"),
        "--policy",
        str(policy),
    )
    assert f"--policy {policy}: not a text file (byte 12 is 0xff" in text

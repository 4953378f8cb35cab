"""CBC padding oracle on KMS envelopes: every failure after the RSA step looks the same.

The attacker is a party that relays ``CiphertextForRecipient`` to the enclave and sees the outcome (the
parent instance). It holds one genuine envelope (``enclaver-hello.ber``, plaintext ``Hello, World``) and
the recipient's public key, and sends modified copies. It must not be able to tell a bad PKCS#7 padding
from any other defect of the encrypted content: not by exception class, message, exit code or stderr.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.cli import cli
from enclavekit.errors import Error, MalformedInput
from enclavekit.kms.envelope import UNDECRYPTABLE_MESSAGE, Envelope, UndecryptableEnvelope
from enclavekit.kms.recipient import RecipientKey

PLAINTEXT = b"Hello, World"


def _mutate(blob: bytes, change: Callable[[Any], None]) -> bytes:
    info = cms.ContentInfo.load(blob)
    change(info)
    return bytes(info.dump(force=True))


def _eci(info: Any) -> Any:
    return info["content"]["encrypted_content_info"]


def _iv(info: Any) -> bytes:
    return bytes(_eci(info)["content_encryption_algorithm"]["parameters"].native)


def _set_iv(info: Any, iv: bytes) -> None:
    _eci(info)["content_encryption_algorithm"] = {"algorithm": "aes256_cbc", "parameters": iv}


def _with_iv_byte(blob: bytes, index: int, xor: int) -> bytes:
    def change(info: Any) -> None:
        iv = bytearray(_iv(info))
        iv[index] ^= xor
        _set_iv(info, bytes(iv))

    return _mutate(blob, change)


def _variants(blob: bytes, public_key: rsa.RSAPublicKey) -> dict[str, bytes]:
    """Modified copies of the genuine envelope, one per kind of defect of the encrypted content."""

    def ciphertext(info: Any) -> bytes:
        return bytes(_eci(info)["encrypted_content"].native)

    def cut_ciphertext(info: Any) -> None:
        _eci(info)["encrypted_content"] = ciphertext(info)[:-1]

    def short_iv(info: Any) -> None:
        _set_iv(info, _iv(info)[:8])

    def no_content(info: Any) -> None:
        _eci(info)["encrypted_content"] = None

    def signed_data_inside(info: Any) -> None:
        _eci(info)["content_type"] = "signed_data"

    def short_content_key(info: Any) -> None:
        oaep = OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["encrypted_key"] = public_key.encrypt(os.urandom(16), oaep)

    return {
        # P[15] is 0x04; flipping IV[15] by 0x07 makes it 0x03: bad padding.
        "padding-bad": _with_iv_byte(blob, 15, 0x07),
        "length-bad (ciphertext not whole blocks)": _mutate(blob, cut_ciphertext),
        "length-bad (16-byte content key)": _mutate(blob, short_content_key),
        "content-type-bad (signedData inside)": _mutate(blob, signed_data_inside),
        "inner-structure-bad (8-byte IV)": _mutate(blob, short_iv),
        "inner-structure-bad (no encrypted content)": _mutate(blob, no_content),
    }


def _outcome(call: Callable[[], object]) -> tuple[str, str]:
    try:
        call()
    except Error as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


@pytest.fixture(scope="module")
def genuine(kms_assets: Path) -> bytes:
    return (kms_assets / "enclaver-hello.ber").read_bytes()


@pytest.fixture(scope="module")
def recipient(enclaver_key: rsa.RSAPrivateKey) -> RecipientKey:
    return RecipientKey(enclaver_key)


def test_genuine_envelope_still_opens(genuine: bytes, recipient: RecipientKey) -> None:
    assert recipient.unwrap(genuine) == PLAINTEXT
    assert recipient.unwrap(genuine, expected_length=len(PLAINTEXT)) == PLAINTEXT


def test_attack_padding_oracle_failures_are_indistinguishable(
    genuine: bytes, recipient: RecipientKey
) -> None:
    """Padding, length, content type, inner structure: one class, one message."""
    variants = _variants(genuine, recipient.private_key.public_key())
    plain = {
        name: _outcome(lambda blob=blob: recipient.unwrap(blob)) for name, blob in variants.items()
    }
    assert len(set(plain.values())) == 1, plain
    ((kind, message),) = set(plain.values())
    assert kind == UndecryptableEnvelope.__name__
    assert "no integrity" in message
    # The caller knows the length (a data key): the valid-padding, wrong-length case (P[15] = 0x01,
    # a 15-byte plaintext) joins them.
    variants["length-bad (valid padding, 15-byte plaintext)"] = _with_iv_byte(genuine, 15, 0x05)
    known = {
        name: _outcome(lambda blob=blob: recipient.unwrap(blob, expected_length=len(PLAINTEXT)))
        for name, blob in variants.items()
    }
    assert set(known.values()) == {(kind, message)}, known


def test_attack_padding_oracle_cli_exit_code_and_stderr_are_identical(
    genuine: bytes, recipient: RecipientKey, kms_assets: Path, tmp_path: Path
) -> None:
    variants = _variants(genuine, recipient.private_key.public_key())
    variants["length-bad (valid padding, 15-byte plaintext)"] = _with_iv_byte(genuine, 15, 0x05)
    seen: dict[str, tuple[int, bytes, str]] = {}
    for index, (name, blob) in enumerate(variants.items()):
        path = tmp_path / f"variant-{index}.der"
        path.write_bytes(blob)
        result = CliRunner().invoke(
            cli,
            [
                *("kms", "unwrap", "--private-key", str(kms_assets / "enclaver-key.pem")),
                *("--envelope", str(path), "--expected-length", str(len(PLAINTEXT))),
            ],
        )
        seen[name] = (result.exit_code, result.stdout_bytes, result.stderr)
    assert len(set(seen.values())) == 1, seen
    ((code, out, err),) = set(seen.values())
    assert (code, out) == (1, b"")
    assert err.startswith("error: ") and "Traceback" not in err


def test_attack_padding_oracle_on_genuine_envelope_learns_nothing(
    genuine: bytes, recipient: RecipientKey
) -> None:
    """The byte-at-a-time attack: try all 255 changes of the IV byte over the last padding byte.

    Against the old code exactly one of them (P[15] = 0x01, valid padding) stood out, which is the
    first step of recovering the whole plaintext; with the plaintext length given, all look the same.
    """
    outcomes = [
        _outcome(
            lambda guess=guess: recipient.unwrap(
                _with_iv_byte(genuine, 15, guess), expected_length=len(PLAINTEXT)
            )
        )
        for guess in range(1, 256)
    ]
    assert len(set(outcomes)) == 1
    assert outcomes[0][0] == UndecryptableEnvelope.__name__


def test_without_a_known_length_valid_padding_shows_as_success(
    genuine: bytes, recipient: RecipientKey
) -> None:
    """The documented limit: CMS EnvelopedData has no integrity. A caller that does not know the length
    and lets a relay see success or failure still gives a padding oracle; bound its retries."""
    successes = [
        guess
        for guess in range(1, 256)
        if _outcome(lambda guess=guess: recipient.unwrap(_with_iv_byte(genuine, 15, guess)))[0]
        == "ok"
    ]
    assert successes == [0x05]


def test_pkcs1v15_recipient_is_refused_before_any_private_key_operation(
    kms_assets: Path, genuine: bytes
) -> None:
    """No Bleichenbacher oracle: an envelope with any PKCS#1 v1.5 recipient is refused at decoding,
    even next to an OAEP recipient, so the private key never sees a v1.5 ciphertext."""
    v15 = cms.ContentInfo.load((kms_assets / "openssl-pkcs1v15.der").read_bytes())
    foreign = v15["content"]["recipient_infos"][0]

    def add(info: Any) -> None:
        infos = info["content"]["recipient_infos"]
        info["content"]["recipient_infos"] = cms.RecipientInfos([infos[0], foreign])

    with pytest.raises(MalformedInput, match="RSAES-OAEP"):
        Envelope.from_ber(_mutate(genuine, add))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=0, max_value=31),
    st.integers(min_value=1, max_value=255),
    st.booleans(),
)
def test_any_change_to_iv_or_ciphertext_gives_the_one_error_or_the_known_length(
    genuine: bytes, recipient: RecipientKey, position: int, flip: int, truncate: bool
) -> None:
    """Property: the attacker's whole view of a changed IV/ciphertext byte is 'ok, 12 bytes' or the
    one UndecryptableEnvelope — never anything naming the defect."""

    def change(info: Any) -> None:
        data = bytearray(_iv(info) + bytes(_eci(info)["encrypted_content"].native))
        data[position] ^= flip
        if truncate:
            data = data[:-1]
        _set_iv(info, bytes(data[:16]))
        _eci(info)["encrypted_content"] = bytes(data[16:])

    blob = _mutate(genuine, change)
    kind, message = _outcome(lambda: recipient.unwrap(blob, expected_length=len(PLAINTEXT)))
    assert (kind, message) in {("ok", ""), (UndecryptableEnvelope.__name__, UNDECRYPTABLE_MESSAGE)}

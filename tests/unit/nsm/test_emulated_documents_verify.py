"""Acceptance: emulated documents verify with the emulator root pinned, and never with the AWS root."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from enclavekit.attestation.policy import AllOf, NonceEquals, NotDebug, PcrsEqual
from enclavekit.attestation.verifier import Verifier
from enclavekit.errors import PolicyViolation, VerificationError
from enclavekit.nsm import Nsm, NsmEmulator
from enclavekit.pki.emulated import EmulatedAwsPki

PCR0 = bytes.fromhex("ab" * 48)


def test_emulated_document_verifies_with_the_emulator_root(
    nsm: Nsm, pki: EmulatedAwsPki, now: datetime
) -> None:
    document = nsm.attestation(nonce=b"challenge", public_key=b"key", user_data=b"")
    verified = Verifier([pki.root_certificate()]).verify(
        document, AllOf([NonceEquals(b"challenge"), NotDebug()]), at=now
    )
    assert verified.nonce == b"challenge"
    assert verified.public_key == b"key"
    assert verified.user_data == b""
    assert verified.is_debug is False


def test_emulated_document_fails_with_the_default_aws_root(nsm: Nsm, now: datetime) -> None:
    """An emulator can never pass for AWS hardware under the default trust root."""
    with pytest.raises(VerificationError):
        Verifier.aws().verify_signature_and_chain(nsm.attestation(), at=now)


def test_emulated_document_fails_with_another_emulator_root(nsm: Nsm, now: datetime) -> None:
    """Each state directory's root is distinct: another emulator's root does not verify it."""
    other = EmulatedAwsPki.ephemeral()
    with pytest.raises(VerificationError):
        Verifier([other.root_certificate()]).verify_signature_and_chain(nsm.attestation(), at=now)


def test_definite_payload_documents_verify_too(pki: EmulatedAwsPki, now: datetime) -> None:
    emulator = NsmEmulator(pki=pki, clock=lambda: now, definite_payload=True)
    Verifier([pki.root_certificate()]).verify_signature_and_chain(emulator.attest(), at=now)


def test_pcr_policy_sees_the_configured_pcrs(pki: EmulatedAwsPki, now: datetime) -> None:
    emulator = NsmEmulator(pcrs={0: PCR0}, pki=pki, clock=lambda: now)
    verifier = Verifier([pki.root_certificate()])
    verifier.verify(emulator.attest(), PcrsEqual({0: PCR0}), at=now)
    with pytest.raises(PolicyViolation):
        verifier.verify(emulator.attest(), PcrsEqual({0: bytes(48)}), at=now)


def test_debug_mode_documents_are_flagged_debug(pki: EmulatedAwsPki, now: datetime) -> None:
    emulator = NsmEmulator(pcrs={0: PCR0, 1: PCR0, 2: PCR0, 3: PCR0}, debug_mode=True, pki=pki)
    verifier = Verifier([pki.root_certificate()])
    document = emulator.attest(now=now)
    verified = verifier.verify_signature_and_chain(document, at=now)
    assert verified.is_debug
    assert verified.pcrs[0] == verified.pcrs[1] == verified.pcrs[2] == bytes(48)
    assert verified.pcrs[3] == PCR0  # PCR3/PCR4 stay set in debug mode, as on AWS
    with pytest.raises(PolicyViolation):
        verifier.verify(document, NotDebug(), at=now)


def test_tampered_emulated_document_is_rejected(
    nsm: Nsm, pki: EmulatedAwsPki, now: datetime
) -> None:
    """A flipped payload byte breaks the COSE signature, even with the right root."""
    document = bytearray(nsm.attestation(nonce=b"\x00" * 32))
    document[-110] ^= 0x01  # inside the payload's nonce (signature: last 98 bytes, then ff)
    with pytest.raises(VerificationError, match="signature"):
        Verifier([pki.root_certificate()]).verify_signature_and_chain(bytes(document), at=now)


def test_documents_outside_the_leaf_window_fail(
    nsm: Nsm, pki: EmulatedAwsPki, now: datetime
) -> None:
    document = nsm.attestation()
    verifier = Verifier([pki.root_certificate()])
    verifier.verify_signature_and_chain(document, at=now + timedelta(hours=2, minutes=59))
    with pytest.raises(VerificationError):
        verifier.verify_signature_and_chain(document, at=now + timedelta(hours=3, seconds=1))

"""NitroTPM documents are not enclave documents (issue 14 item 1).

A NitroTPM document is AWS-signed like an enclave's, but its PCRs are an EC2 instance's TPM PCRs, which the
instance's operating system extends (new = SHA-384(old ‖ digest)) and resets at will. Each test below builds
such a document with PCR values chosen to equal an enclave's and shows that no enclave check accepts it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from enclavekit.attestation import Verifier
from enclavekit.attestation.document import AttestationDocument, DocumentKind
from enclavekit.attestation.policy import (
    AllOf,
    NitroTpmPcrsEqual,
    NotDebug,
    PcrAllowlist,
    PcrsEqual,
    UnsafeNoOp,
    load_policy,
    policy_from_mapping,
)
from enclavekit.errors import (
    DocumentKindError,
    NitroTpmDocumentError,
    PolicyViolation,
    UsageError,
    VerificationError,
)
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.nsm.messages import ExtendPcr, PcrExtended
from tests.unit.attestation.factory import (
    NOW,
    TestPki,
    default_pcrs,
    encode_payload,
    make_document,
    payload_fields,
)

TPM_ID = "i-0123456789abcdef0-tpm0123456789abcdef"
#: An enclave's PCR8 for a signing certificate: SHA-384(0⁴⁸ ‖ SHA-384(certificate DER)).
SIGNING_CERT_DIGEST = hashlib.sha384(b"the enclave owner's signing certificate").digest()
ENCLAVE_PCR8 = hashlib.sha384(bytes(48) + SIGNING_CERT_DIGEST).digest()
APPLICATION_PCR16 = hashlib.sha384(bytes(48) + b"\x16" * 48).digest()


def tpm_document(pki: TestPki, pcrs: dict[int, bytes] | None = None, **fields: object) -> bytes:
    """A NitroTPM-shaped document (``-tpm`` module id, ``nitrotpm_pcrs``) signed by the test PKI."""
    body = payload_fields(pki, module_id=TPM_ID, **fields)
    body.pop("pcrs")
    body["nitrotpm_pcrs"] = pcrs if pcrs is not None else default_pcrs()
    return make_document(pki, raw_payload=encode_payload(body, indefinite=True))


def forged_pcrs() -> dict[int, bytes]:
    pcrs = default_pcrs(count=24)
    pcrs[8] = ENCLAVE_PCR8
    pcrs[16] = APPLICATION_PCR16
    return pcrs


@pytest.fixture
def verifier(pki: TestPki) -> Verifier:
    return Verifier([pki.root])


# -- refused by default --------------------------------------------------------------------------


def test_attack_nitrotpm_document_satisfies_pcr8_policy(pki: TestPki, verifier: Verifier) -> None:
    raw = tpm_document(pki, forged_pcrs())
    with pytest.raises(NitroTpmDocumentError, match="NitroTPM") as caught:
        verifier.verify(raw, PcrsEqual({8: ENCLAVE_PCR8}), at=NOW)
    assert isinstance(caught.value, VerificationError)
    assert caught.value.exit_code == 1


def test_attack_nitrotpm_document_satisfies_pcr16_policy(pki: TestPki, verifier: Verifier) -> None:
    raw = tpm_document(pki, forged_pcrs())
    with pytest.raises(NitroTpmDocumentError):
        verifier.verify(raw, AllOf([NotDebug(), PcrsEqual({16: APPLICATION_PCR16})]), at=NOW)


def test_attack_nitrotpm_document_passes_signature_and_chain(
    pki: TestPki, verifier: Verifier
) -> None:
    """Callers that apply their own checks after verify_signature_and_chain are covered too."""
    with pytest.raises(NitroTpmDocumentError):
        verifier.verify_signature_and_chain(tpm_document(pki, forged_pcrs()), at=NOW)


@pytest.mark.parametrize("workers", [1, 2])
def test_attack_nitrotpm_document_in_a_batch(
    pki: TestPki, verifier: Verifier, workers: int
) -> None:
    docs = [tpm_document(pki, forged_pcrs()), make_document(pki)]
    results = verifier.verify_many(docs, UnsafeNoOp(), at=NOW, workers=workers)
    assert isinstance(results[0], NitroTpmDocumentError)
    assert not isinstance(results[1], Exception)


def test_attack_tpm_module_id_with_enclave_pcrs(pki: TestPki, verifier: Verifier) -> None:
    raw = make_document(pki, module_id=TPM_ID, pcrs=forged_pcrs())
    with pytest.raises(DocumentKindError, match="inconsistent.*-tpm"):
        verifier.verify(raw, PcrsEqual({8: ENCLAVE_PCR8}), at=NOW)
    with pytest.raises(DocumentKindError, match="inconsistent"):
        verifier.verify(raw, UnsafeNoOp(), at=NOW, allow_nitrotpm=True)


def test_attack_enclave_module_id_with_nitrotpm_pcrs(pki: TestPki, verifier: Verifier) -> None:
    body = payload_fields(pki)
    body["nitrotpm_pcrs"] = body.pop("pcrs")
    raw = make_document(pki, raw_payload=encode_payload(body))
    for allow in (False, True):
        with pytest.raises(DocumentKindError, match="inconsistent.*-enc"):
            verifier.verify(raw, UnsafeNoOp(), at=NOW, allow_nitrotpm=allow)


def test_attack_module_id_naming_both_kinds(pki: TestPki, verifier: Verifier) -> None:
    raw = make_document(pki, module_id="i-0123456789abcdef0-enc01-tpm01")
    with pytest.raises(DocumentKindError, match="both"):
        verifier.verify(raw, UnsafeNoOp(), at=NOW)


# -- accepted only on purpose, and then only by NitroTPM checks ---------------------------------


def test_attack_enclave_policies_satisfied_by_allowed_nitrotpm_document(
    pki: TestPki, verifier: Verifier, tmp_path: Path
) -> None:
    """Even with allow_nitrotpm, no enclave policy (PCR set, allowlist, file, nitro-cli JSON) passes."""
    raw = tpm_document(pki, forged_pcrs())
    measurements = tmp_path / "measurements.json"
    measurements.write_text(
        json.dumps(
            {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR8": ENCLAVE_PCR8.hex()}}
        )
    )
    policies = [
        PcrsEqual({8: ENCLAVE_PCR8}),
        PcrAllowlist([{8: ENCLAVE_PCR8}, {16: APPLICATION_PCR16}]),
        load_policy(measurements),
        policy_from_mapping({"pcrs": {"PCR16": APPLICATION_PCR16.hex()}}),
        policy_from_mapping([{"Measurements": {"PCR8": ENCLAVE_PCR8.hex()}}]),
    ]
    for policy in policies:
        with pytest.raises(PolicyViolation, match="document kind") as caught:
            verifier.verify(raw, policy, at=NOW, allow_nitrotpm=True)
        assert "NitroTPM" in str(caught.value)


def test_nitrotpm_pcrs_are_checked_only_by_a_nitrotpm_policy(
    pki: TestPki, verifier: Verifier
) -> None:
    raw = tpm_document(pki, forged_pcrs())
    verified = verifier.verify(
        raw, NitroTpmPcrsEqual({8: ENCLAVE_PCR8}), at=NOW, allow_nitrotpm=True
    )
    assert verified.kind is DocumentKind.NITROTPM
    assert verified.is_nitrotpm
    assert verified.pcrs == {}  # code reading `pcrs` never sees a TPM's PCR
    assert verified.nitrotpm_pcrs[8] == ENCLAVE_PCR8
    with pytest.raises(PolicyViolation, match="NitroTPM PCR16"):
        verifier.verify(raw, NitroTpmPcrsEqual({16: bytes(48)}), at=NOW, allow_nitrotpm=True)
    from_file = policy_from_mapping({"nitrotpm_pcrs": {"8": ENCLAVE_PCR8.hex()}})
    verifier.verify(raw, from_file, at=NOW, allow_nitrotpm=True)


def test_nitrotpm_policy_is_never_satisfied_by_an_enclave_document(
    pki: TestPki, verifier: Verifier
) -> None:
    pcrs = default_pcrs()
    pcrs[8] = ENCLAVE_PCR8
    raw = make_document(pki, pcrs=pcrs)
    with pytest.raises(PolicyViolation, match="document kind"):
        verifier.verify(raw, NitroTpmPcrsEqual({8: ENCLAVE_PCR8}), at=NOW, allow_nitrotpm=True)


def test_policy_file_mixing_enclave_and_nitrotpm_pcrs_is_refused() -> None:
    with pytest.raises(UsageError, match="cannot be combined"):
        policy_from_mapping({"pcrs": {"0": "00" * 48}, "nitrotpm_pcrs": {"0": "00" * 48}})


def test_enclave_documents_are_unaffected(pki: TestPki, verifier: Verifier) -> None:
    verified = verifier.verify(make_document(pki), PcrsEqual({1: b"\xa1" * 48}), at=NOW)
    assert verified.kind is DocumentKind.ENCLAVE
    assert not verified.is_nitrotpm
    assert verified.nitrotpm_pcrs == {}


def test_decoding_keeps_nitrotpm_documents_for_inspection(pki: TestPki) -> None:
    doc = AttestationDocument.from_cbor(tpm_document(pki, forged_pcrs()))
    assert doc.kind is DocumentKind.NITROTPM
    assert doc.is_nitrotpm
    assert doc.pcrs == {}
    assert doc.nitrotpm_pcrs[16] == APPLICATION_PCR16
    assert doc.kind_inconsistency is None


# -- the emulator's NitroTPM mode: the attack as an EC2 user would run it ----------------------


def test_attack_ec2_instance_extends_tpm_pcr8_to_an_enclave_signing_certificate() -> None:
    """On a NitroTPM instance the OS extends PCR8 from zero with SHA-384(cert): the enclave's PCR8."""
    pki = EmulatedAwsPki.ephemeral()
    tpm = NsmEmulator(pki=pki, nitrotpm=True)
    assert "-tpm" in tpm.module_id
    answer = tpm.handle(ExtendPcr(8, SIGNING_CERT_DIGEST))
    assert answer == PcrExtended(ENCLAVE_PCR8)
    raw = tpm.attest()
    verifier = Verifier([pki.root_certificate()])
    with pytest.raises(NitroTpmDocumentError):
        verifier.verify(raw, PcrsEqual({8: ENCLAVE_PCR8}), at=None)
    verified = verifier.verify(
        raw, NitroTpmPcrsEqual({8: ENCLAVE_PCR8}), at=None, allow_nitrotpm=True
    )
    assert sorted(verified.nitrotpm_pcrs) == list(range(24))


def test_emulator_nitrotpm_module_id_must_say_tpm() -> None:
    with pytest.raises(ValueError, match="-tpm"):
        NsmEmulator(nitrotpm=True, module_id="i-0123456789abcdef0-enc0123456789abcdef")
    with pytest.raises(ValueError, match="debug"):
        NsmEmulator(nitrotpm=True, debug_mode=True)

"""The KMS stand-in, like KMS, accepts NitroTPM documents in ``Recipient`` but gives them only
``NitroTPMPCR<n>`` condition keys: no enclave condition (``ImageSha384``, ``PCR<n>``) is satisfied by a
NitroTPM document whose TPM PCRs equal the enclave's values (issue 14 item 1)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.attestation.verifier import Verifier
from enclavekit.kms.client import AwsCredentials
from enclavekit.kms.recipient import KEY_ENCRYPTION_ALGORITHM, RecipientKey
from enclavekit.kms.testing import KmsFault, StandInKms
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.nsm.messages import ExtendPcr

PCR0 = bytes(range(48))
SIGNING_CERT_DIGEST = hashlib.sha384(b"the enclave owner's signing certificate").digest()
ENCLAVE_PCR8 = hashlib.sha384(bytes(48) + SIGNING_CERT_DIGEST).digest()
CREDS = AwsCredentials("AKIAENCLAVEKITTEST", "secret-for-tests")


@pytest.fixture(scope="module")
def recipient(assets: Path) -> RecipientKey:
    key = serialization.load_pem_private_key(
        (assets / "kms" / "recipient-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return RecipientKey(key)


@pytest.fixture(scope="module")
def pki() -> EmulatedAwsPki:
    return EmulatedAwsPki.ephemeral()


@pytest.fixture(scope="module")
def tpm_document(pki: EmulatedAwsPki, recipient: RecipientKey) -> bytes:
    """A NitroTPM whose PCR0 equals the enclave image and whose PCR8 the OS extended to the enclave's."""
    tpm = NsmEmulator(pcrs={0: PCR0}, pki=pki, nitrotpm=True)
    tpm.handle(ExtendPcr(8, SIGNING_CERT_DIGEST))
    return tpm.attest(public_key=recipient.public_key_der)


def _generate(kms: StandInKms, key: str, document: bytes) -> dict[str, object]:
    return kms.handle(
        "GenerateDataKey",
        {
            "KeyId": key,
            "Recipient": {
                "AttestationDocument": base64.b64encode(document).decode(),
                "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
            },
        },
    )


def _policy(**conditions: str) -> dict[str, object]:
    keys = {f"kms:RecipientAttestation:{k}": v for k, v in conditions.items()}
    return {
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "kms:GenerateDataKey",
                "Condition": {"StringEquals": keys},
            }
        ]
    }


@pytest.mark.parametrize(
    "conditions",
    [{"ImageSha384": PCR0.hex()}, {"PCR0": PCR0.hex()}, {"PCR8": ENCLAVE_PCR8.hex()}],
)
def test_attack_nitrotpm_document_satisfies_enclave_kms_condition(
    pki: EmulatedAwsPki, tpm_document: bytes, conditions: dict[str, str]
) -> None:
    kms = StandInKms(verifier=Verifier([pki.root_certificate()]), credentials=CREDS)
    key = kms.create_key(_policy(**conditions))
    with pytest.raises(KmsFault, match="no key policy statement allows") as caught:
        _generate(kms, key, tpm_document)
    assert caught.value.code == "AccessDeniedException"


def test_nitrotpm_condition_keys_are_satisfied_by_nitrotpm_documents(
    pki: EmulatedAwsPki, tpm_document: bytes
) -> None:
    kms = StandInKms(verifier=Verifier([pki.root_certificate()]), credentials=CREDS)
    key = kms.create_key(_policy(NitroTPMPCR8=ENCLAVE_PCR8.hex(), NitroTPMPCR0=PCR0.hex()))
    assert "CiphertextForRecipient" in _generate(kms, key, tpm_document)


def test_nitrotpm_condition_keys_are_not_satisfied_by_enclave_documents(
    pki: EmulatedAwsPki, recipient: RecipientKey
) -> None:
    enclave = NsmEmulator(pcrs={0: PCR0}, pki=pki)
    kms = StandInKms(verifier=Verifier([pki.root_certificate()]), credentials=CREDS)
    key = kms.create_key(_policy(NitroTPMPCR0=PCR0.hex()))
    with pytest.raises(KmsFault, match="no key policy statement allows"):
        _generate(kms, key, enclave.attest(public_key=recipient.public_key_der))

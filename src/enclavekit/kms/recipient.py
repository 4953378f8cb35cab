"""The KMS ``Recipient`` request parameter and the enclave-held RSA key it names.

KMS accepts ``Recipient = {AttestationDocument, KeyEncryptionAlgorithm: "RSAES_OAEP_SHA_256"}`` on
Decrypt, GenerateDataKey, GenerateDataKeyPair, DeriveSharedSecret and GenerateRandom, and then answers with
``CiphertextForRecipient`` encrypted to the document's ``public_key``, which must be an RSA-2048
SubjectPublicKeyInfo in DER.

:func:`build_recipient` checks exactly that shape of the document locally (so a wrong key is reported here,
not as an opaque KMS ``ValidationException``): the document decodes, its ``public_key`` is present, is an
RSA SPKI of :data:`RSA_KEY_BITS` bits and — when a key is given — equals that key. Not checked: the
document's signature and chain (KMS does that; verify it yourself with
:mod:`enclavekit.attestation.verifier` if you need to), its age, or the PCRs.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclavekit.attestation.document import AttestationDocument
from enclavekit.errors import MalformedInput, UsageError
from enclavekit.kms.envelope import Envelope, key_identifiers

#: The only algorithm KMS accepts in Recipient.
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
#: KMS requires an RSA-2048 key in the attestation document.
RSA_KEY_BITS = 2048


@dataclass(frozen=True, slots=True)
class RecipientKey:
    """An RSA-2048 key pair held inside the enclave; its public half goes into the attestation document."""

    private_key: rsa.RSAPrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise TypeError("RecipientKey needs an RSA private key")
        if self.private_key.key_size != RSA_KEY_BITS:
            raise ValueError(
                f"KMS needs an RSA-{RSA_KEY_BITS} key, got {self.private_key.key_size}"
            )

    @classmethod
    def generate(cls) -> RecipientKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS))

    @property
    def public_key_der(self) -> bytes:
        """DER SubjectPublicKeyInfo: the value for the attestation document's ``public_key``."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_identifier(self) -> bytes:
        """SHA-256 of the SPKI DER: the subjectKeyIdentifier KMS puts in the envelope."""
        return key_identifiers(self.private_key.public_key())[0]

    def unwrap(
        self, ciphertext_for_recipient: bytes, *, expected_length: int | None = None
    ) -> bytes:
        """Decrypt a ``CiphertextForRecipient`` (raw bytes, as botocore returns it).

        Pass ``expected_length`` whenever the plaintext's length is known (32 for an AES_256 data key,
        ``NumberOfBytes`` for GenerateRandom): then every tampered envelope fails with the same
        :class:`~enclavekit.kms.envelope.UndecryptableEnvelope`, and a relay that sees the outcome
        learns nothing. Without it, a valid padding shows as success (CMS EnvelopedData has no
        integrity): do not let anyone retry failed envelopes without a bound.
        """
        return Envelope.from_ber(ciphertext_for_recipient).decrypt(
            self.private_key, expected_length=expected_length
        )


@dataclass(frozen=True, slots=True)
class Recipient:
    """The ``Recipient`` parameter; build it with :func:`build_recipient`."""

    attestation_document: bytes
    key_encryption_algorithm: str = KEY_ENCRYPTION_ALGORITHM

    def to_botocore(self) -> dict[str, Any]:
        """For botocore/boto3 (which base64-encodes blobs itself)."""
        return {
            "AttestationDocument": self.attestation_document,
            "KeyEncryptionAlgorithm": self.key_encryption_algorithm,
        }

    def to_json(self) -> dict[str, str]:
        """For the raw KMS JSON protocol (AttestationDocument base64-encoded)."""
        return {
            "AttestationDocument": base64.b64encode(self.attestation_document).decode("ascii"),
            "KeyEncryptionAlgorithm": self.key_encryption_algorithm,
        }


def rsa_public_key_from_document(document: AttestationDocument) -> rsa.RSAPublicKey:
    """The RSA-2048 public key in ``document.public_key``; :class:`UsageError` if it is not one."""
    if document.public_key is None:
        raise UsageError(
            "the attestation document has no public_key; KMS needs an RSA-2048 "
            "SubjectPublicKeyInfo (DER) there — request the document with public_key set"
        )
    try:
        key = serialization.load_der_public_key(document.public_key)
    except (ValueError, TypeError):
        raise UsageError(
            "the attestation document's public_key is not a DER SubjectPublicKeyInfo; KMS needs "
            f"an RSA-{RSA_KEY_BITS} key there (found {len(document.public_key)} bytes)"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != RSA_KEY_BITS:
        found = f"RSA-{key.key_size}" if isinstance(key, rsa.RSAPublicKey) else type(key).__name__
        raise UsageError(
            f"the attestation document's public_key must be RSA-{RSA_KEY_BITS} for KMS, found {found}"
        )
    return key


def build_recipient(attestation_document: bytes, key: RecipientKey | None = None) -> Recipient:
    """Check the document carries an RSA-2048 SPKI (equal to ``key``'s, if given) and wrap it."""
    if not isinstance(attestation_document, bytes):
        raise TypeError("attestation_document must be bytes (the raw COSE_Sign1)")
    try:
        document = AttestationDocument.from_cbor(attestation_document)
    except MalformedInput as exc:
        raise MalformedInput(f"cannot build a KMS Recipient: {exc.diagnostics()}") from None
    public_key = rsa_public_key_from_document(document)
    if key is not None:
        expected = key.public_key_der
        found = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if found != expected:
            raise UsageError(
                "the attestation document's public_key is not this RecipientKey's public key; "
                "KMS would encrypt to a key you cannot use — request a new document with "
                "public_key=key.public_key_der"
            )
    return Recipient(attestation_document)

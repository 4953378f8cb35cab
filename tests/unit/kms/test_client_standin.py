"""KMS client → vsock proxy (over TCP) → stand-in KMS: Recipient, key policy conditions, envelopes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclavekit.attestation.verifier import Verifier
from enclavekit.errors import MalformedInput, UsageError, VerificationError
from enclavekit.kms.client import AwsCredentials, KmsClient, KmsError
from enclavekit.kms.recipient import (
    KEY_ENCRYPTION_ALGORITHM,
    Recipient,
    RecipientKey,
    build_recipient,
)
from enclavekit.kms.testing import KeyPolicy, StandInKms
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.transport.allowlist import Allowlist, AllowlistEntry
from enclavekit.transport.proxy import VsockProxy
from enclavekit.transport.sockets import listen, local_address

PCR0 = bytes(range(48))
PCR3 = bytes([0xAB]) * 48
CREDS = AwsCredentials("AKIAENCLAVEKITTEST", "secret-for-tests", "session-token")
ENDPOINT = "http://kms.eu-west-1.amazonaws.com"


@pytest.fixture(scope="module")
def recipient_key_obj(assets: Path) -> RecipientKey:
    key = serialization.load_pem_private_key(
        (assets / "kms" / "recipient-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return RecipientKey(key)


@pytest.fixture(scope="module")
def emulator() -> NsmEmulator:
    return NsmEmulator(pcrs={0: PCR0, 3: PCR3}, pki=EmulatedAwsPki.ephemeral())


@pytest.fixture(scope="module")
def document(emulator: NsmEmulator, recipient_key_obj: RecipientKey) -> bytes:
    return emulator.attest(public_key=recipient_key_obj.public_key_der)


@pytest.fixture(scope="module")
def kms(emulator: NsmEmulator) -> StandInKms:
    return StandInKms(verifier=Verifier([emulator.pki.root_certificate()]), credentials=CREDS)


@pytest.fixture(scope="module")
def client(kms: StandInKms) -> Iterator[KmsClient]:
    """A client whose stream goes through a VsockProxy (TCP listener) to the stand-in."""
    with kms.serve() as server:
        port = server.address.port
        allowlist = Allowlist((AllowlistEntry("127.0.0.1", port),))
        proxy = VsockProxy("127.0.0.1", port, allowlist=allowlist, workers=2)
        listener = listen("tcp://127.0.0.1:0")
        proxy.start(listener)
        try:
            yield KmsClient(
                region="eu-west-1",
                credentials=CREDS,
                endpoint=ENDPOINT,
                via=local_address(listener),
            )
        finally:
            proxy.close()


def _attested_policy(**conditions: str) -> dict[str, object]:
    keys = {f"kms:RecipientAttestation:{k}": v for k, v in conditions.items()}
    return {
        "Statement": [
            {"Effect": "Allow", "Action": "kms:Encrypt"},
            {
                "Effect": "Allow",
                "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                "Condition": {"StringEqualsIgnoreCase": keys},
            },
        ]
    }


def test_decrypt_with_recipient_returns_envelope_for_enclave_key(
    client: KmsClient, kms: StandInKms, document: bytes, recipient_key_obj: RecipientKey
) -> None:
    key = kms.create_key(_attested_policy(ImageSha384=PCR0.hex().upper(), PCR3=PCR3.hex()))
    blob = kms.encrypt(key, b"database password", {"app": "demo"})
    recipient = build_recipient(document, recipient_key_obj)
    result = client.decrypt(blob, recipient=recipient, encryption_context={"app": "demo"})
    assert result.key_id == key
    assert result.ciphertext_for_recipient[:2] == b"\x30\x80"  # BER, as KMS
    assert recipient_key_obj.unwrap(result.ciphertext_for_recipient) == b"database password"
    assert (
        client.decrypt_plaintext(
            blob,
            key=recipient_key_obj,
            recipient=recipient,
            encryption_context={"app": "demo"},
        )
        == b"database password"
    )


def test_pcr_mismatch_is_denied(client: KmsClient, kms: StandInKms, document: bytes) -> None:
    key = kms.create_key(_attested_policy(ImageSha384="00" * 48))
    blob = kms.encrypt(key, b"x")
    with pytest.raises(KmsError) as info:
        client.decrypt(blob, recipient=build_recipient(document))
    assert info.value.code == "AccessDeniedException"
    assert info.value.exit_code == 1


def test_attestation_condition_without_recipient_is_denied(
    client: KmsClient, kms: StandInKms
) -> None:
    """A plain Decrypt cannot satisfy a RecipientAttestation condition (no plaintext leak)."""
    key = kms.create_key(_attested_policy(ImageSha384=PCR0.hex()))
    blob = kms.encrypt(key, b"x")
    with pytest.raises(KmsError, match="AccessDeniedException"):
        client.call("Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode()})


def test_explicit_deny_wins(client: KmsClient, kms: StandInKms, document: bytes) -> None:
    policy = _attested_policy(ImageSha384=PCR0.hex())
    policy["Statement"].append(  # type: ignore[attr-defined]
        {
            "Effect": "Deny",
            "Action": "kms:*",
            "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR3": PCR3.hex()}},
        }
    )
    key = kms.create_key(policy)
    with pytest.raises(KmsError, match="explicitly denied"):
        client.decrypt(kms.encrypt(key, b"x"), recipient=build_recipient(document))


def test_generate_data_key_round_trip(
    client: KmsClient, kms: StandInKms, document: bytes, recipient_key_obj: RecipientKey
) -> None:
    key = kms.create_key(_attested_policy(PCR0=PCR0.hex()))
    recipient = build_recipient(document, recipient_key_obj)
    result = client.generate_data_key(key, recipient=recipient)
    data_key = recipient_key_obj.unwrap(result.ciphertext_for_recipient, expected_length=32)
    assert len(data_key) == 32
    assert result.ciphertext_blob is not None
    again = client.decrypt(result.ciphertext_blob, recipient=recipient)
    assert recipient_key_obj.unwrap(again.ciphertext_for_recipient, expected_length=32) == data_key


def test_generate_random_with_recipient(
    client: KmsClient, document: bytes, recipient_key_obj: RecipientKey
) -> None:
    result = client.generate_random(24, recipient=build_recipient(document))
    assert len(recipient_key_obj.unwrap(result.ciphertext_for_recipient)) == 24


def test_document_from_untrusted_root_is_refused(client: KmsClient, kms: StandInKms) -> None:
    """A document signed by another (emulated) PKI is not accepted as a Recipient."""
    rogue = NsmEmulator(pcrs={0: PCR0}, pki=EmulatedAwsPki.ephemeral())
    key = kms.create_key(_attested_policy(ImageSha384=PCR0.hex()))
    spki = RecipientKey.generate().public_key_der
    with pytest.raises(KmsError) as info:
        client.decrypt(
            kms.encrypt(key, b"x"), recipient=build_recipient(rogue.attest(public_key=spki))
        )
    assert info.value.code == "ValidationException"


def test_wrong_secret_is_refused(kms: StandInKms, client: KmsClient, document: bytes) -> None:
    """A request signed with another secret fails SigV4 checking at the stand-in."""
    bad = KmsClient(
        region="eu-west-1",
        credentials=AwsCredentials(CREDS.access_key_id, "not-the-secret"),
        endpoint=ENDPOINT,
        via=client._via,
    )
    with pytest.raises(KmsError, match="InvalidSignatureException"):
        bad.generate_random(8, recipient=build_recipient(document))


def test_stand_in_refuses_other_key_encryption_algorithm(kms: StandInKms, document: bytes) -> None:
    from enclavekit.kms.testing import KmsFault

    recipient = Recipient(document, "RSAES_OAEP_SHA_1").to_json()
    with pytest.raises(KmsFault, match=KEY_ENCRYPTION_ALGORITHM):
        kms.handle("GenerateRandom", {"NumberOfBytes": 8, "Recipient": recipient})


def test_build_recipient_refuses_document_without_rsa_key(emulator: NsmEmulator) -> None:
    ec_key = ec.generate_private_key(ec.SECP384R1()).public_key()
    spki = ec_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UsageError, match="RSA-2048"):
        build_recipient(emulator.attest(public_key=spki))
    with pytest.raises(UsageError, match="no public_key"):
        build_recipient(emulator.attest())


def test_build_recipient_refuses_other_key(
    document: bytes,
) -> None:
    with pytest.raises(UsageError, match="not this RecipientKey"):
        build_recipient(document, RecipientKey.generate())


def test_build_recipient_refuses_garbage() -> None:
    with pytest.raises(MalformedInput):
        build_recipient(b"\xa0")


def test_recipient_shapes(document: bytes) -> None:
    recipient = build_recipient(document)
    assert recipient.to_botocore() == {
        "AttestationDocument": document,
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    }
    assert base64.b64decode(recipient.to_json()["AttestationDocument"]) == document


def test_policy_parser_rejects_unknown_operator() -> None:
    with pytest.raises(ValueError, match="operator"):
        KeyPolicy.from_mapping(
            {"Statement": [{"Effect": "Allow", "Action": "kms:*", "Condition": {"ArnLike": {}}}]}
        )


def test_tls_runs_end_to_end_through_the_proxy(
    kms: StandInKms, document: bytes, recipient_key_obj: RecipientKey, tmp_path: Path
) -> None:
    """The proxy relays TLS opaquely; the client checks the KMS host name, not the proxy's."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    host = "kms.eu-west-1.amazonaws.com"
    tls_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(tls_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())

    with kms.serve(tls=server_ctx) as server:
        port = server.address.port
        proxy = VsockProxy(
            "127.0.0.1", port, allowlist=Allowlist((AllowlistEntry("127.0.0.1", port),))
        )
        listener = listen("tcp://127.0.0.1:0")
        proxy.start(listener)
        try:
            client = KmsClient(
                region="eu-west-1",
                credentials=CREDS,
                endpoint=f"https://{host}",
                via=local_address(listener),
                tls=client_ctx,
            )
            result = client.generate_random(16, recipient=build_recipient(document))
            assert len(recipient_key_obj.unwrap(result.ciphertext_for_recipient)) == 16
            wrong_name = KmsClient(
                region="eu-west-1",
                credentials=CREDS,
                endpoint="https://kms.us-east-1.amazonaws.com",
                via=local_address(listener),
                tls=client_ctx,
            )
            with pytest.raises(VerificationError, match="did not verify"):
                wrong_name.generate_random(16, recipient=build_recipient(document))
        finally:
            proxy.close()

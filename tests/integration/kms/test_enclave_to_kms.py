"""The whole enclave → KMS path over TCP stand-ins for vsock.

enclave app → Forwarder (enclave, tcp://127.0.0.1:X) → VsockProxy (parent; would listen on vsock) →
stand-in KMS (checks SigV4, verifies the emulated attestation document, evaluates the key policy) →
CiphertextForRecipient → unwrapped inside the "enclave" with the RSA key from the document.
"""

from __future__ import annotations

from enclavekit.attestation.verifier import Verifier
from enclavekit.kms.client import AwsCredentials, KmsClient
from enclavekit.kms.recipient import RecipientKey, build_recipient
from enclavekit.kms.testing import StandInKms
from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator
from enclavekit.transport.allowlist import Allowlist, AllowlistEntry
from enclavekit.transport.forwarder import Forwarder
from enclavekit.transport.proxy import VsockProxy
from enclavekit.transport.sockets import listen, local_address

PCR0 = bytes.fromhex("ab" * 48)


def test_enclave_reaches_kms_through_forwarder_and_proxy() -> None:
    emulator = NsmEmulator(pcrs={0: PCR0}, pki=EmulatedAwsPki.ephemeral())
    credentials = AwsCredentials("AKIAEXAMPLE", "example-secret")
    kms = StandInKms(verifier=Verifier([emulator.pki.root_certificate()]), credentials=credentials)
    key_arn = kms.create_key(
        {
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "kms:Decrypt",
                    "Condition": {
                        "StringEqualsIgnoreCase": {
                            "kms:RecipientAttestation:ImageSha384": PCR0.hex()
                        }
                    },
                }
            ]
        }
    )
    blob = kms.encrypt(key_arn, b"the enclave's secret")
    with kms.serve() as server:
        port = server.address.port
        proxy = VsockProxy(
            "127.0.0.1", port, allowlist=Allowlist((AllowlistEntry("127.0.0.1", port),))
        )
        parent_listener = listen("tcp://127.0.0.1:0")  # stands in for vsock://ANY:8000
        proxy.start(parent_listener)
        forwarder = Forwarder(local_address(parent_listener))  # stands in for vsock://3:8000
        enclave_listener = listen("tcp://127.0.0.1:0")
        forwarder.start(enclave_listener)
        try:
            # Inside the enclave: key pair, attestation with public_key, KMS call via the tunnel.
            key = RecipientKey.generate()
            with Nsm.in_process(emulator) as nsm:
                document = nsm.attestation(public_key=key.public_key_der)
            client = KmsClient(
                region="eu-west-1",
                credentials=credentials,
                endpoint="http://kms.eu-west-1.amazonaws.com",
                via=local_address(enclave_listener),
            )
            plaintext = client.decrypt_plaintext(
                blob, key=key, recipient=build_recipient(document, key)
            )
        finally:
            forwarder.close()
            proxy.close()
    assert plaintext == b"the enclave's secret"

"""enclavekit: trust code that runs in AWS Nitro Enclaves.

Subpackages, one job each:

- ``enclavekit.attestation``: decode attestation documents, verify them against pinned roots, apply policies.
- ``enclavekit.pki``: trust roots (the AWS Nitro root ships as package data).
- ``enclavekit.eif``: read, write, measure, sign and build Enclave Image Files.
- ``enclavekit.nsm``: the Nitro Secure Module client (real ``/dev/nsm``) and its emulator.
- ``enclavekit.atls``: attested TLS (certificate authority, enclave side, client side, sealed payloads).
- ``enclavekit.kms`` / ``enclavekit.transport``: KMS recipient envelopes; vsock and TCP transport and proxy.
- ``enclavekit.cli``: the ``enclavekit`` command.

Errors raised for untrusted input all derive from :class:`enclavekit.errors.Error`.
"""

__version__ = "0.1.0"

"""AWS KMS with Nitro Enclaves: the ``Recipient`` parameter and ``CiphertextForRecipient`` envelopes.

* :mod:`~enclavekit.kms.envelope` — decode and decrypt CMS EnvelopedData (BER or DER, both recipient
  identifier forms, RSA-OAEP-SHA-256, AES-256-CBC); :func:`~enclavekit.kms.envelope.encode_envelope`
  makes KMS-shaped envelopes for tests and stand-ins.
* :mod:`~enclavekit.kms.recipient` — :class:`~enclavekit.kms.recipient.RecipientKey` (the enclave's
  RSA-2048 key) and :func:`~enclavekit.kms.recipient.build_recipient`.
* :mod:`~enclavekit.kms.client` — Decrypt / GenerateDataKey / GenerateRandom with Recipient, signed with
  botocore (extra ``kms``), sent through any transport address (e.g. the vsock proxy).
"""

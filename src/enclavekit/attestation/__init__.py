"""Attestation documents: decode (``document``), verify against pinned roots (``verifier``), and decide
whether a verified document is acceptable (``policy``).

Typical use::

    from enclavekit.attestation import Verifier, policy

    verified = Verifier.aws().verify(raw, policy.AllOf([policy.NotDebug(), policy.PcrsEqual({0: pcr0})]))

Only :class:`~enclavekit.attestation.verifier.Verifier` creates a
:class:`~enclavekit.attestation.verifier.VerifiedAttestation`, and policies accept nothing else.
"""

from enclavekit.attestation.document import AttestationDocument
from enclavekit.attestation.verifier import VerifiedAttestation, Verifier

__all__ = ["AttestationDocument", "VerifiedAttestation", "Verifier"]

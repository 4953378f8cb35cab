"""The one exception hierarchy of enclavekit.

Every failure caused by *untrusted input* (a document, an EIF, an image, a request) raises a subclass of
:class:`Error`. Misuse of the API by the caller (wrong argument types, impossible combinations) raises the
built-in ``ValueError`` / ``TypeError`` instead, as python-tuf does.

Each message says what was expected, what was found and, where it helps, what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class Error(Exception):
    """Base class of every enclavekit error about untrusted input or the environment."""

    #: CLI exit code for this family (1: verification/policy failure, 2: usage or input error).
    exit_code: int = 2

    def diagnostics(self) -> str:
        """A human-readable, possibly multi-line explanation."""
        return str(self)


class MalformedInput(Error):
    """Input that cannot be decoded: bad CBOR, bad structure, truncated or oversized data."""

    exit_code = 2


class UsageError(Error):
    """The request cannot be carried out as asked (missing file, conflicting options, bad values)."""

    exit_code = 2


class VerificationError(Error):
    """A cryptographic check failed: signature, certificate chain, trust root, integrity (CRC, digest)."""

    exit_code = 1


class DocumentKindError(VerificationError):
    """The document is genuine in form but not the kind the caller verifies: its module id contradicts its
    PCR map, or (see :class:`NitroTpmDocumentError`) it comes from a NitroTPM, not an enclave."""

    exit_code = 1


class NitroTpmDocumentError(DocumentKindError):
    """A NitroTPM (EC2 instance) document where an enclave document is required.

    A NitroTPM's PCRs are extended and reset by the instance's operating system, so any EC2 user can make
    them equal an enclave's PCR values: they prove nothing about an enclave."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed policy check: which check, what it expected and what it found."""

    check: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.check}: expected {self.expected}, found {self.found}"


class PolicyViolation(Error):
    """A verified document does not satisfy the policy. Carries *every* failed check."""

    exit_code = 1

    def __init__(self, failures: Iterable[Failure]) -> None:
        self.failures: tuple[Failure, ...] = tuple(failures)
        if not self.failures:
            raise ValueError("PolicyViolation needs at least one failure")
        super().__init__(self.diagnostics())

    def diagnostics(self) -> str:
        lines = [f"policy not satisfied ({len(self.failures)} failed check(s)):"]
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


class NsmError(Error):
    """The NSM (real or emulated) answered with an error code, or could not be reached."""

    exit_code = 1

    def __init__(self, code: str, message: str | None = None) -> None:
        self.code = code
        super().__init__(message or f"NSM returned error {code}")


class EifError(Error):
    """An Enclave Image File is unreadable (exit 2) or fails an integrity check (see EifIntegrityError)."""

    exit_code = 2


class EifIntegrityError(EifError, VerificationError):
    """An EIF is readable but damaged or tampered with: CRC, section sizes, signature."""

    exit_code = 1

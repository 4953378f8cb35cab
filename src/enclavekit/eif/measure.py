"""PCR measurements exactly as nitro-cli computes them (spec ``eif.md`` §2).

Every PCR nitro-cli reports is one TPM-style extend of a zero register::

    PCRn = SHA384(48 zero bytes || SHA384(content))         # PCR0, PCR1, PCR2, PCR8, file PCR
    PCR3 = SHA384(48 zero bytes || utf8(IAM role ARN))      # no inner hash (AWS user guide)
    PCR4 = SHA384(48 zero bytes || utf8(instance id))       # no inner hash

Which EIF bytes feed which PCR (section *data* only, headers never):

- PCR0: kernel ‖ cmdline ‖ every ramdisk, in file order;
- PCR1: kernel ‖ cmdline ‖ the first ramdisk;
- PCR2: every ramdisk after the first (an EIF with one ramdisk has the hash of the empty string);
- PCR8: DER of the signing certificate (first certificate of the PEM stored in the signature
  section).

Metadata and signature sections are never measured. What is *not* checked here: whether the sections
make a bootable image (that is the reader's job, :mod:`enclavekit.eif.format`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from enclavekit.eif.format import SectionType
from enclavekit.errors import MalformedInput

_MEASURED = frozenset({SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK})

#: Size of a SHA-384 digest and hence of every PCR.
PCR_SIZE = 48
#: The register every measurement starts from.
ZERO_PCR = bytes(PCR_SIZE)

#: ``HashAlgorithm`` string of nitro-cli ≤ 1.4 (image-format ≤ 0.5, sha2 0.9 ``Debug``). The
#: default.
HASH_ALGORITHM_SHA384 = "Sha384 { ... }"
#: ``HashAlgorithm`` string nitro-cli 1.5.0 most likely prints (sha2 0.10 ``Debug``); unconfirmed
#: (§2.5).
HASH_ALGORITHM_SHA512_384 = "Sha512_384 { .. }"

#: Read size for streaming file measurements.
CHUNK_SIZE = 1 << 20


def extend(register: bytes, data: bytes) -> bytes:
    """One TPM-style extend: ``SHA384(register || data)``. ``data`` is used as given (no inner
    hash)."""
    if len(register) != PCR_SIZE:
        raise ValueError(f"a PCR register is {PCR_SIZE} bytes, got {len(register)}")
    return hashlib.sha384(register + data).digest()


class PcrHasher:
    """A streaming SHA-384 whose result is extended once into a zero register (nitro-cli's EifHasher
    in pass-through mode). :meth:`copy` lets PCR0 and PCR1 share the hashing of their common
    prefix."""

    __slots__ = ("_sha",)

    def __init__(self, _sha: Any = None) -> None:
        self._sha = hashlib.sha384() if _sha is None else _sha

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._sha.update(data)

    def copy(self) -> PcrHasher:
        return PcrHasher(self._sha.copy())

    def pcr(self) -> bytes:
        """The PCR value of everything fed so far (the hasher can still be fed afterwards)."""
        return extend(ZERO_PCR, self._sha.digest())


def pcr_of_bytes(data: bytes) -> bytes:
    """The generic PCR of some content: ``SHA384(0^48 || SHA384(data))``."""
    return extend(ZERO_PCR, hashlib.sha384(data).digest())


def pcr_of_stream(stream: BinaryIO | Iterable[bytes]) -> bytes:
    """The generic PCR of a binary stream (read to EOF) or an iterable of byte chunks."""
    hasher = PcrHasher()
    if hasattr(stream, "read"):
        reader: Any = stream
        while chunk := reader.read(CHUNK_SIZE):
            hasher.update(chunk)
    else:
        for chunk in stream:
            hasher.update(chunk)
    return hasher.pcr()


def pcr_of_file(path: str | os.PathLike[str]) -> bytes:
    """``nitro-cli pcr --input FILE``: the generic PCR of a file's bytes, read in a streaming
    fashion."""
    with open(path, "rb") as stream:
        return pcr_of_stream(stream)


def pcr3_of_iam_role(role_arn: str) -> bytes:
    """PCR3 the hypervisor records for the parent instance's IAM role ARN (raw string, no inner
    hash)."""
    return extend(ZERO_PCR, role_arn.encode("utf-8"))


def pcr4_of_instance_id(instance_id: str) -> bytes:
    """PCR4 the hypervisor records for the parent instance id, e.g. ``i-1234567890abcdef0`` (no
    inner hash)."""
    return extend(ZERO_PCR, instance_id.encode("utf-8"))


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse a signing certificate the way nitro-cli does: the first certificate of a PEM file.

    DER input is accepted too (nitro-cli itself only accepts PEM). Raises :class:`MalformedInput`.
    """
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
            return certs[0]
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise MalformedInput(
            f"expected a PEM (or DER) X.509 certificate, found unparseable data ({exc}); "
            "pass the signing certificate file given to sign-eif/build-enclave"
        ) from exc


def pcr8_of_certificate(certificate: bytes | x509.Certificate) -> bytes:
    """PCR8: the extend of the SHA-384 fingerprint of the signing certificate's DER.

    ``certificate`` is a PEM file's bytes (first certificate used), DER bytes or a parsed
    certificate.
    """
    cert = (
        certificate if isinstance(certificate, x509.Certificate) else load_certificate(certificate)
    )
    return extend(ZERO_PCR, cert.fingerprint(hashes.SHA384()))


@dataclass(frozen=True, slots=True)
class Measurements:
    """The PCRs of an EIF as nitro-cli reports them. ``pcr8`` is ``None`` for an unsigned image."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None
    hash_algorithm: str = HASH_ALGORITHM_SHA384

    def __post_init__(self) -> None:
        for name in ("pcr0", "pcr1", "pcr2", "pcr8"):
            value = getattr(self, name)
            if value is not None and len(value) != PCR_SIZE:
                raise ValueError(f"{name} must be {PCR_SIZE} bytes, got {len(value)}")

    @property
    def pcrs(self) -> dict[int, bytes]:
        """``{index: value}`` of the PCRs this image determines (0, 1, 2 and 8 when signed)."""
        out = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            out[8] = self.pcr8
        return out

    def to_json(self) -> dict[str, str]:
        """nitro-cli's ``Measurements`` object: ``HashAlgorithm``, ``PCR0``, ``PCR1``, ``PCR2`` [,
        ``PCR8``]."""
        out = {"HashAlgorithm": self.hash_algorithm}
        out.update({f"PCR{i}": value.hex() for i, value in self.pcrs.items()})
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Measurements:
        """Parse nitro-cli's ``Measurements`` object (as printed by build-enclave/describe-eif)."""
        try:
            values = {i: _pcr_from_hex(obj, f"PCR{i}") for i in (0, 1, 2, 8) if f"PCR{i}" in obj}
            algorithm = obj.get("HashAlgorithm", HASH_ALGORITHM_SHA384)
            if not isinstance(algorithm, str):
                raise MalformedInput("HashAlgorithm must be a string")
            return cls(values[0], values[1], values[2], values.get(8), algorithm)
        except KeyError as exc:
            raise MalformedInput(f"Measurements lacks PCR{exc.args[0]}") from exc


def _pcr_from_hex(obj: Mapping[str, Any], key: str) -> bytes:
    value = obj[key]
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != PCR_SIZE:
        raise MalformedInput(f"{key}: expected {PCR_SIZE * 2} hex digits, found {value!r}")
    return raw


class SectionMeasurer:
    """Feeds EIF section data, in file order, into the PCR0/PCR1/PCR2 hashers.

    Kernel and cmdline bytes go to PCR0 and PCR1; ramdisk 0 to PCR0 and PCR1; later ramdisks to PCR0
    and PCR2. PCR0 and PCR1 share one SHA-384 state until the first ramdisk ends (then it is
    copied). Call :meth:`begin_section` before each section's data, :meth:`update` with its data,
    then :meth:`result`.
    """

    __slots__ = ("_current", "_pcr0", "_pcr1", "_pcr1_done", "_pcr2", "_ramdisks")

    def __init__(self) -> None:
        self._pcr0 = PcrHasher()
        self._pcr1: PcrHasher | None = None  # frozen copy of _pcr0 once ramdisk 0 is over
        self._pcr2 = PcrHasher()
        self._ramdisks = 0
        self._current = 0
        self._pcr1_done = False

    @property
    def ramdisk_index(self) -> int:
        """Index of the current ramdisk (-1 before the first)."""
        return self._ramdisks - 1

    def begin_section(self, section_type: int) -> None:
        self._finish_ramdisk0()
        self._current = section_type
        if section_type == SectionType.RAMDISK:
            self._ramdisks += 1

    def _finish_ramdisk0(self) -> None:
        if self._ramdisks == 1 and not self._pcr1_done and self._current == SectionType.RAMDISK:
            self._pcr1 = self._pcr0.copy()
            self._pcr1_done = True

    def feeds_pcr2(self) -> bool:
        """Whether the current section's data goes to PCR2 (a ramdisk after the first)."""
        return self._current == SectionType.RAMDISK and self._ramdisks > 1

    def measured(self) -> bool:
        """Whether the current section's data is measured at all (kernel, cmdline, ramdisk)."""
        return self._current in _MEASURED

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed data of the current section (sections that are not measured are ignored)."""
        if self._current in _MEASURED:
            if self._pcr1_done and self._current != SectionType.RAMDISK:
                # kernel/cmdline after the first ramdisk: PCR1 still covers it (reader semantics).
                assert self._pcr1 is not None
                self._pcr1.update(data)
            self._pcr0.update(data)
            if self.feeds_pcr2():
                self._pcr2.update(data)

    def update_pcr0_only(self, data: bytes | bytearray | memoryview) -> None:
        """Parallel path: feed PCR0 (and PCR1 when due) only; the caller feeds
        :meth:`pcr2_hasher`."""
        if self._pcr1_done and self._current != SectionType.RAMDISK:
            assert self._pcr1 is not None
            self._pcr1.update(data)
        self._pcr0.update(data)

    def pcr2_hasher(self) -> PcrHasher:
        return self._pcr2

    def result(
        self, pcr8: bytes | None = None, hash_algorithm: str = HASH_ALGORITHM_SHA384
    ) -> Measurements:
        self._finish_ramdisk0()
        pcr1 = self._pcr1 if self._pcr1 is not None else self._pcr0
        return Measurements(self._pcr0.pcr(), pcr1.pcr(), self._pcr2.pcr(), pcr8, hash_algorithm)

"""Reading EIFs: structure checked at open, data streamed in one pass (spec ``eif.md`` §1.7, §2).

:meth:`Eif.open` reads only the header and the section headers and refuses any file whose layout is
not what *both* upstream readers expect: the sections must be contiguous from byte 548 (nitro-cli
walks them sequentially), the header's offset/size tables must agree with them (QEMU seeks by the
table), and the file must end where the last section ends. :meth:`Eif.verify` then makes one
sequential pass that computes the CRC, PCR0/1/2 (PCR0 and PCR1 share one hash state; PCR2 is hashed
on a second thread) and keeps the small metadata and signature sections, and finally checks the
signature.

Errors: :class:`~enclavekit.errors.EifError` (exit 2) when the input is not a readable EIF (too
short for a header, wrong magic, unsupported version, unknown section type);
:class:`~enclavekit.errors.EifIntegrityError` (exit 1) when it is an EIF but damaged: truncated,
trailing bytes, offset/size tables disagreeing with the sections, non-zero section flags, wrong
section counts, oversized signature/metadata, bad CRC (from :func:`measure_eif`), bad signature.

Not checked: that kernel/ramdisks are loadable (bzImage/cpio contents), the signing certificate's
validity period or chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from enclavekit.eif._pass import read_exact, read_pass
from enclavekit.eif.format import (
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    SIGNATURE_MAX_SIZE,
    EifHeader,
    SectionHeader,
    SectionType,
    section_type_of,
)
from enclavekit.eif.measure import (
    HASH_ALGORITHM_SHA384,
    Measurements,
    SectionMeasurer,
)
from enclavekit.eif.metadata import METADATA_MAX_SIZE, IdentityInfo
from enclavekit.eif.sign import SignatureInfo, check_signature_section
from enclavekit.errors import EifError, EifIntegrityError, MalformedInput

#: Read size of :meth:`Eif.iter_section`.
CHUNK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Section:
    """One section as found in the file: index in file order, type, flags, header offset, data
    size."""

    index: int
    section_type: SectionType
    flags: int
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.data_offset + self.size


@dataclass(frozen=True, slots=True)
class EifReport:
    """The result of one verifying pass over an EIF."""

    header: EifHeader
    sections: tuple[Section, ...]
    measurements: Measurements
    computed_crc: int
    signature: SignatureInfo | None
    metadata: IdentityInfo | None

    @property
    def crc_ok(self) -> bool:
        return self.computed_crc == self.header.crc32

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    def problems(self) -> tuple[str, ...]:
        """Integrity findings that describe-eif reports as ``false`` fields (empty when all is
        well)."""
        out = []
        if not self.crc_ok:
            out.append(
                f"CRC mismatch: the header says {self.header.crc32:#010x}, the content gives "
                f"{self.computed_crc:#010x}; the file was altered or damaged after it was written"
            )
        if self.signature is not None and not self.signature.signature_check:
            out.append(
                "the signature is valid but signs a PCR0 other than this image's; the image was "
                "changed "
                "after signing - re-sign it with sign-eif"
            )
        return tuple(out)


class Eif:
    """An open EIF whose layout has been checked. Use as a context manager; see :meth:`open`."""

    def __init__(
        self,
        path: Path,
        stream: BinaryIO,
        header: EifHeader,
        sections: tuple[Section, ...],
        size: int,
    ) -> None:
        self.path = path
        self._stream = stream
        self.header = header
        self.sections = sections
        self.file_size = size

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Eif:
        """Open ``path`` and check its layout (see the module docstring). Reads only headers."""
        target = Path(path)
        try:
            stream = open(target, "rb", buffering=0)  # noqa: SIM115 - closed by close()/__exit__
        except OSError as exc:
            raise EifError(f"cannot open the EIF {target}: {exc.strerror}") from exc
        try:
            size = os.fstat(stream.fileno()).st_size
            header, sections = _parse_layout(stream, size)
        except BaseException:
            stream.close()
            raise
        return cls(target, stream, header, sections, size)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Eif:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- access ------------------------------------------------------------------------------------

    def sections_of(self, section_type: SectionType) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.section_type == section_type)

    def iter_section(self, section: Section, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream one section's data."""
        self._stream.seek(section.data_offset)
        remaining = section.size
        while remaining:
            chunk = self._stream.read(min(chunk_size, remaining))
            if not chunk:
                raise EifIntegrityError(
                    f"{self.path}: section {section.index} ends early (the file shrank while "
                    "reading)"
                )
            remaining -= len(chunk)
            yield chunk

    def read_section(self, section: Section, limit: int = METADATA_MAX_SIZE) -> bytes:
        """One section's data in memory; refuses sections larger than ``limit``."""
        if section.size > limit:
            raise EifIntegrityError(
                f"section {section.index} ({section.section_type.name.lower()}) is {section.size} "
                "bytes; "
                f"at most {limit} are read into memory"
            )
        return b"".join(self.iter_section(section))

    # -- the verifying pass ------------------------------------------------------------------------

    def verify(
        self,
        *,
        parallel: bool = True,
        hash_algorithm: str = HASH_ALGORITHM_SHA384,
        check_signature: bool = True,
        progress: Callable[[int], None] | None = None,
        consume: Callable[[Section, memoryview], None] | None = None,
    ) -> EifReport:
        """One sequential pass: CRC, PCR0/1/2, metadata and signature; then the signature check.

        ``consume(section, chunk)``, when given, receives the data of the kernel, cmdline and
        ramdisk sections in file order as the pass reads it (each view is valid only during the
        call), so a caller can use the very bytes that were measured without reading them twice.
        Those bytes are unverified until this method has returned a report without
        :meth:`~EifReport.problems` (and has not raised).

        An invalid COSE signature or an unparseable signature section raises
        :class:`EifIntegrityError`; a CRC mismatch or a signature over another PCR0 is reported in
        the result (see :meth:`EifReport.problems`). Malformed metadata raises :class:`EifError`.
        """
        stream = self._stream
        stream.seek(0)
        head = read_exact(stream, HEADER_SIZE, "the header")
        measurer = SectionMeasurer()
        crc, kept = read_pass(
            stream,
            head,
            self.sections,
            measurer,
            parallel=parallel,
            progress=progress,
            consume=consume,
        )
        if progress is not None:
            progress(self.file_size)
        unsigned = measurer.result(hash_algorithm=hash_algorithm)
        signature = None
        signatures = self.sections_of(SectionType.SIGNATURE)
        if signatures and check_signature:
            blob = b"".join(kept[s.index] for s in signatures[:1])
            try:
                signature = check_signature_section(blob, unsigned.pcr0)
            except EifIntegrityError:
                raise
            except (EifError, MalformedInput) as exc:
                raise EifIntegrityError(f"{self.path}: {exc}") from exc
        metadata = None
        metas = self.sections_of(SectionType.METADATA)
        if metas:
            try:
                metadata = IdentityInfo.from_bytes(kept[metas[0].index])
            except MalformedInput as exc:
                raise EifError(f"{self.path}: {exc}") from exc
        measurements = Measurements(
            unsigned.pcr0,
            unsigned.pcr1,
            unsigned.pcr2,
            signature.pcr8 if signature else None,
            hash_algorithm,
        )
        return EifReport(self.header, self.sections, measurements, crc, signature, metadata)


def _parse_layout(stream: BinaryIO, size: int) -> tuple[EifHeader, tuple[Section, ...]]:
    """Read the header and walk the sections the way nitro-cli does, cross-checking the offset
    table."""
    head = stream.read(HEADER_SIZE)
    header = EifHeader.unpack(head)  # EifError: too short, bad magic, bad version
    count = header.num_sections
    if not 1 <= count <= MAX_NUM_SECTIONS:
        raise EifIntegrityError(
            f"the header claims {count} sections; an EIF has 1..{MAX_NUM_SECTIONS}"
        )
    sections: list[Section] = []
    position = HEADER_SIZE
    while position < size:
        index = len(sections)
        if index >= count:
            raise EifIntegrityError(
                f"{size - position} byte(s) after the {count} sections the header lists; the file "
                "has "
                "trailing data or a wrong section count"
            )
        stream.seek(position)
        raw = stream.read(SECTION_HEADER_SIZE)
        if len(raw) != SECTION_HEADER_SIZE:
            raise EifIntegrityError(
                f"section {index} header at offset {position} is cut off: the file ends after "
                f"{len(raw)} of its {SECTION_HEADER_SIZE} bytes (truncated file)"
            )
        sh = SectionHeader.unpack(raw)
        section_type = section_type_of(sh.section_type)
        if sh.flags != 0:
            raise EifIntegrityError(
                f"section {index} has flags {sh.flags:#06x}; reserved flags are 0"
            )
        end = position + SECTION_HEADER_SIZE + sh.size
        if end > size:
            raise EifIntegrityError(
                f"section {index} ({section_type.name.lower()}) claims {sh.size} data bytes but "
                "the "
                f"file ends after {size - position - SECTION_HEADER_SIZE} (truncated file)"
            )
        if header.section_offsets[index] != position:
            raise EifIntegrityError(
                f"section {index}: the header's offset table says {header.section_offsets[index]}, "
                f"the section is at {position}"
            )
        if header.section_sizes[index] != sh.size:
            raise EifIntegrityError(
                f"section {index}: the header's size table says {header.section_sizes[index]} "
                "bytes, "
                f"the section header says {sh.size}"
            )
        sections.append(Section(index, section_type, sh.flags, position, sh.size))
        position = end
    if len(sections) != count:
        raise EifIntegrityError(
            f"the header lists {count} sections, the file holds {len(sections)} (truncated file)"
        )
    if any(header.section_offsets[count:]) or any(header.section_sizes[count:]):
        raise EifIntegrityError("unused entries of the header's offset/size tables are not zero")
    _check_section_set(header, tuple(sections))
    return header, tuple(sections)


def _check_section_set(header: EifHeader, sections: tuple[Section, ...]) -> None:
    counts = {t: sum(1 for s in sections if s.section_type == t) for t in SectionType}
    if counts[SectionType.KERNEL] != 1 or counts[SectionType.CMDLINE] != 1:
        raise EifIntegrityError(
            f"an EIF has exactly one kernel and one cmdline section, found "
            f"{counts[SectionType.KERNEL]} and {counts[SectionType.CMDLINE]}"
        )
    if counts[SectionType.RAMDISK] < 1:
        raise EifIntegrityError("an EIF has at least one ramdisk section, found none")
    if counts[SectionType.SIGNATURE] and header.version < 3:
        raise EifIntegrityError(f"a version {header.version} EIF cannot hold a signature section")
    if counts[SectionType.SIGNATURE] > 1:
        raise EifIntegrityError(
            f"found {counts[SectionType.SIGNATURE]} signature sections; nitro-cli writes one"
        )
    if counts[SectionType.METADATA] > 1 or (counts[SectionType.METADATA] and header.version < 4):
        raise EifIntegrityError(
            f"found {counts[SectionType.METADATA]} metadata section(s) in a version "
            f"{header.version} "
            "EIF; version 4 has one, earlier versions none"
        )
    for s in sections:
        if s.section_type == SectionType.SIGNATURE and s.size > SIGNATURE_MAX_SIZE:
            raise EifIntegrityError(
                f"the signature section is {s.size} bytes, more than the {SIGNATURE_MAX_SIZE} EIFs "
                "allow"
            )
        if s.section_type == SectionType.METADATA and s.size > METADATA_MAX_SIZE:
            raise EifIntegrityError(
                f"the metadata section is {s.size} bytes; at most {METADATA_MAX_SIZE} are accepted"
            )


def measure_eif(
    path: str | os.PathLike[str], *, hash_algorithm: str = HASH_ALGORITHM_SHA384
) -> Measurements:
    """The PCRs of an EIF after a full integrity check (layout, CRC, signature).

    Raises :class:`EifIntegrityError` on a CRC mismatch or a signature that does not cover this
    image.
    """
    with Eif.open(path) as eif:
        report = eif.verify(hash_algorithm=hash_algorithm)
    problems = report.problems()
    if problems:
        raise EifIntegrityError(f"{path}: " + "; ".join(problems))
    return report.measurements

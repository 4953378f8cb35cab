"""The EIF container: header, section headers, section types and the CRC-32 (spec ``eif.md`` §1).

Layout: a 548-byte big-endian :class:`EifHeader`, then every section as a 12-byte
:class:`SectionHeader` followed by its data, contiguous, no padding. The header's offset table
(``section_offsets``) points at each section *header*; ``section_sizes`` holds each section's *data*
size. The CRC-32 (zlib's) covers the first 544 header bytes, then every section header and its data
in file order.

This module only packs and unpacks; reading whole files is :mod:`enclavekit.eif.reader`, writing
them is :mod:`enclavekit.eif.writer`.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

from enclavekit.errors import EifError

#: ASCII ``.eif``.
MAGIC = b".eif"
#: Version nitro-cli ≥ 1.2 writes (metadata section mandatory).
CURRENT_VERSION = 4
#: Versions this package reads (0 and 1 were internal; > 4 is undefined).
SUPPORTED_VERSIONS = frozenset({2, 3, 4})
#: Fixed size of the two offset/size tables in the header.
MAX_NUM_SECTIONS = 32
#: Header flag bit 0: the image is for aarch64 (clear: x86_64).
FLAG_ARCH_ARM64 = 0x1
#: Defaults nitro-cli hard-codes in the header (unused by the hypervisor).
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2
#: Per the EIF README: the largest signature section nitro-cli accepts.
SIGNATURE_MAX_SIZE = 32768

HEADER_STRUCT = struct.Struct(">4sHHQQHH32Q32QII")
SECTION_HEADER_STRUCT = struct.Struct(">HHQ")
HEADER_SIZE = HEADER_STRUCT.size  # 548
SECTION_HEADER_SIZE = SECTION_HEADER_STRUCT.size  # 12
#: The CRC covers the header up to (not including) the trailing crc32 field.
HEADER_CRC_SPAN = HEADER_SIZE - 4

assert HEADER_SIZE == 548
assert SECTION_HEADER_SIZE == 12


class SectionType(enum.IntEnum):
    """EIF section types. 0 is invalid; values ≥ 6 are undefined."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """The 12-byte header in front of each section's data."""

    section_type: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return SECTION_HEADER_STRUCT.pack(self.section_type, self.flags, self.size)

    @classmethod
    def unpack(cls, raw: bytes) -> SectionHeader:
        """Unpack 12 bytes. The type is *not* validated here (see :func:`section_type_of`)."""
        if len(raw) != SECTION_HEADER_SIZE:
            raise EifError(
                f"expected a {SECTION_HEADER_SIZE}-byte section header, found {len(raw)} byte(s)"
            )
        section_type, flags, size = SECTION_HEADER_STRUCT.unpack(raw)
        return cls(section_type, flags, size)


def section_type_of(value: int) -> SectionType:
    """Map a raw section type to :class:`SectionType`, refusing 0 and unknown values like
    nitro-cli."""
    if value == SectionType.INVALID:
        raise EifError("found an invalid EIF section (type 0); the file is damaged or not an EIF")
    try:
        return SectionType(value)
    except ValueError:
        raise EifError(
            f"unknown EIF section type {value} (known: 1..5); the file is damaged or was written "
            "by a newer tool than enclavekit understands"
        ) from None


@dataclass(frozen=True, slots=True)
class EifHeader:
    """The 548-byte EIF header. Offsets point at section headers, sizes are data sizes."""

    version: int
    flags: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    crc32: int = 0
    default_mem: int = DEFAULT_MEM
    default_cpus: int = DEFAULT_CPUS
    reserved: int = 0
    unused: int = 0
    magic: bytes = field(default=MAGIC)

    def __post_init__(self) -> None:
        # Tables always hold all 32 entries, so headers compare equal however they were built.
        object.__setattr__(self, "section_offsets", _pad_table(tuple(self.section_offsets)))
        object.__setattr__(self, "section_sizes", _pad_table(tuple(self.section_sizes)))

    def pack(self) -> bytes:
        offsets = self.section_offsets
        sizes = self.section_sizes
        return HEADER_STRUCT.pack(
            self.magic,
            self.version,
            self.flags,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.num_sections,
            *offsets,
            *sizes,
            self.unused,
            self.crc32,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> EifHeader:
        """Unpack and check magic and version. The tables are kept in full (all 32 entries)."""
        if len(raw) != HEADER_SIZE:
            raise EifError(
                f"expected an EIF header of {HEADER_SIZE} bytes, found only {len(raw)}; "
                "the file is truncated or not an EIF"
            )
        fields = HEADER_STRUCT.unpack(raw)
        magic, version, flags, default_mem, default_cpus, reserved, num_sections = fields[:7]
        offsets = tuple(fields[7 : 7 + MAX_NUM_SECTIONS])
        sizes = tuple(fields[7 + MAX_NUM_SECTIONS : 7 + 2 * MAX_NUM_SECTIONS])
        unused, crc = fields[-2:]
        if magic != MAGIC:
            raise EifError(
                f"expected the EIF magic {MAGIC!r}, found {magic!r}; this is not an Enclave Image "
                "File"
            )
        if version not in SUPPORTED_VERSIONS:
            raise EifError(
                f"unsupported EIF version {version} (supported: 2, 3, 4); "
                "the file is damaged or needs a newer tool"
            )
        return cls(
            version=version,
            flags=flags,
            num_sections=num_sections,
            section_offsets=offsets,
            section_sizes=sizes,
            crc32=crc,
            default_mem=default_mem,
            default_cpus=default_cpus,
            reserved=reserved,
            unused=unused,
            magic=magic,
        )

    @property
    def is_arm64(self) -> bool:
        return bool(self.flags & FLAG_ARCH_ARM64)

    def with_crc(self, crc: int) -> EifHeader:
        return EifHeader(
            self.version,
            self.flags,
            self.num_sections,
            self.section_offsets,
            self.section_sizes,
            crc,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.unused,
            self.magic,
        )


def _pad_table(values: tuple[int, ...]) -> tuple[int, ...]:
    if len(values) > MAX_NUM_SECTIONS:
        raise ValueError(
            f"at most {MAX_NUM_SECTIONS} sections fit in an EIF header, got {len(values)}"
        )
    return tuple(values) + (0,) * (MAX_NUM_SECTIONS - len(values))


# --- CRC-32 ---------------------------------------------------------------------------------------
# zlib.crc32 is the function EIFs use (CRC-32/ISO-HDLC). Python's zlib lacks crc32_combine, which
# the streaming writer needs (the header comes first in the CRC but is known last) and which lets
# the reader split the CRC work between threads. Below: multiplication modulo the CRC polynomial in
# its reflected representation (the method of zlib ≥ 1.2.12).

_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a·b modulo the CRC polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> tuple[int, ...]:
    table = [1 << 30]  # x^1
    for _ in range(1, 64):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


_X2N = _x2n_table()


def crc32_shift_operator(length: int) -> int:
    """x^(8·length) mod p: multiply a CRC by this (:func:`crc32_apply`) to append ``length`` zero
    bytes."""
    p = 1 << 31  # x^0
    n = 3  # 2^3 bits per byte
    k = length
    while k:
        if k & 1:
            p = _multmodp(_X2N[n & 63], p)
        k >>= 1
        n += 1
    return p


def crc32_apply(operator: int, crc: int) -> int:
    return _multmodp(operator, crc)


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC-32 of ``A || B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    return _multmodp(crc32_shift_operator(length_b), crc_a) ^ crc_b


def header_crc(header_bytes: bytes) -> int:
    """CRC-32 of the CRC-covered part of a packed header (its first 544 bytes)."""
    return zlib.crc32(header_bytes[:HEADER_CRC_SPAN])

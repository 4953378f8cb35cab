"""Writing EIFs: streamed, measured while written, atomic (spec ``eif.md`` §1.4).

:func:`write_eif` writes what nitro-cli's ``EifBuilder`` writes: header, kernel, cmdline, metadata,
every ramdisk, then the signature when a signer is given. Sections are contiguous **and** the
header's offset table is correct, so both nitro-cli's sequential reader and QEMU's offset-table
reader accept the file. Section data may be bytes, a path, a binary stream or an iterable of byte
chunks; nothing is held in memory whole. PCR0/1/2 (and PCR8) are computed while writing and
returned.

:class:`EifWriter` is the low-level part: sections in any order the caller chooses (for tests and
``sign-eif``), written to a seekable binary stream.
"""

from __future__ import annotations

import os
import secrets
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

from enclavekit.eif.format import (
    CURRENT_VERSION,
    DEFAULT_CPUS,
    DEFAULT_MEM,
    FLAG_ARCH_ARM64,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    EifHeader,
    SectionHeader,
    SectionType,
    crc32_combine,
    header_crc,
)
from enclavekit.eif.measure import (
    HASH_ALGORITHM_SHA384,
    Measurements,
    SectionMeasurer,
)
from enclavekit.eif.metadata import IdentityInfo
from enclavekit.eif.sign import EifSigner

#: Anything a section's data can come from. A ``str``/``PathLike`` is a *file path*.
SectionData = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO | Iterable[bytes]
#: Called with the number of section bytes written so far.
ProgressCallback = Callable[[int], None]

Arch = Literal["x86_64", "aarch64"]

_CHUNK = 1 << 20
#: Chunks at least this large are hashed for PCR2 on a second thread.
_PARALLEL_MIN = 1 << 16


def _chunks(data: SectionData) -> Iterator[bytes | bytearray | memoryview]:
    """Yield the data of one section in chunks, whatever form it was given in."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]
    elif isinstance(data, str | os.PathLike):
        with open(data, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                yield chunk
    elif hasattr(data, "read"):
        reader: Any = data
        while chunk := reader.read(_CHUNK):
            yield chunk
    else:
        for chunk in data:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"section data chunks must be bytes, got {type(chunk).__name__}")
            yield chunk


#: Chunks handed to the workers and not yet collected (bounds the memory held: 1 MiB each).
_IN_FLIGHT = 8


#: A pipelined chunk: its PCR0 and PCR2 updates, its write (which gives its CRC-32), its length.
_Pipelined = tuple[Future[None], Future[None], Future[int], int]


def _write_and_crc(stream: BinaryIO | IO[bytes], chunk: bytes) -> int:
    stream.write(chunk)
    return zlib.crc32(chunk)


class EifWriter:
    """Writes an EIF to a seekable binary stream, one section at a time, in the order they are
    added.

    The header is written as a placeholder first and rewritten (sizes, offsets, CRC) by
    :meth:`finish`. Section data is measured on the way (see :class:`SectionMeasurer`). Not checked:
    that the sections make a bootable image (write_eif enforces nitro-cli's layout).
    """

    def __init__(
        self,
        stream: BinaryIO | IO[bytes],
        *,
        version: int = CURRENT_VERSION,
        flags: int = 0,
        progress: ProgressCallback | None = None,
        default_mem: int = DEFAULT_MEM,
        default_cpus: int = DEFAULT_CPUS,
        parallel: bool = True,
    ) -> None:
        self._stream = stream
        self._parallel = parallel
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._default_mem = default_mem
        self._default_cpus = default_cpus
        self._version = version
        self._flags = flags
        self._progress = progress
        self._start = stream.tell()
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        self._crc = 0  # CRC-32 of every section header + data written so far
        self._crc_len = 0
        self._written = 0
        self.measurer = SectionMeasurer()
        stream.write(bytes(HEADER_SIZE))
        self._pos = HEADER_SIZE

    def add_section(self, section_type: int, data: SectionData, *, flags: int = 0) -> int:
        """Append one section; returns its data size. ``section_type`` may be any u16 (tests write
        bad ones)."""
        if len(self._offsets) >= MAX_NUM_SECTIONS:
            raise ValueError(f"an EIF holds at most {MAX_NUM_SECTIONS} sections")
        header_pos = self._pos
        self._stream.write(bytes(SECTION_HEADER_SIZE))  # patched once the size is known
        self.measurer.begin_section(section_type)
        crc = 0
        size = 0
        pcr2 = self.measurer.pcr2_hasher() if self.measurer.feeds_pcr2() else None
        # Big chunks of a PCR2 section are pipelined: this thread only produces them; one worker thread
        # hashes PCR0 (and PCR1), one PCR2, one writes them out and takes their CRC. Each worker takes
        # its chunks in order, so every hash and the file stay sequential; up to _IN_FLIGHT chunks are in
        # the pipe. No thread carries more than one SHA-384 stream, so with four CPUs the build runs at
        # about the speed of a single SHA-384 (with two, the CPUs are the limit).
        pending: deque[_Pipelined] = deque()
        for chunk in _chunks(data):
            if pcr2 is not None and self._parallel and len(chunk) >= _PARALLEL_MIN:
                if not isinstance(chunk, bytes):
                    # The producer may reuse its buffer; the workers read it later.
                    chunk = bytes(chunk)
                pending.append(
                    (
                        self._worker("pcr0").submit(self.measurer.update_pcr0_only, chunk),
                        self._worker("pcr2").submit(pcr2.update, chunk),
                        self._worker("write").submit(_write_and_crc, self._stream, chunk),
                        len(chunk),
                    )
                )
                while len(pending) > _IN_FLIGHT:
                    crc = self._collect(pending, crc)
            else:
                # This thread is about to feed PCR2 and write: let the workers finish first.
                while pending:
                    crc = self._collect(pending, crc)
                self._stream.write(chunk)
                self.measurer.update(chunk)
                crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            self._written += len(chunk)
            if self._progress is not None:
                self._progress(self._written)
        while pending:
            crc = self._collect(pending, crc)
        header = SectionHeader(section_type, flags, size).pack()
        end = self._stream.tell()
        self._stream.seek(self._start + header_pos)
        self._stream.write(header)
        self._stream.seek(end)
        section_crc = crc32_combine(zlib.crc32(header), crc, size)
        self._crc = crc32_combine(self._crc, section_crc, SECTION_HEADER_SIZE + size)
        self._crc_len += SECTION_HEADER_SIZE + size
        self._offsets.append(header_pos)
        self._sizes.append(size)
        self._pos = header_pos + SECTION_HEADER_SIZE + size
        return size

    @staticmethod
    def _collect(pending: deque[_Pipelined], crc: int) -> int:
        """Wait for the oldest pipelined chunk (raising what any worker raised); the running CRC."""
        pcr0, pcr2, written, length = pending.popleft()
        pcr0.result()
        pcr2.result()
        return crc32_combine(crc, written.result(), length)

    def _worker(self, job: str) -> ThreadPoolExecutor:
        """The one thread that does ``job`` for every pipelined chunk, in order."""
        pool = self._pools.get(job)
        if pool is None:
            pool = self._pools[job] = ThreadPoolExecutor(1, thread_name_prefix=f"eif-{job}")
        return pool

    def close(self) -> None:
        """Stop the worker threads (idempotent; :meth:`finish` calls it)."""
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()

    def finish(self) -> EifHeader:
        """Write the final header (offset table, sizes, CRC) and return it."""
        self.close()
        header = EifHeader(
            version=self._version,
            flags=self._flags,
            num_sections=len(self._offsets),
            section_offsets=tuple(self._offsets),
            section_sizes=tuple(self._sizes),
            default_mem=self._default_mem,
            default_cpus=self._default_cpus,
        )
        crc = crc32_combine(header_crc(header.pack()), self._crc, self._crc_len)
        header = header.with_crc(crc)
        end = self._stream.tell()
        self._stream.seek(self._start)
        self._stream.write(header.pack())
        self._stream.seek(end)
        return header


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[BinaryIO]:
    """A temp file beside ``path`` that replaces ``path`` only if the block completes.

    Readers never see a partial file (the rename is atomic). ``durable=True`` also fsyncs before the
    rename, so the new content survives a power loss; that costs about a quarter of a large build's time,
    and an EIF can be rebuilt, so it is off by default.
    """
    target = Path(path)
    # The name is chosen before the file exists and the file is created inside the ``try``: a signal
    # handler that raises the instant after creation (the CLI's, on SIGTERM) still removes it.
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = -1
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w+b") as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except FileExistsError:
        if fd == -1:  # another file of that name: not ours to remove
            raise
        tmp.unlink(missing_ok=True)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(target: Path) -> int:
    """Keep an existing file's mode; a new file gets 0666 minus the umask, like any created file."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@dataclass(frozen=True, slots=True)
class WrittenEif:
    """What :func:`write_eif_file` wrote."""

    path: Path
    header: EifHeader
    measurements: Measurements

    @property
    def size(self) -> int:
        return (
            HEADER_SIZE
            + SECTION_HEADER_SIZE * self.header.num_sections
            + sum(self.header.section_sizes)
        )


def _metadata_bytes(metadata: IdentityInfo | bytes | None) -> bytes | None:
    if metadata is None or isinstance(metadata, bytes):
        return metadata
    return metadata.to_bytes()


def write_eif_file(
    path: str | os.PathLike[str],
    *,
    kernel: SectionData,
    cmdline: str | bytes,
    ramdisks: Sequence[SectionData],
    metadata: IdentityInfo | bytes | None,
    signer: EifSigner | None = None,
    arch: Arch = "x86_64",
    version: int = CURRENT_VERSION,
    hash_algorithm: str = HASH_ALGORITHM_SHA384,
    progress: ProgressCallback | None = None,
) -> WrittenEif:
    """Write an EIF the way nitro-cli lays it out and return its header and measurements.

    Order: kernel, cmdline, metadata (if any), ramdisks, signature (if ``signer``). ``cmdline`` is
    stored without a trailing NUL (a ``str`` is UTF-8 encoded; trim it first as nitro-cli does).
    Written to a temp file and renamed over ``path``; on any error ``path`` is untouched. Version 4
    requires metadata.
    """
    if not ramdisks:
        raise ValueError("an EIF needs at least one ramdisk")
    if version not in (2, 3, 4):
        raise ValueError(f"version must be 2, 3 or 4, got {version}")
    meta = _metadata_bytes(metadata)
    if version >= 4 and meta is None:
        raise ValueError("EIF version 4 requires a metadata section")
    if version < 4 and meta is not None:
        raise ValueError("metadata sections exist only in EIF version 4")
    if signer is not None and version < 3:
        raise ValueError("signature sections exist only in EIF version ≥ 3")
    if arch not in ("x86_64", "aarch64"):
        raise ValueError(f"arch must be 'x86_64' or 'aarch64', got {arch!r}")
    cmdline_bytes = cmdline.encode("utf-8") if isinstance(cmdline, str) else bytes(cmdline)
    if b"\x00" in cmdline_bytes:
        raise ValueError("the kernel command line must not contain NUL bytes")
    flags = FLAG_ARCH_ARM64 if arch == "aarch64" else 0
    with atomic_output(path) as stream:
        writer = EifWriter(stream, version=version, flags=flags, progress=progress)
        try:
            writer.add_section(SectionType.KERNEL, kernel)
            writer.add_section(SectionType.CMDLINE, cmdline_bytes)
            if meta is not None:
                writer.add_section(SectionType.METADATA, meta)
            for ramdisk in ramdisks:
                writer.add_section(SectionType.RAMDISK, ramdisk)
            unsigned = writer.measurer.result(hash_algorithm=hash_algorithm)
            pcr8 = None
            if signer is not None:
                writer.add_section(SectionType.SIGNATURE, signer.signature_section(unsigned.pcr0))
                pcr8 = signer.pcr8
            header = writer.finish()
        finally:
            writer.close()
    measurements = Measurements(unsigned.pcr0, unsigned.pcr1, unsigned.pcr2, pcr8, hash_algorithm)
    return WrittenEif(Path(path), header, measurements)


def write_eif(
    path: str | os.PathLike[str],
    *,
    kernel: SectionData,
    cmdline: str | bytes,
    ramdisks: Sequence[SectionData],
    metadata: IdentityInfo | bytes | None,
    signer: EifSigner | None = None,
    arch: Arch = "x86_64",
    version: int = CURRENT_VERSION,
    hash_algorithm: str = HASH_ALGORITHM_SHA384,
    progress: ProgressCallback | None = None,
) -> Measurements:
    """Like :func:`write_eif_file`, returning only the measurements (build-enclave's JSON)."""
    return write_eif_file(
        path,
        kernel=kernel,
        cmdline=cmdline,
        ramdisks=ramdisks,
        metadata=metadata,
        signer=signer,
        arch=arch,
        version=version,
        hash_algorithm=hash_algorithm,
        progress=progress,
    ).measurements

"""The one sequential read pass of :meth:`enclavekit.eif.reader.Eif.verify`.

This thread reads the file into a small ring of buffers and hashes PCR0 (PCR1 shares that state);
a worker thread consumes the same buffers in file order, hashing PCR2 and keeping the running CRC-32.
A queue of several buffers decouples the two threads, so a thread that the scheduler pauses does not
stall the other at every chunk. For PCR2 chunks this thread also computes the CRC of the chunk's
head, which the worker joins in (CRC-32 combination), so both threads carry about the same load.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from enclavekit.eif.format import (
    HEADER_CRC_SPAN,
    SECTION_HEADER_SIZE,
    SectionType,
    crc32_apply,
    crc32_shift_operator,
)
from enclavekit.eif.measure import PcrHasher, SectionMeasurer
from enclavekit.errors import EifIntegrityError

#: Read size of the pass (large enough to amortise queue hand-offs, small enough for the caches).
CHUNK_SIZE = 1 << 20
#: Buffers in flight between the two threads (memory: BUFFERS x CHUNK_SIZE).
BUFFERS = 8
#: Share of each PCR2 chunk whose CRC the reading thread computes (it also reads; the worker also
#: hashes PCR2), which balances the two threads.
MAIN_CRC_SHARE = 0.3

_SHIFTS: dict[int, int] = {}


def _shift(length: int) -> int:
    op = _SHIFTS.get(length)
    if op is None:
        op = _SHIFTS[length] = crc32_shift_operator(length)
    return op


@dataclass(frozen=True, slots=True)
class _Item:
    data: bytes | memoryview
    head_len: int  # bytes at the start of data whose CRC is head_crc (computed by the reader)
    head_crc: int
    pcr2: PcrHasher | None
    buffer: bytearray | None  # returned to the free ring once consumed


class _Sink:
    """Receives the bytes of the pass in file order: CRC for all, PCR2 where asked. Inline version."""

    def __init__(self) -> None:
        self.crc = 0
        self._buffer = bytearray(CHUNK_SIZE)

    def buffer(self) -> bytearray:
        return self._buffer

    def crc_only(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)

    def chunk(self, view: memoryview, buffer: bytearray, pcr2: PcrHasher | None) -> None:
        if pcr2 is not None:
            pcr2.update(view)
        self.crc = zlib.crc32(view, self.crc)

    def finish(self) -> int:
        return self.crc

    def close(self) -> None:
        pass


class _ThreadedSink(_Sink):
    """Hands PCR2 and most of the CRC to a worker thread through a bounded ring of buffers."""

    def __init__(self, main_crc_share: float = MAIN_CRC_SHARE) -> None:
        self.crc = 0
        self._main_crc_share = main_crc_share
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(CHUNK_SIZE))
        self._inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eif-pcr2-crc", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                if item.pcr2 is not None:
                    item.pcr2.update(item.data)
                crc = self.crc
                if item.head_len:
                    crc = crc32_apply(_shift(item.head_len), crc) ^ item.head_crc
                self.crc = zlib.crc32(item.data[item.head_len :], crc)
            except BaseException as exc:  # reported by finish(); keep draining
                self._error = self._error or exc
            finally:
                if item.buffer is not None:
                    self._free.put(item.buffer)

    def buffer(self) -> bytearray:
        return self._free.get()

    def crc_only(self, data: bytes) -> None:
        self._inbox.put(_Item(data, 0, 0, None, None))

    def chunk(self, view: memoryview, buffer: bytearray, pcr2: PcrHasher | None) -> None:
        head_len = int(len(view) * self._main_crc_share) if pcr2 is not None else 0
        head_crc = zlib.crc32(view[:head_len]) if head_len else 0
        self._inbox.put(_Item(view, head_len, head_crc, pcr2, buffer))

    def finish(self) -> int:
        self.close()
        if self._error is not None:
            raise self._error
        return self.crc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put(None)
            self._thread.join()


def read_pass(
    stream: BinaryIO,
    header: bytes,
    sections: Sequence[Any],
    measurer: SectionMeasurer,
    *,
    parallel: bool,
    progress: Callable[[int], None] | None,
    consume: Callable[[Any, memoryview], None] | None = None,
) -> tuple[int, dict[int, bytes]]:
    """Stream every section after ``header`` (already read): returns the CRC-32 and the data of the
    metadata and signature sections (bounded in size by the reader's layout checks).

    ``consume(section, chunk)`` is called on this thread with every chunk of the kernel, cmdline
    and ramdisk sections, in file order, before the chunk is handed on (the view is valid only
    during the call)."""
    # A consumer (unpacking) loads this thread: then the worker takes all of the CRC.
    sink = _ThreadedSink(0.0 if consume is not None else MAIN_CRC_SHARE) if parallel else _Sink()
    kept: dict[int, bytes] = {}
    try:
        sink.crc_only(header[:HEADER_CRC_SPAN])
        for section in sections:
            sink.crc_only(read_exact(stream, SECTION_HEADER_SIZE, f"section {section.index}"))
            measurer.begin_section(section.section_type)
            if section.section_type in (SectionType.METADATA, SectionType.SIGNATURE):
                data = read_exact(stream, section.size, f"section {section.index}")
                sink.crc_only(data)
                kept[section.index] = data
                continue
            pcr2 = measurer.pcr2_hasher() if measurer.feeds_pcr2() else None
            measured = measurer.measured()
            remaining = section.size
            while remaining:
                buffer = sink.buffer()
                view = _fill(stream, buffer, min(CHUNK_SIZE, remaining), section.index)
                remaining -= len(view)
                if consume is not None:
                    consume(section, view)
                if measured:
                    measurer.update_pcr0_only(view)
                sink.chunk(view, buffer, pcr2)
                if progress is not None:
                    progress(section.end - remaining)
        return sink.finish(), kept
    finally:
        sink.close()


def _fill(stream: Any, buffer: bytearray, n: int, index: int) -> memoryview:
    view = memoryview(buffer)[:n]
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EifIntegrityError(
                f"section {index} ends early (the file shrank while it was being read)"
            )
        got += k
    return view


def read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes or :class:`EifIntegrityError` (the file ends early)."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    if len(out) != n:
        raise EifIntegrityError(f"{what}: expected {n} bytes, the file ends after {len(out)}")
    return bytes(out)

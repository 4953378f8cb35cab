"""Guest memory shared by a vhost-user front-end, and split virtqueues living in it (back-end side).

`GuestMemory` maps the regions a front-end hands over (``VHOST_USER_SET_MEM_TABLE``: one file descriptor per
region) and translates guest-physical and front-end user addresses into offsets of those mappings.
`SplitVirtqueue` pops descriptor chains the driver made available and pushes them back as used (virtio 1.x
§2.7, split layout).

Checked: every address and length against the mapped regions, descriptor chain length against the queue size
(a looping chain is refused), index bounds, the distance of the available index from the chains already taken
(at most the queue size, see `SplitVirtqueue.available`). Not supported: packed virtqueues, indirect
descriptors and VIRTIO_F_EVENT_IDX (the back-end offers none of them), buffers that straddle two memory
regions.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

from enclavekit.errors import MalformedInput

__all__ = [
    "DescriptorChain",
    "GuestMemory",
    "MemoryRegion",
    "SplitVirtqueue",
    "VirtqueueError",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
MAX_QUEUE_SIZE = 32768  # virtio's limit for split queues


def _load_u16(buffer: mmap.mmap, offset: int) -> int:
    """One 16-bit load. ``struct`` reads byte by byte, so a ring index the guest is updating could be
    seen half old, half new; a native aligned load cannot be torn."""
    return int(ctypes.c_uint16.from_buffer(buffer, offset).value)


def _store_u16(buffer: mmap.mmap, offset: int, value: int) -> None:
    """One 16-bit store (the guest must never see half of a new used index)."""
    ctypes.c_uint16.from_buffer(buffer, offset).value = value


class VirtqueueError(MalformedInput):
    """The front-end or the guest driver put something in shared memory that breaks the virtio rules."""


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of guest memory as described by the front-end."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


class GuestMemory:
    """The guest's RAM, mapped from the front-end's file descriptors."""

    def __init__(self) -> None:
        self._regions: list[tuple[MemoryRegion, mmap.mmap]] = []

    @classmethod
    def from_fds(cls, regions: list[MemoryRegion], fds: list[int]) -> GuestMemory:
        """Map every region from its file descriptor (the descriptors are closed afterwards)."""
        if len(regions) != len(fds):
            for fd in fds:
                os.close(fd)
            raise VirtqueueError(
                f"memory table names {len(regions)} regions but carries {len(fds)} file descriptors"
            )
        memory = cls()
        try:
            for region, fd in zip(regions, fds, strict=True):
                mapping = mmap.mmap(fd, region.size + region.mmap_offset, mmap.MAP_SHARED)
                memory._regions.append((region, mapping))
        finally:
            for fd in fds:
                os.close(fd)
        return memory

    @classmethod
    def from_buffers(cls, regions: list[tuple[MemoryRegion, mmap.mmap]]) -> GuestMemory:
        """Use mappings the caller already made (tests, or a front-end living in this process)."""
        memory = cls()
        memory._regions.extend(regions)
        return memory

    def close(self) -> None:
        for _, mapping in self._regions:
            mapping.close()
        self._regions.clear()

    def _locate(self, addr: int, length: int, *, user: bool) -> tuple[mmap.mmap, int]:
        for region, mapping in self._regions:
            base = region.user_addr if user else region.guest_addr
            if base <= addr and addr + length <= base + region.size:
                return mapping, region.mmap_offset + (addr - base)
        kind = "user" if user else "guest"
        raise VirtqueueError(
            f"{kind} address {addr:#x}+{length} is outside every mapped memory region"
        )

    def user_to_guest_view(self, user_addr: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) of a front-end user address (vring addresses are given this way)."""
        return self._locate(user_addr, length, user=True)

    def read(self, guest_addr: int, length: int) -> bytes:
        mapping, offset = self._locate(guest_addr, length, user=False)
        return mapping[offset : offset + length]

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        mapping, offset = self._locate(guest_addr, len(data), user=False)
        mapping[offset : offset + len(data)] = data


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A chain the driver made available: its head index and its readable and writable buffers."""

    head: int
    readable: tuple[tuple[int, int], ...]  # (guest address, length)
    writable: tuple[tuple[int, int], ...]

    @property
    def writable_size(self) -> int:
        return sum(length for _, length in self.writable)


class SplitVirtqueue:
    """The back-end's view of one split virtqueue (descriptor table, available ring, used ring)."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        size: int,
        desc_user_addr: int,
        avail_user_addr: int,
        used_user_addr: int,
        next_avail: int = 0,
    ) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size must be a power of two up to 32768, found {size}")
        self.memory = memory
        self.size = size
        self._desc, self._desc_off = memory.user_to_guest_view(desc_user_addr, 16 * size)
        self._avail, self._avail_off = memory.user_to_guest_view(avail_user_addr, 4 + 2 * size)
        self._used, self._used_off = memory.user_to_guest_view(used_user_addr, 4 + 8 * size)
        self.next_avail = next_avail & 0xFFFF

    def _avail_idx(self) -> int:
        return _load_u16(self._avail, self._avail_off + 2)

    def available(self) -> int:
        """How many chains the driver has made available that have not been popped yet.

        Invariant (virtio 1.x §2.7.6): ``avail->idx`` is a free-running 16-bit counter, and the driver can
        never have more than ``size`` chains outstanding (each holds at least one of the ``size``
        descriptors), so ``(avail->idx - next_avail) mod 2**16 <= size``. A larger distance means the index
        is not the driver's (seen when a guest restarts through its firmware without resetting the device
        and reuses the ring's memory): the slots past ``next_avail`` hold no heads, and popping them would
        make us write used elements into memory the guest now uses for something else. So refuse before
        reading any slot.
        """
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"available index {avail_idx} is {pending} entries past the {self.next_avail} already "
                f"taken, more than a queue of {self.size} can hold (the ring is not the driver's)"
            )
        return pending

    def has_available(self) -> bool:
        return self.available() > 0

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made none available."""
        if not self.has_available():
            return None
        slot = self.next_avail % self.size
        (head,) = _U16.unpack_from(self._avail, self._avail_off + 4 + 2 * slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise VirtqueueError(f"descriptor index {index} is outside a queue of {self.size}")
            addr, length, flags, nxt = _DESC.unpack_from(self._desc, self._desc_off + 16 * index)
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError("indirect descriptors were not negotiated")
            if flags & VRING_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError("a readable descriptor follows a writable one")
            else:
                readable.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            index = nxt
        raise VirtqueueError(f"descriptor chain from {head} is longer than the queue (a loop)")

    def read_chain(self, chain: DescriptorChain, limit: int) -> bytes:
        """The chain's readable bytes, at most ``limit`` of them."""
        out = bytearray()
        for addr, length in chain.readable:
            take = min(length, limit - len(out))
            if take <= 0:
                break
            out += self.memory.read(addr, take)
        return bytes(out)

    def write_chain(self, chain: DescriptorChain, data: bytes | bytearray) -> int:
        """Copy ``data`` into the chain's writable buffers; returns the number of bytes written."""
        view = memoryview(data)
        written = 0
        for addr, length in chain.writable:
            if written >= len(view):
                break
            part = view[written : written + length]
            self.memory.write(addr, part)
            written += len(part)
        if written < len(view):
            raise ValueError(f"{len(view)} bytes do not fit a chain of {chain.writable_size}")
        return written

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver as used, ``written`` bytes having been written into it."""
        used_idx = _load_u16(self._used, self._used_off + 2)
        slot = used_idx % self.size
        _USED_ELEM.pack_into(self._used, self._used_off + 4 + 8 * slot, chain.head, written)
        # The element must be visible before the index moves (program order suffices on x86-64 TSO).
        _store_u16(self._used, self._used_off + 2, (used_idx + 1) & 0xFFFF)

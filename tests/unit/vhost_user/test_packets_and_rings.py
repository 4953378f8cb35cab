"""virtio-vsock packet parsing (property tests) and split-virtqueue rules against hostile drivers."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import MalformedInput
from enclavekit.vm.virtio_vsock import HEADER, Packet
from enclavekit.vm.virtqueue import (
    GuestMemory,
    MemoryRegion,
    SplitVirtqueue,
    VirtqueueError,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@settings(max_examples=200)
@given(u64, u64, u32, u32, st.integers(0, 7), u32, u32, u32, st.binary(max_size=300))
def test_packet_round_trip(src, dst, sport, dport, op, flags, buf, fwd, payload) -> None:
    pkt = Packet(src, dst, sport, dport, op, 1, flags, buf, fwd, payload)
    assert Packet.decode(pkt.encode()) == pkt


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_malformed(data: bytes) -> None:
    try:
        pkt = Packet.decode(data)
    except MalformedInput:
        return
    assert pkt.encode() == data[: HEADER.size + len(pkt.payload)]


def test_payload_longer_than_the_buffer_is_refused() -> None:
    """A header announcing more payload than the buffer holds must not be trusted."""
    data = Packet(16, 3, 1, 2, 5, payload=b"abcd").encode()
    with pytest.raises(MalformedInput, match="announces 4"):
        Packet.decode(data[:-1])


QSIZE = 4
USER = 0x7000_0000


def ring(
    layout: list[tuple[int, int, int, int]], heads: list[int], *, next_avail: int = 0
) -> SplitVirtqueue:
    """A queue of QSIZE whose driver made ``heads`` available from ring position ``next_avail`` on."""
    mem = mmap.mmap(-1, 0x4000)
    for i, (addr, length, flags, nxt) in enumerate(layout):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    avail = 0x100
    for n, head in enumerate(heads):
        struct.pack_into("<H", mem, avail + 4 + 2 * ((next_avail + n) % QSIZE), head)
    struct.pack_into("<H", mem, avail + 2, (next_avail + len(heads)) & 0xFFFF)
    struct.pack_into("<H", mem, 0x200 + 2, next_avail)  # used idx: all earlier chains returned
    memory = GuestMemory.from_buffers([(MemoryRegion(0, 0x4000, USER, 0), mem)])
    return SplitVirtqueue(
        memory,
        size=QSIZE,
        desc_user_addr=USER,
        avail_user_addr=USER + avail,
        used_user_addr=USER + 0x200,
        next_avail=next_avail,
    )


def guest_bytes(q: SplitVirtqueue) -> bytes:
    mapping, offset = q.memory.user_to_guest_view(USER, 0x4000)
    return bytes(mapping[offset : offset + 0x4000])


def test_descriptor_loop_is_refused() -> None:
    """A chain whose 'next' points back at itself must not spin the back-end forever."""
    q = ring([(0x1000, 8, 1, 1), (0x1008, 8, 1, 0)], [0])
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_descriptor_index_outside_the_queue_is_refused() -> None:
    q = ring([(0x1000, 8, 1, 9)], [0])
    with pytest.raises(VirtqueueError, match="outside a queue"):
        q.pop()


def test_buffer_outside_guest_memory_is_refused() -> None:
    """A descriptor pointing past guest RAM must not read the back-end's own memory."""
    q = ring([(0x3FF0, 0x100, 0, 0)], [0])
    chain = q.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match="outside every mapped memory region"):
        q.read_chain(chain, 0x100)


def test_readable_after_writable_is_refused() -> None:
    q = ring([(0x1000, 8, 1 | 2, 1), (0x1008, 8, 0, 0)], [0])
    with pytest.raises(VirtqueueError, match="readable descriptor follows"):
        q.pop()


def test_used_ring_records_the_chain() -> None:
    q = ring([(0x1000, 64, 2, 0)], [0])
    chain = q.pop()
    assert chain is not None
    assert q.pop() is None
    q.write_chain(chain, b"hello")
    q.push(chain, 5)
    mapping, offset = q.memory.user_to_guest_view(USER + 0x200, 12)
    assert struct.unpack_from("<HHII", mapping, offset) == (0, 1, 0, 5)
    assert q.memory.read(0x1000, 5) == b"hello"


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_queue_size_must_be_a_power_of_two(size: int) -> None:
    memory = GuestMemory.from_buffers(
        [(MemoryRegion(0, 0x100000, USER, 0), mmap.mmap(-1, 0x100000))]
    )
    with pytest.raises(VirtqueueError, match="power of two"):
        SplitVirtqueue(
            memory, size=size, desc_user_addr=USER, avail_user_addr=USER, used_user_addr=USER
        )


def test_a_full_queue_is_popped_across_the_16_bit_wrap() -> None:
    """avail->idx is free-running: QSIZE chains from position 65534 end at index 2 (wrapped)."""
    q = ring([(0x1000 + 0x100 * i, 44, 0, 0) for i in range(QSIZE)], [2, 0, 3, 1], next_avail=65534)
    heads = []
    while (chain := q.pop()) is not None:
        heads.append(chain.head)
        q.push(chain, 0)
    assert heads == [2, 0, 3, 1]
    assert q.next_avail == 2


def test_available_index_no_driver_could_have_written_is_refused_before_anything_is_used() -> None:
    """What the QEMU flake showed: the guest restarted through its firmware without resetting the device,
    its new kernel reused the old ring's memory, and the back-end (15 chains taken) then read an available
    index of 0. (0 - 15) mod 2**16 chains cannot be outstanding in a queue of QSIZE: the ring is not the
    driver's. Without the check the back-end popped the stale slots as heads and wrote used elements (and
    a new used index) into memory the new kernel owned, and later hit a wild 'next' index."""
    q = ring([(0x1000, 44, 0, 0), (0x1100, 44, 0, 0)], [0, 1], next_avail=13)
    for _ in range(2):
        chain = q.pop()
        assert chain is not None
        q.push(chain, 0)
    mapping, offset = q.memory.user_to_guest_view(USER, 0x4000)
    mapping[offset : offset + 0x4000] = bytes(0x4000)  # the guest's new kernel zeroed the page
    before = guest_bytes(q)
    with pytest.raises(VirtqueueError, match="not the driver's"):
        q.pop()
    assert guest_bytes(q) == before  # nothing was written into the guest's memory
    assert q.next_avail == 15


def test_available_index_moving_backwards_is_refused() -> None:
    q = ring([(0x1000, 44, 0, 0)], [0, 0, 0], next_avail=40)
    for _ in range(3):
        chain = q.pop()
        assert chain is not None
        q.push(chain, 0)
    mapping, offset = q.memory.user_to_guest_view(USER + 0x100, 4)
    struct.pack_into("<H", mapping, offset + 2, 6)  # 43 taken, the index now says 6
    with pytest.raises(VirtqueueError, match="6 is 65499 entries past the 43"):
        q.has_available()

"""virtio-vsock packet parsing (property tests) and split-virtqueue rules against hostile drivers."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import MalformedInput
from enclavekit.transport.virtio_vsock import HEADER, Packet
from enclavekit.transport.virtqueue import (
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


def ring(layout: list[tuple[int, int, int, int]], heads: list[int]) -> SplitVirtqueue:
    mem = mmap.mmap(-1, 0x4000)
    for i, (addr, length, flags, nxt) in enumerate(layout):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    avail = 0x100
    for slot, head in enumerate(heads):
        struct.pack_into("<H", mem, avail + 4 + 2 * slot, head)
    struct.pack_into("<H", mem, avail + 2, len(heads))
    memory = GuestMemory.from_buffers([(MemoryRegion(0, 0x4000, USER, 0), mem)])
    return SplitVirtqueue(
        memory,
        size=QSIZE,
        desc_user_addr=USER,
        avail_user_addr=USER + avail,
        used_user_addr=USER + 0x200,
    )


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

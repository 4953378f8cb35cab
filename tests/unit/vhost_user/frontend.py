"""A faithful stand-in for QEMU's vhost-user-vsock front-end and the guest's virtio-vsock driver.

It connects to the back-end's unix socket, negotiates like QEMU (features, protocol features, config, memory
table with a memfd, vring num/addr/base, kick and call eventfds, enable), then acts as the guest driver: puts
TX packets and RX buffers into split virtqueues in the shared memfd and reads used RX buffers.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import time

from enclavekit.vm.virtio_vsock import HEADER, Op, Packet

HDR = struct.Struct("<III")
MEM_SIZE = 4 * 1024 * 1024
GUEST_BASE = 0x4000_0000
USER_BASE = 0x7F00_0000_0000
QSIZE = 16
DESC_F_NEXT, DESC_F_WRITE = 1, 2


class FakeFrontend:
    def __init__(self, path: str, *, enable_rings: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock.settimeout(5)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        # Layout: per queue 0x1000 bytes of rings; buffers from 0x10000 on.
        self.rings = [0x1000 * (1 + q) for q in range(3)]
        self.next_buf = 0x10000
        self.avail_idx = [0, 0, 0]
        self.free_desc = [list(range(QSIZE)) for _ in range(3)]
        self.last_used = [0, 0, 0]
        self.bufs: dict[tuple[int, int], tuple[int, int]] = {}
        self.negotiated = self._negotiate(enable_rings)

    # -- vhost-user front-end -------------------------------------------------------------------------

    def request(
        self,
        req: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        need_reply: bool = False,
        expect_reply: bool = False,
    ) -> bytes | None:
        flags = 0x1 | (0x8 if need_reply else 0)
        msg = HDR.pack(req, flags, len(payload)) + payload
        if fds:
            self.sock.sendmsg(
                [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
        else:
            self.sock.sendall(msg)
        if not (expect_reply or need_reply):
            return None
        head = self._recv_exact(HDR.size)
        rreq, rflags, size = HDR.unpack(head)
        assert rreq == req
        assert rflags & 0x4
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "back-end closed the connection"
            out += chunk
        return out

    def _negotiate(self, enable_rings: bool) -> dict[str, int]:
        u64 = struct.Struct("<Q")
        features = u64.unpack(self.request(1, expect_reply=True))[0]  # GET_FEATURES
        protocol = u64.unpack(self.request(15, expect_reply=True))[0]  # GET_PROTOCOL_FEATURES
        self.request(16, u64.pack(protocol))  # SET_PROTOCOL_FEATURES
        self.request(3)  # SET_OWNER
        config = self.request(24, struct.pack("<III", 0, 8, 0) + bytes(8), expect_reply=True)
        cid = struct.unpack_from("<Q", config, 12)[0]
        self.request(2, u64.pack(features), need_reply=True)  # SET_FEATURES
        region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST_BASE, MEM_SIZE, USER_BASE, 0)
        ack = self.request(5, region, [self.memfd], need_reply=True)  # SET_MEM_TABLE
        assert ack == u64.pack(0)
        for q in range(3):
            base = self.rings[q]
            desc, avail, used = base, base + 16 * QSIZE, base + 0x800
            self.request(8, struct.pack("<II", q, QSIZE))
            self.request(10, struct.pack("<II", q, 0))
            self.request(
                9,
                struct.pack(
                    "<IIQQQQ", q, 0, USER_BASE + desc, USER_BASE + used, USER_BASE + avail, 0
                ),
            )
            self.request(12, u64.pack(q), [self.kick[q]])
            self.request(13, u64.pack(q), [self.call[q]])
            if enable_rings:
                self.request(18, struct.pack("<II", q, 1))
        return {"features": features, "protocol": protocol, "cid": cid}

    def restart_rings(self) -> None:
        """What QEMU does when a new guest kernel resets and sets up the device again: stop the rings (their
        bases come back), then start them afresh from index 0. The guest driver's state starts over too."""
        u64 = struct.Struct("<Q")
        for q in range(2):
            self.request(18, struct.pack("<II", q, 0))  # SET_VRING_ENABLE 0
        for q in range(2):
            self.request(11, struct.pack("<II", q, 0), expect_reply=True)  # GET_VRING_BASE
        self.avail_idx = [0, 0, 0]
        self.free_desc = [list(range(QSIZE)) for _ in range(3)]
        self.last_used = [0, 0, 0]
        self.bufs.clear()
        for q in range(2):
            base = self.rings[q]
            self.mem[base : base + 0x1000] = bytes(0x1000)
            desc, avail, used = base, base + 16 * QSIZE, base + 0x800
            self.request(8, struct.pack("<II", q, QSIZE))
            self.request(10, struct.pack("<II", q, 0))
            self.request(
                9,
                struct.pack(
                    "<IIQQQQ", q, 0, USER_BASE + desc, USER_BASE + used, USER_BASE + avail, 0
                ),
            )
            self.request(12, u64.pack(q), [self.kick[q]])
            self.request(13, u64.pack(q), [self.call[q]])
        for q in range(2):
            self.request(18, struct.pack("<II", q, 1))

    # -- guest driver -------------------------------------------------------------------------------------

    def _desc_off(self, q: int, i: int) -> int:
        return self.rings[q] + 16 * i

    def _avail_off(self, q: int) -> int:
        return self.rings[q] + 16 * QSIZE

    def _used_off(self, q: int) -> int:
        return self.rings[q] + 0x800

    def _alloc(self, size: int) -> int:
        off = self.next_buf
        self.next_buf += (size + 15) & ~15
        assert self.next_buf < MEM_SIZE
        return off

    def _make_available(self, q: int, chain: list[tuple[int, int, bool]]) -> int:
        ids = [self.free_desc[q].pop(0) for _ in chain]
        for n, (off, length, writable) in enumerate(chain):
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if n + 1 < len(chain) else 0)
            nxt = ids[n + 1] if n + 1 < len(chain) else 0
            struct.pack_into(
                "<QIHH", self.mem, self._desc_off(q, ids[n]), GUEST_BASE + off, length, flags, nxt
            )
        a = self._avail_off(q)
        struct.pack_into("<H", self.mem, a + 4 + 2 * (self.avail_idx[q] % QSIZE), ids[0])
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, a + 2, self.avail_idx[q])
        os.eventfd_write(self.kick[q], 1)
        return ids[0]

    def add_rx_buffers(self, count: int, size: int = 4096 + HEADER.size) -> None:
        for _ in range(count):
            off = self._alloc(size)
            head = self._make_available(0, [(off, size, True)])
            self.bufs[(0, head)] = (off, size)

    def send(self, packet: Packet, *, split_header: bool = False) -> None:
        data = packet.encode()
        if split_header:
            h = self._alloc(HEADER.size)
            p = self._alloc(max(len(data) - HEADER.size, 1))
            self.mem[h : h + HEADER.size] = data[: HEADER.size]
            self.mem[p : p + len(data) - HEADER.size] = data[HEADER.size :]
            chain = [(h, HEADER.size, False), (p, len(data) - HEADER.size, False)]
        else:
            off = self._alloc(len(data))
            self.mem[off : off + len(data)] = data
            chain = [(off, len(data), False)]
        self._make_available(1, chain)

    def send_raw(self, data: bytes) -> None:
        off = self._alloc(len(data))
        self.mem[off : off + len(data)] = data
        self._make_available(1, [(off, len(data), False)])

    def received(self, timeout: float = 5.0, count: int = 1) -> list[Packet]:
        """Wait for at least ``count`` used RX buffers and decode them."""
        out: list[Packet] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            used_idx = struct.unpack_from("<H", self.mem, self._used_off(0) + 2)[0]
            while self.last_used[0] != used_idx:
                slot = self.last_used[0] % QSIZE
                head, length = struct.unpack_from("<II", self.mem, self._used_off(0) + 4 + 8 * slot)
                off, _ = self.bufs.pop((0, head))
                out.append(Packet.decode(bytes(self.mem[off : off + length])))
                self.free_desc[0].append(head)
                self.last_used[0] = (self.last_used[0] + 1) & 0xFFFF
            if len(out) >= count:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"expected {count} packets, got {out}")
            select.select([self.call[0]], [], [], min(remaining, 0.1))
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call[0])
        return out

    def tx_used(self) -> int:
        return int(struct.unpack_from("<H", self.mem, self._used_off(1) + 2)[0])

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in [self.memfd, *self.kick, *self.call]:
            os.close(fd)


def request(
    cid: int,
    src_port: int,
    dst_port: int,
    op: Op = Op.REQUEST,
    payload: bytes = b"",
    flags: int = 0,
    fwd_cnt: int = 0,
) -> Packet:
    return Packet(
        cid,
        3,
        src_port,
        dst_port,
        op,
        flags=flags,
        buf_alloc=65536,
        fwd_cnt=fwd_cnt,
        payload=payload,
    )

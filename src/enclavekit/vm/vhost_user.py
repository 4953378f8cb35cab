"""A vhost-user vsock back-end in Python: the parent side of QEMU's ``nitro-enclave`` machine.

QEMU's nitro-enclave machine insists on a live vhost-user-vsock back-end (``-M nitro-enclave,vsock=<chardev>``
with ``-chardev socket,id=<chardev>,path=<socket>``). `VhostUserVsockBackend` listens on that unix socket,
speaks the vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``: feature negotiation, memory table with
file descriptors, vring setup, kick/call eventfds, device config = the guest CID) and runs the virtio-vsock
device: guest TX packets go to `VsockParent`, and its packets for the guest are written into RX buffers.

Negotiated: VIRTIO_F_VERSION_1 and the protocol features REPLY_ACK and CONFIG; nothing else (no indirect
descriptors, no event index, no SEQPACKET, no live migration logging). One front-end connection per back-end;
when it goes away the back-end stops.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enclavekit.errors import MalformedInput
from enclavekit.vm.virtio_vsock import HEADER, Endpoint, Packet, VsockParent
from enclavekit.vm.virtqueue import (
    GuestMemory,
    MemoryRegion,
    SplitVirtqueue,
    VirtqueueError,
)

__all__ = ["Request", "VhostUserVsockBackend"]

log = logging.getLogger(__name__)

_HDR = struct.Struct("<III")  # request, flags, size
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")  # index, num
_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
_REGION = struct.Struct("<QQQQ")  # guest addr, size, user addr, mmap offset
_CONFIG_HDR = struct.Struct("<III")  # offset, size, flags

VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096  # larger than any message we accept (memory table: 8 + 8 * 32 bytes)
MAX_FDS = 8
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG
NUM_QUEUES = 3  # rx, tx, event (virtio spec §5.10.2)
RX, TX = 0, 1
VRING_INVALID_FD = 1 << 8
MAX_TX_PACKET = HEADER.size + 64 * 1024  # Linux sends at most 64 KiB of payload per packet


class Request:
    """vhost-user front-end message types used here."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


class VhostUserError(MalformedInput):
    """The vhost-user front-end sent a message this back-end cannot accept."""


@dataclass(slots=True)
class _Vring:
    num: int = 0
    addr: tuple[int, int, int] | None = None  # desc, avail, used (front-end user addresses)
    base: int = 0
    kick: int | None = None
    call: int | None = None
    enabled: bool = False
    started: bool = False
    queue: SplitVirtqueue | None = None


@dataclass(slots=True)
class _Session:
    features: int = 0
    protocol_features: int = 0
    memory: GuestMemory | None = None
    vrings: list[_Vring] = field(default_factory=lambda: [_Vring() for _ in range(NUM_QUEUES)])


class VhostUserVsockBackend:
    """Serve one QEMU vhost-user-vsock front-end on a unix socket, as the guest's parent (CID 3).

    ``forward`` connects guest connections to parent ports to local endpoints, ``listen`` accepts local TCP
    connections and connects them to guest ports; the enclave init heartbeat (port 9000) is answered unless
    ``heartbeat=False``. `start()` runs the loop in a daemon thread; `stop()` ends it.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        guest_cid: int,
        forward: Mapping[int, Endpoint] | None = None,
        listen: Mapping[tuple[str, int], int] | None = None,
        heartbeat: bool = True,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        if not 3 < guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest CID must be between 4 and 2^32-2, found {guest_cid}")
        self.socket_path = Path(socket_path)
        self.guest_cid = guest_cid
        self.heartbeat_seen = threading.Event()
        self._on_heartbeat = on_heartbeat
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake",))
        self.parent = VsockParent(
            guest_cid,
            self._selector,
            forward=forward,
            listen=listen,
            heartbeat=heartbeat,
            on_heartbeat=self._heartbeat,
        )
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket_path.unlink(missing_ok=True)
        self._server.bind(str(self.socket_path))
        self._server.listen(1)
        self._server.setblocking(False)
        self._selector.register(self._server, selectors.EVENT_READ, ("server",))
        self._conn: socket.socket | None = None
        self._session = _Session()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.frontend_connected = threading.Event()
        self.frontend_gone = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> VhostUserVsockBackend:
        self._thread = threading.Thread(target=self._run, name="vhost-user-vsock", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._teardown()

    def __enter__(self) -> VhostUserVsockBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _heartbeat(self) -> None:
        self.heartbeat_seen.set()
        if self._on_heartbeat is not None:
            self._on_heartbeat()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(timeout=0.5):
                    data = key.data
                    kind = data[0]
                    if kind == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    elif kind == "server":
                        self._accept()
                    elif kind == "frontend":
                        if not self._handle_message():
                            self._stopping = True
                            break
                    elif kind == "kick":
                        self._guarded(self._kicked, data[1])
                    else:
                        self.parent.on_socket_event(data, events)
                self._guarded(self._deliver)
        except BaseException as exc:  # the loop thread must not die silently
            log.exception("vhost-user-vsock back-end failed")
            self.error = exc
        finally:
            self.frontend_gone.set()

    def _guarded(self, step: Callable[..., None], *args: int) -> None:
        """Run a ring step; a guest that breaks the ring rules stops the rings, not the back-end."""
        try:
            step(*args)
        except VirtqueueError as exc:
            log.warning("vsock: stopping the rings: %s", exc)
            for vring in self._session.vrings:
                vring.started = False
                vring.queue = None

    def _teardown(self) -> None:
        self.parent.close()
        for vring in self._session.vrings:
            for fd in (vring.kick, vring.call):
                if fd is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(fd)
                    os.close(fd)
            vring.kick = vring.call = None
        if self._session.memory is not None:
            self._session.memory.close()
            self._session.memory = None
        for sock in (self._conn, self._server):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                sock.close()
        self._conn = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self.socket_path.unlink(missing_ok=True)

    def _accept(self) -> None:
        conn, _ = self._server.accept()
        if self._conn is not None:  # one front-end at a time
            conn.close()
            return
        conn.setblocking(True)
        self._conn = conn
        self._selector.register(conn, selectors.EVENT_READ, ("frontend",))
        self.frontend_connected.set()

    # -- vhost-user messages -------------------------------------------------------------------------------

    def _recv_message(self) -> tuple[int, int, bytes, list[int]] | None:
        assert self._conn is not None
        fds = array.array("i")
        msg, ancdata, _, _ = self._conn.recvmsg(
            _HDR.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
        )
        for level, typ, cmsg in ancdata:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - (len(cmsg) % fds.itemsize)])
        if not msg:
            for fd in fds:
                os.close(fd)
            return None
        while len(msg) < _HDR.size:
            more = self._conn.recv(_HDR.size - len(msg))
            if not more:
                return None
            msg += more
        request, flags, size = _HDR.unpack(msg)
        if size > MAX_PAYLOAD:
            for fd in fds:
                os.close(fd)
            raise VhostUserError(
                f"vhost-user message {request} announces {size} bytes (limit {MAX_PAYLOAD})"
            )
        payload = b""
        while len(payload) < size:
            more = self._conn.recv(size - len(payload))
            if not more:
                return None
            payload += more
        return request, flags, payload, list(fds)

    def _reply(self, request: int, payload: bytes) -> None:
        assert self._conn is not None
        self._conn.sendall(_HDR.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)

    def _handle_message(self) -> bool:
        received = self._recv_message()
        if received is None:
            log.info("vhost-user front-end disconnected")
            return False
        request, flags, payload, fds = received
        try:
            reply = self._dispatch(request, payload, fds)
        except (MalformedInput, struct.error, OSError, ValueError) as exc:
            log.warning("vhost-user request %d refused: %s", request, exc)
            if flags & FLAG_NEED_REPLY:
                self._reply(request, _U64.pack(1))
            return True
        if reply is not None:
            self._reply(request, reply)
        elif flags & FLAG_NEED_REPLY and self._session.protocol_features & PROTOCOL_F_REPLY_ACK:
            self._reply(request, _U64.pack(0))
        return True

    def _dispatch(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        s = self._session
        if request == Request.GET_FEATURES:
            return _U64.pack(FEATURES)
        if request == Request.SET_FEATURES:
            (s.features,) = _U64.unpack_from(payload)
            if not s.features & VHOST_USER_F_PROTOCOL_FEATURES:
                for vring in s.vrings:
                    vring.enabled = True
            return None
        if request == Request.GET_PROTOCOL_FEATURES:
            return _U64.pack(PROTOCOL_FEATURES)
        if request == Request.SET_PROTOCOL_FEATURES:
            (s.protocol_features,) = _U64.unpack_from(payload)
            s.protocol_features &= PROTOCOL_FEATURES
            return None
        if request in (Request.SET_OWNER, Request.RESET_OWNER):
            return None
        if request == Request.GET_QUEUE_NUM:
            return _U64.pack(NUM_QUEUES)
        if request == Request.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if request in (Request.SET_LOG_BASE, Request.SET_LOG_FD):
            for fd in fds:
                os.close(fd)
            raise VhostUserError("dirty-page logging was not negotiated")
        if request == Request.GET_CONFIG:
            offset, size, _ = _CONFIG_HDR.unpack_from(payload)
            config = _U64.pack(self.guest_cid)
            if offset + size > len(config):
                return _CONFIG_HDR.pack(offset, 0, 0)
            return _CONFIG_HDR.pack(offset, size, 0) + config[offset : offset + size]
        if request == Request.SET_CONFIG:
            return None
        return self._dispatch_vring(request, payload, fds)

    def _dispatch_vring(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        s = self._session
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            (value,) = _U64.unpack_from(payload)
            vring = self._vring(value & 0xFF)
            fd = None if value & VRING_INVALID_FD or not fds else fds[0]
            for extra in fds[1:]:
                os.close(extra)
            if request == Request.SET_VRING_ERR:
                if fd is not None:
                    os.close(fd)
            elif request == Request.SET_VRING_CALL:
                if vring.call is not None:
                    os.close(vring.call)
                vring.call = fd
            else:
                self._set_kick(value & 0xFF, vring, fd)
            return None
        index, num = _STATE.unpack_from(payload)
        vring = self._vring(index)
        if request == Request.SET_VRING_NUM:
            vring.num = num
            return None
        if request == Request.SET_VRING_ADDR:
            _, _, desc, used, avail, _ = _ADDR.unpack_from(payload)
            vring.addr = (desc, avail, used)
            vring.queue = None
            return None
        if request == Request.SET_VRING_BASE:
            vring.base = num & 0xFFFF
            vring.queue = None
            return None
        if request == Request.GET_VRING_BASE:
            base = vring.queue.next_avail if vring.queue is not None else vring.base
            vring.started = False
            vring.queue = None
            vring.base = base
            if vring.kick is not None:
                self._selector.unregister(vring.kick)
                os.close(vring.kick)
                vring.kick = None
            return _STATE.pack(index, base)
        if request == Request.SET_VRING_ENABLE:
            vring.enabled = bool(num)
            return None
        del s
        raise VhostUserError(f"unsupported vhost-user request {request}")

    def _vring(self, index: int) -> _Vring:
        if not 0 <= index < NUM_QUEUES:
            raise VhostUserError(f"vring index {index} is not one of the {NUM_QUEUES} vsock queues")
        return self._session.vrings[index]

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        (count,) = struct.unpack_from("<I", payload)
        if count > MAX_FDS or len(payload) < 8 + count * _REGION.size:
            for fd in fds:
                os.close(fd)
            raise VhostUserError(f"memory table with {count} regions does not fit its message")
        regions = [
            MemoryRegion(*_REGION.unpack_from(payload, 8 + i * _REGION.size)) for i in range(count)
        ]
        memory = GuestMemory.from_fds(regions, fds)
        if self._session.memory is not None:
            for vring in self._session.vrings:
                if vring.queue is not None:
                    vring.base = vring.queue.next_avail
                vring.queue = None
            self._session.memory.close()
        self._session.memory = memory

    def _set_kick(self, index: int, vring: _Vring, fd: int | None) -> None:
        if vring.kick is not None:
            self._selector.unregister(vring.kick)
            os.close(vring.kick)
        vring.kick = fd
        if fd is not None:
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ, ("kick", index))
        vring.started = True  # a ring starts when its kick descriptor arrives

    # -- virtqueues ----------------------------------------------------------------------------------------

    def _queue(self, index: int) -> SplitVirtqueue | None:
        vring = self._session.vrings[index]
        if (
            not vring.started
            or not vring.enabled
            or vring.addr is None
            or self._session.memory is None
        ):
            return None
        if vring.queue is None:
            desc, avail, used = vring.addr
            vring.queue = SplitVirtqueue(
                self._session.memory,
                size=vring.num,
                desc_user_addr=desc,
                avail_user_addr=avail,
                used_user_addr=used,
                next_avail=vring.base,
            )
        return vring.queue

    def _kicked(self, index: int) -> None:
        vring = self._session.vrings[index]
        if vring.kick is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(vring.kick, 8)
        if index == TX:
            self._drain_tx()

    def _notify(self, index: int) -> None:
        call = self._session.vrings[index].call
        if call is not None:
            os.write(call, _U64.pack(1))

    def _drain_tx(self) -> None:
        queue = self._queue(TX)
        if queue is None:
            return
        used = False
        while (chain := queue.pop()) is not None:
            data = queue.read_chain(chain, MAX_TX_PACKET)
            queue.push(chain, 0)
            used = True
            try:
                packet = Packet.decode(data)
            except MalformedInput as exc:
                log.warning("vsock: dropping a malformed TX packet: %s", exc)
                continue
            self.parent.handle_packet(packet)
        if used:
            self._notify(TX)

    def _deliver(self) -> None:
        self._drain_tx()
        queue = self._queue(RX)
        if queue is None or not self.parent.has_output():
            return
        delivered = False
        while self.parent.has_output():
            chain = queue.pop()
            if chain is None:
                break
            capacity = chain.writable_size - HEADER.size
            packet = self.parent.next_packet(max(capacity, 0)) if capacity >= 0 else None
            if packet is None:
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # give the chain back
                break
            written = queue.write_chain(chain, packet.encode())
            queue.push(chain, written)
            delivered = True
        if delivered:
            self._notify(RX)

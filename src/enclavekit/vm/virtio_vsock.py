"""The parent (host) side of virtio-vsock stream connections: packets, credit and connection states.

`VsockParent` is the device-side logic of a virtio-vsock device, independent of how packets travel (the
vhost-user back-end in `enclavekit.vm.vhost_user` feeds it packets from the guest's TX queue and drains
packets for the RX queue). It plays the parent instance of a Nitro enclave:

- answers the enclave init heartbeat (guest connects to CID 3 port 9000, sends 0xB7, expects 0xB7 back);
- connects guest connections to local endpoints (``forward={vsock_port: (host, tcp_port) | unix_path |
  sink}``, where a sink is anything with ``submit(conn)``, e.g. a `VsockProxy`: it gets one end of a socket
  pair and the guest's bytes flow through the other);
- connects local listeners to guest ports (``listen={(host, tcp_port): vsock_port}``), the way the parent
  reaches a server inside the enclave.

Checked: header length, packet type (stream only; SEQPACKET is refused with RST), destination CID, payload
length against the header, the peer's credit (never sends more than the guest has room for). Not done:
SEQPACKET, the event queue (no transport reset is ever sent).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import logging
import selectors
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from enclavekit.errors import MalformedInput

__all__ = [
    "HEADER",
    "HEARTBEAT_BYTE",
    "HEARTBEAT_PORT",
    "PARENT_CID",
    "Endpoint",
    "Op",
    "Packet",
    "VsockParent",
]

log = logging.getLogger(__name__)

HEADER = struct.Struct("<QQIIIHHIII")  # 44 bytes, virtio spec §5.10.6
PARENT_CID = 3  # a Nitro enclave's parent instance
HEARTBEAT_PORT = 9000  # nitro-cli's ENCLAVE_READY_VSOCK_PORT
HEARTBEAT_BYTE = 0xB7
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
BUF_ALLOC = 256 * 1024  # receive buffer we advertise per connection
READ_CHUNK = 64 * 1024
FIRST_EPHEMERAL_PORT = 49152


@runtime_checkable
class ConnectionSink(Protocol):
    """Anything that takes ownership of a connected stream socket: `RelayServer.submit` (so a
    `VsockProxy` or `Forwarder`) is one (the transport package's parent-side contract)."""

    def submit(self, conn: socket.socket) -> object: ...


#: Where a guest connection goes: (host, TCP port), a unix socket path, or a connection sink.
Endpoint = tuple[str, int] | str | ConnectionSink


class Op(enum.IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True, slots=True)
class Packet:
    """One virtio-vsock packet (header fields plus payload)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    type: int = TYPE_STREAM
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return (
            HEADER.pack(
                self.src_cid,
                self.dst_cid,
                self.src_port,
                self.dst_port,
                len(self.payload),
                self.type,
                self.op,
                self.flags,
                self.buf_alloc,
                self.fwd_cnt,
            )
            + self.payload
        )

    @classmethod
    def decode(cls, data: bytes) -> Packet:
        """Parse a header and its payload; refuses short input and a length the data does not carry."""
        if len(data) < HEADER.size:
            raise MalformedInput(
                f"vsock packet: expected a {HEADER.size}-byte header, found {len(data)} bytes"
            )
        src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd_cnt = (
            HEADER.unpack_from(data)
        )
        payload = data[HEADER.size : HEADER.size + length]
        if len(payload) != length:
            raise MalformedInput(
                f"vsock packet: header announces {length} payload bytes, found {len(payload)}"
            )
        return cls(
            src_cid, dst_cid, src_port, dst_port, op, typ, flags, buf_alloc, fwd_cnt, payload
        )


class _State(enum.Enum):
    CONNECTING = "connecting"  # we sent REQUEST, waiting for RESPONSE
    CONNECTED = "connected"
    CLOSING = "closing"  # we sent SHUTDOWN (both directions), waiting for RST


@dataclass(eq=False, slots=True)
class _Connection:
    guest_cid: int
    guest_port: int
    local_cid: int
    local_port: int
    sock: socket.socket | None  # None for the built-in heartbeat
    state: _State
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # payload bytes sent to the guest
    fwd_cnt: int = 0  # guest payload bytes delivered to the local socket
    reported_fwd_cnt: int = 0
    to_local: bytearray = field(default_factory=bytearray)
    to_guest: bytearray = field(default_factory=bytearray)
    local_eof: bool = False  # the local side will send nothing more
    guest_eof: bool = False  # the guest will send nothing more
    shutdown_sent: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.guest_port)

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


class VsockParent:
    """Parent-side stream connections for one guest, multiplexed over a packet transport.

    The owner calls `handle_packet` for each packet from the guest, `next_packet(max_payload)` to drain
    packets for the guest whenever RX buffers are available, and drives the local sockets through the
    `selector` it passes in (events are dispatched by `on_socket_event`). Nothing here blocks.
    """

    def __init__(
        self,
        guest_cid: int,
        selector: selectors.BaseSelector,
        *,
        forward: Mapping[int, Endpoint] | None = None,
        listen: Mapping[tuple[str, int], int] | None = None,
        heartbeat: bool = True,
        on_heartbeat: Callable[[], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.guest_cid = guest_cid
        self.selector = selector
        self.forward = dict(forward or {})
        self.heartbeat = heartbeat
        self.on_heartbeat = on_heartbeat
        self.wake = wake or (lambda: None)
        self.heartbeats = 0
        self._conns: dict[tuple[int, int], _Connection] = {}
        self._control: collections.deque[Packet] = collections.deque()
        self._next_port = FIRST_EPHEMERAL_PORT
        self.listeners: list[socket.socket] = []
        for (host, port), guest_port in (listen or {}).items():
            server = socket.create_server((host, port))
            server.setblocking(False)
            self.listeners.append(server)
            self.selector.register(server, selectors.EVENT_READ, ("accept", server, guest_port))

    # -- packets from the guest ---------------------------------------------------------------------------

    def handle_packet(self, pkt: Packet) -> None:
        if pkt.type != TYPE_STREAM:
            self._reply_rst(pkt)
            return
        if pkt.src_cid != self.guest_cid:
            log.warning(
                "vsock: dropping a packet from CID %d (guest is %d)", pkt.src_cid, self.guest_cid
            )
            return
        conn = self._conns.get((pkt.dst_port, pkt.src_port))
        if conn is not None:
            conn.peer_buf_alloc = pkt.buf_alloc
            conn.peer_fwd_cnt = pkt.fwd_cnt
        if pkt.op == Op.REQUEST:
            if conn is None:
                self._accept_from_guest(pkt)
            return
        if conn is None:
            if pkt.op != Op.RST:
                self._reply_rst(pkt)
            return
        if pkt.op == Op.RESPONSE:
            if conn.state is _State.CONNECTING:
                conn.state = _State.CONNECTED
                self._watch(conn)
        elif pkt.op == Op.RW:
            self._guest_data(conn, pkt.payload)
        elif pkt.op == Op.CREDIT_REQUEST:
            self._control.append(self._packet(conn, Op.CREDIT_UPDATE))
        elif pkt.op == Op.SHUTDOWN:
            if pkt.flags & SHUTDOWN_SEND:
                conn.guest_eof = True
            if pkt.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV):
                self._close(conn, send_rst=True)
            else:
                self._flush_local(conn)
        elif pkt.op == Op.RST:
            self._close(conn, send_rst=False)
        self._maybe_finish(conn)

    def _accept_from_guest(self, pkt: Packet) -> None:
        local_port = pkt.dst_port
        if self.heartbeat and local_port == HEARTBEAT_PORT:
            sock = None
        elif local_port in self.forward:
            try:
                sock = _connect(self.forward[local_port])
            except (OSError, RuntimeError) as exc:
                log.warning(
                    "vsock: guest port %d -> %r refused: %s",
                    local_port,
                    self.forward[local_port],
                    exc,
                )
                self._reply_rst(pkt)
                return
        else:
            log.info("vsock: guest connected to port %d, which nothing serves", local_port)
            self._reply_rst(pkt)
            return
        conn = _Connection(
            guest_cid=pkt.src_cid,
            guest_port=pkt.src_port,
            local_cid=pkt.dst_cid,
            local_port=local_port,
            sock=sock,
            state=_State.CONNECTED,
            peer_buf_alloc=pkt.buf_alloc,
            peer_fwd_cnt=pkt.fwd_cnt,
        )
        self._conns[conn.key] = conn
        self._control.append(self._packet(conn, Op.RESPONSE))
        self._watch(conn)

    def _guest_data(self, conn: _Connection, data: bytes) -> None:
        if conn.sock is None:  # heartbeat: echo the byte back once
            if data and data[0] == HEARTBEAT_BYTE:
                conn.fwd_cnt += len(data)
                conn.to_guest += bytes([HEARTBEAT_BYTE])
                self.heartbeats += 1
                if self.on_heartbeat is not None:
                    self.on_heartbeat()
            return
        conn.to_local += data
        self._flush_local(conn)

    # -- local sockets ------------------------------------------------------------------------------------

    def on_socket_event(self, data: tuple[object, ...], events: int) -> None:
        kind = data[0]
        if kind == "accept":
            _, server, guest_port = data
            assert isinstance(server, socket.socket)
            assert isinstance(guest_port, int)
            self._accept_local(server, guest_port)
            return
        _, conn = data
        assert isinstance(conn, _Connection)
        if conn.key not in self._conns:
            return
        if events & selectors.EVENT_WRITE:
            self._flush_local(conn)
        if events & selectors.EVENT_READ and conn.sock is not None:
            try:
                chunk = conn.sock.recv(READ_CHUNK)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk == b"":
                conn.local_eof = True
            elif chunk:
                conn.to_guest += chunk
            self._watch(conn)
        self._maybe_finish(conn)
        self.wake()

    def _accept_local(self, server: socket.socket, guest_port: int) -> None:
        try:
            sock, _ = server.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        local_port = self._allocate_port(guest_port)
        conn = _Connection(
            guest_cid=self.guest_cid,
            guest_port=guest_port,
            local_cid=PARENT_CID,
            local_port=local_port,
            sock=sock,
            state=_State.CONNECTING,
        )
        self._conns[conn.key] = conn
        self._control.append(
            Packet(
                PARENT_CID, self.guest_cid, local_port, guest_port, Op.REQUEST, buf_alloc=BUF_ALLOC
            )
        )

    def _allocate_port(self, guest_port: int) -> int:
        for _ in range(65536):
            port = self._next_port
            self._next_port = FIRST_EPHEMERAL_PORT + (port + 1 - FIRST_EPHEMERAL_PORT) % 16384
            if (port, guest_port) not in self._conns:
                return port
        raise OSError(errno.EADDRINUSE, "no free vsock port")

    def _watch(self, conn: _Connection) -> None:
        if conn.sock is None:
            return
        events = 0
        if conn.state is _State.CONNECTED and not conn.local_eof and len(conn.to_guest) < BUF_ALLOC:
            events |= selectors.EVENT_READ
        if conn.to_local:
            events |= selectors.EVENT_WRITE
        try:
            key = self.selector.get_key(conn.sock)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self.selector.unregister(conn.sock)
        elif key is None:
            self.selector.register(conn.sock, events, ("conn", conn))
        elif key.events != events:
            self.selector.modify(conn.sock, events, ("conn", conn))

    def _flush_local(self, conn: _Connection) -> None:
        if conn.sock is not None and conn.to_local:
            try:
                sent = conn.sock.send(conn.to_local)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, send_rst=True)
                return
            del conn.to_local[:sent]
            conn.fwd_cnt += sent
            if conn.fwd_cnt - conn.reported_fwd_cnt >= BUF_ALLOC // 4:
                self._control.append(self._packet(conn, Op.CREDIT_UPDATE))
        if conn.sock is not None and conn.guest_eof and not conn.to_local:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._watch(conn)

    def _maybe_finish(self, conn: _Connection) -> None:
        if conn.key not in self._conns:
            return
        if conn.local_eof and not conn.to_guest and not conn.shutdown_sent:
            conn.shutdown_sent = True
            self._control.append(self._packet(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND))
        if conn.local_eof and conn.guest_eof and not conn.to_guest and not conn.to_local:
            self._close(conn, send_rst=True)

    def _close(self, conn: _Connection, *, send_rst: bool) -> None:
        if send_rst:
            self._control.append(self._packet(conn, Op.RST))
        self._conns.pop(conn.key, None)
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()

    # -- packets for the guest ----------------------------------------------------------------------------

    def has_output(self) -> bool:
        if self._control:
            return True
        return any(
            c.to_guest and c.credit() > 0 and c.state is _State.CONNECTED
            for c in self._conns.values()
        )

    def next_packet(self, max_payload: int) -> Packet | None:
        """The next packet for the guest, its payload at most ``max_payload`` bytes (None: nothing to send)."""
        if self._control:
            return self._control.popleft()
        for conn in list(self._conns.values()):
            if conn.state is not _State.CONNECTED or not conn.to_guest:
                continue
            size = min(len(conn.to_guest), conn.credit(), max_payload)
            if size <= 0:
                continue
            payload = bytes(conn.to_guest[:size])
            del conn.to_guest[:size]
            conn.tx_cnt += size
            pkt = self._packet(conn, Op.RW, payload=payload)
            self._watch(conn)
            self._maybe_finish(conn)
            return pkt
        return None

    def _packet(self, conn: _Connection, op: Op, *, flags: int = 0, payload: bytes = b"") -> Packet:
        conn.reported_fwd_cnt = conn.fwd_cnt
        return Packet(
            conn.local_cid,
            conn.guest_cid,
            conn.local_port,
            conn.guest_port,
            op,
            flags=flags,
            buf_alloc=BUF_ALLOC,
            fwd_cnt=conn.fwd_cnt,
            payload=payload,
        )

    def _reply_rst(self, pkt: Packet) -> None:
        self._control.append(
            Packet(pkt.dst_cid, pkt.src_cid, pkt.dst_port, pkt.src_port, Op.RST, type=pkt.type)
        )

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn, send_rst=False)
        for server in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(server)
            server.close()
        self.listeners.clear()


def _connect(endpoint: Endpoint) -> socket.socket:
    if isinstance(endpoint, ConnectionSink):
        ours, theirs = socket.socketpair()
        try:
            endpoint.submit(theirs)
        except BaseException:
            ours.close()
            raise
        ours.setblocking(False)
        return ours
    if isinstance(endpoint, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(endpoint)
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection(endpoint, timeout=2.0)
    sock.setblocking(False)
    return sock

"""The vhost-user vsock back-end against a stand-in front-end and guest driver (tests/unit/vhost_user/frontend.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.vm.vhost_user import VhostUserVsockBackend
from enclavekit.vm.virtio_vsock import (
    HEARTBEAT_BYTE,
    HEARTBEAT_PORT,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Op,
)

from .frontend import FakeFrontend, request

CID = 16


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                while not stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[object]:
    made: list[tuple[VhostUserVsockBackend, FakeFrontend]] = []

    def make(**kwargs: object) -> tuple[VhostUserVsockBackend, FakeFrontend]:
        path = tmp_path / f"vu{len(made)}.sock"
        backend = VhostUserVsockBackend(path, guest_cid=CID, **kwargs).start()  # type: ignore[arg-type]
        frontend = FakeFrontend(str(path))
        made.append((backend, frontend))
        return backend, frontend

    yield make
    for backend, frontend in made:
        frontend.close()
        backend.stop()
        assert backend.error is None


def test_negotiation_offers_version_1_and_reports_the_guest_cid(backend_factory) -> None:
    _, fe = backend_factory()
    assert fe.negotiated["cid"] == CID
    assert fe.negotiated["features"] & (1 << 32)
    assert fe.negotiated["protocol"] & (1 << 9)  # CONFIG


def test_heartbeat_is_echoed(backend_factory) -> None:
    backend, fe = backend_factory()
    fe.add_rx_buffers(4)
    fe.send(request(CID, 1025, HEARTBEAT_PORT))
    (resp,) = fe.received()
    assert (resp.op, resp.src_cid, resp.dst_cid, resp.src_port, resp.dst_port) == (
        Op.RESPONSE,
        3,
        CID,
        HEARTBEAT_PORT,
        1025,
    )
    fe.send(request(CID, 1025, HEARTBEAT_PORT, Op.RW, bytes([HEARTBEAT_BYTE])))
    (echo,) = fe.received()
    assert echo.op == Op.RW
    assert echo.payload == bytes([HEARTBEAT_BYTE])
    assert backend.heartbeat_seen.wait(1)
    fe.send(request(CID, 1025, HEARTBEAT_PORT, Op.SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND))
    (rst,) = fe.received()
    assert rst.op == Op.RST


def test_rings_whose_memory_a_restarted_guest_reused_are_stopped_untouched_then_set_up_again(
    backend_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The QEMU flake, end to end: the guest restarts through its firmware without resetting the device and
    its new kernel reuses the old rings' memory (here: zeroed, so the TX available index reads 0 after 2
    chains were taken). The back-end must stop the rings without writing into that memory; when the new
    kernel sets the device up again the rings work, and its init heartbeat (the runner's sign of a second
    boot) gets through."""
    backend, fe = backend_factory()
    fe.add_rx_buffers(4)
    fe.send(request(CID, 1025, HEARTBEAT_PORT))
    fe.send(request(CID, 1025, HEARTBEAT_PORT, Op.RW, bytes([HEARTBEAT_BYTE])))
    assert [p.op for p in fe.received(count=2)] == [Op.RESPONSE, Op.RW]
    assert fe.tx_used() == 2
    for q in range(2):
        fe.mem[fe.rings[q] : fe.rings[q] + 0x1000] = bytes(0x1000)
    os.eventfd_write(fe.kick[1], 1)
    deadline = time.monotonic() + 5
    while "stopping the rings" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "is 65534 entries past the 2 already taken" in caplog.text
    assert fe.tx_used() == 0  # no used element was written into the reused memory
    fe.restart_rings()
    fe.add_rx_buffers(4)
    fe.send(request(CID, 1026, HEARTBEAT_PORT))
    fe.send(request(CID, 1026, HEARTBEAT_PORT, Op.RW, bytes([HEARTBEAT_BYTE])))
    assert [p.op for p in fe.received(count=2)] == [Op.RESPONSE, Op.RW]
    assert backend.parent.heartbeats == 2


def test_guest_connection_is_forwarded_to_a_local_endpoint(backend_factory, echo_server) -> None:
    _, fe = backend_factory(forward={5000: echo_server})
    fe.add_rx_buffers(8)
    fe.send(request(CID, 2000, 5000))
    assert fe.received()[0].op == Op.RESPONSE
    fe.send(request(CID, 2000, 5000, Op.RW, b"hello enclave"), split_header=True)
    (data,) = fe.received()
    assert data.op == Op.RW
    assert data.payload == b"HELLO ENCLAVE"


def test_large_reply_respects_rx_buffer_size_and_credit(backend_factory, echo_server) -> None:
    _, fe = backend_factory(forward={5000: echo_server})
    fe.add_rx_buffers(15, size=1024)
    fe.send(request(CID, 2000, 5000))
    assert fe.received()[0].op == Op.RESPONSE
    blob = bytes(range(256)) * 20  # 5120 bytes
    fe.send(request(CID, 2000, 5000, Op.RW, blob))
    got = b""
    while len(got) < len(blob):
        for pkt in fe.received():
            assert len(pkt.payload) <= 1024 - 44
            got += pkt.payload
    assert got == blob.upper()


def test_unserved_port_is_reset(backend_factory) -> None:
    _, fe = backend_factory()
    fe.add_rx_buffers(2)
    fe.send(request(CID, 3000, 4444))
    (rst,) = fe.received()
    assert (rst.op, rst.src_port, rst.dst_port) == (Op.RST, 4444, 3000)


def test_packet_from_a_spoofed_cid_is_dropped(backend_factory) -> None:
    """A packet claiming another source CID must not open a connection."""
    _, fe = backend_factory()
    fe.add_rx_buffers(2)
    fe.send(request(CID + 1, 3000, HEARTBEAT_PORT))
    fe.send(request(CID, 3001, 4444))
    (rst,) = fe.received()
    assert rst.dst_port == 3001  # only the genuine packet was answered


def test_truncated_tx_packet_is_dropped_without_stopping(backend_factory) -> None:
    """A TX buffer shorter than a header, or shorter than its declared payload, is dropped."""
    backend, fe = backend_factory()
    fe.add_rx_buffers(2)
    fe.send_raw(b"\x01" * 10)
    fe.send_raw(request(CID, 1, HEARTBEAT_PORT, Op.RW, b"xyz").encode()[:-2])
    fe.send(request(CID, 3001, 4444))
    (rst,) = fe.received()
    assert rst.op == Op.RST
    assert backend.error is None


def test_local_listener_connects_into_the_guest(backend_factory) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    _, fe = backend_factory(listen={("127.0.0.1", port): 7000})
    fe.add_rx_buffers(8)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    (req,) = fe.received()
    assert (req.op, req.dst_cid, req.dst_port) == (Op.REQUEST, CID, 7000)
    guest = lambda op, payload=b"", flags=0: request(CID, 7000, req.src_port, op, payload, flags)  # noqa: E731
    fe.send(guest(Op.RESPONSE))
    client.sendall(b"ping")
    (data,) = fe.received()
    assert data.op == Op.RW
    assert data.payload == b"ping"
    fe.send(guest(Op.RW, b"pong"))
    assert client.recv(10) == b"pong"
    client.close()
    (shutdown,) = fe.received()
    assert shutdown.op == Op.SHUTDOWN
    assert shutdown.flags & SHUTDOWN_SEND
    fe.send(guest(Op.SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND))
    (rst,) = fe.received()
    assert rst.op == Op.RST


def test_backend_stops_when_the_frontend_goes_away(backend_factory) -> None:
    backend, fe = backend_factory()
    fe.sock.close()
    assert backend.frontend_gone.wait(5)


def test_oversized_message_is_refused(tmp_path: Path) -> None:
    """A message announcing a huge payload ends the session instead of allocating it."""
    path = tmp_path / "vu.sock"
    backend = VhostUserVsockBackend(path, guest_cid=CID).start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.sendall(
            (5).to_bytes(4, "little") + (1).to_bytes(4, "little") + (1 << 30).to_bytes(4, "little")
        )
        assert backend.frontend_gone.wait(5)
        sock.close()
    finally:
        backend.stop()
    assert backend.error is not None


def test_guest_cid_must_be_a_guest_cid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CID"):
        VhostUserVsockBackend(tmp_path / "x.sock", guest_cid=2)


def test_guest_connection_is_handed_to_a_relay_server(backend_factory, echo_server) -> None:
    """The transport package's parent-side contract: a RelayServer gets one end of a socket pair."""
    from enclavekit.transport import RelayServer

    relay = RelayServer(lambda: socket.create_connection(echo_server, timeout=5), workers=1)
    try:
        _, fe = backend_factory(forward={8000: relay})
        fe.add_rx_buffers(8)
        fe.send(request(CID, 2100, 8000))
        assert fe.received()[0].op == Op.RESPONSE
        fe.send(request(CID, 2100, 8000, Op.RW, b"through the proxy"))
        (data,) = fe.received()
        assert data.payload == b"THROUGH THE PROXY"
    finally:
        relay.close()


def test_closed_relay_server_resets_the_guest(backend_factory) -> None:
    from enclavekit.transport import RelayServer

    relay = RelayServer(lambda: socket.create_connection(("127.0.0.1", 9), timeout=1), workers=1)
    relay.close()
    _, fe = backend_factory(forward={8000: relay})
    fe.add_rx_buffers(2)
    fe.send(request(CID, 2101, 8000))
    (rst,) = fe.received()
    assert rst.op == Op.RST

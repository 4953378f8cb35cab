"""connect/listen (sync and asyncio) over tcp://, and AF_VSOCK where the kernel offers loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from enclavekit.transport.address import (
    VMADDR_CID_LOCAL,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    vsock_available,
)
from enclavekit.transport.errors import TransportError
from enclavekit.transport.sockets import (
    connect,
    listen,
    local_address,
    open_connection,
    start_server,
)

from .conftest import EchoServer, recv_all


def _vsock_loopback() -> bool:
    """AF_VSOCK exists and CID 1 (vsock_loopback) accepts a bind."""
    if not vsock_available():
        return False
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def test_sync_connect_and_listen_over_tcp() -> None:
    listener = listen("tcp://127.0.0.1:0")
    address = local_address(listener)
    assert isinstance(address, TcpAddress)
    assert address.port != 0

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    thread = threading.Thread(target=accept)
    thread.start()
    with connect(address, timeout=5) as sock:
        sock.sendall(b"hello")
        assert sock.recv(100) == b"HELLO"
    thread.join(5)
    listener.close()


def test_connect_refused_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot connect to tcp://127.0.0.1"):
        connect(f"tcp://127.0.0.1:{_free_port()}", timeout=2)


def test_listen_on_busy_port_is_a_transport_error() -> None:
    listener = listen("tcp://127.0.0.1:0")
    port = local_address(listener).port
    blocker = socket.socket()
    try:
        with pytest.raises(TransportError, match="cannot listen"):
            # SO_REUSEADDR does not allow two listeners on the same port.
            listen(f"tcp://127.0.0.1:{port}")
    finally:
        blocker.close()
        listener.close()


def test_asyncio_open_connection_and_start_server(echo_server: EchoServer) -> None:
    async def main() -> bytes:
        async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write((await reader.read(100)).upper())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await start_server(shout, "tcp://127.0.0.1:0")
        port = server.sockets[0].getsockname()[1]
        reader, writer = await open_connection(f"tcp://127.0.0.1:{port}", timeout=5)
        writer.write(b"quiet")
        await writer.drain()
        answer = await reader.read(100)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return answer

    assert asyncio.run(main()) == b"QUIET"


def test_asyncio_connect_refused_is_a_transport_error() -> None:
    async def main() -> None:
        await open_connection(f"tcp://127.0.0.1:{_free_port()}", timeout=2)

    with pytest.raises(TransportError):
        asyncio.run(main())


@pytest.mark.hardware
@pytest.mark.skipif(not _vsock_loopback(), reason="AF_VSOCK loopback (vsock_loopback) unavailable")
def test_vsock_loopback_round_trip() -> None:
    listener = listen(VsockAddress(VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
    address = local_address(listener)
    assert isinstance(address, VsockAddress)

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(100))

    thread = threading.Thread(target=accept)
    thread.start()
    with connect(VsockAddress(VMADDR_CID_LOCAL, address.port), timeout=5) as sock:
        sock.sendall(b"over vsock")
        assert sock.recv(100) == b"over vsock"
    thread.join(5)
    listener.close()


@pytest.mark.skipif(vsock_available(), reason="only meaningful where AF_VSOCK is missing")
def test_vsock_unavailable_is_explained() -> None:
    with pytest.raises(TransportError, match="AF_VSOCK is not available"):
        connect("vsock://3:8000")


def test_unix_socket_listen_connect_and_proxy(tmp_path: Path, echo_server: EchoServer) -> None:
    """A local backend (vhost-user vsock) can reach the proxy through a Unix socket."""
    from enclavekit.transport.allowlist import Allowlist, AllowlistEntry
    from enclavekit.transport.proxy import VsockProxy

    path = str(tmp_path / "proxy.sock")
    listener = listen(f"unix://{path}")
    assert local_address(listener) == UnixAddress(path)
    port = echo_server.address.port
    with VsockProxy(
        "127.0.0.1", port, allowlist=Allowlist((AllowlistEntry("127.0.0.1", port),))
    ) as proxy:
        proxy.start(listener)
        with connect(f"unix://{path}", timeout=5) as sock:
            sock.sendall(b"via unix")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"via unix"

        async def via_asyncio() -> bytes:
            reader, writer = await open_connection(f"unix://{path}", timeout=5)
            writer.write(b"async unix")
            writer.write_eof()
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            return data

        assert asyncio.run(via_asyncio()) == b"async unix"

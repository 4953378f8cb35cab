"""VsockProxy and Forwarder over TCP (the stand-in for AF_VSOCK), and the RelayServer contract."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from enclavekit.transport.address import TcpAddress
from enclavekit.transport.allowlist import Allowlist, AllowlistEntry, IpFamily
from enclavekit.transport.errors import TargetNotAllowed, TransportError
from enclavekit.transport.forwarder import Forwarder
from enclavekit.transport.proxy import VsockProxy
from enclavekit.transport.server import RelayServer
from enclavekit.transport.sockets import connect, listen, local_address

from .conftest import EchoServer, recv_all


def _allow(port: int) -> Allowlist:
    return Allowlist((AllowlistEntry("127.0.0.1", port),))


@pytest.fixture
def proxy(echo_server: EchoServer) -> Iterator[tuple[VsockProxy, TcpAddress]]:
    proxy = VsockProxy(
        "127.0.0.1", echo_server.address.port, allowlist=_allow(echo_server.address.port), workers=3
    )
    listener = listen("tcp://127.0.0.1:0")
    address = local_address(listener)
    assert isinstance(address, TcpAddress)
    proxy.start(listener)
    yield proxy, address
    proxy.close()


def _roundtrip(address: TcpAddress, payload: bytes) -> bytes:
    with connect(address, timeout=5) as sock:
        sender = threading.Thread(
            target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        data = recv_all(sock)
        sender.join()
        return data


def test_proxy_relays_to_allowed_target(proxy: tuple[VsockProxy, TcpAddress]) -> None:
    _, address = proxy
    payload = os.urandom(2_000_000)
    assert _roundtrip(address, payload) == payload


def test_proxy_serves_concurrent_clients(proxy: tuple[VsockProxy, TcpAddress]) -> None:
    _, address = proxy
    results: list[bool] = []

    def one(i: int) -> None:
        payload = bytes([i]) * 200_000
        results.append(_roundtrip(address, payload) == payload)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 6


def test_unlisted_target_refused_before_listening(echo_server: EchoServer) -> None:
    """Egress bypass: the proxy will not even start for a target outside the allowlist."""
    with pytest.raises(TargetNotAllowed):
        VsockProxy("127.0.0.1", echo_server.address.port, allowlist=_allow(1))


def test_proxy_survives_client_that_disconnects_mid_stream(
    proxy: tuple[VsockProxy, TcpAddress],
) -> None:
    _, address = proxy
    sock = connect(address)
    sock.sendall(b"x" * 100_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST
    payload = os.urandom(100_000)
    assert _roundtrip(address, payload) == payload


def test_proxy_drops_client_that_never_reads(echo_server: EchoServer) -> None:
    """Slow-read DoS: a client that sends but never reads is dropped after the stall timeout."""
    proxy = VsockProxy(
        "127.0.0.1",
        echo_server.address.port,
        allowlist=_allow(echo_server.address.port),
        workers=1,
        stall_timeout=0.3,
        buffer_size=16 * 1024,
    )
    listener = listen("tcp://127.0.0.1:0")
    address = local_address(listener)
    assert isinstance(address, TcpAddress)
    proxy.start(listener)
    try:
        hog = connect(address)

        def flood() -> None:  # the echo comes back and is never read
            try:
                while True:
                    hog.sendall(b"y" * 65536)
            except OSError:
                pass

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        # One event loop relays this second client while the hog is still being held.
        payload = b"still alive"
        assert _roundtrip(address, payload) == payload
        flooder.join(10)
        assert not flooder.is_alive()  # the hog was dropped: its sends failed
        hog.close()
    finally:
        proxy.close()


def test_submit_accepts_socketpair_from_another_backend(
    proxy: tuple[VsockProxy, TcpAddress],
) -> None:
    """The contract for other backends (vhost-user): hand over one end of a socketpair."""
    relay_server, _ = proxy
    ours, theirs = socket.socketpair()
    future = relay_server.submit(ours)
    theirs.sendall(b"from a byte stream")
    theirs.shutdown(socket.SHUT_WR)
    assert recv_all(theirs) == b"from a byte stream"
    theirs.close()
    stats = future.result(5)
    assert stats.a_to_b == stats.b_to_a == len(b"from a byte stream")


def test_upstream_failure_closes_the_client() -> None:
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    proxy = VsockProxy("127.0.0.1", port, allowlist=_allow(port))
    ours, theirs = socket.socketpair()
    stats = proxy.submit(ours).result(15)
    assert stats.outcome == "reset"
    assert theirs.recv(10) == b""
    theirs.close()
    proxy.close()
    with pytest.raises(TransportError, match="cannot connect"):
        proxy.connect_upstream()


def test_dns_is_refreshed_after_interval(echo_server: EchoServer) -> None:
    calls: list[str] = []
    now = [0.0]

    def resolver(host: str, family: IpFamily) -> tuple[object, ...]:
        import ipaddress

        calls.append(host)
        return (ipaddress.ip_address("127.0.0.1"),)

    proxy = VsockProxy(
        "localhost",
        echo_server.address.port,
        allowlist=Allowlist((AllowlistEntry("localhost", echo_server.address.port),)),
        resolver=resolver,  # type: ignore[arg-type]
        dns_refresh=30,
        clock=lambda: now[0],
    )
    proxy.connect_upstream().close()
    assert len(calls) == 1
    now[0] = 31
    proxy.connect_upstream().close()
    assert len(calls) == 2
    proxy.close()


def test_close_ends_active_relays(proxy: tuple[VsockProxy, TcpAddress]) -> None:
    relay_server, address = proxy
    sock = connect(address)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    started = time.monotonic()
    relay_server.close()
    assert time.monotonic() - started < 5
    assert sock.recv(10) == b""
    sock.close()
    ours, theirs = socket.socketpair()
    with pytest.raises(RuntimeError):
        relay_server.submit(ours)
    theirs.close()


def test_forwarder_tunnels_to_target(echo_server: EchoServer) -> None:
    with Forwarder(echo_server.address, workers=2) as forwarder:
        listener = listen("tcp://127.0.0.1:0")
        address = local_address(listener)
        assert isinstance(address, TcpAddress)
        forwarder.start(listener)
        payload = os.urandom(300_000)
        assert _roundtrip(address, payload) == payload


def test_relay_server_rejects_zero_workers() -> None:
    with pytest.raises(ValueError, match="workers"):
        RelayServer(lambda: socket.socket(), workers=0)

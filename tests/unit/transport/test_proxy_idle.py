"""Idle clients cannot block the relay: no connection slots, an idle timeout, a polite connection limit.

nitro-cli's vsock-proxy (and enclavekit's before issue 18) relays each connection on one of ``-w``
worker threads (default 4), so four connections that send nothing stop every further client. All
clients here are loopback TCP (the stand-in for AF_VSOCK); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator

import pytest

from enclavekit.transport.allowlist import Allowlist, AllowlistEntry
from enclavekit.transport.proxy import VsockProxy
from enclavekit.transport.server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_WORKERS,
    FDS_PER_CONNECTION,
    RelayServer,
    connection_limit,
)

from .conftest import SelectorEchoServer

#: How long a client may wait for its echo before the test calls the relay blocked.
PATIENCE = 5.0


def _proxy(echo: SelectorEchoServer, **kwargs: object) -> VsockProxy:
    port = echo.address.port
    return VsockProxy(
        "127.0.0.1",
        port,
        allowlist=Allowlist((AllowlistEntry("127.0.0.1", port),)),
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _listening(server: RelayServer) -> Iterator[tuple[str, int]]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    address = listener.getsockname()
    server.start(listener)
    try:
        yield address
    finally:
        server.close()


def _echo_roundtrip(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=PATIENCE) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                break
            got += chunk
        return got


def _open_idle(address: tuple[str, int], count: int) -> list[socket.socket]:
    idle = []
    for _ in range(count):
        idle.append(socket.create_connection(address, timeout=PATIENCE))
    return idle


def _wait_until(condition: object, timeout: float = PATIENCE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_attack_four_idle_connections_do_not_block_a_new_client(
    selector_echo_server: SelectorEchoServer,
) -> None:
    """nitro-cli's default: -w 4. Four silent clients used to take every worker."""
    proxy = _proxy(selector_echo_server, workers=DEFAULT_WORKERS)
    with _listening(proxy) as address:
        idle = _open_idle(address, DEFAULT_WORKERS)
        try:
            payload = os.urandom(1024)
            assert _echo_roundtrip(address, payload) == payload
        finally:
            for sock in idle:
                sock.close()


def _raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def test_attack_thousand_idle_connections_do_not_block_a_new_client(
    selector_echo_server: SelectorEchoServer,
) -> None:
    """1,000 silent clients (fewer if this process may not open the descriptors): still served."""
    soft = _raise_nofile(8192)
    # This process holds every end: client, relay (2) and echo server side, plus a reserve.
    count = min(1000, (soft - 256) // 4)
    if count < 100:
        pytest.skip(f"RLIMIT_NOFILE {soft} leaves room for only {count} idle connections")
    proxy = _proxy(selector_echo_server, workers=2)
    with _listening(proxy) as address:
        idle = _open_idle(address, count)
        try:
            assert _wait_until(lambda: proxy.open_connections == count)
            for _ in range(3):
                payload = os.urandom(1024)
                assert _echo_roundtrip(address, payload) == payload
            # ... and the idle ones are relayed too, not parked.
            idle[0].sendall(b"still here")
            idle[0].settimeout(PATIENCE)
            assert idle[0].recv(100) == b"still here"
        finally:
            for sock in idle:
                sock.close()


def test_idle_connections_hold_no_relay_buffers(selector_echo_server: SelectorEchoServer) -> None:
    """An idle connection costs its two sockets: the splice pipes exist only while bytes move."""
    proxy = _proxy(selector_echo_server, workers=1)
    with _listening(proxy) as address:
        assert _echo_roundtrip(address, b"warm up") == b"warm up"  # loops and threads exist now
        before = len(os.listdir("/proc/self/fd"))
        idle = _open_idle(address, 50)
        try:
            assert _wait_until(lambda: proxy.open_connections == 50)
            time.sleep(0.1)
            grown = len(os.listdir("/proc/self/fd")) - before
            # Per idle connection: client + relay side + upstream + echo server side = 4.
            assert grown <= 50 * 4 + 4, grown
        finally:
            for sock in idle:
                sock.close()


def test_idle_timeout_closes_a_silent_connection(selector_echo_server: SelectorEchoServer) -> None:
    proxy = _proxy(selector_echo_server, idle_timeout=0.3)
    with _listening(proxy) as address:
        sock = socket.create_connection(address, timeout=PATIENCE)
        with sock:
            sock.settimeout(PATIENCE)
            started = time.monotonic()
            assert sock.recv(10) == b""  # closed by the relay, not by the test's timeout
            assert time.monotonic() - started < PATIENCE
        assert _wait_until(lambda: proxy.open_connections == 0)


def test_traffic_keeps_a_connection_past_the_idle_timeout(
    selector_echo_server: SelectorEchoServer,
) -> None:
    proxy = _proxy(selector_echo_server, idle_timeout=0.4)
    with _listening(proxy) as address:
        with socket.create_connection(address, timeout=PATIENCE) as sock:
            sock.settimeout(PATIENCE)
            for i in range(10):  # 1 s of traffic, a message every 0.1 s
                sock.sendall(bytes([i]))
                assert sock.recv(1) == bytes([i])
                time.sleep(0.1)


def test_attack_connection_flood_beyond_the_limit_is_refused_not_queued(
    selector_echo_server: SelectorEchoServer,
) -> None:
    """Past max_connections a client is closed at once (it can retry), never left hanging."""
    proxy = _proxy(selector_echo_server, max_connections=3)
    assert proxy.max_connections == 3
    with _listening(proxy) as address:
        held = _open_idle(address, 3)
        try:
            assert _wait_until(lambda: proxy.open_connections == 3)
            with socket.create_connection(address, timeout=PATIENCE) as extra:
                extra.settimeout(PATIENCE)
                started = time.monotonic()
                with contextlib.suppress(ConnectionResetError):
                    assert extra.recv(10) == b""
                assert time.monotonic() - started < PATIENCE
            ours, theirs = socket.socketpair()
            assert proxy.submit(ours).result(PATIENCE).outcome == "refused"
            theirs.close()
            held.pop().close()  # a slot frees up ...
            assert _wait_until(lambda: proxy.open_connections == 2)
            assert _echo_roundtrip(address, b"served again") == b"served again"
        finally:
            for sock in held:
                sock.close()


def test_connection_limit_follows_the_descriptor_limit() -> None:
    """max_connections never exceeds what RLIMIT_NOFILE can hold with every pipe open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = connection_limit(None, workers=4)
    assert 1 <= limit <= DEFAULT_MAX_CONNECTIONS
    if soft != resource.RLIM_INFINITY:
        assert limit * FDS_PER_CONNECTION < soft
    assert connection_limit(5, workers=4) == 5
    assert connection_limit(10**9, workers=4) == limit


def test_workers_are_event_loops_not_connection_slots(
    selector_echo_server: SelectorEchoServer,
) -> None:
    """-w 1: one thread relays many connections at once."""
    proxy = _proxy(selector_echo_server, workers=1)
    with _listening(proxy) as address:
        idle = _open_idle(address, 20)
        try:
            for sock in idle:
                sock.sendall(b"ping")
            for sock in idle:
                sock.settimeout(PATIENCE)
                assert sock.recv(4) == b"ping"
        finally:
            for sock in idle:
                sock.close()


def test_invalid_limits_are_value_errors(selector_echo_server: SelectorEchoServer) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        _proxy(selector_echo_server, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        _proxy(selector_echo_server, idle_timeout=0)

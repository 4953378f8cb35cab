"""The relay loop: both directions, half-close, resets, stalled readers, bounded memory."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.transport.relay import RelayStats, relay, relay_streams

from .conftest import recv_all

Quad = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


@pytest.fixture
def pairs() -> Iterator[Quad]:
    """client <-> (a relay b) <-> server, all closed at teardown."""
    client, proxy_a = socket.socketpair()
    proxy_b, server = socket.socketpair()
    yield client, proxy_a, proxy_b, server
    for sock in (client, proxy_a, proxy_b, server):
        sock.close()


def _start(
    a: socket.socket, b: socket.socket, **kwargs: object
) -> tuple[threading.Thread, list[RelayStats]]:
    out: list[RelayStats] = []
    thread = threading.Thread(target=lambda: out.append(relay(a, b, **kwargs)), daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread, out


@pytest.mark.parametrize("zero_copy", [True, False])
def test_bulk_both_ways_with_half_close(pairs: Quad, zero_copy: bool) -> None:
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb, zero_copy=zero_copy, buffer_size=4096)
    up = os.urandom(3_000_000)
    down = os.urandom(1_000_000)

    def send_up() -> None:
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)

    def serve() -> None:
        got = recv_all(server)  # reads until the client's EOF arrives
        server.sendall(down)
        server.shutdown(socket.SHUT_WR)
        received.append(got)

    received: list[bytes] = []
    threads = [threading.Thread(target=send_up), threading.Thread(target=serve)]
    for t in threads:
        t.start()
    assert recv_all(client) == down
    for t in threads:
        t.join(10)
    thread.join(10)
    assert received == [up]
    assert out == [RelayStats(len(up), len(down), "closed")]


@pytest.mark.parametrize("zero_copy", [True, False])
def test_reply_after_half_close_still_flows(pairs: Quad, zero_copy: bool) -> None:
    """EOF one way must not cut the other way (HTTP/1.0-style request, then response)."""
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb, zero_copy=zero_copy)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"request"
    time.sleep(0.05)
    server.sendall(b"response")
    server.close()
    assert recv_all(client) == b"response"
    thread.join(5)
    assert out[0].outcome == "closed"


@pytest.mark.parametrize("zero_copy", [True, False])
def test_client_disconnect_mid_stream_ends_relay(pairs: Quad, zero_copy: bool) -> None:
    """A client that resets mid-download ends the relay and closes the upstream side."""
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb, zero_copy=zero_copy, buffer_size=4096)
    stop = threading.Event()

    def flood() -> None:
        try:
            while not stop.is_set():
                server.sendall(b"x" * 65536)
        except OSError:
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    client.recv(1000)
    client.close()
    thread.join(5)
    stop.set()
    assert not thread.is_alive()
    assert out[0].outcome in ("reset", "closed")
    flooder.join(5)
    server.close()


@pytest.mark.parametrize("zero_copy", [True, False])
def test_reader_that_never_reads_is_dropped_after_stall_timeout(
    pairs: Quad, zero_copy: bool
) -> None:
    """Slow-read DoS: a peer that stops reading cannot hold the relay forever."""
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb, zero_copy=zero_copy, buffer_size=4096, stall_timeout=0.3)

    def flood() -> None:
        try:
            while True:
                server.sendall(b"x" * 65536)
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    thread.join(10)
    assert not thread.is_alive()
    assert out[0].outcome == "stalled"
    client.close()
    server.close()


def test_idle_connection_is_not_a_stall(pairs: Quad) -> None:
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb, stall_timeout=0.1)
    time.sleep(0.4)
    assert thread.is_alive()
    client.sendall(b"late")
    assert server.recv(10) == b"late"
    client.close()
    server.close()
    thread.join(5)
    assert out[0].a_to_b == 4


@pytest.mark.parametrize("zero_copy", [True, False])
def test_shutdown_from_another_thread_stops_relay(pairs: Quad, zero_copy: bool) -> None:
    client, pa, pb, server = pairs
    thread, _ = _start(pa, pb, zero_copy=zero_copy)
    time.sleep(0.05)
    pa.shutdown(socket.SHUT_RDWR)
    thread.join(5)
    assert not thread.is_alive()
    client.close()
    server.close()


@pytest.mark.parametrize("zero_copy", [True, False])
def test_memory_stays_bounded_while_relaying(pairs: Quad, zero_copy: bool) -> None:
    """Relaying 32 MiB allocates no more than a small multiple of the buffer size."""
    client, pa, pb, server = pairs
    size = 32 * 1024 * 1024
    tracemalloc.start()
    try:
        thread, out = _start(pa, pb, zero_copy=zero_copy, buffer_size=64 * 1024)

        def sink() -> None:
            buf = bytearray(65536)
            while server.recv_into(buf):
                pass

        sink_thread = threading.Thread(target=sink)
        sink_thread.start()
        chunk = b"\0" * 65536
        for _ in range(size // len(chunk)):
            client.sendall(chunk)
        client.shutdown(socket.SHUT_WR)
        sink_thread.join(30)
        server.close()
        thread.join(10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    client.close()
    assert out[0].a_to_b == size
    assert peak < 2 * 1024 * 1024


def test_invalid_buffer_size_is_a_value_error() -> None:
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="buffer_size"):
        relay(a, b, buffer_size=0)
    a.close()
    b.close()


def test_relay_streams_asyncio() -> None:
    async def main() -> RelayStats:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = echo_server.sockets[0].getsockname()[1]
        stats: list[RelayStats] = []

        async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream = await asyncio.open_connection("127.0.0.1", echo_port)
            stats.append(await relay_streams((reader, writer), upstream))

        proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = proxy_server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(500_000)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        assert got == payload
        writer.close()
        for _ in range(100):
            if stats:
                break
            await asyncio.sleep(0.01)
        proxy_server.close()
        echo_server.close()
        await proxy_server.wait_closed()
        await echo_server.wait_closed()
        return stats[0]

    stats = asyncio.run(main())
    assert stats.a_to_b == 500_000
    assert stats.b_to_a == 500_000


def test_splice_refusal_falls_back_to_copying(pairs: Quad, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket family without splice support (EINVAL) is relayed by copying instead."""
    import errno

    import enclavekit.transport.relay as relay_module

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "splice not supported")

    monkeypatch.setattr(relay_module, "_SPLICE", refuse)
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb)
    client.sendall(b"copied")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"copied"
    server.close()
    thread.join(5)
    assert out[0].a_to_b == 6


def test_splice_refused_on_output_keeps_data(pairs: Quad, monkeypatch: pytest.MonkeyPatch) -> None:
    """If only pipe → destination splicing is refused, bytes already in the pipe are not lost."""
    import errno
    import os as os_module

    import enclavekit.transport.relay as relay_module

    real = os_module.splice

    def half(src: int, dst: int, count: int, **kwargs: object) -> int:
        if stat.S_ISFIFO(os_module.fstat(src).st_mode):
            raise OSError(errno.EINVAL, "splice to this socket not supported")
        return real(src, dst, count, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(relay_module, "_SPLICE", half)
    client, pa, pb, server = pairs
    thread, out = _start(pa, pb)
    client.sendall(b"kept in the pipe")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(server) == b"kept in the pipe"
    server.close()
    thread.join(5)
    assert out[0].a_to_b == len(b"kept in the pipe")


@settings(max_examples=25, deadline=None)
@given(
    up=st.lists(st.binary(min_size=1, max_size=5000), max_size=8),
    down=st.lists(st.binary(min_size=1, max_size=5000), max_size=8),
    buffer_size=st.sampled_from([4096, 8192, 65536]),
    zero_copy=st.booleans(),
)
def test_any_write_pattern_arrives_intact(
    up: list[bytes], down: list[bytes], buffer_size: int, zero_copy: bool
) -> None:
    client, pa = socket.socketpair()
    pb, server = socket.socketpair()
    thread, out = _start(pa, pb, buffer_size=buffer_size, zero_copy=zero_copy)

    def talk(sock: socket.socket, chunks: list[bytes]) -> None:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    writers = [
        threading.Thread(target=talk, args=(client, up)),
        threading.Thread(target=talk, args=(server, down)),
    ]
    for w in writers:
        w.start()
    got_down = recv_all(client)
    got_up = recv_all(server)
    for w in writers:
        w.join(10)
    thread.join(10)
    client.close()
    server.close()
    assert got_up == b"".join(up)
    assert got_down == b"".join(down)
    assert out[0] == RelayStats(len(got_up), len(got_down), "closed")


def test_a_copying_direction_keeps_bytes_only_while_its_destination_is_slow() -> None:
    """Reads go to the thread's scratch buffer: a direction holds at most ``buffer_size`` bytes, and
    only those its destination has not taken; once the reader catches up it holds nothing."""
    from enclavekit.transport.relay import RelayPair

    client, a = socket.socketpair()
    b, upstream = socket.socketpair()
    payload = os.urandom(2 << 20)
    writer = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    writer.start()
    pair = RelayPair(a, b, buffer_size=4096)
    pair.forward.ready = True
    for _ in range(200):  # upstream reads nothing: b's send buffer fills, the rest waits
        pair.step()
    assert pair.forward.holds_buffer
    assert pair.forward.end - pair.forward.start <= 4096
    upstream.setblocking(False)
    received = bytearray()
    deadline = time.monotonic() + 20
    while len(received) < len(payload) and time.monotonic() < deadline:
        pair.step()
        try:
            received += upstream.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(received) == payload
    pair.step()
    assert not pair.forward.holds_buffer and not pair.holds_buffers
    writer.join(5)
    pair.close("closed")
    client.close()
    upstream.close()

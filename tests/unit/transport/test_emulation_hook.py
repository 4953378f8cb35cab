"""enclavekit.transport sends vsock:// addresses to the local runner's emulation when it is on."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from enclavekit import transport
from enclavekit.transport import sockets


@pytest.fixture
def emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "vsock"
    monkeypatch.setenv("ENCLAVEKIT_VSOCK_DIR", str(directory))
    monkeypatch.setenv("ENCLAVEKIT_VSOCK_CID", "16")
    return directory


def test_sync_listen_and_connect_use_the_emulation_directory(emulated: Path) -> None:
    server = sockets.listen("vsock://ANY:5000")
    assert (emulated / "16.5000").is_socket()

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(5))

    thread = threading.Thread(target=echo)
    thread.start()
    with sockets.connect("vsock://16:5000", timeout=5) as client:
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
    thread.join()
    server.close()


def test_asyncio_start_server_and_open_connection_use_the_emulation_directory(
    emulated: Path,
) -> None:
    async def main() -> bytes:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(4))
            await writer.drain()
            writer.close()

        server = await sockets.start_server(handler, "vsock://ANY:5001")
        async with server:
            reader, writer = await sockets.open_connection("vsock://16:5001", timeout=5)
            writer.write(b"ping")
            await writer.drain()
            data = await reader.readexactly(4)
            writer.close()
            return data

    assert asyncio.run(main()) == b"ping"
    assert (emulated / "16.5001").exists()


def test_tcp_addresses_are_never_remapped(emulated: Path) -> None:
    server = sockets.listen("tcp://127.0.0.1:0")
    assert server.family != __import__("socket").AF_UNIX
    server.close()
    assert not emulated.exists()


def test_package_exports_still_work(emulated: Path) -> None:
    assert hasattr(transport, "connect")

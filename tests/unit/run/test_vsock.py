"""vsock emulated over unix sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from enclavekit.run import vsock
from enclavekit.transport.address import TcpAddress, VsockAddress
from enclavekit.transport.errors import TransportError


@pytest.fixture
def emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "v"
    monkeypatch.setenv(vsock.ENV_DIR, str(directory))
    monkeypatch.setenv(vsock.ENV_CID, "16")
    return directory


def _echo_once(listener: socket.socket) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_enclave_listens_on_any_and_parent_connects_by_cid(emulated: Path) -> None:
    with vsock.listen("vsock://ANY:5000") as listener:
        assert vsock.bound_address(listener) == VsockAddress(16, 5000)
        assert (emulated / "16.5000").exists()
        thread = _echo_once(listener)
        with vsock.connect("vsock://16:5000", directory=emulated) as conn:
            conn.sendall(b"ping")
            assert conn.recv(10) == b"PING"
        thread.join(5)


def test_enclave_reaches_the_parent_on_cid_3_and_host_cid_2(emulated: Path) -> None:
    with vsock.listen("vsock://ANY:8000", directory=emulated, own_cid=3) as listener:
        for address in ("vsock://3:8000", "vsock://2:8000"):
            thread = _echo_once(listener)
            with vsock.connect(address) as conn:
                conn.sendall(b"x")
                assert conn.recv(10) == b"X"
            thread.join(5)


def test_port_zero_picks_a_free_port(emulated: Path) -> None:
    with vsock.listen("vsock://ANY:0") as listener:
        address = vsock.bound_address(listener)
        assert isinstance(address, VsockAddress) and address.port >= 49152


def test_stale_socket_is_replaced_and_live_one_refused(emulated: Path) -> None:
    first = vsock.listen("vsock://ANY:7000")
    with pytest.raises(TransportError, match="already in use"):
        vsock.listen("vsock://ANY:7000")
    first.close()  # the file stays behind: stale
    vsock.listen("vsock://ANY:7000").close()


def test_connect_without_listener_names_the_address(emulated: Path) -> None:
    with pytest.raises(TransportError, match=r"vsock://16:9"):
        vsock.connect("vsock://16:9")


def test_without_emulation_tcp_goes_to_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vsock.ENV_DIR, raising=False)
    with vsock.listen("tcp://127.0.0.1:0") as listener:
        address = vsock.bound_address(listener)
        assert isinstance(address, TcpAddress)
        thread = _echo_once(listener)
        with vsock.connect(address) as conn:
            conn.sendall(b"tcp")
            assert conn.recv(10) == b"TCP"
        thread.join(5)


def test_bad_cid_variable_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclavekit.errors import UsageError

    monkeypatch.setenv(vsock.ENV_CID, "sixteen")
    with pytest.raises(UsageError):
        vsock.local_cid()


def test_asyncio_server_and_connection(emulated: Path) -> None:
    async def main() -> bytes:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write((await reader.read(10)).upper())
            await writer.drain()
            writer.close()

        server = await vsock.start_server(handler, "vsock://ANY:6000")
        async with server:
            reader, writer = await vsock.open_connection("vsock://16:6000", timeout=5)
            writer.write(b"async")
            await writer.drain()
            data = await reader.read(10)
            writer.close()
            return data

    assert asyncio.run(main()) == b"ASYNC"


def test_emulated_socket_path_hook(emulated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert vsock.emulated_socket_path("vsock://3:8000", listening=False) == emulated / "3.8000"
    assert vsock.emulated_socket_path("vsock://ANY:5000", listening=True) == emulated / "16.5000"
    assert vsock.emulated_socket_path("tcp://127.0.0.1:80", listening=False) is None
    monkeypatch.delenv(vsock.ENV_DIR)
    assert vsock.emulated_socket_path("vsock://3:8000", listening=False) is None

"""The emulator served over sockets: the same answers as in process, many clients at once."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit._cbor import loads
from enclavekit.errors import NsmError, UsageError
from enclavekit.nsm import Nsm, NsmEmulator
from enclavekit.nsm.messages import GetRandom, encode_request
from enclavekit.nsm.server import serve_in_background


@pytest.fixture
def tcp_url(emulator: NsmEmulator) -> Iterator[str]:
    with serve_in_background(emulator, "tcp://127.0.0.1:0") as url:
        yield url


def test_tcp_client_gets_the_same_state_as_in_process(tcp_url: str, emulator: NsmEmulator) -> None:
    with Nsm.connect(tcp_url) as client:
        assert client.describe_nsm().module_id == emulator.module_id
        client.extend_pcr(16, b"abc")
    assert emulator.pcr(16)[1] == client_value(tcp_url, 16)


def client_value(url: str, index: int) -> bytes:
    with Nsm.connect(url) as client:
        return client.describe_pcr(index).data


def test_relative_unix_path_is_accepted(emulator: NsmEmulator, tmp_path: Path) -> None:
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with serve_in_background(emulator, "unix:rel.sock") as address, Nsm.connect(address) as c:
            assert len(c.get_random()) == 256
    finally:
        os.chdir(cwd)


def test_unix_socket_roundtrip(emulator: NsmEmulator, tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/nsm.sock"
    with serve_in_background(emulator, url) as address, Nsm.connect(address) as client:
        document = client.attestation(nonce=b"n")
        assert loads(loads(document)[2])["nonce"] == b"n"
    assert not (tmp_path / "nsm.sock").exists()


def test_errors_travel_over_the_socket(tcp_url: str) -> None:
    with Nsm.connect(tcp_url) as client, pytest.raises(NsmError) as excinfo:
        client.describe_pcr(99)
    assert excinfo.value.code == "InvalidIndex"


def test_many_concurrent_clients_get_valid_answers(tcp_url: str) -> None:
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with Nsm.connect(tcp_url) as client:
                for i in range(10):
                    doc = client.attestation(nonce=bytes([i]))
                    assert loads(loads(doc)[2])["nonce"] == bytes([i])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def raw_exchange(url: str, frame: bytes) -> bytes:
    host, port = url.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(frame)
        header = sock.recv(4, socket.MSG_WAITALL)
        if not header:
            return b""
        (length,) = struct.unpack(">I", header)
        return sock.recv(length, socket.MSG_WAITALL)


def test_request_over_4096_bytes_is_input_too_large_on_the_wire(tcp_url: str) -> None:
    body = b"\x00" * 5000
    answer = raw_exchange(tcp_url, struct.pack(">I", len(body)) + body)
    assert answer == bytes.fromhex("a1654572726f726d496e707574546f6f4c61726765")


def test_garbage_request_is_invalid_operation(tcp_url: str) -> None:
    body = b"\xff\xfe"
    answer = raw_exchange(tcp_url, struct.pack(">I", len(body)) + body)
    assert answer == bytes.fromhex("a1654572726f7270496e76616c69644f7065726174696f6e")


def test_huge_frame_length_closes_the_connection_without_allocating(tcp_url: str) -> None:
    """A client announcing a 4 GiB frame is disconnected, not buffered."""
    assert raw_exchange(tcp_url, struct.pack(">I", 0xFFFFFFFF)) == b""
    with Nsm.connect(tcp_url) as client:  # the server is still fine
        assert len(client.get_random()) == 256


def test_raw_frames_match_the_device_encoding(tcp_url: str) -> None:
    body = encode_request(GetRandom())
    answer = raw_exchange(tcp_url, struct.pack(">I", len(body)) + body)
    assert answer.startswith(bytes.fromhex("a16947657452616e646f6da16672616e646f6d5901 00"))


def test_unreachable_emulator_error_says_how_to_start_one(tmp_path: Path) -> None:
    with Nsm.connect(f"unix://{tmp_path}/absent.sock") as client, pytest.raises(NsmError) as exc:
        client.get_random()
    assert "enclavekit nsm serve" in str(exc.value)


def test_listen_on_a_regular_file_is_refused(emulator: NsmEmulator, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(UsageError), serve_in_background(emulator, f"unix://{target}"):
        pass
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "url",
    ["http://x", "tcp://host", "unix://", "tcp://:80", "unix://tmp/nsm.sock", "tcp://h:99999"],
)
def test_bad_addresses_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        Nsm.connect(url)


def test_symlink_at_the_socket_path_is_not_followed_or_removed(
    emulator: NsmEmulator, tmp_path: Path
) -> None:
    """A symlink planted at --listen must not make the server unlink or bind through it."""
    victim = tmp_path / "victim"
    victim.write_text("data")
    link = tmp_path / "nsm.sock"
    link.symlink_to(victim)
    with pytest.raises(UsageError), serve_in_background(emulator, f"unix://{link}"):
        pass
    assert link.is_symlink()
    assert victim.read_text() == "data"


def test_client_reconnects_after_a_server_restart_without_resending(
    emulator: NsmEmulator, tmp_path: Path
) -> None:
    url = f"unix://{tmp_path}/nsm.sock"
    client = Nsm.connect(url)
    with serve_in_background(emulator, url):
        client.extend_pcr(16, b"a")
    with serve_in_background(emulator, url):
        with pytest.raises(NsmError, match="may or may not"):
            client.extend_pcr(16, b"b")  # the old connection is gone: reported, not resent
        assert client.describe_pcr(16).data == emulator.pcr(16)[1]  # reconnected
    client.close()
    assert emulator.pcr(16)[1] == hashlib.sha384(bytes(48) + b"a").digest()

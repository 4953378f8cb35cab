"""Real Linux virtio-vsock traffic through the Python vhost-user back-end, both directions, in QEMU."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavekit.eif.describe import describe_eif
from enclavekit.vm.runner import run_enclave_vm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture
def reversing_server() -> Iterator[tuple[str, int]]:
    """Reads until EOF, answers with the bytes reversed (so order and completeness both show)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(120)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data[::-1])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()
    server.close()
    thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_vsock_both_directions_and_unsigned_pcrs(
    unsigned_eif: Path, vm_qemu: Path, tmp_path: Path, reversing_server: tuple[str, int]
) -> None:
    port = free_port()
    chunks: list[str] = []
    enclave = run_enclave_vm(
        unsigned_eif,
        cpu_count=1,
        memory_mib=512,
        debug_mode=True,
        console=chunks.append,
        forward={8000: reversing_server},
        listen={("127.0.0.1", port): 5005},
        qemu=vm_qemu,
        records=tmp_path / "records",
        boot_timeout=240,
    )
    try:
        deadline = time.monotonic() + 180
        while "EK-LISTENING" not in "".join(chunks):
            assert enclave.is_running(), "".join(chunks)[-3000:]
            assert time.monotonic() < deadline, "".join(chunks)[-3000:]
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            client.sendall(b"hello from the parent")
            reply = client.recv(1024)
        assert reply == b"enclave says: hello from the parent"
        enclave.wait(120)
    finally:
        enclave.terminate()
    console = "".join(chunks)
    match = re.search(r"^EK-RESULT (\{.*\})\s*$", console, re.MULTILINE)
    assert match, console[-3000:]
    result = json.loads(match.group(1))
    assert result["echo_ok"], result
    assert result["peer_cid"] == 3  # the parent
    assert result["pcr8"] == "00" * 48  # unsigned EIF
    assert result["pcr2"] == describe_eif(unsigned_eif)["Measurements"]["PCR2"]

"""``enclavekit vsock-proxy`` and ``vsock-forward``: refusals via CliRunner, a live run in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from enclavekit.cli import cli
from enclavekit.transport.server import DEFAULT_WORKERS

from .conftest import EchoServer, recv_all


def _config(tmp_path: Path, entries: str) -> Path:
    path = tmp_path / "allowlist.yaml"
    path.write_text(f"allowlist:\n{entries}")
    return path


def test_unlisted_target_exits_1(tmp_path: Path) -> None:
    config = _config(tmp_path, "- {address: 127.0.0.1, port: 443}\n")
    result = CliRunner().invoke(
        cli, ["vsock-proxy", "8000", "127.0.0.1", "444", "--config", str(config)]
    )
    assert result.exit_code == 1
    assert "127.0.0.1:444" in result.stderr


def test_missing_config_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["vsock-proxy", "8000", "127.0.0.1", "443", "--config", str(tmp_path / "no.yaml")]
    )
    assert result.exit_code == 2
    assert "cannot read allowlist" in result.stderr


def test_ipv4_and_ipv6_together_exit_2(tmp_path: Path) -> None:
    config = _config(tmp_path, "- {address: 127.0.0.1, port: 443}\n")
    result = CliRunner().invoke(
        cli, ["vsock-proxy", "-4", "-6", "8000", "127.0.0.1", "443", "--config", str(config)]
    )
    assert result.exit_code == 2


def test_ipv6_only_with_ipv4_target_exits_2(tmp_path: Path) -> None:
    config = _config(tmp_path, "- {address: 127.0.0.1, port: 443}\n")
    result = CliRunner().invoke(
        cli, ["vsock-proxy", "--ipv6", "8000", "127.0.0.1", "443", "--config", str(config)]
    )
    assert result.exit_code == 2
    assert "no ipv6 address" in result.stderr


def test_bad_listen_address_exits_2(tmp_path: Path, echo_server: EchoServer) -> None:
    port = echo_server.address.port
    config = _config(tmp_path, f"- {{address: 127.0.0.1, port: {port}}}\n")
    result = CliRunner().invoke(
        cli,
        [
            "vsock-proxy",
            "0",
            "127.0.0.1",
            str(port),
            "--config",
            str(config),
            "--listen",
            "udp://x:1",
        ],
    )
    assert result.exit_code == 2


def test_live_proxy_process_relays(tmp_path: Path, echo_server: EchoServer) -> None:
    port = echo_server.address.port
    config = _config(tmp_path, f"- {{address: localhost, port: {port}}}\n")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        listen_port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "enclavekit"),
            "vsock-proxy",
            "-4",
            "8000",
            "localhost",
            str(port),
            "--config",
            str(config),
            "--listen",
            f"tcp://127.0.0.1:{listen_port}",
        ],
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 20
        sock = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", listen_port), timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        assert sock is not None, "vsock-proxy did not start listening"
        with sock:
            payload = os.urandom(200_000)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == payload
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert b"allowed" in err
    assert f"connections on {DEFAULT_WORKERS} event loop(s), idle timeout 600 s".encode() in err


def test_forward_bad_address_exits_2() -> None:
    result = CliRunner().invoke(cli, ["vsock-forward", "tcp://127.0.0.1:0", "vsock://x:1"])
    assert result.exit_code == 2
    assert "invalid CID" in result.stderr


def test_forward_port_in_use_exits_2(echo_server: EchoServer) -> None:
    result = CliRunner().invoke(
        cli, ["vsock-forward", str(echo_server.address), "tcp://127.0.0.1:1"]
    )
    assert result.exit_code == 2
    assert "cannot listen" in result.stderr


def test_negative_idle_timeout_exits_2(tmp_path: Path) -> None:
    config = _config(tmp_path, "- {address: 127.0.0.1, port: 443}\n")
    result = CliRunner().invoke(
        cli,
        [
            "vsock-proxy",
            "8000",
            "127.0.0.1",
            "443",
            "--config",
            str(config),
            "--idle-timeout",
            "-1",
        ],
    )
    assert result.exit_code == 2
    assert "--idle-timeout" in result.stderr


def test_zero_max_connections_exits_2(tmp_path: Path) -> None:
    config = _config(tmp_path, "- {address: 127.0.0.1, port: 443}\n")
    result = CliRunner().invoke(
        cli,
        [
            "vsock-proxy",
            "8000",
            "127.0.0.1",
            "443",
            "--config",
            str(config),
            "--max-connections",
            "0",
        ],
    )
    assert result.exit_code == 2
    assert "--max-connections" in result.stderr

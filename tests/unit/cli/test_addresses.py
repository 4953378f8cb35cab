"""One grammar for address flags; services announce "listening" only after the bind succeeded; a busy
port or a bad address is exit 2 naming the flag."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import UsageError
from enclavekit.transport.address import (
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_endpoint,
)
from tests.unit.cli.conftest import EXE, run, wait_for

POLICY = (
    "services:\n  web:\n    dns_names: [localhost]\n    pcrs:\n      - {'0': '" + "00" * 48 + "'}\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", TcpAddress("127.0.0.1", 8000)),
        ("localhost:0", TcpAddress("localhost", 0)),
        ("[::1]:443", TcpAddress("::1", 443)),
        ("tcp://127.0.0.1:8000", TcpAddress("127.0.0.1", 8000)),
        ("TCP://[::1]:1", TcpAddress("::1", 1)),
        ("unix:///run/nsm.sock", UnixAddress("/run/nsm.sock")),
        ("vsock://3:8000", VsockAddress(3, 8000)),
    ],
)
def test_one_grammar_for_every_address_flag(text: str, expected: object) -> None:
    assert parse_endpoint(text, option="--listen") == expected


def test_unix_relative_path_is_made_absolute_and_unix_double_slash_relative_is_refused() -> None:
    assert parse_endpoint("unix:nsm.sock", option="--nsm") == UnixAddress(
        str(Path.cwd() / "nsm.sock")
    )
    with pytest.raises(UsageError, match=r"--nsm: .*unix:///tmp/nsm.sock"):
        parse_endpoint("unix://tmp/nsm.sock", option="--nsm")


@pytest.mark.parametrize(
    "text", ["", "8000", "host", "host:port", "udp://1.2.3.4:5", "::1:80", "h:65536"]
)
def test_bad_addresses_name_the_flag(text: str) -> None:
    with pytest.raises(UsageError, match="^--upstream: "):
        parse_endpoint(text, option="--upstream")


def test_a_kind_the_flag_does_not_take_is_refused() -> None:
    with pytest.raises(UsageError, match="--listen: expected HOST:PORT, tcp://HOST:PORT; found"):
        parse_endpoint("vsock://3:80", option="--listen", kinds=("tcp",))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_an_address_or_a_usage_error_naming_the_flag(text: str) -> None:
    message = ""
    try:
        parse_endpoint(text, option="--forward")
    except UsageError as exc:
        message = str(exc)
    assert message == "" or message.startswith("--forward: ")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.fixture
def ca_state(tmp_path: Path) -> Path:
    state = tmp_path / "ca"
    assert run("ca", "init", "--state-dir", str(state)).returncode == 0
    (tmp_path / "policy.yaml").write_text(POLICY)
    return state


def _ca_serve(state: Path, listen: str) -> list[str]:
    return ["ca", "serve", "--listen", listen, "--state-dir", str(state),
            "--policy", str(state.parent / "policy.yaml")]  # fmt: skip


def test_attack_ca_serve_listen_tcp_url_is_a_dns_error(tmp_path: Path, ca_state: Path) -> None:
    log = tmp_path / "ca.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*EXE, *_ca_serve(ca_state, "tcp://127.0.0.1:0")], stderr=err)
    try:
        wait_for(lambda: "listening on" in log.read_text() or proc.poll() is not None, "the CA")
        assert proc.poll() is None, log.read_text()
        line = next(x for x in log.read_text().splitlines() if "listening on" in x)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert port != 0  # the bound port, not the requested 0
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_attack_ca_serve_announces_a_busy_port_then_exits_3(ca_state: Path, busy_port: int) -> None:
    done = run(*_ca_serve(ca_state, f"127.0.0.1:{busy_port}"))
    assert done.returncode == 2, done.stderr
    assert b"--listen" in done.stderr
    assert b"listening" not in done.stderr


def test_ca_serve_bad_address_is_exit_2_naming_the_flag(ca_state: Path) -> None:
    done = run(*_ca_serve(ca_state, "127.0.0.1"))
    assert done.returncode == 2
    assert done.stderr.startswith(b"error: --listen: ")


def test_attack_atls_proxy_busy_port_is_not_exit_2(busy_port: int) -> None:
    done = run(
        "atls", "proxy", "--ca", "127.0.0.1:9", "--name", "web",
        "--listen", f"tcp://127.0.0.1:{busy_port}", "--upstream", "127.0.0.1:9", "--nsm", "127.0.0.1:9",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"--listen" in done.stderr and b"in use" in done.stderr
    assert b"attested TLS on" not in done.stderr


def test_atls_proxy_bad_upstream_names_the_flag() -> None:
    done = run("atls", "proxy", "--ca", "http://x:1", "--name", "w", "--listen", "127.0.0.1:0",
               "--upstream", "tcp://nowhere")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(b"error: --upstream: ")


def test_attack_nsm_serve_busy_port_is_not_exit_2(tmp_path: Path, busy_port: int) -> None:
    done = run(
        "nsm",
        "serve",
        "--state-dir",
        str(tmp_path / "s"),
        "--listen",
        f"tcp://127.0.0.1:{busy_port}",
    )
    assert done.returncode == 2, done.stderr
    assert b"--listen" in done.stderr
    assert b"listening on" not in done.stderr


def test_attack_vsock_forward_busy_port_is_not_exit_2(busy_port: int) -> None:
    done = run("vsock-forward", f"127.0.0.1:{busy_port}", "vsock://3:8000")
    assert done.returncode == 2, done.stderr
    assert b"LISTEN_ADDRESS" in done.stderr
    assert b"listening on" not in done.stderr


def test_attack_forward_refuses_tcp_and_unix_urls() -> None:
    from enclavekit.vm.commands import _parse_forward

    assert _parse_forward(
        ("8000=tcp://127.0.0.1:9000", "8001=unix:///run/k.sock", "8002=/run/j.sock")
    ) == {
        8000: ("127.0.0.1", 9000),
        8001: "/run/k.sock",
        8002: "/run/j.sock",
    }
    with pytest.raises(UsageError, match="^--forward: "):
        _parse_forward(("8000=vsock://3:80",))

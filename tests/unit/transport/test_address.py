"""Address parsing: vsock://CID:PORT and tcp://HOST:PORT."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import UsageError
from enclavekit.transport.address import (
    VMADDR_CID_ANY,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    as_address,
    parse_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vsock://3:8000", VsockAddress(3, 8000)),
        ("vsock://16:5005", VsockAddress(16, 5005)),
        ("vsock://ANY:9000", VsockAddress(VMADDR_CID_ANY, 9000)),
        ("vsock://-1:9000", VsockAddress(VMADDR_CID_ANY, 9000)),
        ("VSOCK://1:1", VsockAddress(1, 1)),
        ("tcp://127.0.0.1:0", TcpAddress("127.0.0.1", 0)),
        ("tcp://kms.eu-west-1.amazonaws.com:443", TcpAddress("kms.eu-west-1.amazonaws.com", 443)),
        ("tcp://[::1]:8443", TcpAddress("::1", 8443)),
        ("unix:///run/x.sock", UnixAddress("/run/x.sock")),
    ],
)
def test_parse_good_addresses(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "address",
    [
        VsockAddress(3, 8000),
        VsockAddress(VMADDR_CID_ANY, 1),
        TcpAddress("::1", 80),
        TcpAddress("h", 1),
    ],
)
def test_str_round_trips(address: VsockAddress | TcpAddress) -> None:
    assert parse_address(str(address)) == address
    assert as_address(str(address)) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3:8000",
        "udp://1.2.3.4:5",
        "vsock://3",
        "vsock://:80",
        "vsock://x:80",
        "vsock://3:port",
        "vsock://4294967296:1",
        "vsock://3:4294967296",
        "tcp://host:65536",
        "tcp://::1:80",
        "tcp://host:-1",
        "tcp://:80",
        "unix://",
        "unix:///" + "x" * 200,
    ],
)
def test_bad_addresses_raise_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_random_text_only_raises_usage_error(text: str) -> None:
    with contextlib.suppress(UsageError):
        parse_address(text)


def test_models_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="CID"):
        VsockAddress(-2, 1)
    with pytest.raises(ValueError, match="port"):
        TcpAddress("h", 70000)

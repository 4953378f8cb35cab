"""The /dev/nsm backend against a stand-in for the kernel driver, plus a real-hardware test."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from enclavekit.errors import NsmError
from enclavekit.nsm import Nsm, NsmEmulator
from enclavekit.nsm.device import NSM_IOCTL_RAW, DeviceTransport

REQUEST_MAX, RESPONSE_MAX = 0x1000, 0x3000


class FakeNsmDriver:
    """Behaves like drivers/misc/nsm.c in front of an emulated device (nsm.md §1-2).

    Checks the ioctl number and argument size, reads the request from the caller's memory, refuses more than
    4096 bytes with EMSGSIZE, writes min(capacity, actual) response bytes and the length back.
    """

    def __init__(self, emulator: NsmEmulator) -> None:
        self.emulator = emulator
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        if request != NSM_IOCTL_RAW or len(arg) != 32 or not mutate:
            raise OSError(errno.EINVAL, "Invalid argument")
        req_addr, req_len, resp_addr, resp_cap = struct.unpack("=QQQQ", arg)
        self.calls.append((req_len, resp_cap, fd))
        if req_len > REQUEST_MAX:
            raise OSError(errno.EMSGSIZE, "Message too long")
        answer = self.emulator.handle_bytes(ctypes.string_at(req_addr, req_len))
        written = min(resp_cap, len(answer))
        ctypes.memmove(resp_addr, answer, written)
        struct.pack_into("=Q", arg, 24, written)
        return 0


@pytest.fixture
def driver(emulator: NsmEmulator) -> FakeNsmDriver:
    return FakeNsmDriver(emulator)


@pytest.fixture
def device_nsm(driver: FakeNsmDriver) -> Nsm:
    return Nsm(DeviceTransport(-1, ioctl=driver))


def test_ioctl_number_is_iowr_0x0a_0_with_a_32_byte_argument() -> None:
    assert NSM_IOCTL_RAW == (3 << 30) | (32 << 16) | (0x0A << 8) | 0


def test_every_request_goes_through_the_ioctl_with_full_response_buffer(
    device_nsm: Nsm, driver: FakeNsmDriver, emulator: NsmEmulator
) -> None:
    assert device_nsm.describe_nsm().module_id == emulator.module_id
    assert device_nsm.extend_pcr(16, b"abc").hex().startswith("b1c16eb7")
    device_nsm.lock_pcr(16)
    device_nsm.lock_pcrs(32)
    assert device_nsm.describe_pcr(16).lock is True
    assert len(device_nsm.get_random()) == 256
    assert device_nsm.attestation(nonce=b"n")[:4] == bytes.fromhex("8444a101")
    assert len(driver.calls) == 7
    assert all(capacity == RESPONSE_MAX for _, capacity, _ in driver.calls)
    assert driver.calls[0][0] == len(bytes.fromhex("6b44657363726962654e534d"))


def test_nsm_errors_come_back_through_the_device(device_nsm: Nsm) -> None:
    with pytest.raises(NsmError) as excinfo:
        device_nsm.extend_pcr(0, b"x")
    assert excinfo.value.code == "ReadOnlyIndex"


def test_emsgsize_from_the_kernel_is_input_too_large(emulator: NsmEmulator) -> None:
    def refusing(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        raise OSError(errno.EMSGSIZE, "Message too long")

    with pytest.raises(NsmError) as excinfo:
        Nsm(DeviceTransport(-1, ioctl=refusing)).get_random()
    assert excinfo.value.code == "InputTooLarge"


def test_other_errno_is_internal_error() -> None:
    def broken(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        raise OSError(errno.ETIMEDOUT, "Connection timed out")

    with pytest.raises(NsmError) as excinfo:
        Nsm(DeviceTransport(-1, ioctl=broken)).get_random()
    assert excinfo.value.code == "InternalError"
    assert "errno" in str(excinfo.value)


def test_oversized_request_never_reaches_the_kernel(device_nsm: Nsm, driver: FakeNsmDriver) -> None:
    """Like AWS's Rust driver: more than 4096 bytes is InputTooLarge before any ioctl."""
    with pytest.raises(NsmError, match="at most 4096"):
        device_nsm.attestation(user_data=bytes(5000))
    assert driver.calls == []


def test_truncated_response_from_a_too_small_buffer_is_internal_error() -> None:
    """The driver truncates silently; a cut CBOR answer must not be taken for a valid one."""

    def truncating(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        _, _, resp_addr, _ = struct.unpack("=QQQQ", arg)
        answer = bytes.fromhex("a16947657452616e646f6da16672616e646f6d5901 00") + bytes(10)
        ctypes.memmove(resp_addr, answer, len(answer))
        struct.pack_into("=Q", arg, 24, len(answer))
        return 0

    with pytest.raises(NsmError) as excinfo:
        Nsm(DeviceTransport(-1, ioctl=truncating)).get_random()
    assert excinfo.value.code == "InternalError"


def test_mismatched_response_is_invalid_response() -> None:
    def wrong(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        _, _, resp_addr, _ = struct.unpack("=QQQQ", arg)
        answer = bytes.fromhex("674c6f636b504352")  # "LockPCR"
        ctypes.memmove(resp_addr, answer, len(answer))
        struct.pack_into("=Q", arg, 24, len(answer))
        return 0

    with pytest.raises(NsmError) as excinfo:
        Nsm(DeviceTransport(-1, ioctl=wrong)).get_random()
    assert excinfo.value.code == "InvalidResponse"


def test_kernel_claiming_a_longer_response_than_the_buffer_is_refused() -> None:
    def lying(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
        struct.pack_into("=Q", arg, 24, RESPONSE_MAX + 1)
        return 0

    with pytest.raises(NsmError, match="buffer holds"):
        Nsm(DeviceTransport(-1, ioctl=lying)).get_random()


def test_missing_device_says_how_to_use_the_emulator(tmp_path: object) -> None:
    with pytest.raises(NsmError, match="ENCLAVEKIT_NSM"):
        DeviceTransport.open(f"{tmp_path}/nsm")


def test_open_prefers_the_environment_then_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclavekit.errors import UsageError
    from enclavekit.nsm.client import SocketTransport

    client = Nsm.open({"ENCLAVEKIT_NSM": "tcp://127.0.0.1:9"})
    assert isinstance(client.transport, SocketTransport)
    if not os.path.exists("/dev/nsm"):
        with pytest.raises(UsageError, match="enclavekit nsm serve"):
            Nsm.open({})


@pytest.mark.hardware
@pytest.mark.skipif(not os.path.exists("/dev/nsm"), reason="needs a Nitro Enclave (/dev/nsm)")
def test_real_nsm_device() -> None:
    with Nsm.device() as nsm:
        description = nsm.describe_nsm()
        assert description.max_pcrs == 32
        assert set(range(16)) <= set(description.locked_pcrs)
        assert len(nsm.describe_pcr(0).data) == 48
        assert len(nsm.get_random()) > 0
        assert nsm.attestation(nonce=b"enclavekit")[:4] == bytes.fromhex("8444a101")
        with pytest.raises(NsmError):
            nsm.extend_pcr(0, b"x")


def test_real_ioctl_path_on_a_non_nsm_device_is_internal_error() -> None:
    """The genuine fcntl.ioctl call (argument types, request number) runs; /dev/null says ENOTTY."""
    transport = DeviceTransport.open("/dev/null")
    try:
        with pytest.raises(NsmError) as excinfo:
            Nsm(transport).describe_nsm()
        assert excinfo.value.code == "InternalError"
        assert f"errno {errno.ENOTTY}" in str(excinfo.value)
    finally:
        transport.close()

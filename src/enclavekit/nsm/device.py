"""The real NSM: ``/dev/nsm`` and its single ioctl (``nsm.md`` §1-2, §6).

``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)`` = ``0xC0200A00``. Its argument is 32 bytes: four
native u64 (request address, request length, response address, response capacity); the kernel writes
the actual response length back into the fourth. The driver truncates silently if the response
buffer is too small, so the full 12288 bytes are always passed. Errno ``EMSGSIZE`` means
InputTooLarge; any other errno is InternalError, as the Rust reference driver maps them.

The ioctl function is injectable (signature of :func:`fcntl.ioctl` with a mutable buffer) so that
tests can put a stand-in for the kernel in its place. What is *not* done here: decoding the response
(see :mod:`enclavekit.nsm.client`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable

from enclavekit.errors import NsmError
from enclavekit.nsm.messages import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, ErrorCode

DEVICE_PATH = "/dev/nsm"
#: _IOWR(0x0A, 0x00, 32-byte struct nsm_raw): dir 3 << 30 | size 32 << 16 | type 0x0A << 8 | nr 0.
NSM_IOCTL_RAW = 0xC0200A00
#: ``struct nsm_raw``: request {u64 addr, u64 len}, response {u64 addr, u64 len}, native endianness.
RAW_ARGUMENT = struct.Struct("=QQQQ")

#: ``fcntl.ioctl(fd, request, buffer, mutate_flag)`` - or a stand-in with the same behaviour.
IoctlFunction = Callable[[int, int, bytearray, bool], int]


def _ioctl(fd: int, request: int, arg: bytearray, mutate: bool) -> int:
    result: int = fcntl.ioctl(fd, request, arg, mutate)
    return result


class DeviceTransport:
    """Exchanges raw CBOR with the NSM through the ioctl. Thread-safe (the driver serialises
    requests).
    """

    def __init__(self, fd: int, *, ioctl: IoctlFunction = _ioctl, path: str = DEVICE_PATH) -> None:
        self._fd = fd
        self._ioctl = ioctl
        self.path = path

    @classmethod
    def open(cls, path: str = DEVICE_PATH, *, ioctl: IoctlFunction = _ioctl) -> DeviceTransport:
        """Open the device read+write (as the Rust driver does)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(
                ErrorCode.INTERNAL_ERROR.value,
                f"cannot open the NSM device {path}: {exc.strerror}. Inside a Nitro Enclave the "
                f"nsm driver must be loaded; elsewhere set ENCLAVEKIT_NSM to an emulator "
                f"(`enclavekit nsm serve`)",
            ) from None
        return cls(fd, ioctl=ioctl, path=path)

    def exchange(self, request: bytes) -> bytes:
        """Send one CBOR request, return the CBOR response bytes."""
        if len(request) > MAX_REQUEST_SIZE:
            raise NsmError(
                ErrorCode.INPUT_TOO_LARGE.value,
                f"NSM request is {len(request)} bytes; the NSM accepts at most {MAX_REQUEST_SIZE}",
            )
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(MAX_RESPONSE_SIZE)
        argument = bytearray(
            RAW_ARGUMENT.pack(
                ctypes.addressof(request_buffer),
                len(request),
                ctypes.addressof(response_buffer),
                MAX_RESPONSE_SIZE,
            )
        )
        try:
            self._ioctl(self._fd, NSM_IOCTL_RAW, argument, True)
        except OSError as exc:
            code = (
                ErrorCode.INPUT_TOO_LARGE
                if exc.errno == errno.EMSGSIZE
                else ErrorCode.INTERNAL_ERROR
            )
            raise NsmError(
                code.value,
                f"NSM ioctl on {self.path} failed: {exc.strerror or exc} (errno {exc.errno})",
            ) from None
        length = RAW_ARGUMENT.unpack(argument)[3]
        if length > MAX_RESPONSE_SIZE:
            raise NsmError(
                ErrorCode.INTERNAL_ERROR.value,
                f"NSM ioctl reported a {length}-byte response; "
                f"the buffer holds {MAX_RESPONSE_SIZE}",
            )
        # Both buffers stay referenced until here, after the kernel is done with them.
        return response_buffer.raw[:length]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

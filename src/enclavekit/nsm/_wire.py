"""The emulator's socket protocol: each message is a 4-byte big-endian length followed by that many
bytes.

A request frame carries exactly the CBOR a client would hand to the ``/dev/nsm`` ioctl; the response
frame carries exactly the CBOR the device would write back. One connection carries any number of
request/response pairs, answered in order. Frames above :data:`MAX_FRAME` bytes end the connection
(requests between 4096 bytes and that bound are answered with ``InputTooLarge``, as the device
does).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
#: Upper bound for a frame in either direction (the device limits are 4096 in and 12288 out).
MAX_FRAME = 64 * 1024


def parse_address(url: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:///path`` (or ``unix:relative``) → ("unix", path); ``tcp://host:port`` or ``host:port``
    → ("tcp", (host, port)); else UsageError. The grammar is the command line's one
    (:func:`enclavekit.transport.address.parse_endpoint`).
    """
    from enclavekit.transport.address import TcpAddress, UnixAddress, parse_endpoint

    address = parse_endpoint(url, option="NSM address", kinds=("tcp", "unix"))
    if isinstance(address, UnixAddress):
        return "unix", address.path
    assert isinstance(address, TcpAddress)
    return "tcp", (address.host, address.port)

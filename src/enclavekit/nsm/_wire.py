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
from urllib.parse import urlsplit

from enclavekit.errors import UsageError

HEADER = struct.Struct(">I")
#: Upper bound for a frame in either direction (the device limits are 4096 in and 12288 out).
MAX_FRAME = 64 * 1024


def parse_address(url: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:///path`` → ("unix", path); ``tcp://host:port`` → ("tcp", (host, port)); else
    UsageError.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path:
            raise UsageError(
                f"bad NSM address {url!r}: expected unix:///absolute/path (three slashes) or "
                "unix:relative/path"
            )
        return "unix", parts.path
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise UsageError(f"bad NSM address {url!r}: expected tcp://host:port")
        return "tcp", (parts.hostname, port)
    raise UsageError(
        f"bad NSM address {url!r}: expected unix:///path/to/socket or tcp://host:port "
        "(the address `enclavekit nsm serve --listen` was given)"
    )

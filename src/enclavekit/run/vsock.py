"""vsock emulated over unix sockets, for enclaves run by the local runner.

When ``$ENCLAVEKIT_VSOCK_DIR`` names a directory, every ``vsock://CID:PORT`` endpoint is the unix
socket ``$ENCLAVEKIT_VSOCK_DIR/CID.PORT``. The local runner sets it (and ``$ENCLAVEKIT_VSOCK_CID``,
this side's CID) for the applications it starts; a parent-side process uses the same directory
(``enclavekit.run.state.vsock_dir()``) with CID 3, the parent's CID in Nitro Enclaves. So:

- the enclave listens on ``vsock://ANY:5000`` → ``<dir>/16.5000`` (its own CID, e.g. 16);
- the parent connects to ``vsock://16:5000`` → the same socket;
- the enclave connects to ``vsock://3:8000`` (CID 2, the host, is treated as the parent too) →
  ``<dir>/3.8000``, where a parent-side proxy listens.

Without the variable, addresses go to :mod:`enclavekit.transport` unchanged (real AF_VSOCK or TCP).
``tcp://`` addresses are never remapped.

Not emulated: CID-based access control (any local process may open the sockets; the directory is
created 0700), vsock's datagram sockets, and the 16 KiB-ish buffer sizes of real vsock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from enclavekit.errors import UsageError
from enclavekit.transport import sockets as transport_sockets
from enclavekit.transport.address import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_PARENT,
    Address,
    TcpAddress,
    VsockAddress,
    as_address,
)
from enclavekit.transport.errors import TransportError

#: Directory of the emulated vsock endpoints (set by the local runner).
ENV_DIR = "ENCLAVEKIT_VSOCK_DIR"
#: This side's CID under emulation (the enclave's CID inside an enclave; 3 when unset).
ENV_CID = "ENCLAVEKIT_VSOCK_CID"

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def emulation_dir(environ: dict[str, str] | None = None) -> Path | None:
    """The emulation directory from the environment, or None when vsock is real."""
    value = (environ if environ is not None else os.environ).get(ENV_DIR)
    return Path(value) if value else None


def local_cid(environ: dict[str, str] | None = None) -> int:
    """This side's CID under emulation (default 3, the parent)."""
    value = (environ if environ is not None else os.environ).get(ENV_CID, "")
    if not value:
        return VMADDR_CID_PARENT
    if not value.isdigit():
        raise UsageError(f"${ENV_CID} must be a decimal CID, found {value!r}")
    return int(value)


def socket_path(directory: Path, cid: int, port: int) -> Path:
    """The unix socket standing for ``vsock://cid:port``."""
    if cid == VMADDR_CID_HOST:
        cid = VMADDR_CID_PARENT
    return directory / f"{cid}.{port}"


def _emulated(
    address: Address | str,
    *,
    listening: bool,
    directory: Path | None = None,
    own_cid: int | None = None,
) -> tuple[Address, Path | None]:
    addr = as_address(address)
    directory = directory if directory is not None else emulation_dir()
    if directory is None or not isinstance(addr, VsockAddress):
        return addr, None
    cid = addr.cid
    if listening and cid == VMADDR_CID_ANY:
        cid = own_cid if own_cid is not None else local_cid()
    port = addr.port
    if listening and port == 0:
        port = _free_port(directory, cid)
    return VsockAddress(cid, port), socket_path(directory, cid, port)


def emulated_socket_path(address: Address | str, *, listening: bool) -> Path | None:
    """The unix socket standing for ``address`` under emulation, or None (not vsock, or no
    ``$ENCLAVEKIT_VSOCK_DIR``). The hook for :mod:`enclavekit.transport` to honour emulation."""
    return _emulated(address, listening=listening)[1]


def _free_port(directory: Path, cid: int) -> int:
    for _ in range(64):
        port = 49152 + secrets.randbelow(16384)
        if not socket_path(directory, cid, port).exists():
            return port
    raise TransportError(f"no free emulated vsock port for CID {cid} in {directory}")


def connect(
    address: Address | str, *, timeout: float | None = None, directory: Path | None = None
) -> socket.socket:
    """:func:`enclavekit.transport.connect`, with vsock emulated when the runner asks for it
    (or in ``directory``, for parent-side callers)."""
    addr, path = _emulated(address, listening=False, directory=directory)
    if path is None:
        return transport_sockets.connect(addr, timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot connect to {addr} (emulated at {path}): {exc.strerror or exc}; check that a"
            " listener is running there"
        ) from exc
    return sock


def listen(
    address: Address | str,
    *,
    backlog: int = 128,
    directory: Path | None = None,
    own_cid: int | None = None,
) -> socket.socket:
    """:func:`enclavekit.transport.listen`, with vsock emulated when the runner asks for it (or in
    ``directory`` as CID ``own_cid``, default 3, for parent-side callers)."""
    addr, path = _emulated(address, listening=True, directory=directory, own_cid=own_cid)
    if path is None:
        return transport_sockets.listen(addr, backlog=backlog)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale(path, addr)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot listen on {addr} (emulated at {path}): {exc.strerror or exc}"
        ) from exc
    return sock


def _remove_stale(path: Path, addr: Address) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} (standing for {addr}) exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise TransportError(f"{addr} is already in use (a listener answers at {path})")


def bound_address(sock: socket.socket) -> Address:
    """The vsock/TCP address a socket from :func:`listen` stands for."""
    if sock.family == socket.AF_UNIX:
        name = Path(str(sock.getsockname())).name
        cid, _, port = name.partition(".")
        return VsockAddress(int(cid), int(port))
    return transport_sockets.local_address(sock)


async def open_connection(
    address: Address | str, *, timeout: float | None = None, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio counterpart of :func:`connect`."""
    addr, path = _emulated(address, listening=False)
    if path is None:
        return await transport_sockets.open_connection(addr, timeout=timeout, limit=limit)
    try:
        return await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=limit), timeout)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to {addr} (emulated at {path}): {exc}") from exc


async def start_server(
    handler: StreamHandler, address: Address | str, *, backlog: int = 128, limit: int = 2**16
) -> asyncio.Server:
    """asyncio counterpart of :func:`listen`."""
    sock = listen(address, backlog=backlog)
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        return await asyncio.start_unix_server(handler, sock=sock, limit=limit)
    return await asyncio.start_server(handler, sock=sock, limit=limit)


__all__ = [
    "ENV_CID",
    "ENV_DIR",
    "TcpAddress",
    "VsockAddress",
    "bound_address",
    "connect",
    "emulated_socket_path",
    "emulation_dir",
    "listen",
    "local_cid",
    "open_connection",
    "socket_path",
    "start_server",
]

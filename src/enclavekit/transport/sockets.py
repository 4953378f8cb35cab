"""Open and accept stream connections on ``vsock://`` and ``tcp://`` addresses, sync and asyncio.

Every function returns ordinary ``socket.socket`` objects or asyncio streams, whatever the address family,
so callers never branch on vsock vs TCP. Failures to connect or bind raise
:class:`~enclavekit.transport.errors.TransportError` naming the address and what to check.
Not done here: TLS, retries, name-resolution policy (see :mod:`enclavekit.transport.allowlist`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from enclavekit.transport.address import (
    Address,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    as_address,
    vsock_available,
)
from enclavekit.transport.errors import TransportError

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _vsock_socket() -> socket.socket:
    if not vsock_available():
        raise TransportError(
            "AF_VSOCK is not available here (no kernel support or not Linux); "
            "use a tcp://HOST:PORT address instead"
        )
    return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)


def connect(address: Address | str, *, timeout: float | None = None) -> socket.socket:
    """Connect to ``address`` and return a blocking stream socket (``timeout`` applies to connecting)."""
    addr = as_address(address)
    try:
        if isinstance(addr, TcpAddress):
            sock = socket.create_connection(addr.sockaddr, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = (
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                if isinstance(addr, UnixAddress)
                else _vsock_socket()
            )
            try:
                sock.settimeout(timeout)
                sock.connect(addr.sockaddr)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(None)
        return sock
    except OSError as exc:
        raise TransportError(
            f"cannot connect to {addr}: {exc.strerror or exc}; check that a listener is running there"
        ) from exc


def listen(address: Address | str, *, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``address`` (port 0 picks a free port; see :func:`local_address`)."""
    addr = as_address(address)
    try:
        if isinstance(addr, TcpAddress):
            infos = socket.getaddrinfo(
                addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
        else:
            sock = (
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                if isinstance(addr, UnixAddress)
                else _vsock_socket()
            )
            try:
                sock.bind(addr.sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
        return sock
    except OSError as exc:
        raise TransportError(
            f"cannot listen on {addr}: {exc.strerror or exc}; "
            "check that the port is free and the address belongs to this machine"
        ) from exc


def local_address(sock: socket.socket) -> Address:
    """The address a socket is bound to, as a model (resolves port 0 to the real port)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return UnixAddress(name if isinstance(name, str) else name.decode())
    if sock.family == getattr(socket, "AF_VSOCK", None):
        return VsockAddress(int(name[0]), int(name[1]))
    return TcpAddress(str(name[0]), int(name[1]))


async def open_connection(
    address: Address | str, *, timeout: float | None = None, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio counterpart of :func:`connect`."""
    addr = as_address(address)
    try:
        if isinstance(addr, TcpAddress):
            return await asyncio.wait_for(
                asyncio.open_connection(addr.host, addr.port, limit=limit), timeout
            )
        if isinstance(addr, UnixAddress):
            return await asyncio.wait_for(
                asyncio.open_unix_connection(addr.path, limit=limit), timeout
            )
        sock = _vsock_socket()
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, addr.sockaddr), timeout)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise TransportError(
            f"cannot connect to {addr}: {reason}; check that a listener is running there"
        ) from exc


async def start_server(
    handler: StreamHandler, address: Address | str, *, backlog: int = 128, limit: int = 2**16
) -> asyncio.Server:
    """asyncio counterpart of :func:`listen`: serve ``handler(reader, writer)`` per connection."""
    sock = listen(address, backlog=backlog)
    sock.setblocking(False)
    return await asyncio.start_server(handler, sock=sock, limit=limit)

"""One transport API for ``vsock://CID:PORT`` and ``tcp://HOST:PORT`` (and ``unix:///PATH`` for local
backends), sync and asyncio.

Modules (one job each):

* :mod:`~enclavekit.transport.address` — ``parse_address("vsock://3:8000")`` → :class:`VsockAddress`,
  ``"tcp://[::1]:80"`` → :class:`TcpAddress`; the constants ``VMADDR_CID_ANY``/``_LOCAL``/``_HOST``/
  ``_PARENT``; :func:`vsock_available`.
* :mod:`~enclavekit.transport.sockets` — ``connect(addr) -> socket.socket``, ``listen(addr) -> socket``,
  ``local_address(sock)``; asyncio: ``await open_connection(addr) -> (reader, writer)``,
  ``await start_server(handler, addr) -> asyncio.Server``. Address family never leaks to callers.
* :mod:`~enclavekit.transport.relay` — ``RelayPair``: the single bounded-memory copy state machine
  (half-close, resets, stalled readers; buffers only while bytes move); ``relay(a, b) -> RelayStats``
  drives one pair; ``await relay_streams((r, w), (r, w))`` for asyncio.
* :mod:`~enclavekit.transport.server` — :class:`RelayServer`: accept-and-relay on N event loops, with a
  connection limit, idle timeout and stall timeout (idle clients cannot block others).
* :mod:`~enclavekit.transport.allowlist` — nitro-cli allowlist YAML, DNS resolution by family, the check.
* :mod:`~enclavekit.transport.proxy` — :class:`VsockProxy` (parent side, nitro-cli ``vsock-proxy``).
* :mod:`~enclavekit.transport.forwarder` — :class:`Forwarder` (enclave side: local TCP → vsock parent).

The virtio machinery behind QEMU's ``nitro-enclave`` machine (vhost-user vsock back-end, virtio-vsock
packets, vrings) is used only by the VM runner and lives in :mod:`enclavekit.vm`.

Handing connections from another backend (the parent-side contract)
------------------------------------------------------------------
The relay and proxy logic works on **connected stream sockets of any family**; where a connection comes
from does not matter. A backend hands over a connection with ``server.submit(conn)`` on a
:class:`RelayServer` (so also a :class:`VsockProxy` or :class:`Forwarder`); the server then owns ``conn``,
opens the upstream connection, relays on an event loop and closes both ends::

    proxy = VsockProxy("kms.eu-west-1.amazonaws.com", 443, allowlist=Allowlist.load(path))
    proxy.start(listen("vsock://ANY:8000"))        # AF_VSOCK connections ...
    proxy.submit(tcp_conn)                         # ... a TCP connection accepted elsewhere ...
    ours, theirs = socket.socketpair()             # ... or a byte stream from a non-socket backend
    proxy.submit(ours)                             #     (e.g. vhost-user): pump bytes through `theirs`
    proxy.start(listen("unix:///run/vsock-8000.sock"))  # ... or connections to a Unix socket
    proxy.close()                                  # stop accepting, end relays, join threads

A backend that wants to relay by itself (asyncio, say) calls ``proxy.connect_upstream()`` for the checked
target connection and ``enclavekit.transport.relay.relay`` / ``relay_streams`` on the pair (the
functions are not re-exported here so that the module name stays importable). To stop one relay early,
``shutdown(SHUT_RDWR)`` either socket.

Not provided: TLS (callers wrap the socket), vsock loopback emulation (tests use TCP addresses).
"""

from __future__ import annotations

from enclavekit.transport.address import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_LOCAL,
    VMADDR_CID_PARENT,
    Address,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
    vsock_available,
)
from enclavekit.transport.errors import TargetNotAllowed, TransportError
from enclavekit.transport.relay import RelayStats
from enclavekit.transport.server import RelayServer
from enclavekit.transport.sockets import (
    connect,
    listen,
    local_address,
    open_connection,
    start_server,
)

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_LOCAL",
    "VMADDR_CID_PARENT",
    "Address",
    "RelayServer",
    "RelayStats",
    "TargetNotAllowed",
    "TcpAddress",
    "TransportError",
    "UnixAddress",
    "VsockAddress",
    "connect",
    "listen",
    "local_address",
    "open_connection",
    "parse_address",
    "start_server",
    "vsock_available",
]

"""The enclave-side forwarder: a local TCP port whose connections are tunnelled over vsock to the parent.

Typical use inside an enclave: listen on ``tcp://127.0.0.1:8000`` and forward to ``vsock://3:8000``
where the parent's ``vsock-proxy`` relays on to KMS. Any address pair works (the target may be TCP for
tests). Nothing is inspected: the tunnel is a byte pipe and TLS runs end to end through it.
"""

from __future__ import annotations

import socket

from enclavekit.transport.address import Address, as_address
from enclavekit.transport.relay import DEFAULT_BUFFER_SIZE, DEFAULT_STALL_TIMEOUT
from enclavekit.transport.server import DEFAULT_IDLE_TIMEOUT, DEFAULT_WORKERS, RelayServer
from enclavekit.transport.sockets import connect

#: Connecting to the parent must not hold a connect thread forever.
CONNECT_TIMEOUT = 10.0


class Forwarder(RelayServer):
    """Relay every accepted (or submitted) connection to ``target`` (usually ``vsock://3:PORT``)."""

    def __init__(
        self,
        target: Address | str,
        *,
        workers: int = DEFAULT_WORKERS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int | None = None,
    ) -> None:
        self.target = as_address(target)
        super().__init__(
            self._connect_target,
            workers=workers,
            buffer_size=buffer_size,
            stall_timeout=stall_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )

    def _connect_target(self) -> socket.socket:
        return connect(self.target, timeout=CONNECT_TIMEOUT)

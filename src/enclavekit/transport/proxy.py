"""The parent-side vsock proxy: nitro-cli ``vsock-proxy`` semantics in Python.

The target (``remote_host:remote_port``) is checked against the allowlist once, at construction; a target
that is not listed raises :class:`~enclavekit.transport.errors.TargetNotAllowed` and nothing listens.
Each connection then re-resolves the target at most every ``dns_refresh`` seconds (the system resolver
exposes no TTL) within the chosen address family, and relays bytes opaquely (TLS stays end to end
between the enclave and the target).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from enclavekit.transport.allowlist import (
    Allowlist,
    IPAddress,
    IpFamily,
    Resolver,
    resolve,
)
from enclavekit.transport.errors import TransportError
from enclavekit.transport.relay import DEFAULT_BUFFER_SIZE, DEFAULT_STALL_TIMEOUT
from enclavekit.transport.server import DEFAULT_WORKERS, RelayServer

#: The system resolver gives no TTL; re-resolve the target after this many seconds.
DEFAULT_DNS_REFRESH = 60.0
#: Connecting to the target must not hold a worker forever.
CONNECT_TIMEOUT = 10.0


class VsockProxy(RelayServer):
    """Relay connections (from a vsock listener or any :meth:`submit` source) to one allowed TCP target."""

    def __init__(
        self,
        remote_host: str,
        remote_port: int,
        *,
        allowlist: Allowlist,
        family: IpFamily = IpFamily.ANY,
        resolver: Resolver = resolve,
        workers: int = DEFAULT_WORKERS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        dns_refresh: float = DEFAULT_DNS_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < remote_port <= 0xFFFF:
            raise ValueError(f"remote_port must be 1..65535, got {remote_port}")
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.family = family
        self._resolver = resolver
        self._clock = clock
        self._dns_refresh = dns_refresh
        self._dns_lock = threading.Lock()
        self._remote_ip: IPAddress = allowlist.check(
            remote_host, remote_port, family, resolver=resolver
        )
        self._resolved_at = clock()
        super().__init__(
            self.connect_upstream,
            workers=workers,
            buffer_size=buffer_size,
            stall_timeout=stall_timeout,
        )

    @property
    def remote_ip(self) -> IPAddress:
        """The target address in use (refreshed lazily by :meth:`connect_upstream`)."""
        return self._remote_ip

    def _current_ip(self) -> IPAddress:
        with self._dns_lock:
            if self._clock() - self._resolved_at >= self._dns_refresh:
                self._remote_ip = self._resolver(self.remote_host, self.family)[0]
                self._resolved_at = self._clock()
            return self._remote_ip

    def connect_upstream(self) -> socket.socket:
        """Open a TCP connection to the target (for callers that relay on their own, e.g. asyncio)."""
        ip = self._current_ip()
        try:
            sock = socket.create_connection((str(ip), self.remote_port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise TransportError(
                f"cannot connect to {self.remote_host}:{self.remote_port} ({ip}): "
                f"{exc.strerror or exc}"
            ) from exc
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

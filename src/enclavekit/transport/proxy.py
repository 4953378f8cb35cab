"""The parent-side vsock proxy: nitro-cli ``vsock-proxy`` semantics in Python.

The target (``remote_host:remote_port``) is checked against the allowlist at construction; a target
that is not listed raises :class:`~enclavekit.transport.errors.TargetNotAllowed` and nothing listens.
Each connection then re-resolves the target at most every ``dns_refresh`` seconds (the system resolver
exposes no TTL) within the chosen address family, and relays bytes opaquely (TLS stays end to end
between the enclave and the target).

DNS rebinding: every answer a re-resolution gives is checked against the allowlist
(:meth:`Allowlist.check_address`) before any connection goes to it. An answer the allowlist refuses is
logged (warning) and the connection refused with :class:`TargetNotAllowed`; it is never stored, so the
next connection resolves again and the proxy recovers as soon as the name points to an allowed address.
An allowed answer is kept, with its verdict, for ``dns_refresh`` seconds. nitro-cli's vsock-proxy checks
the allowlist only at start-up and connects to whatever later resolutions return; this is stricter.
Not checked: what the address serves (the enclave's TLS client checks the certificate).
"""

from __future__ import annotations

import logging
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
from enclavekit.transport.errors import TargetNotAllowed, TransportError
from enclavekit.transport.relay import DEFAULT_BUFFER_SIZE, DEFAULT_STALL_TIMEOUT
from enclavekit.transport.server import DEFAULT_IDLE_TIMEOUT, DEFAULT_WORKERS, RelayServer

logger = logging.getLogger(__name__)

#: The system resolver gives no TTL; re-resolve the target after this many seconds.
DEFAULT_DNS_REFRESH = 60.0
#: Connecting to the target must not hold a connect thread forever.
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
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int | None = None,
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
        self._allowlist = allowlist
        self._remote_ip: IPAddress = allowlist.check(
            remote_host, remote_port, family, resolver=resolver
        )
        self._resolved_at = clock()
        super().__init__(
            self.connect_upstream,
            workers=workers,
            buffer_size=buffer_size,
            stall_timeout=stall_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
        )

    @property
    def remote_ip(self) -> IPAddress:
        """The last allowed target address (refreshed lazily by :meth:`connect_upstream`)."""
        return self._remote_ip

    def _current_ip(self) -> IPAddress:
        """The target address to connect to now: the kept one, or a fresh answer the allowlist allows."""
        with self._dns_lock:
            if self._clock() - self._resolved_at < self._dns_refresh:
                return self._remote_ip
            ip = self._resolver(self.remote_host, self.family)[0]
            # Checked on every refresh, changed or not: an entry name may have moved as well.
            try:
                self._allowlist.check_address(
                    self.remote_host, self.remote_port, ip, self.family, resolver=self._resolver
                )
            except TargetNotAllowed:
                logger.warning(
                    "vsock-proxy: %s:%d now resolves to %s, which the allowlist does not allow "
                    "(last allowed: %s); refusing the connection",
                    self.remote_host,
                    self.remote_port,
                    ip,
                    self._remote_ip,
                )
                raise
            if ip != self._remote_ip:
                logger.info(
                    "vsock-proxy: %s:%d now resolves to %s (was %s), allowed",
                    self.remote_host,
                    self.remote_port,
                    ip,
                    self._remote_ip,
                )
            self._remote_ip = ip
            self._resolved_at = self._clock()
            return ip

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

"""A threaded accept-and-relay server: every accepted connection is relayed to a fresh upstream connection.

:class:`RelayServer` is the shared engine of the parent-side vsock proxy and the enclave-side forwarder.
Connections can come from its own listener (:meth:`RelayServer.serve_forever`) or from anywhere else
(:meth:`RelayServer.submit`): an AF_VSOCK or TCP socket, or one end of a ``socket.socketpair()`` that a
non-socket backend (e.g. vhost-user) feeds. ``workers`` connections are relayed at once; further ones wait
in order (as nitro-cli's thread pool). Memory per active connection is two relay buffers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from enclavekit.errors import Error
from enclavekit.transport.relay import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_STALL_TIMEOUT,
    RelayStats,
    relay,
)

logger = logging.getLogger(__name__)

#: nitro-cli vsock-proxy's default number of workers (simultaneous connections).
DEFAULT_WORKERS = 4

UpstreamFactory = Callable[[], socket.socket]


class RelayServer:
    """Relay each submitted or accepted connection to a new connection made by ``upstream()``."""

    def __init__(
        self,
        upstream: UpstreamFactory,
        *,
        workers: int = DEFAULT_WORKERS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._upstream = upstream
        self._buffer_size = buffer_size
        self._stall_timeout = stall_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay")
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._listeners: set[socket.socket] = set()
        self._closed = False

    # -- connections from any source ------------------------------------------------------------
    def submit(self, conn: socket.socket) -> Future[RelayStats]:
        """Queue ``conn`` (a connected stream socket, now owned by the server) for relaying."""
        with self._lock:
            if self._closed:
                conn.close()
                raise RuntimeError("RelayServer is closed")
            return self._pool.submit(self._handle, conn)

    def _handle(self, conn: socket.socket) -> RelayStats:
        try:
            upstream = self._upstream()
        except (Error, OSError) as exc:
            logger.warning("relay: cannot open upstream connection: %s", exc)
            conn.close()
            return RelayStats(0, 0, "reset")
        with self._lock:
            if self._closed:
                conn.close()
                upstream.close()
                return RelayStats(0, 0, "reset")
            self._active.update((conn, upstream))
        try:
            stats = relay(
                conn, upstream, buffer_size=self._buffer_size, stall_timeout=self._stall_timeout
            )
        finally:
            with self._lock:
                self._active.difference_update((conn, upstream))
        logger.info(
            "relay: %s (%d bytes in, %d bytes out)", stats.outcome, stats.a_to_b, stats.b_to_a
        )
        return stats

    # -- own listener ---------------------------------------------------------------------------
    def serve_forever(self, listener: socket.socket) -> None:
        """Accept on ``listener`` until :meth:`close`; the listener is closed on return."""
        with self._lock:
            if self._closed:
                listener.close()
                return
            self._listeners.add(listener)
        try:
            while True:
                try:
                    conn, peer = listener.accept()
                except OSError:
                    if self.closed:
                        return
                    raise
                logger.info("relay: accepted connection from %s", peer)
                try:
                    self.submit(conn)
                except RuntimeError:
                    return
        finally:
            with self._lock:
                self._listeners.discard(listener)
            listener.close()

    def start(self, listener: socket.socket) -> threading.Thread:
        """Run :meth:`serve_forever` on a daemon thread and return it."""
        thread = threading.Thread(
            target=self.serve_forever, args=(listener,), name="relay-accept", daemon=True
        )
        thread.start()
        return thread

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Stop accepting, end active relays (both sockets are shut down) and wait for the workers."""
        with self._lock:
            self._closed = True
            sockets = list(self._listeners) + list(self._active)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RelayServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

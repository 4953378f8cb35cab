"""An event-loop accept-and-relay server: every connection is relayed to a fresh upstream connection.

:class:`RelayServer` is the shared engine of the parent-side vsock proxy and the enclave-side forwarder.
Connections can come from its own listener (:meth:`RelayServer.serve_forever`) or from anywhere else
(:meth:`RelayServer.submit`): an AF_VSOCK or TCP socket, or one end of a ``socket.socketpair()`` that a
non-socket backend (e.g. vhost-user) feeds.

Idle clients cannot block it (issue 18): connections are not tied to threads. ``workers`` event loops
(one thread each, ``epoll``) each relay any number of connections with :class:`RelayPair`; a new
connection goes to the least-loaded loop. Upstream connections are opened by a small pool of
``connect_threads`` (``upstream()`` may resolve names and block for up to its own connect timeout), so
a slow target never stalls relaying. Limits, all documented in docs/vsock.md:

* ``max_connections`` open at once (default :data:`DEFAULT_MAX_CONNECTIONS`, lowered to what
  ``RLIMIT_NOFILE`` can hold, see :func:`connection_limit`); past it a new connection is closed at once
  (outcome ``refused``, a rate-limited warning), never queued;
* ``idle_timeout``: a connection with no byte either way for this long is closed (outcome ``idle``);
* ``stall_timeout``: data that waits this long for a peer that does not read drops the connection;
* memory: an idle connection holds its two sockets and a few hundred bytes of Python state; reads go
  to one scratch buffer per loop thread, and a connection keeps bytes (at most ``buffer_size`` per
  direction) only while its peer is slow to read.

Why a hand-written loop and not asyncio: the relay reads into one reused buffer per thread and writes
from it with raw non-blocking ``recv_into``/``send`` (asyncio's transports allocate a ``bytes`` per
chunk and queue them), so it needs readiness of fds; a bare ``epoll`` loop over :class:`RelayPair` is
the smallest thing that does that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from types import TracebackType

from enclavekit._cpus import usable_cpus
from enclavekit.errors import Error
from enclavekit.transport.relay import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_STALL_TIMEOUT,
    Outcome,
    RelayPair,
    RelayStats,
)

logger = logging.getLogger(__name__)


#: Event-loop threads: nitro-cli's ``-w`` default (4; there it meant simultaneous connections), or the
#: CPUs this process may use if fewer. The loops share one GIL: on 2 CPUs, ``-w 2`` relayed 100
#: concurrent transfers at 1.05-1.06x a thread-per-connection relay, ``-w 4`` at 0.82-0.97x.
DEFAULT_WORKERS = min(4, usable_cpus())
#: Connections open at once unless RLIMIT_NOFILE allows fewer.
DEFAULT_MAX_CONNECTIONS = 4096
#: A connection with no byte either way for this long is closed (nitro-cli has no idle timeout).
DEFAULT_IDLE_TIMEOUT = 600.0
#: Threads opening upstream connections (each connect blocks one for at most its connect timeout).
DEFAULT_CONNECT_THREADS = 16
#: File descriptors reserved per connection: 2 sockets, and room for 2 splice pipes of 2 ends (a relay
#: with ``zero_copy``; the default copying relay opens none, so this is conservative).
FDS_PER_CONNECTION = 6
#: Descriptors kept free for listeners, logging, imports and whatever else the process opens.
FD_RESERVE = 64
#: Buffers and pipes that held nothing for this long are given back (they return with the next data).
BUFFER_RELEASE_AFTER = 2.0
#: At most one "connection limit reached" warning per this many seconds.
_REFUSAL_LOG_INTERVAL = 10.0
_ACCEPT_RETRY = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

UpstreamFactory = Callable[[], socket.socket]


def _nofile_soft() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(
    requested: int | None,
    *,
    workers: int = DEFAULT_WORKERS,
    connect_threads: int = DEFAULT_CONNECT_THREADS,
) -> int:
    """The connection limit a server may use: ``requested`` (default :data:`DEFAULT_MAX_CONNECTIONS`),
    lowered so that every connection with both pipes open still fits in ``RLIMIT_NOFILE``:
    ``(soft limit - FD_RESERVE - 3 * workers - connect_threads) // FDS_PER_CONNECTION``, at least 1
    (each loop holds an epoll fd and a wake-up pipe; each connect thread one socket in progress)."""
    wanted = DEFAULT_MAX_CONNECTIONS if requested is None else requested
    soft = _nofile_soft()
    if soft is None:
        return wanted
    room = (soft - FD_RESERVE - 3 * workers - connect_threads) // FDS_PER_CONNECTION
    return max(1, min(wanted, room))


def raise_nofile_limit(connections: int = DEFAULT_MAX_CONNECTIONS) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard limit, as far as ``connections`` need
    (never lowers it); returns the soft limit now in force. For programs (the CLI), not libraries."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FD_RESERVE + 2048 + connections * FDS_PER_CONNECTION
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Connection:
    """One relayed connection inside an event loop."""

    __slots__ = ("finished", "future", "pair", "registered")

    def __init__(self, pair: RelayPair, future: Future[RelayStats]) -> None:
        self.pair = pair
        self.future = future
        self.registered: dict[int, int] = {}
        self.finished = False


class _EventLoop:
    """One thread relaying any number of connections with ``epoll`` (level-triggered)."""

    def __init__(self, server: RelayServer, index: int) -> None:
        self._server = server
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._inbox: deque[_Connection] = deque()
        self._by_fd: dict[int, _Connection] = {}
        self._live: set[_Connection] = set()
        self._stopping = False
        #: Connections handed to this loop and not finished (changed under the server's lock).
        self.load = 0
        self._thread = threading.Thread(target=self._run, name=f"relay-loop-{index}", daemon=True)
        self._thread.start()

    # -- from other threads ------------------------------------------------------------------------
    def hand_over(self, conn: _Connection) -> None:
        self._inbox.append(conn)
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def join(self, timeout: float) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        tick = self._server._tick
        next_scan = time.monotonic() + tick
        again: list[_Connection] = []
        try:
            while not self._stopping:
                timeout = 0.0 if again else max(0.0, next_scan - time.monotonic())
                try:
                    events = self._epoll.poll(timeout)
                except InterruptedError:  # pragma: no cover - retried by Python since 3.5
                    continue
                touched: dict[_Connection, None] = dict.fromkeys(again)
                again = []
                for fd, event in events:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        self._take_inbox(touched)
                        continue
                    conn = self._by_fd.get(fd)
                    if conn is None or conn.finished:
                        continue
                    try:
                        conn.pair.event(fd, event)
                    except OSError as exc:
                        logger.debug("relay: connection ended by %s", exc)
                        self._finish(conn, "reset")
                        continue
                    touched[conn] = None
                for conn in touched:
                    if not conn.finished and self._service(conn):
                        again.append(conn)
                now = time.monotonic()
                if now >= next_scan:
                    self._scan(now)
                    next_scan = now + tick
        except Exception:  # pragma: no cover - a bug; never leave connections hanging
            logger.exception("relay: event loop failed; closing its connections")
        finally:
            self._take_inbox({})
            for conn in list(self._live):
                conn.pair.shutdown()
                self._finish(conn, "reset")
            self._epoll.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _take_inbox(self, touched: dict[_Connection, None]) -> None:
        while self._inbox:
            conn = self._inbox.popleft()
            self._live.add(conn)
            touched[conn] = None

    def _service(self, conn: _Connection) -> bool:
        """Move what can move; True when a burst ended and the connection wants another turn."""
        pair = conn.pair
        try:
            must_wait = pair.step()
            if pair.done:
                self._finish(conn, "closed")
                return False
            if not must_wait:
                return True
            self._register(conn, pair.interest())
            if not conn.registered:
                # Both peers hung up and nothing can block any more: one more step settles it.
                pair.step()
                self._finish(conn, "closed")
        except OSError as exc:
            logger.debug("relay: connection ended by %s", exc)
            self._finish(conn, "reset")
        return False

    def _register(self, conn: _Connection, wanted: dict[int, int]) -> None:
        registered = conn.registered
        for fd, mask in wanted.items():
            have = registered.get(fd)
            if mask == 0:
                if have is not None:
                    self._epoll.unregister(fd)
                    del registered[fd]
                    self._by_fd.pop(fd, None)
            elif have is None:
                self._epoll.register(fd, mask)
                registered[fd] = mask
                self._by_fd[fd] = conn
            elif have != mask:
                self._epoll.modify(fd, mask)
                registered[fd] = mask

    def _scan(self, now: float) -> None:
        """Drop stalled and idle connections; give back buffers that hold nothing."""
        stall = self._server._stall_timeout
        idle = self._server._idle_timeout
        for conn in list(self._live):
            pair = conn.pair
            since = pair.stalled_since()
            if stall is not None and since is not None and now - since >= stall:
                logger.info("relay: peer read nothing for %ss; dropping connection", stall)
                self._finish(conn, "stalled")
            elif idle is not None and now - pair.last_activity >= idle:
                logger.info("relay: no traffic for %ss; closing idle connection", idle)
                pair.shutdown()
                self._finish(conn, "idle")
            elif pair.holds_buffers and now - pair.last_activity >= BUFFER_RELEASE_AFTER:
                pair.release_buffers()

    def _finish(self, conn: _Connection, outcome: Outcome) -> None:
        if conn.finished:
            return
        conn.finished = True
        for fd in conn.registered:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
            self._by_fd.pop(fd, None)
        conn.registered.clear()
        self._live.discard(conn)
        stats = conn.pair.close(outcome)
        with contextlib.suppress(InvalidStateError):
            conn.future.set_result(stats)
        self._server._finished(self, stats)


class RelayServer:
    """Relay each submitted or accepted connection to a new connection made by ``upstream()``.

    ``workers`` is the number of event-loop threads, not a connection limit (that is
    ``max_connections``). ``idle_timeout=None`` or ``stall_timeout=None`` disables that timeout.
    """

    def __init__(
        self,
        upstream: UpstreamFactory,
        *,
        workers: int = DEFAULT_WORKERS,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_connections: int | None = None,
        connect_threads: int = DEFAULT_CONNECT_THREADS,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if buffer_size <= 0:
            raise ValueError("buffer_size must be positive")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive or None, got {stall_timeout}")
        if connect_threads < 1:
            raise ValueError("connect_threads must be at least 1")
        self._upstream = upstream
        self._workers = workers
        self._buffer_size = buffer_size
        self._stall_timeout = stall_timeout
        self._idle_timeout = idle_timeout
        limit = connection_limit(max_connections, workers=workers, connect_threads=connect_threads)
        if max_connections is not None and limit < max_connections:
            logger.warning(
                "relay: max_connections %d does not fit RLIMIT_NOFILE %s (%d descriptors per "
                "connection); using %d — raise the limit (ulimit -n) for more",
                max_connections,
                _nofile_soft(),
                FDS_PER_CONNECTION,
                limit,
            )
        #: Connections open at once; more are refused (closed at once), not queued.
        self.max_connections = limit
        timeouts = [t for t in (stall_timeout, idle_timeout) if t is not None]
        self._tick = min([1.0, *(t / 4 for t in timeouts)])
        self._tick = max(self._tick, 0.01)
        self._connect_pool = ThreadPoolExecutor(
            max_workers=connect_threads, thread_name_prefix="relay-connect"
        )
        self._lock = threading.Lock()
        self._loops: list[_EventLoop] = []
        self._listeners: set[socket.socket] = set()
        self._open = 0
        self._refused = 0
        self._refusal_logged_at = float("-inf")
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections accepted and not finished (connecting upstream or relaying)."""
        return self._open

    # -- connections from any source ------------------------------------------------------------
    def submit(self, conn: socket.socket) -> Future[RelayStats]:
        """Hand over ``conn`` (a connected stream socket, now owned by the server) for relaying.

        The future gives the :class:`RelayStats` once the connection is finished; past
        ``max_connections`` it is already done with outcome ``refused`` (``conn`` is closed)."""
        future: Future[RelayStats] = Future()
        with self._lock:
            if self._closed:
                conn.close()
                raise RuntimeError("RelayServer is closed")
            if self._open < self.max_connections:
                self._open += 1
                self._connect_pool.submit(self._connect, conn, future)
                return future
            self._refused += 1
            now = time.monotonic()
            refused = 0
            if now - self._refusal_logged_at >= _REFUSAL_LOG_INTERVAL:
                self._refusal_logged_at = now
                refused, self._refused = self._refused, 0
        conn.close()
        if refused:
            logger.warning(
                "relay: connection limit (%d open) reached; refused %d connection(s) — "
                "raise --max-connections or lower --idle-timeout",
                self.max_connections,
                refused,
            )
        future.set_result(RelayStats(0, 0, "refused"))
        return future

    def _give_up(self, conn: socket.socket, future: Future[RelayStats]) -> None:
        conn.close()
        with self._lock:
            self._open -= 1
        with contextlib.suppress(InvalidStateError):
            future.set_result(RelayStats(0, 0, "reset"))

    def _connect(self, conn: socket.socket, future: Future[RelayStats]) -> None:
        if self.closed:
            self._give_up(conn, future)
            return
        try:
            upstream = self._upstream()
        except (Error, OSError) as exc:
            logger.warning("relay: cannot open upstream connection: %s", exc)
            self._give_up(conn, future)
            return
        except BaseException:
            logger.exception("relay: upstream connection failed")
            self._give_up(conn, future)
            raise
        try:
            pair = RelayPair(conn, upstream, buffer_size=self._buffer_size)
        except OSError as exc:  # a socket already closed by its peer's backend
            logger.debug("relay: connection ended by %s", exc)
            upstream.close()
            self._give_up(conn, future)
            return
        with self._lock:
            if not self._closed:
                loop = self._pick_loop()
                loop.load += 1
                loop.hand_over(_Connection(pair, future))
                return
        pair.close("reset")
        with self._lock:
            self._open -= 1
        with contextlib.suppress(InvalidStateError):
            future.set_result(RelayStats(0, 0, "reset"))

    def _pick_loop(self) -> _EventLoop:
        """The least-loaded loop; a new one while fewer than ``workers`` run and all are busy."""
        loops = self._loops
        if len(loops) < self._workers and all(loop.load for loop in loops):
            loops.append(_EventLoop(self, len(loops)))
        return min(loops, key=lambda loop: loop.load)

    def _finished(self, loop: _EventLoop, stats: RelayStats) -> None:
        with self._lock:
            loop.load -= 1
            self._open -= 1
        logger.info(
            "relay: %s (%d bytes in, %d bytes out)", stats.outcome, stats.a_to_b, stats.b_to_a
        )

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
                except OSError as exc:
                    if self.closed:
                        return
                    if exc.errno in _RESOURCE_ERRNOS:
                        logger.warning("relay: cannot accept (%s); retrying", exc.strerror)
                        time.sleep(_ACCEPT_RETRY)
                        continue
                    if exc.errno in _TRANSIENT_ACCEPT_ERRNOS:
                        continue
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
        """Stop accepting, end active relays (both sockets are shut down) and wait for the threads."""
        with self._lock:
            self._closed = True
            listeners = list(self._listeners)
            loops = list(self._loops)
        for sock in listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._connect_pool.shutdown(wait=True)
        for loop in loops:
            loop.stop()
        for loop in loops:
            loop.join(10)

    def __enter__(self) -> RelayServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

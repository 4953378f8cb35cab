"""Relay bytes between two connected stream sockets with bounded memory, in both directions.

:class:`RelayPair` is the one copy state machine behind the vsock proxy, the enclave-side forwarder and
any other backend: it takes two ``socket.socket`` objects of any family (AF_VSOCK, AF_INET/AF_INET6,
AF_UNIX — e.g. one end of a ``socket.socketpair()`` whose other end a non-socket backend feeds), never
blocks, and is driven by readiness events — many pairs per event loop in
:class:`~enclavekit.transport.server.RelayServer`, or one pair by :func:`relay`, which returns when both
directions are finished or one side fails.

Behaviour:

* memory is bounded: reads go to one ``buffer_size`` scratch buffer per thread and are written on at
  once; a direction keeps at most ``buffer_size`` bytes, and only those its destination did not take
  yet (with ``zero_copy``: a splice pipe of ``buffer_size``, given back by
  :meth:`RelayPair.release_buffers` once empty), so an idle connection holds only its two sockets;
* half-close is propagated: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other, and the
  other direction keeps flowing;
* a reset, a broken pipe or any socket error on either side ends the relay and closes both sockets;
* a peer that stops reading is tolerated for ``stall_timeout`` seconds while data waits for it, then the
  relay gives up (``outcome == "stalled"``); an idle connection with nothing pending is kept open;
* both sockets are always closed on return.

Not done here: connecting, access control, TLS (bytes are relayed opaquely).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

#: Bytes moved per read. 256 KiB amortises syscalls (1 GiB = 4096 round trips); a connection holds at
#: most this much per direction, and only while a peer is slow to read (reads go to one scratch
#: buffer per thread).
DEFAULT_BUFFER_SIZE = 256 * 1024
#: How long data may wait for a peer that does not read before the connection is dropped.
DEFAULT_STALL_TIMEOUT = 60.0
#: Upper bound of back-to-back transfers in one direction before the other direction gets a turn.
_BURST = 16

Outcome = Literal["closed", "reset", "stalled", "idle", "refused"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLNVAL
_POLLHUP = select.POLLHUP
_now = time.monotonic


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What one relay did: bytes each way and how it ended.

    ``outcome``: ``closed`` (both directions finished), ``reset`` (a socket error, or the server was
    closed), ``stalled`` (a peer read nothing for ``stall_timeout``), ``idle`` (no byte either way for
    the server's idle timeout) or ``refused`` (the server's connection limit was reached; nothing relayed).
    """

    a_to_b: int
    b_to_a: int
    outcome: Outcome


_scratch = threading.local()


def _scratch_view(size: int) -> memoryview:
    """This thread's receive buffer of at least ``size`` bytes: one per event-loop thread, reused by
    every direction it pumps (its pages stay mapped; nothing is allocated per read)."""
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None or len(view) < size:
        view = memoryview(bytearray(size))
        _scratch.view = view
    return view


class _Direction:
    """One direction of a relay: reads ``src`` into the thread's scratch buffer and writes it to ``dst``
    at once. Only bytes ``dst`` did not take are kept (a copy of at most ``size`` bytes, freed as soon
    as they are sent), so a direction holds memory only while its destination is slow to read."""

    __slots__ = (
        "buf",
        "count",
        "dst",
        "dst_fd",
        "end",
        "eof",
        "ready",
        "shut",
        "since",
        "size",
        "src",
        "src_fd",
        "start",
        "view",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, size: int) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.size = size
        self.buf: bytes | bytearray | None = None  # bytes dst has not taken yet
        self.view: memoryview | None = None
        self.start = 0
        self.end = 0
        self.eof = False
        self.shut = False
        #: ``src`` was reported readable (or hung up) since the buffer was last released.
        self.ready = False
        self.count = 0
        #: When data last moved (or arrived); a stall is measured from here while data is pending.
        self.since = 0.0

    @property
    def pending(self) -> bool:
        return self.start < self.end

    @property
    def done(self) -> bool:
        return self.shut

    @property
    def holds_buffer(self) -> bool:
        return self.buf is not None

    def abandon(self) -> None:
        """The destination is gone: drop pending data and finish this direction."""
        self.start = self.end = 0
        self.eof = self.shut = True

    def release(self) -> None:
        """Give the buffer back while nothing is pending (it is allocated again on the next data)."""
        if self.buf is not None and not self.pending:
            self.buf = self.view = None
            self.ready = False

    def close(self) -> None:
        self.buf = self.view = None

    def _pass_eof(self) -> bool:
        """Everything read was written and the source ended: shut the destination's write side, once.
        Returns True (nothing more to do until the other direction or a close)."""
        if not self.shut:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self.shut = True
        return True

    def pump(self) -> bool:
        """Move data until an operation would block (return True) or the burst ends (False)."""
        for _ in range(_BURST):
            if self.start < self.end:
                assert self.view is not None
                try:
                    sent = self.dst.send(self.view[self.start : self.end])
                except BlockingIOError:
                    return True
                self.start += sent
                self.count += sent
                self.since = _now()
                if self.start == self.end:
                    self.start = self.end = 0
                    self.buf = self.view = None
            elif not self.eof:
                if not self.ready:
                    return True  # wait for readability (no read before the poller says so)
                scratch = _scratch_view(self.size)
                try:
                    received = self.src.recv_into(scratch, self.size)
                except BlockingIOError:
                    return True
                if received == 0:
                    self.eof = True
                    continue
                self.since = _now()
                try:
                    sent = self.dst.send(scratch[:received])
                except BlockingIOError:
                    sent = 0
                self.count += sent
                if sent < received:  # keep what dst did not take; wait for it to be writable
                    self.buf = scratch[sent:received].tobytes()
                    self.view = memoryview(self.buf)
                    self.start, self.end = 0, len(self.buf)
            else:
                return self._pass_eof()
        return False


_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


class _SpliceDirection(_Direction):
    """Zero-copy variant (Linux ``splice(2)`` through a pipe of ``size`` bytes): the data never
    enters Python. The pipe is opened when ``src`` is first readable and closed by :meth:`release`
    once empty. Falls back to copying if the first splice is refused (e.g. a socket family without
    splice support) or no pipe can be opened (out of file descriptors)."""

    __slots__ = ("copying", "in_pipe", "pipe_r", "pipe_w")

    def __init__(self, src: socket.socket, dst: socket.socket, size: int) -> None:
        super().__init__(src, dst, size)
        self.pipe_r = self.pipe_w = -1
        self.in_pipe = 0
        self.copying = False

    @property
    def pending(self) -> bool:
        return self.in_pipe > 0 if not self.copying else self.start < self.end

    @property
    def holds_buffer(self) -> bool:
        return self.pipe_r >= 0 or self.buf is not None

    def abandon(self) -> None:
        self.in_pipe = 0
        super().abandon()

    def _close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pipe_r = self.pipe_w = -1

    def close(self) -> None:
        self._close_pipe()
        super().close()

    def release(self) -> None:
        if self.copying:
            super().release()
        elif self.pipe_r >= 0 and self.in_pipe == 0:
            self._close_pipe()
            self.ready = False

    def _open_pipe(self) -> bool:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # out of file descriptors: copy instead
            self.copying = True
            return False
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, self.size)
        return True

    def _fall_back(self, carried: bytes) -> bool:
        """Switch to copying, keeping bytes already moved into the pipe (``carried``)."""
        self.copying = True
        self._close_pipe()
        if carried:
            self.buf = carried
            self.view = memoryview(carried)
            self.start, self.end = 0, len(carried)
        self.in_pipe = 0
        return super().pump()

    def pump(self) -> bool:
        if self.copying:
            return super().pump()
        assert _SPLICE is not None
        for _ in range(_BURST):
            if self.in_pipe:
                try:
                    sent = _SPLICE(self.pipe_r, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno in _NO_SPLICE and self.count == 0:
                        return self._fall_back(os.read(self.pipe_r, self.in_pipe))
                    raise
                self.in_pipe -= sent
                self.count += sent
                self.since = _now()
            elif not self.eof:
                if self.pipe_r < 0:
                    if not self.ready:
                        return True  # wait for readability before opening a pipe
                    if not self._open_pipe():
                        return super().pump()
                try:
                    received = _SPLICE(self.src_fd, self.pipe_w, self.size, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno in _NO_SPLICE and self.count == 0:
                        return self._fall_back(b"")
                    raise
                if received == 0:
                    self.eof = True
                else:
                    self.in_pipe = received
                    self.since = _now()
            else:
                return self._pass_eof()
        return False


class RelayPair:
    """Both directions between two connected sockets, driven by readiness events from outside.

    The non-blocking state machine behind :func:`relay` (one pair, ``poll``) and
    :class:`~enclavekit.transport.server.RelayServer` (many pairs per event loop). It never blocks and
    never waits: :meth:`step` moves what can move, :meth:`interest` says which events to wait for,
    :meth:`event` takes what the poller reported. An idle pair holds no buffer or pipe.
    ``zero_copy``: splice through pipes instead of copying (see :func:`relay`).
    """

    __slots__ = ("a", "b", "backward", "forward", "hung_up", "started")

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        zero_copy: bool = False,
    ) -> None:
        if buffer_size <= 0:
            raise ValueError("buffer_size must be positive")
        kind = _SpliceDirection if zero_copy and _SPLICE is not None else _Direction
        self.a = a
        self.b = b
        a.setblocking(False)
        b.setblocking(False)
        self.forward: _Direction = kind(a, b, buffer_size)
        self.backward: _Direction = kind(b, a, buffer_size)
        self.hung_up: set[int] = set()
        self.started = _now()

    @property
    def fds(self) -> tuple[int, int]:
        return self.forward.src_fd, self.backward.src_fd

    @property
    def done(self) -> bool:
        return self.forward.done and self.backward.done

    def step(self) -> bool:
        """Move bytes both ways; True when both directions would block, False when a burst ended
        with more to do (call again after giving others a turn). Raises OSError on a socket error."""
        return self.forward.pump() & self.backward.pump()

    def interest(self) -> dict[int, int]:
        """Poll mask wanted per file descriptor (0: nothing, do not register)."""
        forward, backward = self.forward, self.backward
        wanted = {forward.src_fd: 0, backward.src_fd: 0}
        for direction in (forward, backward):
            if direction.pending:
                wanted[direction.dst_fd] |= _POLLOUT
            elif not direction.eof:
                wanted[direction.src_fd] |= _POLLIN
        for fd in self.hung_up:
            wanted[fd] = 0
        return wanted

    def event(self, fd: int, event: int) -> None:
        """Take one poll result for ``fd``; raises ConnectionResetError on a socket error."""
        if event & _POLLERR:
            sock = self.a if fd == self.forward.src_fd else self.b
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            raise ConnectionResetError(err, "socket error")
        for direction in (self.forward, self.backward):
            if direction.src_fd == fd and event & (_POLLIN | _POLLHUP):
                direction.ready = True
        if event & _POLLHUP:
            # The peer can neither send nor receive any more: nothing more can be delivered to it;
            # data it sent before hanging up is still drained the other way.
            self.hung_up.add(fd)
            for direction in (self.forward, self.backward):
                if direction.dst_fd == fd:
                    direction.abandon()

    def stalled_since(self) -> float | None:
        """Since when the oldest pending data has waited for its reader (None: nothing pending)."""
        pending = [d.since for d in (self.forward, self.backward) if d.pending]
        return min(pending) if pending else None

    @property
    def last_activity(self) -> float:
        """When a byte last moved either way (or the pair was made)."""
        return max(self.started, self.forward.since, self.backward.since)

    @property
    def holds_buffers(self) -> bool:
        return self.forward.holds_buffer or self.backward.holds_buffer

    def release_buffers(self) -> None:
        """Give back buffers and pipes that hold nothing (they return with the next data)."""
        self.forward.release()
        self.backward.release()

    def shutdown(self) -> None:
        """Shut both sockets down (the peers see EOF); :meth:`close` still has to follow."""
        for sock in (self.a, self.b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self, outcome: Outcome) -> RelayStats:
        """Close both sockets and any pipes; the stats of the relay so far."""
        for sock in (self.a, self.b):
            with contextlib.suppress(OSError):
                sock.close()
        self.forward.close()
        self.backward.close()
        return RelayStats(self.forward.count, self.backward.count, outcome)


def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    zero_copy: bool = False,
) -> RelayStats:
    """Copy ``a`` → ``b`` and ``b`` → ``a`` until both directions end; close both sockets.

    Bytes are read into a per-thread buffer of ``buffer_size`` and written on at once; only what the
    destination did not take is kept (at most ``buffer_size`` per direction). With ``zero_copy`` and
    Linux ``splice(2)`` available they move socket → pipe → socket inside the kernel instead (the pipe
    holds at most ``buffer_size`` bytes). Not the default: on the CI machine's kernel (6.18) splice
    relayed 64 MiB at 0.74-0.81x a plain two-thread relay, the copy at 0.96-1.09x
    (benchmarks/bench_vsock_proxy.py, alternated runs).

    To stop a running relay from another thread, call ``shutdown(socket.SHUT_RDWR)`` on either socket.
    """
    if buffer_size <= 0:
        raise ValueError("buffer_size must be positive")
    outcome: Outcome = "closed"
    pair: RelayPair | None = None
    try:
        pair = RelayPair(a, b, buffer_size=buffer_size, zero_copy=zero_copy)
        poller = select.poll()
        registered: dict[int, int] = {}
        while True:
            must_wait = pair.step()
            if pair.done:
                break
            if not must_wait:
                continue  # a burst ended with more to do: give the other direction its turn first
            for fd, mask in pair.interest().items():
                if mask == 0:
                    if fd in registered:
                        poller.unregister(fd)
                        del registered[fd]
                elif registered.get(fd) != mask:
                    poller.register(fd, mask)
                    registered[fd] = mask
            if not registered:
                # Both peers hung up and nothing can block any more: one more step settles it.
                pair.step()
                break
            timeout_ms: int | None = None
            if stall_timeout is not None:
                since = pair.stalled_since()
                if since is not None:
                    left = since + stall_timeout - _now()
                    if left <= 0:
                        outcome = "stalled"
                        logger.info(
                            "relay: peer read nothing for %ss; dropping connection", stall_timeout
                        )
                        break
                    timeout_ms = max(1, int(left * 1000) + 1)
            for fd, event in poller.poll(timeout_ms):
                pair.event(fd, event)
    except OSError as exc:
        outcome = "reset"
        logger.debug("relay: connection ended by %s", exc)
    finally:
        if pair is not None:
            stats = pair.close(outcome)
        else:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
            stats = RelayStats(0, 0, outcome)
    return RelayStats(stats.a_to_b, stats.b_to_a, outcome)


async def relay_streams(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> RelayStats:
    """asyncio counterpart of :func:`relay` over ``(reader, writer)`` pairs; closes both writers.

    Memory is bounded by the stream limits plus the writers' high-water marks (``drain`` after each
    chunk). There is no stall timeout: wrap the call in ``asyncio.wait_for`` if you need one.
    """

    counts = [0, 0]

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while chunk := await reader.read(buffer_size):
            writer.write(chunk)
            await writer.drain()
            counts[index] += len(chunk)
        if writer.can_write_eof():
            writer.write_eof()

    outcome: Outcome = "closed"
    tasks = [
        asyncio.ensure_future(pump(a[0], b[1], 0)),
        asyncio.ensure_future(pump(b[0], a[1], 1)),
    ]
    try:
        await asyncio.gather(*tasks)
    except OSError:
        outcome = "reset"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer in (a, b):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return RelayStats(counts[0], counts[1], outcome)

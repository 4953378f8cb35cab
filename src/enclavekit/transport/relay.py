"""Relay bytes between two connected stream sockets with bounded memory, in both directions.

:func:`relay` is the one copy loop behind the vsock proxy, the enclave-side forwarder and any other
backend: it takes two ``socket.socket`` objects of any family (AF_VSOCK, AF_INET/AF_INET6, AF_UNIX — e.g.
one end of a ``socket.socketpair()`` whose other end a non-socket backend feeds) and returns when both
directions are finished or one side fails.

Behaviour:

* memory is bounded: one buffer of ``buffer_size`` bytes per direction, never more;
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
import time
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

#: Per-direction buffer. 256 KiB amortises syscalls (1 GiB = 4096 round trips) while keeping memory per
#: connection at 512 KiB.
DEFAULT_BUFFER_SIZE = 256 * 1024
#: How long data may wait for a peer that does not read before the connection is dropped.
DEFAULT_STALL_TIMEOUT = 60.0
#: Upper bound of back-to-back transfers in one direction before the other direction gets a turn.
_BURST = 16

Outcome = Literal["closed", "reset", "stalled"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLNVAL
_POLLHUP = select.POLLHUP
_now = time.monotonic


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What one relay did: bytes each way and how it ended."""

    a_to_b: int
    b_to_a: int
    outcome: Outcome


class _Direction:
    """One direction of a relay: reads ``src`` into a fixed buffer and writes it to ``dst``."""

    __slots__ = ("buf", "count", "dst", "end", "eof", "shut", "since", "src", "start", "view")

    def __init__(self, src: socket.socket, dst: socket.socket, size: int) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.eof = False
        self.shut = False
        self.count = 0
        #: When pending data last moved (or arrived); a stall is measured from here.
        self.since = 0.0

    @property
    def pending(self) -> bool:
        return self.start < self.end

    @property
    def done(self) -> bool:
        return self.shut

    def abandon(self) -> None:
        """The destination is gone: drop pending data and finish this direction."""
        self.start = self.end = 0
        self.eof = self.shut = True

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
                try:
                    sent = self.dst.send(self.view[self.start : self.end])
                except BlockingIOError:
                    return True
                self.start += sent
                self.count += sent
                self.since = _now()
                if self.start == self.end:
                    self.start = self.end = 0
            elif not self.eof:
                try:
                    received = self.src.recv_into(self.buf)
                except BlockingIOError:
                    return True
                if received == 0:
                    self.eof = True
                else:
                    self.end = received
                    self.since = _now()
            else:
                return self._pass_eof()
        return False


_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


class _SpliceDirection(_Direction):
    """Zero-copy variant (Linux ``splice(2)`` through a pipe of ``size`` bytes): the data never
    enters Python. Falls back to copying if the first splice is refused (e.g. a socket family
    without splice support)."""

    __slots__ = ("_size", "copying", "in_pipe", "pipe_r", "pipe_w")

    def __init__(self, src: socket.socket, dst: socket.socket, size: int) -> None:
        super().__init__(src, dst, 0)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, size)
        self.in_pipe = 0
        self.copying = False
        self._size = size

    @property
    def pending(self) -> bool:
        return self.in_pipe > 0 if not self.copying else self.start < self.end

    def abandon(self) -> None:
        self.in_pipe = 0
        super().abandon()

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _fall_back(self, carried: bytes) -> bool:
        """Switch to copying, keeping bytes already moved into the pipe (``carried``)."""
        self.copying = True
        self.buf = bytearray(max(self._size, len(carried)))
        self.view = memoryview(self.buf)
        self.buf[: len(carried)] = carried
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
                    sent = _SPLICE(
                        self.pipe_r, self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS
                    )
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
                try:
                    received = _SPLICE(
                        self.src.fileno(), self.pipe_w, self._size, flags=_SPLICE_FLAGS
                    )
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


def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
    zero_copy: bool = True,
) -> RelayStats:
    """Copy ``a`` → ``b`` and ``b`` → ``a`` until both directions end; close both sockets.

    With ``zero_copy`` (default) and Linux ``splice(2)`` available, bytes move socket → pipe → socket
    inside the kernel (the pipe holds at most ``buffer_size`` bytes, so memory stays bounded);
    otherwise through a ``buffer_size`` bytearray per direction.

    To stop a running relay from another thread, call ``shutdown(socket.SHUT_RDWR)`` on either socket.
    """
    if buffer_size <= 0:
        raise ValueError("buffer_size must be positive")
    kind = _SpliceDirection if zero_copy and _SPLICE is not None else _Direction
    outcome: Outcome = "closed"
    directions: list[_Direction] = []
    try:
        try:
            directions.append(kind(a, b, buffer_size))
            directions.append(kind(b, a, buffer_size))
        except OSError:  # out of file descriptors for the pipes: copy instead
            for direction in directions:
                if isinstance(direction, _SpliceDirection):
                    direction.close()
            directions = [_Direction(a, b, buffer_size), _Direction(b, a, buffer_size)]
        forward, backward = directions
        a.setblocking(False)
        b.setblocking(False)
        fds = {a.fileno(): a, b.fileno(): b}
        hung_up: set[int] = set()
        poller = select.poll()
        registered: dict[int, int] = {}
        while not (forward.done and backward.done):
            must_wait = forward.pump() & backward.pump()
            if forward.done and backward.done:
                break
            if not must_wait:
                continue  # a burst ended with more to do: give the other direction its turn first
            wanted = dict.fromkeys(fds, 0)
            for direction in (forward, backward):
                if direction.pending:
                    wanted[direction.dst.fileno()] |= _POLLOUT
                elif not direction.eof:
                    wanted[direction.src.fileno()] |= _POLLIN
            for fd, mask in wanted.items():
                if fd in hung_up:
                    mask = 0
                if fd in hung_up or (mask == 0 and fd not in registered):
                    if fd in registered:
                        poller.unregister(fd)
                        del registered[fd]
                    continue
                if registered.get(fd) != mask:
                    poller.register(fd, mask)
                    registered[fd] = mask
            if not registered:
                # Both peers hung up and nothing can block any more: one more pump settles it.
                forward.pump()
                backward.pump()
                break
            timeout_ms: int | None = None
            if stall_timeout is not None:
                pending = [d.since for d in (forward, backward) if d.pending]
                if pending:
                    left = min(pending) + stall_timeout - _now()
                    if left <= 0:
                        outcome = "stalled"
                        logger.info(
                            "relay: peer read nothing for %ss; dropping connection", stall_timeout
                        )
                        break
                    timeout_ms = max(1, int(left * 1000) + 1)
            events = poller.poll(timeout_ms)
            for fd, event in events:
                if event & _POLLERR:
                    err = fds[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    raise ConnectionResetError(err, "socket error")
                if event & _POLLHUP:
                    # The peer can neither send nor receive any more: nothing more can be delivered
                    # to it; data it sent before hanging up is still drained the other way.
                    hung_up.add(fd)
                    for direction in (forward, backward):
                        if direction.dst.fileno() == fd:
                            direction.abandon()
    except OSError as exc:
        outcome = "reset"
        logger.debug("relay: connection ended by %s", exc)
    finally:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.close()
        for direction in directions:
            if isinstance(direction, _SpliceDirection):
                direction.close()
    counts = [d.count for d in directions] + [0, 0]
    return RelayStats(counts[0], counts[1], outcome)


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

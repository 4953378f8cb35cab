"""Reading input that may wait (a FIFO, a pipe, a terminal) so that a stop signal always ends the wait.

Python runs a signal handler between bytecodes; the C-level handler only records the signal and interrupts
a system call already in progress. A signal that lands after the interpreter's last check and before a
blocking ``open()`` or ``read()`` starts is recorded, but nothing interrupts the call, so the command keeps
waiting for its writer — the handler that would end it runs only when the call returns, possibly never.
(Seen about once in 200 signalled ``seal`` runs.)

This module closes that window the way event loops do: the signal module writes every signal to a wakeup
pipe (``signal.set_wakeup_fd``), and the wait is a ``poll`` on the input *and* that pipe. A signal that
arrived before the ``poll`` leaves a byte in the pipe, so the ``poll`` returns at once and the pending
handler runs before the next wait. Opening uses ``O_NONBLOCK``, so a FIFO with no writer yet is opened at
once and its writer awaited by the same ``poll`` (Linux reports a FIFO readable only once a writer has
connected and written or left).

Regular files and block devices are read directly: their reads do not wait on another party. Not handled:
reads outside the main thread (``set_wakeup_fd`` needs it), which fall back to a plain read.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
from collections.abc import Iterator

#: Bytes asked of the input per read.
CHUNK = 1 << 16


def read_path(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the file at ``path`` (callers refuse more than ``limit``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``fd``, up to its end; a stop signal ends a wait for more."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return _read(fd, limit, None)
    with _wakeup_pipe() as wakeup:
        return _read(fd, limit, wakeup)


def _read(fd: int, limit: int, wakeup: int | None) -> bytes:
    """Read to the end or past ``limit``; with ``wakeup``, wait in ``poll`` on ``fd`` and ``wakeup``."""
    poller = None
    if wakeup is None:
        # A plain blocking read: a file (it never waits), or no wakeup pipe (not the main thread).
        os.set_blocking(fd, True)
    else:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        poller.register(wakeup, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        if poller is not None and wakeup is not None:
            ready = {ready_fd for ready_fd, _ in poller.poll()}
            if wakeup in ready:  # a signal arrived: its handler runs before the loop waits again
                with contextlib.suppress(BlockingIOError):
                    while os.read(wakeup, 512):
                        pass
            if fd not in ready:
                continue
        try:
            chunk = os.read(fd, min(CHUNK, limit + 1 - size))
        except BlockingIOError:  # readiness without data (a terminal, another reader of the pipe)
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def _wakeup_pipe() -> Iterator[int | None]:
    """The read end of a pipe the signal module writes each signal to, for the duration of the block."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            yield None
            return
        try:
            yield read_end
        finally:
            signal.set_wakeup_fd(previous, warn_on_full_buffer=False)
    finally:
        os.close(read_end)
        os.close(write_end)

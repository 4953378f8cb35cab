"""A stop signal ends a wait for input even when it lands where no system call is interrupted.

The race the CLI once lost (the signal recorded just before ``read()`` started, so nothing interrupted
it) is made certain here: the main thread blocks the signal, so the kernel hands it to a helper thread,
and the main thread's wait is never interrupted by it. Only the wakeup pipe can end that wait.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from enclavekit.cli import _waiting

_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from enclavekit.cli import _waiting

    def stop(signum, frame):
        raise SystemExit(42)

    signal.signal(signal.SIGTERM, stop)
    # The helper starts with SIGTERM unblocked; the main thread then blocks it, so the kernel delivers
    # it to the helper and the main thread's open()/read()/poll() never sees EINTR.
    helper = threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGTERM)))
    helper.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if sys.argv[1] == "fd":
        read_end, _write_end = os.pipe()  # a writer that never writes
        _waiting.read_fd(read_end, 100)
    else:
        _waiting.read_path(sys.argv[2], 100)  # a FIFO nobody opens for writing
    sys.exit(0)
    """
)


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, *argv], capture_output=True, timeout=30, check=False
    )


def test_attack_signal_missed_by_a_blocked_read_still_ends_it() -> None:
    done = _run("fd")
    assert done.returncode == 42, done.stderr.decode()


def test_attack_signal_while_waiting_for_a_fifo_writer_still_ends_it(tmp_path: Path) -> None:
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    done = _run("path", str(fifo))
    assert done.returncode == 42, done.stderr.decode()


def test_a_fifo_is_read_to_its_end_once_its_writer_comes(tmp_path: Path) -> None:
    fifo = tmp_path / "input.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"sleep 0.2; printf abc > {fifo}"])
    try:
        assert _waiting.read_path(fifo, 100) == b"abc"
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("size", [0, 1, _waiting.CHUNK, 3 * _waiting.CHUNK + 7])
def test_a_pipe_gives_every_byte_up_to_one_past_the_limit(size: int) -> None:
    limit = 2 * _waiting.CHUNK
    read_end, write_end = os.pipe()
    data = os.urandom(size)

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), os.fdopen(write_end, "wb") as out:
            out.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert _waiting.read_fd(read_end, limit) == data[: limit + 1]
    finally:
        os.close(read_end)
        writer.join()


def test_a_regular_file_is_read_directly(tmp_path: Path) -> None:
    path = tmp_path / "doc"
    path.write_bytes(b"x" * 1000)
    assert _waiting.read_path(path, 10) == b"x" * 11
    assert _waiting.read_path(path, 5000) == b"x" * 1000

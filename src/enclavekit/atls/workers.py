"""Serve one ASGI application from several processes sharing one listening socket.

:func:`serve` takes a listening socket bound once by the caller, then (``workers > 1``) forks the
worker processes, each of which builds its own application (and so its own database connection:
none is ever shared across ``fork``) and runs uvicorn on the inherited socket. The kernel hands each new connection to one
worker that is waiting in ``accept``; a busy worker accepts less, so new connections go to the less
loaded ones (a keep-alive connection stays with the worker that accepted it).

Why this and not uvicorn's own ``workers=``: that re-imports the application from an import string
in spawned interpreters, so the CA's configuration (keys, policy, store, limits) would have to travel
through environment variables; a pre-bound socket and ``fork`` keep it in one place, and the parent
validates everything (and migrates the database) before any worker starts.

Shutdown: SIGINT or SIGTERM to the parent stops every worker (SIGTERM: uvicorn finishes the requests
in flight, for up to ``graceful_timeout`` seconds, then the parent kills what is left) and the parent
exits 0. Workers never outlive the parent: each holds the read end of a pipe whose only writer is the
parent, and stops when it reads end-of-file — however the parent ended, ``kill -9`` included. A
worker that dies on its own is restarted; five such deaths within a minute stop the service (exit 1).

``workers == 1`` runs uvicorn in the calling process, without a supervisor.

Hooks for what needs to know about workers (metrics in multiprocess mode, for instance):
``worker_init(index)`` runs in each worker after the fork, before its application is built, and
``on_worker_exit(pid, index)`` runs in the parent when a worker has exited, before its replacement
(which gets the same ``index``) is started: an index has at most one live worker at a time.

Not handled here: TLS, limits and the application itself (uvicorn options pass through
``uvicorn_options``), Windows (no ``fork``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from enclavekit._cpus import usable_cpus

#: Seconds a stopping worker may take to finish the requests in flight before it is killed.
GRACEFUL_TIMEOUT = 10.0
#: Unexpected worker deaths tolerated within ``_CRASH_WINDOW`` seconds before the service stops.
_MAX_CRASHES = 5
_CRASH_WINDOW = 60.0
#: Pending connections the listening socket queues (shared by all workers).
BACKLOG = 2048


def default_workers() -> int:
    """The CPUs this process may run on (the ``--workers`` default)."""
    return usable_cpus()


def serve(
    make_app: Callable[[], Any],
    sock: socket.socket,
    *,
    workers: int,
    uvicorn_options: Mapping[str, Any] | None = None,
    worker_init: Callable[[int], None] | None = None,
    on_worker_exit: Callable[[int, int], None] | None = None,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
) -> int:
    """Serve ``make_app()`` on ``sock`` from ``workers`` processes until SIGINT/SIGTERM.

    Returns the exit status for the command: 0 after a requested stop, 1 if workers kept dying.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    options = dict(uvicorn_options or {})
    if workers == 1:
        if worker_init is not None:
            worker_init(0)
        _run_uvicorn(make_app(), sock, options)
        return 0
    return _Supervisor(
        make_app, sock, workers, options, worker_init, on_worker_exit, graceful_timeout
    ).run()


def _run_uvicorn(
    app: Any, sock: socket.socket, options: Mapping[str, Any], stop: threading.Event | None = None
) -> None:
    import uvicorn

    config = uvicorn.Config(app, lifespan="off", **{"log_level": "warning", **options})
    server = uvicorn.Server(config)
    if stop is not None:

        def watch() -> None:
            stop.wait()
            server.should_exit = True

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    server.run(sockets=[sock])


class _Supervisor:
    def __init__(
        self,
        make_app: Callable[[], Any],
        sock: socket.socket,
        workers: int,
        options: dict[str, Any],
        worker_init: Callable[[int], None] | None,
        on_worker_exit: Callable[[int, int], None] | None,
        graceful_timeout: float,
    ) -> None:
        self.make_app = make_app
        self.sock = sock
        self.workers = workers
        self.options = options
        self.worker_init = worker_init
        self.on_worker_exit = on_worker_exit
        self.graceful_timeout = graceful_timeout
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.crashes: list[float] = []
        # The parent keeps the only write end: workers see EOF when the parent is gone.
        self.life_r, self.life_w = os.pipe()
        # Signals wake the supervision loop through this pipe (set_wakeup_fd).
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def run(self) -> int:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(self.wake_w)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # only to wake the loop
        status = 0
        try:
            for index in range(self.workers):
                self._spawn(index)
            status = self._supervise()
        finally:
            self.stopping = True
            self._stop_children()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            for fd in (self.life_r, self.life_w, self.wake_r, self.wake_w):
                os.close(fd)
        return status

    def _on_stop_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker (covered by subprocess tests)
            code = 1
            try:
                code = self._worker(index)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = index

    def _worker(self, index: int) -> int:  # pragma: no cover - runs in the worker
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(self.life_w)
        os.close(self.wake_r)
        os.close(self.wake_w)
        stop = threading.Event()
        life_r = self.life_r

        def parent_watch() -> None:
            while os.read(
                life_r, 1
            ):  # nothing is ever written: returns b"" when the parent is gone
                pass
            stop.set()
            time.sleep(self.graceful_timeout)
            os._exit(1)

        threading.Thread(target=parent_watch, name="parent-life", daemon=True).start()
        if self.worker_init is not None:
            self.worker_init(index)
        _run_uvicorn(self.make_app(), self.sock, self.options, stop)
        return 0

    def _supervise(self) -> int:
        while not self.stopping:
            self._reap(restart=True)
            if len(self.crashes) >= _MAX_CRASHES:
                print(
                    f"enclavekit: {len(self.crashes)} CA workers died within"
                    f" {_CRASH_WINDOW:.0f} s; stopping (see the errors above)",
                    file=sys.stderr,
                )
                return 1
            self._wait_for_signal(1.0)
        return 0

    def _wait_for_signal(self, timeout: float) -> None:
        import select

        try:
            ready, _, _ = select.select([self.wake_r], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            return
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 512)

    def _reap(self, *, restart: bool) -> None:
        while self.children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            if self.on_worker_exit is not None:
                self.on_worker_exit(pid, index)
            if restart and not self.stopping:
                now = time.monotonic()
                self.crashes = [t for t in self.crashes if now - t < _CRASH_WINDOW] + [now]
                if len(self.crashes) < _MAX_CRASHES:
                    print(f"enclavekit: CA worker {pid} exited; starting another", file=sys.stderr)
                    self._spawn(index)

    def _stop_children(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout
        while self.children and time.monotonic() < deadline:
            self._reap(restart=False)
            if self.children:
                time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            self._reap(restart=False)
            if self.children:
                time.sleep(0.01)

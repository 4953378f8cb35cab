"""Serve an :class:`NsmEmulator` over a unix or TCP socket (asyncio, many clients at once).

Wire protocol (documented in docs/nsm.md): each frame is a 4-byte big-endian length and that many
bytes; a request frame holds the CBOR request exactly as it would go to the ``/dev/nsm`` ioctl, the
response frame the CBOR the device would answer. Requests on one connection are answered in order;
connections are independent. Requests larger than 4096 bytes get ``InputTooLarge``; frames larger
than 64 KiB close the connection. Signing runs on a small thread pool (ECDSA releases the GIL), so
several cores are used.

Not provided: authentication or TLS. Anyone who can reach the socket can ask for documents, which is
fine for an emulator whose root nobody trusts by default; bind TCP to loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from enclavekit.errors import UsageError
from enclavekit.nsm import _wire
from enclavekit.nsm.emulator import NsmEmulator

log = logging.getLogger(__name__)

#: Threads that run requests (signing): 2 per core keeps the cores busy.
DEFAULT_WORKERS = max(2, 2 * (os.cpu_count() or 1))


class EmulatorServer:
    """An asyncio server for one emulator at one address (``unix:///path`` or ``tcp://host:port``).

    Use :meth:`start` / :meth:`close` inside a running loop, or :func:`serve` /
    :func:`serve_in_background`. ``address`` is the bound address (with the real port when 0 was
    asked).
    """

    def __init__(self, emulator: NsmEmulator, url: str, *, workers: int = DEFAULT_WORKERS) -> None:
        self.emulator = emulator
        self.url = url
        self._family, self._address = _wire.parse_address(url)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsm-emulator")
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.address = url

    async def start(self) -> None:
        if self._family == "unix":
            assert isinstance(self._address, str)
            _remove_stale_socket(self._address)
            self._server = await asyncio.start_unix_server(self._handle, path=self._address)
        else:
            assert isinstance(self._address, tuple)
            host, port = self._address
            self._server = await asyncio.start_server(self._handle, host=host, port=port)
            bound = self._server.sockets[0].getsockname()
            self.address = f"tcp://{host}:{bound[1]}"
        log.info("NSM emulator %s listening on %s", self.emulator.module_id, self.address)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            if self._connections:
                await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._family == "unix":
            assert isinstance(self._address, str)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    header = await reader.readexactly(_wire.HEADER.size)
                except asyncio.IncompleteReadError:
                    return  # the client is done
                (length,) = _wire.HEADER.unpack(header)
                if length > _wire.MAX_FRAME:
                    log.warning("closing a connection that sent a %d-byte frame", length)
                    return
                request = await reader.readexactly(length)
                response = await loop.run_in_executor(
                    self._executor, self.emulator.handle_bytes, request
                )
                writer.write(_wire.HEADER.pack(len(response)) + response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse anything else or a live server."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket; choose another --listen path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise UsageError(f"another server is already listening on {path}")


def serve(emulator: NsmEmulator, url: str, *, workers: int = DEFAULT_WORKERS) -> None:
    """Serve until interrupted (blocking)."""

    async def main() -> None:
        server = EmulatorServer(emulator, url, workers=workers)
        await server.start()
        try:
            await server.serve_forever()
        finally:
            await server.close()

    asyncio.run(main())


@contextlib.contextmanager
def serve_in_background(
    emulator: NsmEmulator, url: str = "tcp://127.0.0.1:0", *, workers: int = DEFAULT_WORKERS
) -> Iterator[str]:
    """Run a server on a background thread; yields its address (for tests and demos)."""
    loop = asyncio.new_event_loop()
    server = EmulatorServer(emulator, url, workers=workers)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="nsm-emulator-server", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        loop.close()
        raise failure[0]
    try:
        yield server.address
    finally:
        future = asyncio.run_coroutine_threadsafe(server.close(), loop)
        future.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

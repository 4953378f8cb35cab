"""DNS rebinding: the proxy re-checks the allowlist for every address a re-resolution gives it.

Real TCP listeners on 127.0.0.1 and 127.0.0.2 (the loopback /8 on Linux) share one port; a resolver the
test controls moves the target name between them. Nothing is monkeypatched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from enclavekit.transport.allowlist import Allowlist, AllowlistEntry, IPAddress, IpFamily
from enclavekit.transport.errors import TargetNotAllowed
from enclavekit.transport.proxy import VsockProxy

NAME = "target.example"


class Listener:
    """Accepts on ``host:port``, answers ``b"hello from <host>"`` and counts connections."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.host = sock.getsockname()[0]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                with contextlib.suppress(OSError):
                    conn.sendall(f"hello from {self.host}".encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def listeners() -> Iterator[tuple[Listener, Listener]]:
    """Listeners on 127.0.0.1:P and 127.0.0.2:P for one ephemeral port P."""
    for _ in range(20):
        first = socket.create_server(("127.0.0.1", 0))
        port = first.getsockname()[1]
        try:
            second = socket.create_server(("127.0.0.2", port))
        except OSError:
            first.close()
            continue
        allowed, other = Listener(first), Listener(second)
        yield allowed, other
        allowed.close()
        other.close()
        return
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


class MovingName:
    """A resolver whose answer for NAME the test sets; IP literals resolve to themselves."""

    def __init__(self, answer: str) -> None:
        self.answer = ipaddress.ip_address(answer)
        self.lookups = 0

    def __call__(self, host: str, family: IpFamily) -> tuple[IPAddress, ...]:
        if host == NAME:
            self.lookups += 1
            return (self.answer,)
        return (ipaddress.ip_address(host),)


def _read(sock: socket.socket) -> bytes:
    with sock:
        return sock.recv(100)


def test_attack_dns_rebinding_to_unlisted_address_is_refused(
    listeners: tuple[Listener, Listener], caplog: pytest.LogCaptureFixture
) -> None:
    allowed, other = listeners
    port = allowed.sock.getsockname()[1]
    allowlist = Allowlist((AllowlistEntry("127.0.0.1", port),))
    # Asked directly, the allowlist refuses 127.0.0.2.
    with pytest.raises(TargetNotAllowed):
        allowlist.check("127.0.0.2", port)
    resolver = MovingName("127.0.0.1")
    now = [0.0]
    proxy = VsockProxy(
        NAME, port, allowlist=allowlist, resolver=resolver, dns_refresh=60, clock=lambda: now[0]
    )
    try:
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"

        resolver.answer = ipaddress.ip_address("127.0.0.2")  # the name moves
        now[0] = 61.0  # the next connection re-resolves
        with caplog.at_level(logging.WARNING), pytest.raises(TargetNotAllowed) as info:
            proxy.connect_upstream()
        assert "127.0.0.2" in str(info.value)
        assert any(
            "127.0.0.2" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records
        )
        # Relayed connections are refused too (the client is closed), and logged.
        ours, theirs = socket.socketpair()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stats = proxy.submit(ours).result(15)
        assert stats.outcome == "reset"
        assert theirs.recv(10) == b""
        theirs.close()
        assert any("127.0.0.2" in r.getMessage() for r in caplog.records)
        assert other.accepted == 0  # nothing ever reached 127.0.0.2
        # The refused answer is not kept.
        assert proxy.remote_ip == ipaddress.ip_address("127.0.0.1")

        resolver.answer = ipaddress.ip_address("127.0.0.1")  # back to an allowed address
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"
        assert other.accepted == 0
    finally:
        proxy.close()


def test_rebinding_to_another_listed_address_is_followed(
    listeners: tuple[Listener, Listener],
) -> None:
    allowed, other = listeners
    port = allowed.sock.getsockname()[1]
    allowlist = Allowlist((AllowlistEntry("127.0.0.1", port), AllowlistEntry("127.0.0.2", port)))
    resolver = MovingName("127.0.0.1")
    now = [0.0]
    proxy = VsockProxy(
        NAME, port, allowlist=allowlist, resolver=resolver, dns_refresh=60, clock=lambda: now[0]
    )
    try:
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"
        resolver.answer = ipaddress.ip_address("127.0.0.2")
        now[0] = 61.0
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.2"
        assert proxy.remote_ip == ipaddress.ip_address("127.0.0.2")
    finally:
        proxy.close()


def test_entry_naming_the_target_allows_whatever_it_resolves_to(
    listeners: tuple[Listener, Listener],
) -> None:
    """nitro-cli semantics: an entry equal to the target name allows the name, not an address."""
    allowed, other = listeners
    port = allowed.sock.getsockname()[1]
    allowlist = Allowlist((AllowlistEntry(NAME, port),))
    resolver = MovingName("127.0.0.1")
    now = [0.0]
    proxy = VsockProxy(
        NAME, port, allowlist=allowlist, resolver=resolver, dns_refresh=60, clock=lambda: now[0]
    )
    try:
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"
        resolver.answer = ipaddress.ip_address("127.0.0.2")
        now[0] = 61.0
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.2"
    finally:
        proxy.close()


def test_unchanged_answer_is_not_rechecked_within_the_refresh_interval(
    listeners: tuple[Listener, Listener],
) -> None:
    """The verdict is kept with the address it was computed for: no DNS per connection."""
    allowed, _ = listeners
    port = allowed.sock.getsockname()[1]
    resolver = MovingName("127.0.0.1")
    proxy = VsockProxy(
        NAME,
        port,
        allowlist=Allowlist((AllowlistEntry("127.0.0.1", port),)),
        resolver=resolver,
        dns_refresh=60,
        clock=lambda: 0.0,
    )
    try:
        for _ in range(3):
            assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"
        assert resolver.lookups == 1
    finally:
        proxy.close()


def test_attack_allowlist_entry_name_moving_away_is_noticed_on_refresh(
    listeners: tuple[Listener, Listener],
) -> None:
    """The target's answer is unchanged, but the entry name that allowed it now points elsewhere."""
    allowed, _ = listeners
    port = allowed.sock.getsockname()[1]
    entry = {"allowed.example": ipaddress.ip_address("127.0.0.1")}

    def resolver(host: str, family: IpFamily) -> tuple[IPAddress, ...]:
        if host == NAME:
            return (ipaddress.ip_address("127.0.0.1"),)
        return (entry[host],)

    now = [0.0]
    proxy = VsockProxy(
        NAME,
        port,
        allowlist=Allowlist((AllowlistEntry("allowed.example", port),)),
        resolver=resolver,
        dns_refresh=60,
        clock=lambda: now[0],
    )
    try:
        assert _read(proxy.connect_upstream()) == b"hello from 127.0.0.1"
        entry["allowed.example"] = ipaddress.ip_address("127.0.0.3")
        now[0] = 61.0
        with pytest.raises(TargetNotAllowed):
            proxy.connect_upstream()
        assert allowed.accepted == 1
    finally:
        proxy.close()

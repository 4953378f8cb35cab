"""``enclavekit vsock-proxy`` (parent side, nitro-cli flags) and ``vsock-forward`` (enclave side)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from enclavekit.cli._common import bind_error
from enclavekit.cli._render import stderr, warn
from enclavekit.errors import UsageError
from enclavekit.transport.address import (
    VMADDR_CID_ANY,
    Address,
    TcpAddress,
    VsockAddress,
    parse_endpoint,
)
from enclavekit.transport.allowlist import DEFAULT_CONFIG_PATH, Allowlist, IpFamily
from enclavekit.transport.errors import TransportError
from enclavekit.transport.forwarder import Forwarder
from enclavekit.transport.proxy import VsockProxy
from enclavekit.transport.relay import DEFAULT_STALL_TIMEOUT
from enclavekit.transport.server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_WORKERS,
    RelayServer,
    raise_nofile_limit,
)
from enclavekit.transport.sockets import listen, local_address

logger = logging.getLogger(__name__)


def _serve(server: RelayServer, listen_at: Address, what: str, option: str) -> None:
    try:
        listener = listen(listen_at)
    except OSError as exc:
        server.close()
        raise bind_error(option, str(listen_at), exc) from None
    except TransportError as exc:
        server.close()
        raise UsageError(f"{option} {listen_at}: {exc}") from None
    except BaseException:
        server.close()
        raise
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = server.start(listener)
        stderr.print(f"{what} listening on {local_address(listener)}")
        while not stop.wait(0.5) and thread.is_alive():
            pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stall(value: float) -> float | None:
    return None if value <= 0 else value


@click.command("vsock-proxy")
@click.argument("local_port", type=click.IntRange(0, 0xFFFFFFFF))
@click.argument("remote_addr")
@click.argument("remote_port", type=click.IntRange(1, 0xFFFF))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="Allowlist YAML (nitro-cli format); targets not listed are refused.",
)
@click.option("-4", "--ipv4", is_flag=True, help="Use IPv4 addresses only.")
@click.option("-6", "--ipv6", is_flag=True, help="Use IPv6 addresses only.")
@click.option(
    "-w",
    "--workers",
    "--num_workers",
    type=click.IntRange(1, 1024),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Event-loop threads relaying connections (nitro-cli: simultaneous connections; "
    "here connections are limited by --max-connections).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=None,
    help=f"Connections open at once; more are closed at once [default: {DEFAULT_MAX_CONNECTIONS}, "
    "fewer if the open-file limit is lower].",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_IDLE_TIMEOUT,
    show_default=True,
    help="Close a connection with no traffic either way for this many seconds (0: never).",
)
@click.option(
    "--listen",
    "listen_text",
    metavar="ADDRESS",
    help="Listen here instead of vsock://ANY:LOCAL_PORT (e.g. tcp://127.0.0.1:8000 for tests).",
)
@click.option(
    "--stall-timeout",
    type=float,
    default=DEFAULT_STALL_TIMEOUT,
    show_default=True,
    help="Drop a connection whose peer has not read pending data for this many seconds (0: never).",
)
def vsock_proxy(
    local_port: int,
    remote_addr: str,
    remote_port: int,
    config_path: Path,
    ipv4: bool,
    ipv6: bool,
    workers: int,
    max_connections: int | None,
    idle_timeout: float,
    listen_text: str | None,
    stall_timeout: float,
) -> None:
    """Relay vsock connections from enclaves to REMOTE_ADDR:REMOTE_PORT (nitro-cli vsock-proxy).

    The target must be in the allowlist (--config): exit 1 when it is not, 2 on bad arguments or an
    unreadable allowlist. Runs until SIGINT/SIGTERM.
    """
    if ipv4 and ipv6:
        raise UsageError("--ipv4 and --ipv6 exclude each other; give at most one")
    family = IpFamily.IPV4 if ipv4 else IpFamily.IPV6 if ipv6 else IpFamily.ANY
    allowlist = Allowlist.load(config_path)
    raise_nofile_limit(max_connections or DEFAULT_MAX_CONNECTIONS)
    proxy = VsockProxy(
        remote_addr,
        remote_port,
        allowlist=allowlist,
        family=family,
        workers=workers,
        stall_timeout=_stall(stall_timeout),
        idle_timeout=_stall(idle_timeout),
        max_connections=max_connections,
    )
    stderr.print(f"vsock-proxy: target {remote_addr}:{remote_port} ({proxy.remote_ip}) allowed")
    stderr.print(
        f"vsock-proxy: up to {proxy.max_connections} connections on {workers} event loop(s), "
        f"idle timeout {f'{idle_timeout:g} s' if idle_timeout > 0 else 'none'}"
    )
    listen_at = (
        parse_endpoint(listen_text, option="--listen")
        if listen_text
        else VsockAddress(VMADDR_CID_ANY, local_port)
    )
    _serve(proxy, listen_at, "vsock-proxy", "--listen" if listen_text else "LOCAL_PORT")


@click.command("vsock-forward")
@click.argument("listen_address")
@click.argument("target_address")
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(1, 1024),
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Event-loop threads relaying connections (not a connection limit).",
)
@click.option(
    "--stall-timeout",
    type=float,
    default=DEFAULT_STALL_TIMEOUT,
    show_default=True,
    help="Drop a connection whose peer has not read pending data for this many seconds (0: never).",
)
def vsock_forward(
    listen_address: str, target_address: str, workers: int, stall_timeout: float
) -> None:
    """Enclave side: accept on LISTEN_ADDRESS and tunnel each connection to TARGET_ADDRESS.

    Example inside an enclave: vsock-forward tcp://127.0.0.1:8000 vsock://3:8000
    """
    target = parse_endpoint(target_address, option="TARGET_ADDRESS")
    listen_at = parse_endpoint(listen_address, option="LISTEN_ADDRESS")
    if isinstance(listen_at, TcpAddress) and listen_at.host not in (
        "127.0.0.1",
        "::1",
        "localhost",
    ):
        warn(f"vsock-forward listens on {listen_at}, not loopback: other hosts may use the tunnel")
    raise_nofile_limit()
    _serve(
        Forwarder(target, workers=workers, stall_timeout=_stall(stall_timeout)),
        listen_at,
        f"vsock-forward → {target}",
        "LISTEN_ADDRESS",
    )


def register(group: click.Group) -> None:
    group.add_command(vsock_proxy)
    group.add_command(vsock_forward)

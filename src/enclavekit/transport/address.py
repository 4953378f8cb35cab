"""Transport addresses: ``vsock://CID:PORT`` and ``tcp://HOST:PORT``, parsed into frozen models.

Checked: scheme, port range (vsock 32-bit, TCP 16-bit; 0 means "any free port" for listeners), CID range
(32-bit; ``ANY``/``-1`` for ``VMADDR_CID_ANY``), IPv6 literals in brackets. Not checked: whether the host
name resolves or the CID exists — that is found out when connecting.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from enclavekit.errors import UsageError

#: ``VMADDR_CID_ANY``: bind on every CID of this machine (listeners only).
VMADDR_CID_ANY = 0xFFFFFFFF
#: ``VMADDR_CID_LOCAL``: vsock loopback (needs the ``vsock_loopback`` module). Python 3.11 lacks the constant.
VMADDR_CID_LOCAL = 1
#: ``VMADDR_CID_HOST``: the parent instance as seen from an enclave.
VMADDR_CID_HOST = 2
#: The parent's CID in Nitro Enclaves (nitro-cli ``VMADDR_CID_PARENT``; vsock-proxy listens there).
VMADDR_CID_PARENT = 3

_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """An AF_VSOCK endpoint."""

    cid: int
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.cid <= _U32_MAX:
            raise ValueError(f"vsock CID must be 0..{_U32_MAX}, got {self.cid}")
        if not 0 <= self.port <= _U32_MAX:
            raise ValueError(f"vsock port must be 0..{_U32_MAX}, got {self.port}")

    @property
    def sockaddr(self) -> tuple[int, int]:
        return (self.cid, self.port)

    def __str__(self) -> str:
        cid = "ANY" if self.cid == VMADDR_CID_ANY else str(self.cid)
        return f"vsock://{cid}:{self.port}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP endpoint; ``host`` is a name, an IPv4 literal or an IPv6 literal (without brackets)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("TCP host must not be empty")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"TCP port must be 0..65535, got {self.port}")

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix-domain stream socket path (``unix:///run/x.sock``): how a local backend such as the
    vhost-user vsock device hands connections to the proxy without a TCP port."""

    path: str

    def __post_init__(self) -> None:
        if not self.path or "\0" in self.path:
            raise ValueError("unix socket path must be non-empty and contain no NUL")
        if len(self.path.encode()) > 107:
            raise ValueError("unix socket path is longer than 107 bytes")

    @property
    def sockaddr(self) -> str:
        return self.path

    def __str__(self) -> str:
        return f"unix://{self.path}"


Address = VsockAddress | TcpAddress | UnixAddress


def _parse_int(text: str, what: str, address: str) -> int:
    if not text.isdigit():
        raise UsageError(
            f"invalid {what} {text!r} in address {address!r}: expected a decimal number "
            "(address forms: vsock://CID:PORT, tcp://HOST:PORT)"
        )
    return int(text)


def parse_address(text: str) -> Address:
    """Parse ``vsock://CID:PORT`` (CID may be ``ANY``), ``tcp://HOST:PORT`` (``[v6]`` in brackets) or
    ``unix:///PATH``.

    Raises :class:`~enclavekit.errors.UsageError` with the expected form when ``text`` is not an address.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("vsock", "tcp", "unix"):
        raise UsageError(
            f"unsupported address {text!r}: expected vsock://CID:PORT, tcp://HOST:PORT "
            "or unix:///PATH"
        )
    if scheme.lower() == "unix":
        try:
            return UnixAddress(rest)
        except ValueError as exc:
            raise UsageError(f"invalid address {text!r}: {exc}") from None
    host, colon, port_text = rest.rpartition(":")
    if not colon or not host:
        raise UsageError(f"address {text!r} lacks a port: expected {scheme}://HOST:PORT")
    port = _parse_int(port_text, "port", text)
    try:
        if scheme.lower() == "vsock":
            cid = VMADDR_CID_ANY if host.upper() in ("ANY", "-1") else _parse_int(host, "CID", text)
            return VsockAddress(cid, port)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise UsageError(f"IPv6 host in {text!r} must be in brackets: tcp://[::1]:PORT")
        return TcpAddress(host, port)
    except ValueError as exc:
        raise UsageError(f"invalid address {text!r}: {exc}") from None


#: Address kinds by scheme, for :func:`parse_endpoint`'s ``kinds``.
KINDS: dict[str, type[Address]] = {"tcp": TcpAddress, "unix": UnixAddress, "vsock": VsockAddress}
_FORMS = {
    "tcp": "HOST:PORT, tcp://HOST:PORT",
    "unix": "unix://PATH",
    "vsock": "vsock://CID:PORT",
}


def parse_endpoint(
    text: str, *, option: str, kinds: tuple[str, ...] = ("tcp", "unix", "vsock")
) -> Address:
    """The one grammar of the command line's address flags (``--listen``, ``--upstream``, ``--nsm``, …).

    ``HOST:PORT`` (IPv6 as ``[addr]:PORT``) and ``tcp://HOST:PORT`` are TCP; ``unix:///ABSOLUTE`` or
    ``unix:RELATIVE`` (made absolute) and ``vsock://CID:PORT`` where ``kinds`` allows them. Errors are
    :class:`~enclavekit.errors.UsageError` naming ``option`` and listing the accepted forms. Not checked:
    that the host resolves or the port is free (binding tells).
    """
    forms = ", ".join(_FORMS[k] for k in kinds)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text.lower().startswith("unix:"):  # unix:relative/path, as the NSM client has accepted
            scheme, rest = "unix", text[5:]
        else:
            scheme, rest = "tcp", text
    scheme = scheme.lower()
    if scheme not in kinds:
        raise UsageError(f"{option}: expected {forms}; found {text!r}")
    if scheme == "unix" and rest and not rest.startswith("/"):
        if sep:  # unix://tmp/x.sock almost always means /tmp/x.sock: say so rather than guess
            raise UsageError(
                f"{option}: {text!r}: the path after unix:// must be absolute (unix:///{rest});"
                f" for a path relative to the current directory write unix:{rest}"
            )
        rest = os.path.abspath(rest)
    try:
        return parse_address(f"{scheme}://{rest}")
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}; expected {forms}") from None


def as_address(value: Address | str) -> Address:
    """Accept an address model or its text form."""
    return parse_address(value) if isinstance(value, str) else value


def vsock_available() -> bool:
    """True when this Python and kernel can create AF_VSOCK sockets (not whether any peer is reachable)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True

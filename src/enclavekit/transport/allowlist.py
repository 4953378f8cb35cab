"""nitro-cli vsock-proxy allowlists: the YAML format, DNS resolution by address family, and the check.

Format (``/etc/nitro_enclaves/vsock-proxy.yaml``)::

    allowlist:
    - {address: kms.eu-west-1.amazonaws.com, port: 443}
    - {address: 10.0.0.5, port: 8443}

Semantics (as nitro-cli ``check_allowlist``): the target host is resolved first (restricted to the chosen
address family) and the first address is kept; then each entry is tried in order — its port must equal the
target port, then its address must equal the target host name, or else one of the entry's resolved
addresses must equal the target's address. No entry matching means refusal. Differences from nitro-cli,
all on the closed side: host names compare case-insensitively without a trailing dot, and an entry whose
name does not resolve is skipped (reported) instead of aborting the whole check.

Not checked: TLS names (the proxy relays bytes; the client checks the server certificate).
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from enclavekit.errors import Failure, MalformedInput, UsageError
from enclavekit.transport.errors import TargetNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: nitro-cli's default configuration path.
DEFAULT_CONFIG_PATH = Path("/etc/nitro_enclaves/vsock-proxy.yaml")
#: Allowlist files are small; refuse anything bigger than this before parsing.
MAX_CONFIG_BYTES = 1024 * 1024


class IpFamily(enum.Enum):
    """Which address family the proxy may use (nitro-cli ``--ipv4`` / ``--ipv6``; default both)."""

    ANY = "any"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


Resolver = Callable[[str, IpFamily], tuple[IPAddress, ...]]


def resolve(host: str, family: IpFamily = IpFamily.ANY) -> tuple[IPAddress, ...]:
    """Resolve ``host`` with the system resolver; IPv4 first, then IPv6, filtered by ``family``.

    Raises :class:`UsageError` when the name does not resolve or yields no address of the family.
    """
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        found: tuple[IPAddress, ...] = (literal,)
    else:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise UsageError(
                f"DNS lookup of {host!r} failed ({exc}); check the name and the resolver"
            ) from None
        seen: dict[IPAddress, None] = {}
        for family_, _, _, _, sockaddr in infos:
            if family_ in (socket.AF_INET, socket.AF_INET6):
                seen.setdefault(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]), None)
        found = tuple(sorted(seen, key=lambda ip: ip.version))
    if family is IpFamily.IPV4:
        found = tuple(ip for ip in found if ip.version == 4)
    elif family is IpFamily.IPV6:
        found = tuple(ip for ip in found if ip.version == 6)
    if not found:
        raise UsageError(
            f"{host!r} has no {family.value if family is not IpFamily.ANY else 'IP'} address; "
            "drop --ipv4/--ipv6 or use another name"
        )
    return found


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    """One allowed target: a host name or IP literal, and a TCP port."""

    address: str
    port: int


def _normalise(host: str) -> str:
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class Allowlist:
    """The parsed ``allowlist:`` of a vsock-proxy YAML file. An empty allowlist refuses everything."""

    entries: tuple[AllowlistEntry, ...]

    @classmethod
    def from_mapping(cls, obj: Any, *, source: str = "allowlist") -> Allowlist:
        if not isinstance(obj, Mapping) or "allowlist" not in obj:
            raise MalformedInput(
                f"{source}: expected a mapping with an 'allowlist' key (nitro-cli vsock-proxy format), "
                f"found {type(obj).__name__}"
            )
        raw = obj["allowlist"]
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise MalformedInput(
                f"{source}: 'allowlist' must be a list, found {type(raw).__name__}"
            )
        entries = []
        for index, item in enumerate(raw):
            where = f"{source}: allowlist[{index}]"
            if not isinstance(item, Mapping):
                raise MalformedInput(f"{where}: expected {{address, port}}, found {item!r}")
            address, port = item.get("address"), item.get("port")
            if not isinstance(address, str) or not address.strip():
                raise MalformedInput(
                    f"{where}: 'address' must be a non-empty string, found {address!r}"
                )
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
                raise MalformedInput(f"{where}: 'port' must be an integer 1..65535, found {port!r}")
            entries.append(AllowlistEntry(address.strip(), port))
        return cls(tuple(entries))

    @classmethod
    def from_yaml(cls, text: str | bytes, *, source: str = "allowlist") -> Allowlist:
        if len(text) > MAX_CONFIG_BYTES:
            raise MalformedInput(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MalformedInput(f"{source}: not valid YAML ({exc})") from None
        return cls.from_mapping(obj, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Allowlist:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise UsageError(
                f"cannot read allowlist {path}: {exc.strerror or exc}; pass --config FILE"
            ) from None
        return cls.from_yaml(data, source=str(path))

    def check(
        self,
        host: str,
        port: int,
        family: IpFamily = IpFamily.ANY,
        *,
        resolver: Resolver = resolve,
    ) -> IPAddress:
        """Return the target's address if ``host:port`` is allowed; else raise :class:`TargetNotAllowed`."""
        target_ip = resolver(host, family)[0]
        self.check_address(host, port, target_ip, family, resolver=resolver)
        return target_ip

    def check_address(
        self,
        host: str,
        port: int,
        target_ip: IPAddress,
        family: IpFamily = IpFamily.ANY,
        *,
        resolver: Resolver = resolve,
    ) -> None:
        """Raise :class:`TargetNotAllowed` unless ``target_ip`` is allowed as the address of ``host:port``.

        The check of :meth:`check` for an address already resolved (the proxy's re-resolutions): an
        entry equal to ``host`` allows any address of that name; an address entry or another name
        must resolve to ``target_ip`` itself.
        """
        wanted = _normalise(host)
        notes: list[Failure] = []
        for entry in self.entries:
            if entry.port != port:
                continue
            if _normalise(entry.address) == wanted:
                return
            try:
                entry_ips = resolver(entry.address, family)
            except UsageError as exc:
                notes.append(
                    Failure(f"allowlist entry {entry.address}:{entry.port}", "resolvable", str(exc))
                )
                continue
            if target_ip in entry_ips:
                return
        expected = ", ".join(f"{e.address}:{e.port}" for e in self.entries) or "(empty allowlist)"
        raise TargetNotAllowed(
            [
                Failure(
                    "vsock-proxy allowlist", f"one of {expected}", f"{host}:{port} ({target_ip})"
                ),
                *notes,
            ]
        )

"""Helpers shared by command modules (trust roots, HOST:PORT)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from enclavekit.cli._render import warn
from enclavekit.errors import UsageError

if TYPE_CHECKING:  # imported where used: command modules load fast for --help
    from enclavekit.attestation.verifier import Verifier

#: ``--root PEM`` (repeatable), read by :func:`nsm_verifier`; shared by every command that verifies NSM
#: attestations, so the option means the same everywhere.
root_option = click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="PEM NSM trust root (repeatable). Default: the pinned AWS Nitro root G1.",
)


def nsm_verifier(roots: tuple[str, ...]) -> Verifier:
    """A verifier for the given PEM roots (``--root``; default: AWS); warns loudly about any non-AWS root."""
    from enclavekit.attestation.verifier import Verifier
    from enclavekit.pki.roots import aws_root, fingerprint, load_pem_roots

    trust = [c for path in roots for c in load_pem_roots(path)] if roots else [aws_root()]
    verifier = Verifier(trust)
    if not verifier.trusts_only_aws:
        names = ", ".join(f"{c.subject.rfc4514_string()} ({fingerprint(c)[:16]}…)" for c in trust)
        warn(
            f"trusting non-AWS root(s): {names}. Documents signed by them are NOT from AWS Nitro"
            " hardware (emulator or test PKI)."
        )
    return verifier


def host_port(value: str, option: str) -> tuple[str, int]:
    """Parse a TCP address flag: ``HOST:PORT`` or ``tcp://HOST:PORT`` (IPv6 as ``[addr]:port``)."""
    from enclavekit.transport.address import TcpAddress, parse_endpoint

    address = parse_endpoint(value, option=option, kinds=("tcp",))
    assert isinstance(address, TcpAddress)
    return address.host, address.port


def endpoint_url(value: str, option: str, kinds: tuple[str, ...] = ("tcp", "unix")) -> str:
    """An address flag in its canonical ``scheme://`` text (``HOST:PORT`` becomes ``tcp://HOST:PORT``)."""
    from enclavekit.transport.address import parse_endpoint

    return str(parse_endpoint(value, option=option, kinds=kinds))


def bind_error(option: str, value: str, exc: OSError) -> UsageError:
    """A failed bind as the user's mistake: which flag, which address, why."""
    reason = exc.strerror or str(exc)
    return UsageError(
        f"{option} {value}: cannot listen there: {reason}; choose a free port or an address of"
        " this machine"
    )

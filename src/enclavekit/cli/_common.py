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
    """Parse HOST:PORT (IPv6 as [addr]:port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option}: expected HOST:PORT, found {value!r}")
    return host.strip("[]"), int(port)

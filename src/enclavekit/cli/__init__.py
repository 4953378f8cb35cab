"""The ``enclavekit`` command: one click group, one module per command group.

Only this package maps exceptions to exit codes: 0 ok, 1 verification/policy failure, 2 usage or input error.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from enclavekit import __version__
from enclavekit.errors import Error

# Command modules: each exposes ``register(group)``. One module per command group.
_COMMAND_MODULES: tuple[str, ...] = (
    "enclavekit.cli.verify",  # verify, inspect
    "enclavekit.cli.eif",  # describe-eif, pcr, sign-eif
    "enclavekit.cli.build",  # build-enclave
    "enclavekit.cli.nsm",  # nsm serve|root|attest|describe-pcr
    "enclavekit.cli.ca",  # ca init|root|serve
    "enclavekit.cli.atls",  # atls proxy|get
    "enclavekit.cli.seal",  # seal, unseal
    "enclavekit.cli.kms",  # kms unwrap
    "enclavekit.cli.vsock",  # vsock-proxy
    "enclavekit.cli.run",  # run-enclave, describe-enclaves, console, terminate-enclave
    "enclavekit.cli.demo",  # demo
)


class _Group(click.Group):
    """A click group that turns enclavekit errors into messages and exit codes, never tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Error as exc:
            click.echo(f"error: {exc.diagnostics()}", err=True)
            ctx.exit(exc.exit_code)
        except (OSError, ValueError) as exc:
            if isinstance(exc, BrokenPipeError):
                ctx.exit(0)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="enclavekit")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Build, measure, attest, verify and trust AWS Nitro Enclaves."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="enclavekit")

"""The ``enclavekit`` command: one click group, one module per command group.

Only this package maps exceptions to exit codes: 0 ok, 1 verification/policy failure, 2 usage or input error.

Command modules are imported lazily, when their command runs or shows its help: ``enclavekit --help``
and ``enclavekit verify --help`` do not pay for cryptography, the HTTP stack or the EIF builder. The
short help of the top-level listing is therefore kept in :data:`_COMMANDS` (a unit test checks it
against each command's docstring, so the two cannot drift).
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
from typing import Any

import click

from enclavekit import __version__
from enclavekit.errors import Error

#: Command name -> (module exposing ``register(group)``, short help for ``enclavekit --help``).
_COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("enclavekit.cli.verify", "Verify an attestation document (path, '-'..."),
    "inspect": ("enclavekit.cli.verify", "Decode and show an attestation document..."),
    "describe-eif": ("enclavekit.cli.eif", "Show an EIF's version, PCRs, signature and..."),
    "pcr": ("enclavekit.cli.eif", "Compute a PCR value (nitro-cli pcr;..."),
    "sign-eif": ("enclavekit.cli.eif", "Add or replace an EIF's signature over..."),
    "build-enclave": ("enclavekit.cli.build", "Build an EIF from a container image or a..."),
    "nsm": ("enclavekit.cli.nsm", "The Nitro Secure Module: emulator and client."),
    "ca": ("enclavekit.cli.ca", "Attestation CA: issues short-lived TLS..."),
    "atls": ("enclavekit.cli.atls", "Attested TLS: serve behind a CA-issued..."),
    "seal": ("enclavekit.cli.seal", "Verify DOC against the policy, then..."),
    "unseal": ("enclavekit.cli.seal", "Decrypt a sealed payload inside the enclave."),
    "kms": ("enclavekit.cli.kms", "KMS recipient envelopes..."),
    "vsock-proxy": ("enclavekit.cli.vsock", "Relay vsock connections from enclaves to..."),
    "vsock-forward": ("enclavekit.cli.vsock", "Enclave side: accept on LISTEN_ADDRESS and..."),
    "run-enclave": ("enclavekit.cli.run", "Run an EIF locally, as the enclave's init..."),
    "describe-enclaves": ("enclavekit.cli.run", "List the running local enclaves..."),
    "console": ("enclavekit.cli.run", "Print an enclave's console output and..."),
    "terminate-enclave": ("enclavekit.cli.run", "Terminate one local enclave (or all);..."),
    "demo": ("enclavekit.cli.demo", "The whole enclave lifecycle locally; exit..."),
}

#: Optional dependencies by top-level module -> the extra that installs them.
_EXTRAS: dict[str, str] = {"psycopg": "postgres", "botocore": "kms"}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The ``pip install`` line for an optional dependency that is not installed, else None."""
    top = (exc.name or "").partition(".")[0]
    extra = _EXTRAS.get(top)
    return None if extra is None else f"pip install 'enclavekit[{extra}]'"


def _load(name: str) -> click.Command | None:
    entry = _COMMANDS.get(name)
    if entry is None:
        return None
    collector = click.Group()
    importlib.import_module(entry[0]).register(collector)
    return collector.commands.get(name)


class _Group(click.Group):
    """A click group that loads its commands lazily and turns enclavekit errors into messages and
    exit codes, never tracebacks."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands.get(cmd_name) or _load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The listing reads the short help from _COMMANDS instead of importing every module.
        rows = [(name, _COMMANDS[name][1]) for name in self.list_commands(ctx) if name in _COMMANDS]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Error as exc:
            click.echo(f"error: {exc.diagnostics()}", err=True)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            line = _missing_extra(exc)
            if line is None:
                raise
            click.echo(
                f"error: this command needs the optional dependency {exc.name!r}, which is not"
                f" installed; install it with: {line}",
                err=True,
            )
            ctx.exit(2)
        except (OSError, ValueError) as exc:
            if isinstance(exc, BrokenPipeError):
                ctx.exit(0)
            if isinstance(exc, OSError):
                from enclavekit.cli._files import describe_os_error

                click.echo(f"error: {describe_os_error(exc)}", err=True)
            else:
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


#: Signals that end a command: the stack unwinds (every ``finally`` and ``with`` removes what it made)
#: and the process exits with the shell's convention for death by signal, 128 + the signal number.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived. A ``BaseException``, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum: int, frame: object) -> None:
    for other in _STOP_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point."""
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup and `&` stay as they are
            signal.signal(signum, _interrupted)
    try:
        cli(prog_name="enclavekit")
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        # Through logging, so that a service with --log-format json says it in JSON too.
        logging.getLogger("enclavekit.cli").warning(
            "stopped by %s", name, extra={"event": "signal", "fields": {"signal": name}}
        )
        sys.exit(128 + stop.signum)

"""``enclavekit demo``: build, run, attest, verify, seal, tamper, refuse — on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from enclavekit.cli._render import emit_json, json_option, stderr


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep everything (EIFs, CA database, enclave state) here instead of a temp directory.",
)
@click.option(
    "--isolation",
    type=click.Choice(["chroot", "process"]),
    default=None,
    help="How run-enclave runs the application (default: chroot when root and possible).",
)
@json_option
def demo_command(workdir: Path | None, isolation: str | None, as_json: bool) -> None:
    """The whole enclave lifecycle locally; exit 0 when every step (the refusal too) behaves."""
    from enclavekit.demo import run_demo

    result = run_demo(workdir=workdir, console=stderr, isolation=isolation)
    if as_json:
        emit_json(result.to_json())
    raise SystemExit(0 if result.ok else 1)


def register(group: click.Group) -> None:
    group.add_command(demo_command)

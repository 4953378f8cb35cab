"""``run-enclave``, ``describe-enclaves``, ``console`` and ``terminate-enclave`` for local enclaves.

Like nitro-cli, these always print their JSON object(s) on stdout; a short human summary goes to
stderr unless ``--json`` is given.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.errors import UsageError
from enclavekit.run import runner
from enclavekit.run.state import EnclaveStore


def _store(state_dir: Path | None) -> EnclaveStore:
    return EnclaveStore(state_dir) if state_dir is not None else EnclaveStore()


_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where enclave records live (default: $ENCLAVEKIT_STATE_DIR, else ~/.local/state/enclavekit).",
)


def _run_in_vm(ctx: click.Context) -> None:
    try:
        vm = importlib.import_module("enclavekit.vm")
    except ModuleNotFoundError:
        raise UsageError(
            "--vm needs the QEMU runner (enclavekit.vm), which is not part of this build; install"
            " an enclavekit with the vm module, or drop --vm to run the EIF locally"
        ) from None
    entry = getattr(vm, "run_enclave_cli", None)
    if entry is None:
        raise UsageError("enclavekit.vm has no run_enclave_cli entry point yet; drop --vm")
    entry(**ctx.params)


@click.command("run-enclave")
@click.option(
    "--eif-path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The EIF to run.",
)
@click.option(
    "--cpu-count", type=click.IntRange(1), default=runner.DEFAULT_CPU_COUNT, show_default=True
)
@click.option(
    "--memory",
    "memory_mib",
    type=click.IntRange(1),
    default=runner.DEFAULT_MEMORY_MIB,
    show_default=True,
    help="Memory in MiB (reported, and checked to be >= 4 x the EIF size, as nitro-cli does).",
)
@click.option(
    "--enclave-cid", type=int, default=None, help="The enclave's CID (>= 4; default 16+)."
)
@click.option("--enclave-name", default=None, help="Name for the enclave (default: EIF file stem).")
@click.option(
    "--debug-mode", is_flag=True, help="PCR0/1/2/8 read as zero in attestation documents."
)
@click.option(
    "--isolation",
    type=click.Choice(["chroot", "process"]),
    default=None,
    help="chroot: private mount namespace + chroot (root only, default for root); process: a"
    " plain process in the rootfs directory (default otherwise).",
)
@click.option(
    "--mount-host",
    "host_mounts",
    multiple=True,
    help="Host path to bind read-only at the same path inside the chroot (repeatable; not"
    " measured).",
)
@click.option(
    "--host-python",
    is_flag=True,
    help="Bind this Python and enclavekit into the chroot ($ENCLAVEKIT_PYTHON); not measured.",
)
@click.option("--vm", is_flag=True, help="Boot the EIF in QEMU (enclavekit.vm) instead.")
@_state_dir_option
@json_option
@click.pass_context
def run_enclave_command(
    ctx: click.Context,
    eif_path: Path,
    cpu_count: int,
    memory_mib: int,
    enclave_cid: int | None,
    enclave_name: str | None,
    debug_mode: bool,
    isolation: str | None,
    host_mounts: tuple[str, ...],
    host_python: bool,
    vm: bool,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Run an EIF locally, as the enclave's init would (no hypervisor, no isolation)."""
    if vm:
        _run_in_vm(ctx)
        return
    options = runner.RunOptions(
        eif_path=eif_path,
        cpu_count=cpu_count,
        memory_mib=memory_mib,
        enclave_cid=enclave_cid,
        debug_mode=debug_mode,
        enclave_name=enclave_name,
        isolation=isolation,
        host_mounts=host_mounts,
        host_python=host_python,
    )
    record = runner.run_enclave(options, store=_store(state_dir))
    if not as_json:
        stderr.print(
            f"Started enclave {record.enclave_id} (CID {record.cid}, {record.isolation} mode)."
        )
        warn(
            "this is a local stand-in: the application runs on this machine without an enclave's"
            " isolation, and its NSM is an emulator whose root nobody trusts by default"
        )
    emit_json(record.run_info())


@click.command("describe-enclaves")
@click.option("--metadata", is_flag=True, help="Also print ImageName, ImageVersion, Metadata.")
@_state_dir_option
@json_option
def describe_enclaves_command(metadata: bool, state_dir: Path | None, as_json: bool) -> None:
    """List the running local enclaves (nitro-cli's JSON array)."""
    records = runner.describe_enclaves(_store(state_dir))
    emit_json([r.describe(with_metadata=metadata) for r in records])


@click.command("console")
@click.option("--enclave-id", default=None)
@click.option("--enclave-name", default=None)
@click.option(
    "--disconnect-timeout",
    type=click.FloatRange(0),
    default=None,
    help="Stop following after this many seconds (default: until the enclave ends).",
)
@_state_dir_option
def console_command(
    enclave_id: str | None,
    enclave_name: str | None,
    disconnect_timeout: float | None,
    state_dir: Path | None,
) -> None:
    """Print an enclave's console output and follow it."""
    if (enclave_id is None) == (enclave_name is None):
        raise UsageError("give exactly one of --enclave-id and --enclave-name")
    store = _store(state_dir)
    record = runner.find_enclave(store, enclave_id=enclave_id, name=enclave_name)
    if not record.debug_mode:
        warn(
            "on AWS, nitro-cli's console works only for enclaves started with --debug-mode; this"
            " local runner shows every enclave's console"
        )
    stderr.print(f"Connecting to the console for enclave {record.enclave_id}...")
    for chunk in runner.follow_console(store, record, disconnect_timeout=disconnect_timeout):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


@click.command("terminate-enclave")
@click.option("--enclave-id", default=None)
@click.option("--enclave-name", default=None)
@click.option("--all", "terminate_all", is_flag=True, help="Terminate every running enclave.")
@_state_dir_option
@json_option
def terminate_enclave_command(
    enclave_id: str | None,
    enclave_name: str | None,
    terminate_all: bool,
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Terminate one local enclave (or all); prints nitro-cli's {EnclaveName, EnclaveID, Terminated}."""
    chosen = sum(x is not None for x in (enclave_id, enclave_name)) + int(terminate_all)
    if chosen != 1:
        raise UsageError("give exactly one of --enclave-id, --enclave-name and --all")
    store = _store(state_dir)
    if terminate_all:
        targets = runner.describe_enclaves(store)
    else:
        targets = [runner.find_enclave(store, enclave_id=enclave_id, name=enclave_name)]
    for record in targets:
        done = runner.terminate_enclave(record, store=store)
        if not as_json:
            stderr.print(
                f"Enclave {record.enclave_id} {'terminated' if done else 'NOT terminated'}."
            )
        emit_json({"EnclaveName": record.name, "EnclaveID": record.enclave_id, "Terminated": done})


def register(group: click.Group) -> None:
    group.add_command(run_enclave_command)
    group.add_command(describe_enclaves_command)
    group.add_command(console_command)
    group.add_command(terminate_enclave_command)

"""``run-enclave``, ``describe-enclaves``, ``console`` and ``terminate-enclave`` for local enclaves.

Like nitro-cli, these always print their JSON on stdout — one JSON value per command
(``terminate-enclave --all``: one array); a short human summary goes to stderr unless ``--json``
is given. ``run-enclave --attach-console`` writes the console on stdout after the JSON, so it is
refused together with ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.errors import UsageError
from enclavekit.run import runner
from enclavekit.run.state import EnclaveStore

if TYPE_CHECKING:
    from enclavekit.vm.state import EnclaveRecord as VmRecord


def _store(state_dir: Path | None) -> EnclaveStore:
    return EnclaveStore(state_dir) if state_dir is not None else EnclaveStore()


_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where enclave records live (default: $ENCLAVEKIT_STATE_DIR, else ~/.local/state/enclavekit).",
)


def _run_in_vm(ctx: click.Context) -> None:
    """Hand ``run-enclave --vm`` to the QEMU runner (``enclavekit.vm``, imported only when used).

    Options that only make sense for the local runner are refused.
    """
    from enclavekit.vm import commands
    from enclavekit.vm.runner import DEFAULT_BOOT_TIMEOUT

    params = ctx.params
    local_only = [
        flag
        for flag, used in (
            ("--config", params["config_path"] is not None),
            ("--cpu-ids", params["cpu_ids"] is not None),
            ("--isolation", params["isolation"] is not None),
            ("--mount-host", bool(params["host_mounts"])),
            ("--host-python", params["host_python"]),
            ("--state-dir", params["state_dir"] is not None),
        )
        if used
    ]
    if local_only:
        raise UsageError(f"{', '.join(local_only)} apply to the local runner, not to --vm")
    if params["eif_path"] is None:
        raise UsageError("give --eif-path")
    ctx.invoke(
        commands.run_enclave,
        eif_path=params["eif_path"],
        cpu_count=params["cpu_count"] or runner.DEFAULT_CPU_COUNT,
        memory_mib=params["memory_mib"] or runner.DEFAULT_MEMORY_MIB,
        enclave_cid=params["enclave_cid"],
        enclave_name=params["enclave_name"],
        debug_mode=params["debug_mode"],
        attach_console=params["attach_console"],
        parent_role=params["parent_role"],
        parent_id=params["parent_id"],
        forward=params["forward"],
        listen=params["vm_listen"],
        boot_timeout=DEFAULT_BOOT_TIMEOUT,
        as_json=params["as_json"],
    )


#: nitro-cli's ``--config`` keys (RunEnclavesArgs) and the options they stand for.
_CONFIG_KEYS = {
    "eif_path": str,
    "enclave_cid": int,
    "memory_mib": int,
    "cpu_ids": list,
    "cpu_count": int,
    "debug_mode": bool,
    "attach_console": bool,
    "enclave_name": str,
}


def _load_config(path: Path) -> dict[str, Any]:
    """nitro-cli's ``run-enclave --config`` JSON file, checked key by key."""
    try:
        obj = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read --config {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UsageError(f"--config {path} is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"--config {path}: expected a JSON object")
    unknown = sorted(set(obj) - set(_CONFIG_KEYS))
    if unknown:
        raise UsageError(
            f"--config {path}: unknown key(s) {unknown}; known: {sorted(_CONFIG_KEYS)}"
        )
    for key, kind in _CONFIG_KEYS.items():
        value = obj.get(key)
        if value is not None and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise UsageError(f"--config {path}: {key} must be a {kind.__name__}")
    if "eif_path" not in obj or ("memory_mib" not in obj):
        raise UsageError(f"--config {path}: eif_path and memory_mib are required")
    if "cpu_ids" in obj and not all(
        isinstance(i, int) and not isinstance(i, bool) for i in obj["cpu_ids"]
    ):
        raise UsageError(f"--config {path}: cpu_ids must be a list of integers")
    return obj


class _SeveralCpuIds(click.Command):
    """nitro-cli's ``--cpu-ids 1 3``: the option takes every CPU number that follows it (click
    options take one value; ``--cpu-ids '1 3'`` and ``--cpu-ids 1,3`` keep working)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg == "--":
                out += [arg, *rest]
                break
            if arg == "--cpu-ids" and rest:
                values = [rest.pop(0)]
            elif arg.startswith("--cpu-ids="):
                values = [arg.split("=", 1)[1]]
            else:
                out.append(arg)
                continue
            while rest and rest[0].isascii() and rest[0].isdigit():
                values.append(rest.pop(0))
            out += ["--cpu-ids", " ".join(values)]
        return super().parse_args(ctx, out)


def _cpu_ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"--cpu-ids {text!r}: expected CPU numbers, e.g. '1 3'") from None


@click.command("run-enclave", cls=_SeveralCpuIds)
@click.option(
    "--eif-path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The EIF to run (required unless --config).",
)
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="nitro-cli's run-enclave JSON (eif_path, memory_mib, cpu_count|cpu_ids, enclave_cid,"
    " debug_mode, attach_console, enclave_name); excludes those flags.",
)
@click.option(
    "--cpu-count", type=click.IntRange(1), default=None, help="CPUs (default 2; or --cpu-ids)."
)
@click.option(
    "--cpu-ids", default=None, help="Explicit CPU numbers, one or several: --cpu-ids 1 3."
)
@click.option(
    "--memory",
    "memory_mib",
    type=click.IntRange(1),
    default=None,
    help="Memory in MiB (default 512; checked to be >= 4 x the EIF size, as nitro-cli does).",
)
@click.option(
    "--attach-console",
    is_flag=True,
    help="Follow the console right after starting; implies --debug-mode, as in nitro-cli.",
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
@click.option("--vm", is_flag=True, help="Boot the EIF in QEMU's nitro-enclave machine instead.")
@click.option("--parent-role", metavar="ARN", help="--vm: IAM role ARN measured into PCR3.")
@click.option("--parent-id", metavar="ID", help="--vm: instance id measured into PCR4.")
@click.option(
    "--forward",
    multiple=True,
    metavar="PORT=HOST:PORT",
    help="--vm: guest connections to parent vsock PORT go to this local endpoint (repeatable).",
)
@click.option(
    "--listen",
    "vm_listen",
    multiple=True,
    metavar="HOST:PORT=PORT",
    help="--vm: a local TCP listener tunnelled to guest vsock PORT (repeatable).",
)
@_state_dir_option
@json_option
@click.pass_context
def run_enclave_command(
    ctx: click.Context,
    eif_path: Path | None,
    config_path: Path | None,
    cpu_count: int | None,
    cpu_ids: str | None,
    memory_mib: int | None,
    attach_console: bool,
    enclave_cid: int | None,
    enclave_name: str | None,
    debug_mode: bool,
    isolation: str | None,
    host_mounts: tuple[str, ...],
    host_python: bool,
    vm: bool,
    parent_role: str | None,
    parent_id: str | None,
    forward: tuple[str, ...],
    vm_listen: tuple[str, ...],
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Run an EIF locally, as the enclave's init would (no hypervisor, no isolation).

    With --vm, boot it in QEMU's nitro-enclave machine instead (see scripts/qemu-nitro/setup.sh).
    """
    if vm:
        _run_in_vm(ctx)
        return
    vm_only = [
        flag
        for flag, used in (
            ("--parent-role", parent_role is not None),
            ("--parent-id", parent_id is not None),
            ("--forward", bool(forward)),
            ("--listen", bool(vm_listen)),
        )
        if used
    ]
    if vm_only:
        raise UsageError(f"{', '.join(vm_only)} apply to --vm only")
    ids = _cpu_ids(cpu_ids)
    if config_path is not None:
        given = [
            flag
            for flag, value in (
                ("--eif-path", eif_path),
                ("--cpu-count", cpu_count),
                ("--cpu-ids", ids),
                ("--memory", memory_mib),
                ("--enclave-cid", enclave_cid),
                ("--enclave-name", enclave_name),
            )
            if value is not None
        ] + [
            f for f, v in (("--debug-mode", debug_mode), ("--attach-console", attach_console)) if v
        ]
        if given:
            raise UsageError(f"--config cannot be combined with {', '.join(given)}")
        config = _load_config(config_path)
        eif_path = Path(config["eif_path"])
        memory_mib = config["memory_mib"]
        cpu_count = config.get("cpu_count")
        ids = tuple(config["cpu_ids"]) if config.get("cpu_ids") is not None else None
        enclave_cid = config.get("enclave_cid")
        enclave_name = config.get("enclave_name")
        debug_mode = bool(config.get("debug_mode", False))
        attach_console = bool(config.get("attach_console", False))
    if eif_path is None:
        raise UsageError("give --eif-path (or --config)")
    if attach_console and as_json:
        raise UsageError(
            "--attach-console writes the console on stdout after the JSON, and --json prints one"
            " JSON value only: drop one (follow the console with `enclavekit console`)"
        )
    # nitro-cli: "--attach-console ... (implies debug-mode)"; a console is a debug facility.
    debug_mode = debug_mode or attach_console
    if cpu_count is not None and ids is not None:
        raise UsageError("give --cpu-count or --cpu-ids, not both")
    options = runner.RunOptions(
        eif_path=eif_path,
        cpu_count=cpu_count if cpu_count is not None else runner.DEFAULT_CPU_COUNT,
        memory_mib=memory_mib if memory_mib is not None else runner.DEFAULT_MEMORY_MIB,
        enclave_cid=enclave_cid,
        debug_mode=debug_mode,
        enclave_name=enclave_name,
        isolation=isolation,
        host_mounts=host_mounts,
        host_python=host_python,
        cpu_ids=ids,
    )
    store = _store(state_dir)
    record = runner.run_enclave(options, store=store)
    if not as_json:
        stderr.print(
            f"Started enclave with enclave-cid: {record.cid}, memory: {record.memory_mib} MiB,"
            f" cpu-ids: {list(record.cpu_ids)} ({record.isolation} mode)"
        )
        warn(
            "this is a local stand-in: the application runs on this machine without an enclave's"
            " isolation, and its NSM is an emulator whose root nobody trusts by default"
        )
    emit_json(record.run_info())
    if attach_console:
        for chunk in runner.follow_console(store, record):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


@click.command("describe-enclaves")
@click.option("--metadata", is_flag=True, help="Also print ImageName, ImageVersion, Metadata.")
@_state_dir_option
@json_option
def describe_enclaves_command(metadata: bool, state_dir: Path | None, as_json: bool) -> None:
    """List the running local enclaves (nitro-cli's JSON array).

    Measurements are what the enclave's attestation documents carry: zero PCR0/1/2/8 in debug
    mode. Without --json, the enclaves that ended most recently are named on stderr with their exit
    status and console log.
    """
    store = _store(state_dir)
    records = runner.describe_enclaves(store)
    emit_json(
        [r.describe(with_metadata=metadata) for r in records]
        + [r.describe_json() for r in _vm_records()]
    )
    if not as_json:
        ended = store.ended()
        for item in ended[:_ENDED_SHOWN]:
            stderr.print(item.summary(), markup=False)
        if len(ended) > _ENDED_SHOWN:
            stderr.print(
                f"({len(ended) - _ENDED_SHOWN} more ended enclave(s): their summaries and logs are"
                f" in {Path(ended[0].console_log).parent})",
                markup=False,
            )


#: describe-enclaves names this many of the most recently ended enclaves.
_ENDED_SHOWN = 3


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
    vm_record = _vm_record(enclave_id, enclave_name)
    if vm_record is not None:
        from enclavekit.vm import commands

        click.get_current_context().invoke(
            commands.console, enclave_id=vm_record.enclave_id, disconnect_timeout=disconnect_timeout
        )
        return
    store = _store(state_dir)
    try:
        record = runner.find_enclave(store, enclave_id=enclave_id, name=enclave_name)
    except runner.EnclaveEnded as gone:
        # What it printed is kept: show it, then say how it ended and where the log is.
        with contextlib.suppress(FileNotFoundError), open(gone.ended.console_log, "rb") as log:
            while chunk := log.read(65536):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        stderr.print(gone.ended.summary(), markup=False)
        return
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
    """Terminate one local enclave (or all); prints nitro-cli's {EnclaveName, EnclaveID, Terminated}
    (for --all: one array of them)."""
    chosen = sum(x is not None for x in (enclave_id, enclave_name)) + int(terminate_all)
    if chosen != 1:
        raise UsageError("give exactly one of --enclave-id, --enclave-name and --all")
    store = _store(state_dir)
    vm_targets = (
        _vm_records() if terminate_all else [r for r in [_vm_record(enclave_id, enclave_name)] if r]
    )
    results: list[dict[str, Any]] = []
    if vm_targets:
        from enclavekit.vm.runner import terminate_recorded

        for vm_record in vm_targets:
            done = terminate_recorded(vm_record.enclave_id)
            results.append(
                {
                    "EnclaveName": vm_record.enclave_name,
                    "EnclaveID": vm_record.enclave_id,
                    "Terminated": done,
                }
            )
    if terminate_all:
        targets = runner.describe_enclaves(store)
    elif vm_targets:
        targets = []
    else:
        targets = [runner.find_enclave(store, enclave_id=enclave_id, name=enclave_name)]
    for record in targets:
        done = runner.terminate_enclave(record, store=store)
        if not as_json:
            stderr.print(
                f"Enclave {record.enclave_id} {'terminated' if done else 'NOT terminated'}."
            )
        results.append(
            {"EnclaveName": record.name, "EnclaveID": record.enclave_id, "Terminated": done}
        )
    # One JSON value: the object for one enclave, an array for --all (empty when none ran).
    emit_json(results if terminate_all else results[0])


def _vm_records() -> list[VmRecord]:
    """Enclaves running in QEMU (``run-enclave --vm``)."""
    from enclavekit.vm.state import list_records

    return list_records()


def _vm_record(enclave_id: str | None, name: str | None) -> VmRecord | None:
    for record in _vm_records():
        if (enclave_id is not None and record.enclave_id == enclave_id) or (
            name is not None and record.enclave_name == name
        ):
            return record
    return None


def register(group: click.Group) -> None:
    group.add_command(run_enclave_command)
    group.add_command(describe_enclaves_command)
    group.add_command(console_command)
    group.add_command(terminate_enclave_command)

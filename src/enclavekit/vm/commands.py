"""Click commands for enclaves in QEMU: run-enclave / describe-enclaves / terminate-enclave / console.

Run as ``python -m enclavekit.vm ...`` until ``run-enclave --vm`` is wired into the ``enclavekit`` command;
the commands (``run_enclave``, ``describe_enclaves``, ``terminate_enclave``, ``console``) and the group
``main`` can be added to another click group as they are.
``run-enclave`` stays in the foreground while the enclave runs (this process is the enclave's parent: the
vhost-user vsock back-end lives in it); it prints nitro-cli's run-enclave JSON once the enclave has booted and
exits with the enclave. Ctrl-C or ``terminate-enclave`` from another shell stops it.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from enclavekit.cli._common import host_port
from enclavekit.cli._render import emit_json, json_option, stderr
from enclavekit.errors import Error, UsageError
from enclavekit.transport.address import UnixAddress, parse_endpoint
from enclavekit.vm.runner import DEFAULT_BOOT_TIMEOUT, run_enclave_vm, terminate_recorded
from enclavekit.vm.state import list_records
from enclavekit.vm.virtio_vsock import Endpoint


def _vsock_port(text: str, option: str, item: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 2**32:
        raise UsageError(
            f"{option}: the vsock port must be 0..4294967295, found {text!r} in {item!r}"
        )
    return int(text)


def _parse_forward(items: tuple[str, ...]) -> dict[int, Endpoint]:
    out: dict[int, Endpoint] = {}
    for item in items:
        port, sep, target = item.partition("=")
        if not sep:
            raise UsageError(
                f"--forward expects VSOCK_PORT=HOST:PORT (or tcp://HOST:PORT, unix:///PATH, /PATH),"
                f" found {item!r}"
            )
        vsock_port = _vsock_port(port, "--forward", item)
        if target.startswith("/"):
            target = f"unix://{target}"
        address = parse_endpoint(target, option="--forward", kinds=("tcp", "unix"))
        out[vsock_port] = (
            address.path if isinstance(address, UnixAddress) else host_port(target, "--forward")
        )
    return out


def _parse_listen(items: tuple[str, ...]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for item in items:
        address, sep, port = item.rpartition("=")
        if not sep:
            raise UsageError(f"--listen expects HOST:PORT=VSOCK_PORT, found {item!r}")
        out[host_port(address, "--listen")] = _vsock_port(port, "--listen", item)
    return out


@click.group()
def main() -> None:
    """Enclaves in QEMU's nitro-enclave machine (what `enclavekit run-enclave --vm` will run)."""


@main.command("run-enclave")
@click.option("--eif-path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--cpu-count", type=int, default=2, show_default=True, help="Virtual CPUs.")
@click.option("--memory", "memory_mib", type=int, required=True, help="Memory in MiB.")
@click.option(
    "--enclave-cid", type=int, help="The guest's vsock CID (default: the first free from 16)."
)
@click.option(
    "--enclave-name", help="Name shown by describe-enclaves (default: the EIF's file name)."
)
@click.option(
    "--debug-mode", is_flag=True, help="Keep the serial console (as on Nitro, only then)."
)
@click.option(
    "--attach-console", is_flag=True, help="Print the console here (implies --debug-mode)."
)
@click.option("--parent-role", metavar="ARN", help="IAM role ARN measured into PCR3.")
@click.option(
    "--parent-id", metavar="ID", help="Instance id measured into PCR4 (and the EnclaveID)."
)
@click.option(
    "--forward",
    multiple=True,
    metavar="PORT=HOST:PORT",
    help="Guest connections to parent port -> local endpoint.",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="HOST:PORT=PORT",
    help="Local TCP listener -> guest vsock port.",
)
@click.option("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT, show_default=True)
@json_option
def run_enclave(
    eif_path: Path,
    cpu_count: int,
    memory_mib: int,
    enclave_cid: int | None,
    enclave_name: str | None,
    debug_mode: bool,
    attach_console: bool,
    parent_role: str | None,
    parent_id: str | None,
    forward: tuple[str, ...],
    listen: tuple[str, ...],
    boot_timeout: float,
    as_json: bool,
) -> None:
    """Boot EIF_PATH in QEMU and stay its parent until it ends."""
    debug_mode = debug_mode or attach_console
    stderr.print("Start allocating memory...")
    enclave = run_enclave_vm(
        eif_path,
        cpu_count=cpu_count,
        memory_mib=memory_mib,
        debug_mode=debug_mode,
        enclave_cid=enclave_cid,
        enclave_name=enclave_name,
        console=sys.stderr if attach_console else None,
        parent_role=parent_role,
        parent_id=parent_id,
        forward=_parse_forward(forward),
        listen=_parse_listen(listen),
        boot_timeout=boot_timeout,
    )
    stderr.print(
        f"Started enclave with enclave-cid: {enclave.record.enclave_cid}, memory: {memory_mib} MiB, cpu-ids: {list(range(cpu_count))}"
    )
    info = enclave.record.run_json()
    if as_json:
        emit_json(info)
    else:
        click.echo(json.dumps(info, indent=2))
    sys.stdout.flush()

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only ask QEMU to stop here: the main thread is inside wait(), which then cleans up.
        if enclave.process.poll() is None:
            enclave.process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    enclave.wait()


@main.command("describe-enclaves")
@json_option
def describe_enclaves(as_json: bool) -> None:
    """The running enclave VMs, as nitro-cli describe-enclaves prints them."""
    records = [r.describe_json() for r in list_records()]
    if as_json:
        emit_json(records)
    else:
        click.echo(json.dumps(records, indent=2))


@main.command("terminate-enclave")
@click.option("--enclave-id", help="The enclave to stop.")
@click.option("--all", "all_", is_flag=True, help="Stop every enclave VM.")
@json_option
def terminate_enclave(enclave_id: str | None, all_: bool, as_json: bool) -> None:
    """Stop an enclave VM (its QEMU and its parent process)."""
    if bool(enclave_id) == all_:
        raise UsageError("give exactly one of --enclave-id ID or --all")
    targets = [r for r in list_records() if all_ or r.enclave_id == enclave_id]
    if not targets and enclave_id:
        raise UsageError(f"no running enclave VM has the id {enclave_id} (see describe-enclaves)")
    results = []
    for record in targets:
        done = terminate_recorded(record.enclave_id)
        results.append(
            {"EnclaveName": record.enclave_name, "EnclaveID": record.enclave_id, "Terminated": done}
        )
    out: object = results[0] if enclave_id and results else results
    if as_json:
        emit_json(out)
    else:
        click.echo(json.dumps(out, indent=2))


@main.command("console")
@click.option("--enclave-id", required=True)
@click.option("--disconnect-timeout", type=float, help="Stop after this many seconds.")
def console(enclave_id: str, disconnect_timeout: float | None) -> None:
    """Stream a debug-mode enclave's console until it ends."""
    record = next((r for r in list_records() if r.enclave_id == enclave_id), None)
    if record is None:
        raise UsageError(f"no running enclave VM has the id {enclave_id} (see describe-enclaves)")
    if not record.console_log:
        raise UsageError(
            "the enclave was not started with --debug-mode: it has no console (as on Nitro)"
        )
    deadline = None if disconnect_timeout is None else time.monotonic() + disconnect_timeout
    with open(record.console_log, encoding="utf-8", errors="replace") as source:
        while deadline is None or time.monotonic() < deadline:
            text = source.read(65536)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
                continue
            if not any(r.enclave_id == enclave_id for r in list_records()):
                return
            time.sleep(0.2)


def run() -> None:
    try:
        main(standalone_mode=False)
    except Error as exc:
        stderr.print(f"error: {exc.diagnostics()}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)

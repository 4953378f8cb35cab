"""Find a QEMU with the ``nitro-enclave`` machine and build its command line.

Where QEMU is looked for, in order: ``$ENCLAVEKIT_QEMU`` (a binary), ``$ENCLAVEKIT_QEMU_NITRO_CACHE``
(the cache folder of ``scripts/qemu-nitro/setup.sh``), ``.cache/qemu-nitro`` in the current directory and
its parents, then ``qemu-system-x86_64`` on ``PATH``. A candidate counts only if ``-machine help`` lists
``nitro-enclave`` (Debian's packaged QEMU does not: it is built without libcbor).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from enclavekit.errors import UsageError

__all__ = [
    "CACHE_ENV",
    "QEMU_ENV",
    "QemuConfig",
    "QemuNotFound",
    "find_cache_dir",
    "find_qemu",
    "host_tsc_khz",
    "qemu_command",
    "supports_nitro_enclave",
]

QEMU_ENV = "ENCLAVEKIT_QEMU"
CACHE_ENV = "ENCLAVEKIT_QEMU_NITRO_CACHE"
_CACHE_NAME = Path(".cache") / "qemu-nitro"
_QEMU_IN_CACHE = Path("qemu") / "bin" / "qemu-system-x86_64"
#: Where Debian's qemu-system-data and seabios packages put bios-microvm.bin.
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios")

HOW_TO_GET_QEMU = (
    "run-enclave --vm needs QEMU >= 9.2 built with the nitro-enclave machine (libcbor, gnutls, "
    "vhost-user); Debian's packaged QEMU lacks it. Build one into .cache/qemu-nitro/ with "
    "`scripts/qemu-nitro/setup.sh` (root, Debian bookworm, about 4 minutes on 2 cores), or point "
    f"${QEMU_ENV} at a qemu-system-x86_64 that has it"
)


class QemuNotFound(UsageError):
    """No usable QEMU with the nitro-enclave machine."""


def supports_nitro_enclave(binary: str | os.PathLike[str]) -> bool:
    """True if ``binary -machine help`` lists the nitro-enclave machine."""
    try:
        out = subprocess.run(
            [os.fspath(binary), "-machine", "help"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split(" ", 1)[0] == "nitro-enclave" for line in out.splitlines())


def find_cache_dir(
    environ: Mapping[str, str] | None = None, start: Path | None = None
) -> Path | None:
    """The qemu-nitro cache folder (``$ENCLAVEKIT_QEMU_NITRO_CACHE`` or ``.cache/qemu-nitro`` upwards)."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / _CACHE_NAME).is_dir():
            return folder / _CACHE_NAME
    return None


def find_qemu(environ: Mapping[str, str] | None = None, start: Path | None = None) -> Path:
    """The first QEMU binary with the nitro-enclave machine; raises `QemuNotFound` explaining how to get one."""
    env = os.environ if environ is None else environ
    tried: list[str] = []
    candidates: list[Path] = []
    if env.get(QEMU_ENV):
        candidates.append(Path(env[QEMU_ENV]))
    cache = find_cache_dir(env, start)
    if cache is not None:
        candidates.append(cache / _QEMU_IN_CACHE)
    on_path = shutil.which("qemu-system-x86_64", path=env.get("PATH"))
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and supports_nitro_enclave(candidate):
            return candidate
        tried.append(str(candidate))
    found = f" (tried: {', '.join(tried)})" if tried else " (none found)"
    raise QemuNotFound(HOW_TO_GET_QEMU + found)


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC frequency in kHz (``cpu MHz`` of /proc/cpuinfo when the TSC is constant), else None.

    Under TCG the guest reads the host's TSC. The guest kernel calibrates it against the PIT, which fails
    on a loaded host ("tsc: Unable to calibrate against PIT") and then hangs in early boot; passing
    ``tsc_early_khz=`` skips that calibration. ``$ENCLAVEKIT_VM_TSC_KHZ`` overrides (0 disables).
    """
    override = os.environ.get("ENCLAVEKIT_VM_TSC_KHZ")
    if override is not None:
        return int(override) or None if override.isdigit() else None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    mhz: float | None = None
    constant = False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif key == "flags" and "constant_tsc" in value.split():
            constant = True
        if key == "" and mhz is not None:
            break
    if mhz is None or not constant or mhz <= 0:
        return None
    return round(mhz * 1000)


def _escape(value: str) -> str:
    """QEMU option syntax: a comma inside a value is written twice."""
    return value.replace(",", ",,")


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """Everything that goes on the QEMU command line for one enclave."""

    qemu: Path
    eif_path: Path
    vhost_socket: Path
    memory_mib: int
    cpu_count: int
    module_id: str
    serial: str  # "null" or "file:<path>"
    parent_role: str | None = None
    parent_id: str | None = None
    qmp_socket: Path | None = None
    firmware_dirs: Sequence[str] = FIRMWARE_DIRS
    append: str | None = None  # added to the EIF's command line by QEMU, not measured


def qemu_command(cfg: QemuConfig) -> list[str]:
    """The argv that boots ``cfg.eif_path`` in the nitro-enclave machine (TCG; ACPI on, so the
    Debian guest kernel finds the virtio-mmio devices; no reboot: the VM ends when the enclave does)."""
    machine = [
        "nitro-enclave",
        "vsock=vsock0",
        f"id={_escape(cfg.module_id)}",
        "acpi=on",
    ]
    if cfg.parent_role is not None:
        machine.append(f"parent-role={_escape(cfg.parent_role)}")
    if cfg.parent_id is not None:
        machine.append(f"parent-id={_escape(cfg.parent_id)}")
    argv = [
        os.fspath(cfg.qemu),
        "-M",
        ",".join(machine),
        "-accel",
        "tcg",
        "-kernel",
        os.fspath(cfg.eif_path),
        "-m",
        f"{cfg.memory_mib}M",
        "-smp",
        str(cfg.cpu_count),
        "-chardev",
        f"socket,id=vsock0,path={_escape(os.fspath(cfg.vhost_socket))}",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        cfg.serial,
        "-no-reboot",
    ]
    for folder in cfg.firmware_dirs:
        if Path(folder).is_dir():
            argv += ["-L", folder]
    if cfg.append:
        argv += ["-append", cfg.append]
    if cfg.qmp_socket is not None:
        argv += ["-qmp", f"unix:{_escape(os.fspath(cfg.qmp_socket))},server=on,wait=off"]
    return argv

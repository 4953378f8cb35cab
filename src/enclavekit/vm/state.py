"""Records of enclaves running in QEMU, for ``describe-enclaves`` and ``terminate-enclave``.

One JSON file per enclave in the state folder: ``$ENCLAVEKIT_STATE_DIR/vm``, else
``$XDG_RUNTIME_DIR/enclavekit/vm``, else ``~/.local/state/enclavekit/vm``. Files are written atomically.
A record whose process is gone is stale: `list_records` drops it (and deletes the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from enclavekit._fs import write_atomic
from enclavekit.errors import MalformedInput

__all__ = ["EnclaveRecord", "list_records", "remove_record", "state_dir", "write_record"]


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("ENCLAVEKIT_STATE_DIR"):
        return Path(env["ENCLAVEKIT_STATE_DIR"]) / "vm"
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "enclavekit" / "vm"
    return Path.home() / ".local" / "state" / "enclavekit" / "vm"


@dataclass(frozen=True, slots=True)
class EnclaveRecord:
    """One running enclave VM (what ``describe-enclaves`` prints, plus what ``terminate`` needs)."""

    enclave_name: str
    enclave_id: str
    process_id: int  # the process that owns the VM (vhost-user back-end + QEMU child)
    qemu_pid: int
    enclave_cid: int
    cpu_count: int
    memory_mib: int
    debug_mode: bool
    eif_path: str
    console_log: str | None
    measurements: dict[str, str] = field(default_factory=dict)
    state: str = "RUNNING"

    def describe_json(self) -> dict[str, Any]:
        """nitro-cli's ``describe-enclaves`` entry (CPUIDs are the VM's virtual CPUs)."""
        out: dict[str, Any] = {
            "EnclaveName": self.enclave_name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.process_id,
            "EnclaveCID": self.enclave_cid,
            "NumberOfCPUs": self.cpu_count,
            "CPUIDs": list(range(self.cpu_count)),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": "DEBUG_MODE" if self.debug_mode else "NONE",
        }
        if self.measurements:
            out["Measurements"] = dict(self.measurements)
        return out

    def run_json(self) -> dict[str, Any]:
        """nitro-cli's ``run-enclave`` output."""
        full = self.describe_json()
        keys = ("EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs")
        return {**{k: full[k] for k in keys}, "MemoryMiB": self.memory_mib}

    @classmethod
    def from_json(cls, obj: Any, what: str) -> EnclaveRecord:
        if not isinstance(obj, dict):
            raise MalformedInput(f"{what}: expected a JSON object")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise MalformedInput(f"{what}: {exc}") from None


def _path(folder: Path, enclave_id: str) -> Path:
    if not enclave_id or "/" in enclave_id or enclave_id.startswith("."):
        raise ValueError(f"not an enclave id: {enclave_id!r}")
    return folder / f"{enclave_id}.json"


def write_record(record: EnclaveRecord, folder: Path | None = None) -> Path:
    folder = folder or state_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = _path(folder, record.enclave_id)
    write_atomic(target, json.dumps(asdict(record), indent=2).encode(), mode=0o600)
    return target


def remove_record(enclave_id: str, folder: Path | None = None) -> None:
    _path(folder or state_dir(), enclave_id).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_records(folder: Path | None = None) -> list[EnclaveRecord]:
    """Every live enclave, oldest file first; stale or unreadable records are removed."""
    folder = folder or state_dir()
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            record = EnclaveRecord.from_json(json.loads(path.read_text()), str(path))
        except (OSError, ValueError, MalformedInput):
            path.unlink(missing_ok=True)
            continue
        if not _alive(record.qemu_pid):
            path.unlink(missing_ok=True)
            continue
        records.append(record)
    return records

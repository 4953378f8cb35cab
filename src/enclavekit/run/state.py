"""Enclave records kept under the state directory, so every CLI invocation sees the same enclaves.

Layout (``root`` = ``$ENCLAVEKIT_STATE_DIR``, else ``$XDG_STATE_HOME/enclavekit``, else
``~/.local/state/enclavekit``)::

    root/instance-id              this machine's emulated EC2 instance id (enclave ids start with it)
    root/nsm/                     the emulated AWS PKI (shared with ``enclavekit nsm serve``)
    root/vsock/                   emulated vsock endpoints (``CID.PORT`` unix sockets)
    root/enclaves/<id>/record.json   one running enclave (this module)
    root/enclaves/<id>/rootfs/       its unpacked ramdisks; runtime/ its NSM socket; console.log
    root/logs/<id>.log            the console of an enclave that has ended

Records are written atomically (temp file + rename). A record whose supervisor process is gone is
stale and is removed when enclaves are listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from enclavekit._fs import write_atomic
from enclavekit.errors import MalformedInput, UsageError

RECORD_FILE = "record.json"
STATE_STARTING = "STARTING"
STATE_RUNNING = "RUNNING"
STATE_TERMINATING = "TERMINATING"
STATE_FAILED = "FAILED"
#: A record still STARTING after this many seconds belongs to a launcher that died.
STALE_STARTING_AGE = 120.0


def state_root(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory (see the module docstring)."""
    env = environ if environ is not None else os.environ
    explicit = env.get("ENCLAVEKIT_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "enclavekit"
    return Path.home() / ".local" / "state" / "enclavekit"


#: Unix socket paths must fit in sun_path (108 bytes on Linux); keep a margin.
MAX_SOCKET_PATH = 100


def _short_dir(kind: str, key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"enclavekit-{kind}-{digest}"


def vsock_dir(root: Path) -> Path:
    """The emulated vsock directory: ``root/vsock``, or a short directory under the temp dir when
    ``root`` is too deep for unix socket names (the same for every caller with this root)."""
    directory = root.absolute() / "vsock"
    if len(str(directory)) + len("/4294967295.4294967295") <= MAX_SOCKET_PATH:
        return directory
    return _short_dir("vsock", str(root.absolute()))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or accept it if it is a real directory owned by us; refuse a symlink or
    someone else's directory (a shared temp dir could be prepared by another user)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise UsageError(
            f"{path} is not a directory owned by this user; remove it or set"
            " ENCLAVEKIT_STATE_DIR to a shorter private path"
        )
    return path


def runtime_dir(root: Path, enclave_id: str) -> Path:
    """Where an enclave's NSM socket lives (short enough for a unix socket name)."""
    directory = root.absolute() / "enclaves" / enclave_id / "runtime"
    if len(str(directory / "nsm.sock")) <= MAX_SOCKET_PATH:
        return directory
    return _short_dir("run", f"{root.absolute()}/{enclave_id}")


def enclaves_dir(root: Path) -> Path:
    return root / "enclaves"


def logs_dir(root: Path) -> Path:
    return root / "logs"


def instance_id(root: Path) -> str:
    """This state directory's emulated instance id (``i-`` + 17 hex), created on first use."""
    path = root / "instance-id"
    with contextlib.suppress(OSError):
        value = path.read_text().strip()
        if len(value) == 19 and value.startswith("i-"):
            return value
    root.mkdir(parents=True, exist_ok=True)
    value = "i-0" + secrets.token_hex(8)
    write_atomic(path, value.encode() + b"\n")
    return value


@dataclass(frozen=True, slots=True)
class EnclaveRecord:
    """Everything the runner knows about one enclave (persisted as JSON)."""

    name: str
    enclave_id: str
    cid: int
    cpu_ids: tuple[int, ...]
    memory_mib: int
    debug_mode: bool
    eif_path: str
    measurements: Mapping[str, str]
    isolation: str
    state: str = STATE_STARTING
    pid: int = 0
    app_pid: int = 0
    error: str = ""
    metadata: Mapping[str, Any] | None = field(default=None)

    @property
    def flags(self) -> str:
        return "DEBUG_MODE" if self.debug_mode else "NONE"

    def describe(self, *, with_metadata: bool = False) -> dict[str, Any]:
        """nitro-cli's ``describe-enclaves`` object for this enclave (field order as nitro-cli)."""
        out: dict[str, Any] = {
            "EnclaveName": self.name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.pid,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": len(self.cpu_ids),
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
            "State": self.state,
            "Flags": self.flags,
            "Measurements": dict(self.measurements),
        }
        if with_metadata and self.metadata:
            out.update(self.metadata)
        return out

    def run_info(self) -> dict[str, Any]:
        """nitro-cli's ``run-enclave`` object (EnclaveRunInfo)."""
        return {
            "EnclaveName": self.name,
            "EnclaveID": self.enclave_id,
            "ProcessID": self.pid,
            "EnclaveCID": self.cid,
            "NumberOfCPUs": len(self.cpu_ids),
            "CPUIDs": list(self.cpu_ids),
            "MemoryMiB": self.memory_mib,
        }

    def to_json(self) -> bytes:
        obj = asdict(self)
        obj["cpu_ids"] = list(self.cpu_ids)
        obj["measurements"] = dict(self.measurements)
        return json.dumps(obj, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> EnclaveRecord:
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise TypeError("not an object")
            obj["cpu_ids"] = tuple(int(i) for i in obj["cpu_ids"])
            return cls(**obj)
        except (ValueError, TypeError, KeyError) as exc:
            raise MalformedInput(f"enclave record {where} is damaged: {exc}") from exc

    def replace(self, **changes: Any) -> EnclaveRecord:
        obj = {k: getattr(self, k) for k in self.__dataclass_fields__}
        obj.update(changes)
        return EnclaveRecord(**obj)


class EnclaveStore:
    """The enclave records of one state directory."""

    def __init__(self, root: Path | None = None) -> None:
        # Absolute: the enclave process runs in another working directory.
        self.root = (root if root is not None else state_root()).absolute()

    def enclave_dir(self, enclave_id: str) -> Path:
        if "/" in enclave_id or enclave_id in ("", ".", ".."):
            raise ValueError(f"bad enclave id {enclave_id!r}")
        return enclaves_dir(self.root) / enclave_id

    def save(self, record: EnclaveRecord) -> None:
        directory = self.enclave_dir(record.enclave_id)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / RECORD_FILE, record.to_json())

    def load(self, enclave_id: str) -> EnclaveRecord | None:
        path = self.enclave_dir(enclave_id) / RECORD_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return EnclaveRecord.from_json(raw, str(path))

    def all(self) -> list[EnclaveRecord]:
        """Live records (stale ones, whose supervisor died, are cleaned up), oldest first."""
        base = enclaves_dir(self.root)
        if not base.is_dir():
            return []
        found: list[tuple[float, EnclaveRecord]] = []
        for entry in sorted(base.iterdir()):
            try:
                record = self.load(entry.name)
            except (MalformedInput, ValueError):
                continue
            if record is None:
                continue
            age = time.time() - entry.stat().st_mtime
            starting = record.state == STATE_STARTING and age < STALE_STARTING_AGE
            if not starting and not pid_alive(record.pid):
                self.remove(record.enclave_id)
                continue
            found.append((entry.stat().st_mtime, record))
        return [r for _, r in sorted(found, key=lambda item: item[0])]

    def remove(self, enclave_id: str, *, keep_console: bool = True) -> None:
        directory = self.enclave_dir(enclave_id)
        kept = {
            "console.log": f"{enclave_id}.log",
            "supervisor.log": f"{enclave_id}.supervisor.log",
        }
        for name, target in kept.items():
            source = directory / name
            with contextlib.suppress(OSError):
                if keep_console and source.stat().st_size:
                    logs_dir(self.root).mkdir(parents=True, exist_ok=True)
                    shutil.move(str(source), logs_dir(self.root) / target)
        remove_tree(directory)
        remove_tree(runtime_dir(self.root, enclave_id))


def remove_tree(path: Path) -> None:
    """Remove a directory tree, making read-only directories writable first."""

    def onerror(func: Any, target: str, exc_info: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        with contextlib.suppress(OSError):
            func(target)

    if path.exists():
        shutil.rmtree(path, onerror=onerror)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[-1].split()
        if fields and fields[0] in (b"Z", b"X"):
            return False
    return True

"""Enclave records kept under the state directory, so every CLI invocation sees the same enclaves.

Layout (``root`` = ``$ENCLAVEKIT_STATE_DIR``, else ``$XDG_STATE_HOME/enclavekit``, else
``~/.local/state/enclavekit``)::

    root/instance-id              this machine's emulated EC2 instance id (enclave ids start with it)
    root/nsm/                     the emulated AWS PKI (shared with ``enclavekit nsm serve``)
    root/vsock/                   emulated vsock endpoints (``CID.PORT`` unix sockets)
    root/enclaves/<id>/record.json   one running enclave (this module)
    root/enclaves/<id>/rootfs/       its unpacked ramdisks; runtime/ its NSM socket; console.log
    root/logs/<id>.log            the console of an enclave that has ended
    root/logs/<id>.ended.json     how it ended (exit status or start failure; newest 64 kept)
    root/enclaves.lock            held while an enclave is chosen a CID and name and recorded

Records are written atomically (temp file + rename). A record whose supervisor process is gone is
stale and is removed when enclaves are listed. Of the enclaves that ended, the newest
:data:`MAX_ENDED` keep their summary and logs; older ones are purged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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
ENDED_SUFFIX = ".ended.json"
#: How many ended enclaves keep their summary and logs under ``root/logs``.
MAX_ENDED = 64
#: nitro-cli: in debug mode the attestation documents carry zeros for these PCRs.
DEBUG_ZEROED_PCRS = ("PCR0", "PCR1", "PCR2", "PCR8")


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

    def attested_measurements(self) -> dict[str, str]:
        """The PCRs the enclave's attestation documents carry: in debug mode PCR0/1/2/8 are zero
        (nitro-cli's describe-enclaves shows the image's values there, aws-nitro-enclaves-cli#695)."""
        out = dict(self.measurements)
        if self.debug_mode:
            for key in DEBUG_ZEROED_PCRS:
                if key in out:
                    out[key] = "00" * (len(out[key]) // 2)
        return out

    def describe(self, *, with_metadata: bool = False) -> dict[str, Any]:
        """nitro-cli's ``describe-enclaves`` object for this enclave (field order as nitro-cli);
        ``Measurements`` are what its attestation documents carry (see
        :meth:`attested_measurements`)."""
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
            "Measurements": self.attested_measurements(),
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


@dataclass(frozen=True, slots=True)
class EndedEnclave:
    """How an enclave ended: its exit status, or why its application could not start."""

    name: str
    enclave_id: str
    ended_at: str
    #: The application's exit status (negative: killed by that signal); None if it never ran.
    exit_status: int | None
    #: Why the application could not be started, or why the enclave process ended ("" if neither).
    error: str
    terminated: bool
    console_log: str

    def summary(self) -> str:
        """One line: which enclave, when, how, and where its console is kept."""
        if self.error:
            how = f"could not run: {self.error}"
        elif self.terminated:
            how = "was terminated (terminate-enclave)"
        elif self.exit_status is not None and self.exit_status < 0:
            how = f"was killed by signal {-self.exit_status}"
        else:
            how = f"ended: its application exited with status {self.exit_status}"
        log = self.console_log if os.path.exists(self.console_log) else "none (no console output)"
        return (
            f"enclave {self.enclave_id} ({self.name}) {how} at {self.ended_at}; console log: {log}"
        )


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
            try:
                # The enclave may end (and its supervisor remove the entry) while we look.
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            starting = record.state == STATE_STARTING and time.time() - mtime < STALE_STARTING_AGE
            if not starting and not pid_alive(record.pid):
                self.record_end(record, error="its enclave process ended unexpectedly")
                self.remove(record.enclave_id)
                continue
            found.append((mtime, record))
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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive among runners of this state directory (choosing a CID and a name, then
        recording the enclave, must not interleave with another run-enclave)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "enclaves.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record_end(
        self,
        record: EnclaveRecord,
        *,
        exit_status: int | None = None,
        error: str = "",
        terminated: bool = False,
    ) -> EndedEnclave:
        """Keep how ``record`` ended (``logs/<id>.ended.json``), purging beyond :data:`MAX_ENDED`."""
        logs = logs_dir(self.root)
        logs.mkdir(parents=True, exist_ok=True)
        ended = EndedEnclave(
            name=record.name,
            enclave_id=record.enclave_id,
            ended_at=datetime.now(UTC).isoformat(timespec="seconds"),
            exit_status=exit_status,
            error=error,
            terminated=terminated,
            console_log=str(logs / f"{record.enclave_id}.log"),
        )
        write_atomic(
            logs / f"{record.enclave_id}{ENDED_SUFFIX}", json.dumps(asdict(ended)).encode()
        )
        for old in self._ended_paths()[MAX_ENDED:]:
            stem = old.name[: -len(ENDED_SUFFIX)]
            for name in (old.name, f"{stem}.log", f"{stem}.supervisor.log"):
                with contextlib.suppress(OSError):
                    (logs / name).unlink()
        return ended

    def _ended_paths(self) -> list[Path]:
        """Summaries of ended enclaves, newest first."""
        found: list[tuple[float, Path]] = []
        with contextlib.suppress(OSError):
            for path in logs_dir(self.root).iterdir():
                if path.name.endswith(ENDED_SUFFIX):
                    with contextlib.suppress(OSError):
                        found.append((path.stat().st_mtime, path))
        return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]

    def ended(self) -> list[EndedEnclave]:
        """The kept summaries of ended enclaves, newest first (damaged ones skipped)."""
        out: list[EndedEnclave] = []
        for path in self._ended_paths():
            try:
                out.append(EndedEnclave(**json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def find_ended(
        self, *, enclave_id: str | None = None, name: str | None = None
    ) -> EndedEnclave | None:
        """The newest ended enclave with this id or name."""
        for ended in self.ended():
            if (enclave_id is not None and ended.enclave_id == enclave_id) or (
                name is not None and ended.name == name
            ):
                return ended
        return None


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

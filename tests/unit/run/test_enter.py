"""``python -m enclavekit.run.enter``: the chroot entry enforces the no-follow rule itself, at the
moment of use (the runner's earlier check is not what protects the host), and reports through its
status pipe whether the application's execve happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclavekit.run.runner import chroot_supported

pytestmark = pytest.mark.skipif(not chroot_supported(), reason="needs root and mount namespaces")


def _enter(tmp_path: Path, argv: list[str], host_mounts: list[str]) -> tuple[int, bytes]:
    runtime, vsock = tmp_path / "runtime", tmp_path / "vsock"
    runtime.mkdir()
    vsock.mkdir()
    status, status_w = os.pipe()
    spec = {
        "rootfs": str(tmp_path / "initramfs" / "rootfs"),
        "runtime_dir": str(runtime),
        "vsock_dir": str(vsock),
        "host_mounts": host_mounts,
        "argv": argv,
        "env": ["PATH=/bin"],
        "status_fd": status_w,
    }
    spec_path = tmp_path / "enter.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "enclavekit.run.enter", str(spec_path)],
            pass_fds=(status_w,),
            capture_output=True,
            timeout=60,
        )
    finally:
        os.close(status_w)
    with os.fdopen(status, "rb") as pipe:
        return proc.returncode, pipe.read()


@pytest.mark.parametrize("entry", ["tmp", "run", "etc"])
def test_attack_mount_point_linked_to_the_host_after_the_runner_checked_is_refused_at_use(
    tmp_path: Path, entry: str
) -> None:
    host = tmp_path / "host-directory"
    host.mkdir()
    rootfs = tmp_path / "initramfs" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / entry).symlink_to(host)
    code, reason = _enter(tmp_path, ["/bin/true"], ["/etc/ssl"])
    assert code == 127
    assert f"/rootfs/{entry} is a symbolic link to {host}".encode() in reason
    assert list(host.iterdir()) == []


def test_attack_rootfs_linked_to_the_host_is_not_chrooted_into(tmp_path: Path) -> None:
    host = tmp_path / "host-directory"
    host.mkdir()
    (tmp_path / "initramfs").mkdir()
    (tmp_path / "initramfs" / "rootfs").symlink_to(host)
    code, reason = _enter(tmp_path, ["/bin/true"], [])
    assert code == 127 and b"/rootfs is a symbolic link" in reason
    assert list(host.iterdir()) == []


def test_status_pipe_closes_empty_once_the_application_runs(tmp_path: Path) -> None:
    (tmp_path / "initramfs" / "rootfs").mkdir(parents=True)
    mounts = [p for p in ("/usr", "/bin", "/lib", "/lib64") if os.path.lexists(p)]
    code, reason = _enter(tmp_path, ["/bin/true"], mounts)
    assert (code, reason) == (0, b"")


def test_status_pipe_carries_why_the_command_could_not_be_executed(tmp_path: Path) -> None:
    rootfs = tmp_path / "initramfs" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / "app").write_text("#!/no/such/interpreter\n")
    (rootfs / "app").chmod(0o755)
    code, reason = _enter(tmp_path, ["/app"], [])
    assert code == 127
    assert b"cannot execute /app" in reason and b"interpreter" in reason

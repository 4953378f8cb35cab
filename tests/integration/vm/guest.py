"""Build test enclaves for QEMU's nitro-enclave machine with enclavekit's own build-enclave.

The blobs folder handed to `enclavekit.eif.build.build_enclave` holds the Debian guest kernel (bzImage +
its config), nitro's ``init`` (tests/assets/vm/init) and the Debian ``nsm.ko``; the kernel command line is
nitro-cli's plus ``rdinit=/rootfs/preinit`` (loads virtio_mmio and vsock, then runs nitro's init) and
``cgroup_disable=cpuset,memory`` (the Debian kernel lacks those cgroup v1 controllers that init mounts).

The root file system is Debian's python3 (the host's /usr/bin/python3.11 with the shared libraries it and its
extension modules need, and a trimmed standard library), enclavekit's source, and the third-party packages
`enclavekit.nsm` imports (cbor2, cryptography, cffi), plus the guest program.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import enclavekit

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "vm"
PY_VERSION = "python3.11"
HOST_PYTHON = Path("/usr/bin") / PY_VERSION
HOST_STDLIB = Path("/usr/lib") / PY_VERSION
THIRD_PARTY = ("cbor2", "cryptography", "_cffi_backend")
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "config-3.11-x86_64-linux-gnu",
    "site-packages",
    "dist-packages",
    "unittest",
    "venv",
    "sqlite3",
    "curses",
    "dbm",
    "xmlrpc",
    "wsgiref",
    "msilib",
}
MODULES = (
    "virtio_mmio.ko",
    "vsock.ko",
    "vmw_vsock_virtio_transport_common.ko",
    "vmw_vsock_virtio_transport.ko",
)
CMDLINE = (
    "reboot=k panic=30 pci=off console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
    "random.trust_cpu=on rdinit=/rootfs/preinit cgroup_disable=cpuset,memory quiet"
)


def make_blobs(cache: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache / "kernel" / "vmlinuz", dest / "bzImage")
    shutil.copyfile(cache / "kernel" / "config", dest / "bzImage.config")
    shutil.copyfile(cache / "kernel" / "modules" / "nsm.ko", dest / "nsm.ko")
    shutil.copyfile(ASSETS / "init", dest / "init")
    (dest / "cmdline").write_text(CMDLINE + "\n")
    return dest


def _shared_libs(binaries: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=False
        ).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def _copy_file(src: Path, root: Path, at: Path | None = None) -> None:
    target = root / (at or src).relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), target)


def _site_packages() -> Path:
    import cbor2

    return Path(cbor2.__file__).resolve().parents[1]


def build_rootfs(cache: Path, dest: Path, program: str) -> Path:
    """A root file system that runs ``program`` (Python source) with enclavekit importable."""
    root = dest
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cache / "preinit", root / "preinit")
    (root / "ek-modules").mkdir()
    for name in MODULES:
        shutil.copyfile(cache / "kernel" / "modules" / name, root / "ek-modules" / name)
    # The interpreter and its standard library.
    _copy_file(HOST_PYTHON, root, Path("/usr/bin/python3"))
    shutil.copytree(
        HOST_STDLIB,
        root / "usr" / "lib" / PY_VERSION,
        ignore=lambda d, names: [n for n in names if n in STDLIB_SKIP and Path(d) == HOST_STDLIB],
        symlinks=False,
    )
    # Application code: enclavekit's source and the third-party packages it imports.
    site = root / "app" / "site"
    shutil.copytree(
        Path(enclavekit.__file__).parent,
        site / "enclavekit",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    packages = _site_packages()
    extension_modules: list[Path] = []
    for name in THIRD_PARTY:
        matches = [p for p in packages.iterdir() if p.name == name or p.name.startswith(name + ".")]
        for match in matches:
            if match.is_dir():
                shutil.copytree(
                    match, site / match.name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(match, site / match.name)
    extension_modules += list(site.rglob("*.so"))
    extension_modules += list((root / "usr" / "lib" / PY_VERSION / "lib-dynload").glob("*.so"))
    for lib in _shared_libs([HOST_PYTHON, *extension_modules]):
        if str(lib).startswith(str(root)):
            continue
        _copy_file(lib, root)
    (root / "app" / "main.py").write_text(program)
    return root


def build_test_eif(
    cache: Path, work: Path, program: str, *, name: str = "vm-test", signer: object = None
) -> tuple[Path, object]:
    """Build ``work/<name>.eif`` running ``program``; returns (path, BuildResult)."""
    from enclavekit.eif.build import build_enclave
    from enclavekit.eif.image import RootfsDir

    blobs = make_blobs(cache, work / "blobs")
    rootfs = build_rootfs(cache, work / f"{name}-rootfs", program)
    output = work / f"{name}.eif"
    result = build_enclave(
        RootfsDir(rootfs),
        output,
        blobs_dir=blobs,
        name=name,
        version="1",
        cmd=["/usr/bin/python3", "-B", "/app/main.py"],
        env=["PYTHONPATH=/app/site", "PYTHONDONTWRITEBYTECODE=1", "PATH=/usr/bin:/bin"],
        signer=signer,  # type: ignore[arg-type]
        source_date_epoch="0",
    )
    return output, result


if __name__ == "__main__":  # manual experiments: python guest.py CACHE WORK
    out, res = build_test_eif(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]).read_text())
    print(out, res)

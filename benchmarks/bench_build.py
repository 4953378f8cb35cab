"""build-enclave throughput and memory, against reading + SHA-384 of the same bytes in the same run.

    python benchmarks/bench_build.py               # 64 MiB image (fits a shared machine)
    python benchmarks/bench_build.py --size-mb 1024 --gzip

Prints the image size, the baseline rate (read the image files + SHA-384, 1 MiB chunks), the build rate
(image bytes / build wall time), their ratio (target >= 0.7) and the build's peak RSS (target < 300 MiB
for 1 GiB). The build runs in a child process so its RSS is measured alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.unit.build.factory import docker_archive, kernel_bytes, oci_layout  # noqa: E402

ASSETS = ROOT / "tests" / "assets" / "build"


def _layer(size: int, seed: int) -> bytes:
    """A layer of mixed files: many small ones and some large ones, ``size`` bytes of contents."""
    block = hashlib.shake_256(f"block{seed}".encode()).digest(1 << 20)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(f"d{seed}")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        archive.addfile(info)
        written, i = 0, 0
        while written < size:
            n = 4096 if i % 4 else min(4 << 20, size - written)
            data = (block * (n // len(block) + 1))[:n]
            info = tarfile.TarInfo(f"d{seed}/f{i:06d}")
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
            written += n
            i += 1
    return out.getvalue()


def _make_image(directory: Path, size_mb: int, gzip_layers: bool) -> tuple[Path, list[Path]]:
    per_layer = max(1, size_mb // 4) << 20
    layers = [_layer(per_layer, seed) for seed in range(4)]
    if gzip_layers:
        (directory / "oci").mkdir()
        image = oci_layout(directory / "oci", layers, compress=True)
        files = sorted((image / "blobs" / "sha256").iterdir())
    else:
        image = docker_archive(directory / "image.tar", layers, legacy=False)
        files = [image]
    return image, files


def _baseline(files: list[Path]) -> tuple[int, float]:
    """Read every file of the image and SHA-384 it: the rate a single-pass tool could reach."""
    total = 0
    start = time.perf_counter()
    for path in files:
        digest = hashlib.sha384()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
    return total, time.perf_counter() - start


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's, inherited at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(image: str, output: str, blobs: str) -> None:
    from enclavekit.eif.build import build_enclave
    from enclavekit.eif.image import open_source

    start = time.perf_counter()
    result = build_enclave(open_source(image), output, blobs_dir=Path(blobs))
    elapsed = time.perf_counter() - start
    rss = _peak_rss()
    print(json.dumps({"seconds": elapsed, "rss": rss, "size": result.size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--size-mb", type=int, default=64, help="image contents in MiB (default 64)"
    )
    parser.add_argument("--gzip", action="store_true", help="OCI layout with gzip layers")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        work = Path(scratch)
        blobs = work / "blobs"
        blobs.mkdir()
        for name in ("init", "nsm.ko", "cmdline", "bzImage.config"):
            shutil.copy(ASSETS / name, blobs / name)
        (blobs / "bzImage").write_bytes(kernel_bytes())
        image, files = _make_image(work, args.size_mb, args.gzip)
        _baseline(files)  # warm the page cache for both measurements
        total, base_seconds = _baseline(files)
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(image), str(work / "app.eif"), str(blobs)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        child = json.loads(done.stdout)
    base_rate = total / base_seconds / 1e6
    build_rate = total / child["seconds"] / 1e6
    kind = "OCI gzip" if args.gzip else "docker-archive"
    print(f"image: {kind}, {total / 2**20:.0f} MiB stored, EIF {child['size'] / 2**20:.0f} MiB")
    print(f"baseline (read + SHA-384): {base_rate:8.1f} MB/s")
    print(f"build-enclave:             {build_rate:8.1f} MB/s")
    print(f"ratio build/baseline:      {build_rate / base_rate:8.2f}  (target >= 0.7)")
    print(f"build peak RSS:            {child['rss'] / 2**20:8.1f} MiB (target < 300 MiB at 1 GiB)")


if __name__ == "__main__":
    main()

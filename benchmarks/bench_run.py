"""Local-runner benchmarks: unpacking ramdisks, and the time from ``run_enclave`` to a running app.

Measured in one run, each against a baseline measured in the same run:

* unpack: ``enclavekit.run.cpio.extract`` of a newc archive of N files vs the standard library's
  ``tarfile`` extracting a tar of the same files (both into fresh directories, same disk);
* start: ``run_enclave`` (check + measure + unpack the EIF, spawn the enclave process, start the
  emulated NSM, start the application) until the application's first console line, vs spawning the
  same command with ``subprocess`` and waiting for the same line.

Usage: ``python benchmarks/bench_run.py [--files 2000] [--size 16384] [--starts 3]`` (well under a
minute by default).
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.ramdisk import CpioEntry, CpioWriter, FileType
from enclavekit.eif.writer import write_eif
from enclavekit.run import runner
from enclavekit.run.cpio import extract
from enclavekit.run.state import EnclaveStore


def make_files(count: int, size: int) -> list[tuple[str, bytes]]:
    return [(f"rootfs/d{i % 50:02d}/f{i:05d}", bytes([i % 251]) * size) for i in range(count)]


def make_cpio(files: list[tuple[str, bytes]], *, with_cmd: bytes | None = None) -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.add(CpioEntry(b"rootfs", FileType.DIRECTORY, 0o755))
    for d in sorted({name.rsplit("/", 1)[0] for name, _ in files}):
        writer.add(CpioEntry(d.encode(), FileType.DIRECTORY, 0o755))
    for name, data in files:
        writer.add(CpioEntry(name.encode(), FileType.REGULAR, 0o644, size=len(data)), data)
    if with_cmd is not None:
        writer.add(CpioEntry(b"cmd", FileType.REGULAR, 0o644, size=len(with_cmd)), with_cmd)
        writer.add(CpioEntry(b"env", FileType.REGULAR, 0o644, size=0), b"")
    writer.close()
    return out.getvalue()


def make_tar(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def timed(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def bench_unpack(base: Path, count: int, size: int) -> None:
    files = make_files(count, size)
    archive = make_cpio(files)
    tar = make_tar(files)
    total = sum(len(d) for _, d in files)
    n = [0]

    def ours() -> None:
        n[0] += 1
        extract(archive, base / f"cpio{n[0]}")

    def stdlib() -> None:
        n[0] += 1
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(base / f"tar{n[0]}", filter="data")

    # Interleaved rounds, median of per-round ratios: robust to a machine shared with other work.
    rounds = [(timed(ours, 1), timed(stdlib, 1)) for _ in range(5)]
    t_ours = statistics.median(o for o, _ in rounds)
    t_base = statistics.median(b for _, b in rounds)
    ratio = statistics.median(b / o for o, b in rounds)
    print(
        f"unpack {count} files, {total / 1e6:.1f} MB: enclavekit.run.cpio {t_ours * 1e3:.0f} ms"
        f" ({total / t_ours / 1e6:.0f} MB/s, {count / t_ours:.0f} files/s);"
        f" tarfile baseline {t_base * 1e3:.0f} ms; ratio {ratio:.2f}x (median of 5 interleaved"
        " rounds; >1: faster)"
    )


def bench_start(base: Path, starts: int) -> None:
    script = "echo ready; exec sleep 30"
    cmd = b"/bin/sh\n-c\n" + script.encode() + b"\n"
    bootstrap = make_cpio([])
    customer = make_cpio(make_files(200, 4096), with_cmd=cmd)
    eif = base / "start.eif"
    write_eif(
        eif,
        kernel=b"k" * 4096,
        cmdline="console=ttyS0",
        ramdisks=[bootstrap, customer],
        metadata=IdentityInfo("bench", "1", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )
    store = EnclaveStore(base / "state")

    def wait_line(record: runner.st.EnclaveRecord) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if b"ready" in b"".join(runner.follow_console(store, record, disconnect_timeout=0)):
                return
            time.sleep(0.01)
        raise SystemExit("the benchmark enclave never printed its line")

    ours: list[float] = []
    plain: list[float] = []
    for _ in range(starts):
        t0 = time.perf_counter()
        record = runner.run_enclave(
            runner.RunOptions(eif_path=eif, isolation="process", memory_mib=64), store=store
        )
        wait_line(record)
        ours.append(time.perf_counter() - t0)
        runner.terminate_enclave(record, store=store)
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()
        plain.append(time.perf_counter() - t0)
        proc.kill()
        proc.wait()
    m_ours, m_plain = statistics.median(ours), statistics.median(plain)
    print(
        f"start to first console line (median of {starts}): run_enclave {m_ours * 1e3:.0f} ms;"
        f" plain subprocess baseline {m_plain * 1e3:.1f} ms; ratio {m_ours / m_plain:.0f}x slower"
        " (EIF check + unpack + enclave process + emulated NSM)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        bench_unpack(base, args.files, args.size)
        bench_start(base, args.starts)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

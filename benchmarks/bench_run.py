"""Local-runner benchmarks: unpacking ramdisks, and the time from ``run_enclave`` to a running app.

Measured in one run, each against a baseline measured in the same run:

* unpack: ``enclavekit.run.cpio.extract`` of a newc archive of N files vs the standard library's
  ``tarfile`` extracting a tar of the same files (both into fresh directories, same disk);
* start: ``run_enclave`` (check + measure + unpack the EIF, spawn the enclave process, start the
  emulated NSM, start the application) until the application's first console line, vs spawning the
  same command with ``subprocess`` and waiting for the same line;
* large EIFs (256 MiB and 1 GiB by default): ``enclavekit run-enclave`` as a command, from its start
  to the application's first console line, and its peak RSS (``/usr/bin/time -f %M``), vs the
  baseline ``sha384sum EIF`` + ``cpio -idm < customer-ramdisk`` + ``sh -c 'echo ready'`` (GNU cpio;
  peak RSS the largest of the three), interleaved rounds in the same run. The customer ramdisk holds
  files of 32 MiB (one of them the largest a ramdisk may make a runner hold) and 1,000 of 4 KiB.
  Targets (issue 18): peak RSS under 100 MiB whatever the size; start ≤ 1.5x the baseline at 1 GiB.

Usage: ``python benchmarks/bench_run.py [--files 2000] [--size 16384] [--starts 3]
[--eif-mib 256 1024] [--rounds 3]`` (about a minute by default; needs ``cpio`` and GNU ``time``, and
4 x the largest size free on the temporary directory's disk).
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

from _results import record as record_figure  # `record` is an enclave record here

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
    record_figure(
        bench="bench_run",
        figure=f"unpack {count} files: tarfile time / enclavekit.run.cpio time",
        value=ratio,
        unit="ratio",
        baseline=f"tarfile extracting a tar of the same files ({t_base * 1e3:.0f} ms), median of 5 interleaved rounds",
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
    record_figure(
        bench="bench_run",
        figure="run_enclave to first console line / plain subprocess",
        value=m_ours / m_plain,
        unit="ratio",
        baseline=f"the same command spawned with subprocess ({m_plain * 1e3:.1f} ms), median of {starts}",
    )


BIG_FILE = 32 * 1024 * 1024
SMALL_FILES = 1000
RSS_TARGET_MIB = 100
START_TARGET = 1.5
_RUN_CLI = "from enclavekit.cli import main; main()"


def write_large_eif(base: Path, size_mib: int) -> tuple[Path, Path]:
    """An EIF of about ``size_mib`` MiB and its customer ramdisk as a file, both streamed."""
    ramdisk = base / f"customer-{size_mib}.cpio"
    script = "echo ready; exec sleep 60"
    cmd = b"/bin/sh\n-c\n" + script.encode() + b"\n"
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(ramdisk, "wb") as out:
        writer = CpioWriter(out)
        writer.add(CpioEntry(b"rootfs", FileType.DIRECTORY, 0o755))
        writer.add(CpioEntry(b"rootfs/small", FileType.DIRECTORY, 0o755))
        for i in range(SMALL_FILES):
            data = block[i : i + 4096]
            name = f"rootfs/small/f{i:04d}".encode()
            writer.add(CpioEntry(name, FileType.REGULAR, 0o644, size=len(data)), data)
        room = size_mib * 1024 * 1024 - SMALL_FILES * 4096 - 1024 * 1024  # headers, bootstrap
        sizes = [BIG_FILE] * (room // BIG_FILE) + ([room % BIG_FILE] if room % BIG_FILE else [])
        for i, size in enumerate(sizes):
            name = f"rootfs/big{i:03d}".encode()
            writer.begin(CpioEntry(name, FileType.REGULAR, 0o644, size=size))
            left = size
            while left:
                piece = block[: min(left, len(block))]
                writer.write(piece)
                left -= len(piece)
            writer.end()
        writer.add(CpioEntry(b"cmd", FileType.REGULAR, 0o644, size=len(cmd)), cmd)
        writer.add(CpioEntry(b"env", FileType.REGULAR, 0o644, size=0), b"")
        writer.close()
    eif = base / f"large-{size_mib}.eif"
    write_eif(
        eif,
        kernel=b"k" * 4096,
        cmdline="console=ttyS0",
        ramdisks=[make_cpio([]), ramdisk],
        metadata=IdentityInfo("bench", "1", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )
    return eif, ramdisk


def _timed_rss(argv: list[str], rss_file: Path, **kwargs: object) -> tuple[float, int]:
    """Wall time and peak RSS (KiB, GNU time's %M: the command's own, not this process's)."""
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv], check=True, **kwargs)  # type: ignore[call-overload]
    elapsed = time.perf_counter() - t0
    return elapsed, int(rss_file.read_text().split()[-1])


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def bench_large(base: Path, size_mib: int, rounds: int) -> None:
    eif, ramdisk = write_large_eif(base, size_mib)
    eif_size = eif.stat().st_size
    state = base / f"state-{size_mib}"
    store = EnclaveStore(state)
    memory = -(-4 * eif_size // (1024 * 1024))
    ours: list[tuple[float, int, int]] = []
    plain: list[tuple[float, int]] = []
    for r in range(rounds):
        # run-enclave: the command's start to the application's first console line.
        t0 = time.perf_counter()
        _, rss = _timed_rss(
            [
                sys.executable,
                "-c",
                _RUN_CLI,
                "run-enclave",
                "--eif-path",
                str(eif),
                "--isolation",
                "process",
                "--memory",
                str(memory),
                "--cpu-count",
                "1",
                "--state-dir",
                str(state),
                "--json",
            ],
            base / "rss-ours",
            stdout=subprocess.PIPE,
        )
        [record] = store.all()
        deadline = time.monotonic() + 60
        while b"ready" not in b"".join(runner.follow_console(store, record, disconnect_timeout=0)):
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark enclave never printed its line")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        enclave_rss = _vm_hwm_kib(record.pid)
        runner.terminate_enclave(record, store=store)
        ours.append((elapsed, rss, enclave_rss))
        # Baseline: check the file's hash, unpack the same ramdisk, start a shell that prints.
        target = base / f"cpio-{size_mib}-{r}"
        target.mkdir()
        t_hash, rss_hash = _timed_rss(
            ["sha384sum", str(eif)], base / "rss-b", stdout=subprocess.DEVNULL
        )
        with open(ramdisk, "rb") as stdin:
            t_cpio, rss_cpio = _timed_rss(
                ["cpio", "-idm", "--quiet"], base / "rss-b", stdin=stdin, cwd=target
            )
        t_sh, rss_sh = _timed_rss(
            ["sh", "-c", "echo ready"], base / "rss-b", stdout=subprocess.PIPE
        )
        plain.append((t_hash + t_cpio + t_sh, max(rss_hash, rss_cpio, rss_sh)))
        shutil.rmtree(target)
        shutil.rmtree(state / "enclaves", ignore_errors=True)
    ratios = [o[0] / p[0] for o, p in zip(ours, plain, strict=True)]
    ratio = statistics.median(ratios)
    t_ours = statistics.median(o[0] for o in ours)
    t_plain = statistics.median(p[0] for p in plain)
    rss_ours = max(o[1] for o in ours) / 1024
    rss_enclave = max(o[2] for o in ours) / 1024
    rss_plain = max(p[1] for p in plain) / 1024
    start_ok = ratio <= START_TARGET
    rss_ok = rss_ours < RSS_TARGET_MIB
    print(
        f"run-enclave, {eif_size / 2**20:.0f} MiB EIF: start to first console line"
        f" {t_ours * 1e3:.0f} ms, peak RSS {rss_ours:.1f} MiB (enclave process"
        f" {rss_enclave:.1f} MiB); baseline sha384sum + cpio -idm + sh -c echo"
        f" {t_plain * 1e3:.0f} ms, peak RSS {rss_plain:.1f} MiB; ratio {ratio:.2f}x"
        f" (median of {rounds} interleaved rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(
        f"  target: peak RSS < {RSS_TARGET_MIB} MiB whatever the size:"
        f" {'met' if rss_ok else 'NOT met'}; start <= {START_TARGET}x the baseline at 1 GiB:"
        + (f" {'met' if start_ok else 'NOT met'}" if size_mib >= 1024 else " (applies at 1 GiB)")
    )
    record_figure(
        bench="bench_run",
        figure=f"run-enclave start / baseline, {eif_size / 2**20:.0f} MiB EIF",
        value=ratio,
        unit="ratio",
        baseline=f"sha384sum + cpio -idm + sh -c echo ({t_plain * 1e3:.0f} ms), median of {rounds} interleaved rounds",
        target=f"<= {START_TARGET} at 1 GiB",
        met=start_ok if size_mib >= 1024 else None,
        headline=True,
    )
    record_figure(
        bench="bench_run",
        figure=f"run-enclave peak RSS, {eif_size / 2**20:.0f} MiB EIF",
        value=rss_ours,
        unit="MiB",
        baseline=f"the baseline's largest peak RSS: {rss_plain:.1f} MiB",
        target=f"< {RSS_TARGET_MIB} MiB",
        met=rss_ok,
    )
    eif.unlink()
    ramdisk.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--eif-mib", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        bench_unpack(base, args.files, args.size)
        bench_start(base, args.starts)
        for size_mib in args.eif_mib:
            bench_large(base, size_mib, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

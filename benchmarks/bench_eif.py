"""describe-eif throughput against hashlib.sha384 over the same bytes, measured in the same run.

Builds a synthetic EIF (8 MiB kernel, 1 MiB bootstrap ramdisk, the rest one customer ramdisk, like a real
nitro-cli image), then times, best of ``--repeat`` interleaved runs:

- baseline: read the file in 2 MiB chunks and feed every byte to one ``hashlib.sha384`` (``sha384sum``);
- describe: ``enclavekit.eif.describe.describe_eif`` (layout checks, CRC, PCR0/1/2, metadata).

describe-eif must hash the customer ramdisk twice (PCR0 and PCR2), so it can only keep up with one
SHA-384 by using a second core. Usage::

    python benchmarks/bench_eif.py                 # 256 MiB (quick; EIF_BENCH_MIB overrides)
    python benchmarks/bench_eif.py --size-mib 1024 # the 1 GiB figure
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from _results import record

from enclavekit.eif.describe import describe_eif
from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.writer import write_eif

MIB = 1 << 20
TARGET_RATIO = 0.9


def _pattern_chunks(total: int, seed: bytes) -> list[bytes] | object:
    block = hashlib.shake_256(seed).digest(4 * MIB)

    def gen():  # type: ignore[no-untyped-def]
        left = total
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n

    return gen()


def build(path: Path, size: int) -> None:
    kernel = 8 * MIB
    bootstrap = 1 * MIB
    customer = max(size - kernel - bootstrap, MIB)
    write_eif(
        path,
        kernel=_pattern_chunks(kernel, b"kernel"),  # type: ignore[arg-type]
        cmdline="reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on",
        ramdisks=[
            _pattern_chunks(bootstrap, b"bootstrap"),  # type: ignore[list-item]
            _pattern_chunks(customer, b"customer"),  # type: ignore[list-item]
        ],
        metadata=IdentityInfo("bench", "1.0", BuildInfo(build_time="1970-01-01T00:00:00+00:00")),
    )


def sha384_file(path: Path) -> str:
    h = hashlib.sha384()
    buf = bytearray(2 * MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def parallel_capacity() -> float:
    """Speed-up of two threads hashing vs one, right now: how many free cores this run really had."""
    data = hashlib.shake_256(b"capacity").digest(32 * MIB)

    def hash_once() -> None:
        h = hashlib.sha384()
        view = memoryview(data)
        for i in range(0, len(data), 2 * MIB):
            h.update(view[i : i + 2 * MIB])

    t = time.perf_counter()
    hash_once()
    hash_once()
    sequential = time.perf_counter() - t
    threads = [threading.Thread(target=hash_once) for _ in range(2)]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sequential / (time.perf_counter() - t)


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mib",
        type=int,
        default=int(os.environ.get("EIF_BENCH_MIB", "256")),
        help="EIF size in MiB (default 256, or $EIF_BENCH_MIB; use 1024 for the 1 GiB figure)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, best kept")
    args = parser.parse_args()
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-eif-") as tmp:
        path = Path(tmp) / "bench.eif"
        t = time.perf_counter()
        build(path, size)
        build_s = time.perf_counter() - t
        actual = path.stat().st_size
        sha384_file(path)  # warm the page cache
        base_times, desc_times, capacity = [], [], []
        cpu_base = cpu_desc = 0.0
        for _ in range(args.repeat):
            capacity.append(parallel_capacity())
            c = time.process_time()
            base_times.append(best_of(lambda: sha384_file(path), 1))
            cpu_base += time.process_time() - c
            c = time.process_time()
            desc_times.append(best_of(lambda: describe_eif(path), 1))
            cpu_desc += time.process_time() - c
        base, desc = min(base_times), min(desc_times)
    mb = actual / 1e6
    ratio = base / desc
    print(
        f"EIF size:              {actual / MIB:.0f} MiB ({actual} bytes), cores: {os.cpu_count()}"
    )
    print(f"write_eif (build):     {mb / build_s:8.1f} MB/s")
    print(f"baseline sha384 file:  {mb / base:8.1f} MB/s")
    print(f"describe-eif:          {mb / desc:8.1f} MB/s")
    print(f"ratio describe/sha384: {ratio:8.3f}  (target >= {TARGET_RATIO})")
    record(
        bench="bench_eif",
        figure=f"describe-eif rate / sha384 rate, {actual / MIB:.0f} MiB EIF",
        value=ratio,
        unit="ratio",
        baseline=f"one hashlib.sha384 over the file in 2 MiB chunks ({mb / base:.0f} MB/s), best of {args.repeat}, same run",
        target=f">= {TARGET_RATIO}",
        met=ratio >= TARGET_RATIO,
        headline=True,
    )
    print(f"CPU time describe/sha384: {cpu_desc / cpu_base:5.2f}x (two SHA-384 passes + CRC)")
    print(
        f"2-thread SHA-384 speed-up available during the run: {max(capacity):.2f}x "
        "(below ~1.8 the machine is shared and the ratio is held down by it)"
    )
    record(
        bench="bench_eif",
        figure="describe-eif CPU time / sha384 CPU time",
        value=cpu_desc / cpu_base,
        unit="ratio",
        baseline="one hashlib.sha384 over the file, same run (describe does two SHA-384 passes + CRC)",
    )
    record(
        bench="bench_eif",
        figure="2-thread SHA-384 speed-up available during the run",
        value=max(capacity),
        unit="x",
        baseline="the same hashing on one thread, same run (about 1.8 or more: two free cores)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up time of ``enclavekit --help`` and ``enclavekit verify --help`` against ``python -c "import click"``.

The three commands are run interleaved, ``--runs`` times each, in the same run; the best (minimum) wall
time of each is the least disturbed by other processes on the machine. Target: each ratio ≤ 4.

Usage: python benchmarks/bench_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import record

TARGET = 4.0


def _entry() -> list[str]:
    script = Path(sys.executable).with_name("enclavekit")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from enclavekit.cli import main; main()"]


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    cases = {
        "python -c 'import click'": [sys.executable, "-c", "import click"],
        "enclavekit --help": [*_entry(), "--help"],
        "enclavekit verify --help": [*_entry(), "verify", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, argv in cases.items():
            times[name].append(_wall(argv))
    base = min(times["python -c 'import click'"])
    worst = 0.0
    for name, samples in times.items():
        ratio = min(samples) / base
        if name != "python -c 'import click'":
            worst = max(worst, ratio)
        print(
            f"{name:<28} best {min(samples) * 1000:7.1f} ms  median"
            f" {statistics.median(samples) * 1000:7.1f} ms  ratio {ratio:4.2f}"
        )
        if name != "python -c 'import click'":
            record(
                bench="bench_startup",
                figure=f"{name} time / import click time",
                value=ratio,
                unit="ratio",
                baseline=f"python -c 'import click', best of {args.runs} interleaved, same run",
                target=f"<= {TARGET:g}",
                met=ratio <= TARGET,
            )
    print(f"worst ratio {worst:.2f} (target <= {TARGET})")
    record(
        bench="bench_startup",
        figure="start-up time / import click time, worst command",
        value=worst,
        unit="ratio",
        baseline=f"python -c 'import click', best of {args.runs} interleaved, same run",
        target=f"<= {TARGET:g}",
        met=worst <= TARGET,
        headline=True,
    )
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

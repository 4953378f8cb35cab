"""Record a benchmark's headline figures as JSON, for ``benchmarks/report.py`` (``make bench``).

A benchmark calls :func:`record` next to the line that prints a figure::

    record(bench="bench_pull", figure="layout build time / pull + build time", value=0.83,
           unit="ratio", baseline="build from a local OCI layout, same run", target=">= 0.8", met=True)

When ``ENCLAVEKIT_BENCH_RESULTS`` names a directory, each call rewrites ``<dir>/<bench>.json`` atomically
(temporary file + rename) with every figure this run has recorded for that bench so far, values kept to 6
significant digits: a figure recorded again under the same name replaces the earlier value, and a new run
replaces the file (figures of an earlier run are not kept, so every figure in a file comes from the one run
whose command it names). Without the variable, :func:`record` does nothing.

The run is described once per file: its date (UTC, when this module was imported); the command line, a
password in a URL replaced by ``***``; the CPUs this process may use (``nproc``); the load average at start,
from ``ENCLAVEKIT_BENCH_LOADAVG`` (``make bench`` sets it from /proc/loadavg just before it starts each bench)
or else sampled when this module was imported (the file says which); and ``ENCLAVEKIT_BENCH_NOTE``, a
free-text note (e.g. "smoke run") shown with the figures. Not checked: that ``value`` is what the bench
printed, or that ``met`` agrees with ``target`` (the bench decides both).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS_ENV = "ENCLAVEKIT_BENCH_RESULTS"
LOADAVG_ENV = "ENCLAVEKIT_BENCH_LOADAVG"
NOTE_ENV = "ENCLAVEKIT_BENCH_NOTE"
ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^/@\s]*@")


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (so committed results name no home)."""
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return path


def _command() -> str:
    """This process's command line, with any password in a URL (``scheme://user:password@``) hidden."""
    argv = [_relative(sys.executable), _relative(sys.argv[0]), *sys.argv[1:]]
    return shlex.join(_PASSWORD.sub(r"\1***@", arg) for arg in argv)


def _load_average() -> list[float]:
    text = os.environ.get(LOADAVG_ENV)
    if text:
        try:
            values = [float(x) for x in text.split()[:3]]
        except ValueError:
            values = []
        if len(values) == 3:
            return values
        raise ValueError(
            f"{LOADAVG_ENV} must start with three numbers (as /proc/loadavg does), found {text!r}"
        )
    return [round(x, 2) for x in os.getloadavg()]


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_run() -> dict[str, Any]:
    """This process's run: id, date, command, CPUs, load average at start and the note (if any)."""
    run: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": _command(),
        "nproc": _nproc(),
        "load_average": _load_average(),
        "load_average_sampled": "at start" if os.environ.get(LOADAVG_ENV) else "at import",
    }
    note = os.environ.get(NOTE_ENV, "").strip()
    if note:
        run["note"] = note
    return run


class Recorder:
    """The figures of one run, per bench, and the files they are written to."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run
        self._figures: dict[str, dict[str, dict[str, Any]]] = {}

    def record(
        self,
        *,
        bench: str,
        figure: str,
        value: float,
        unit: str,
        baseline: str | None,
        target: str | None = None,
        met: bool | None = None,
        headline: bool = False,
        directory: str | os.PathLike[str] | None = None,
    ) -> Path | None:
        """Add one figure and rewrite ``<directory>/<bench>.json``; returns the file, or None when no
        directory is given (neither here nor in ``ENCLAVEKIT_BENCH_RESULTS``)."""
        if not _NAME.fullmatch(bench):
            raise ValueError(f"bench must be a file-name stem like 'bench_pull', found {bench!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(
                f"{bench}: value of {figure!r} must be a finite number, found {value!r}"
            )
        if met is not None and target is None:
            raise ValueError(f"{bench}: {figure!r} says met={met} but names no target")
        target_dir = directory if directory is not None else os.environ.get(RESULTS_ENV)
        if not target_dir:
            return None
        figures = self._figures.setdefault(bench, {})
        figures[figure] = {
            "figure": figure,
            "value": value if isinstance(value, int) else float(f"{value:.6g}"),
            "unit": unit,
            "baseline": baseline,
            "target": target,
            "met": met,
            "headline": headline,
        }
        document = {
            "schema": SCHEMA,
            "bench": bench,
            "run": self.run,
            "figures": list(figures.values()),
        }
        path = Path(target_dir) / f"{bench}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
        return path


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


_RUN = Recorder(describe_run())


def record(
    *,
    bench: str,
    figure: str,
    value: float,
    unit: str,
    baseline: str | None,
    target: str | None = None,
    met: bool | None = None,
    headline: bool = False,
) -> Path | None:
    """Record one figure of this run (see the module docstring); ``headline`` figures also go into
    README.md's Performance section. ``baseline`` says what the figure is measured against (None for a
    figure that has none, such as a peak RSS against an absolute target)."""
    return _RUN.record(
        bench=bench,
        figure=figure,
        value=value,
        unit=unit,
        baseline=baseline,
        target=target,
        met=met,
        headline=headline,
    )

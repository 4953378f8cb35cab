"""How many CPUs this process may run on (its affinity mask where the OS has one)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on, at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)

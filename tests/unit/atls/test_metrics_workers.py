"""``/metrics`` with several CA workers: prometheus-client's multiprocess mode (:class:`MultiprocessDir`),
driven from real separate processes. ``ca serve --workers 2`` end to end (both workers counted,
a crashed worker's counts kept): tests/integration/atls/test_ca_workers.py."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclavekit.atls.metrics import CaMetrics, MultiprocessDir

#: One worker's life: prometheus-client already imported (as in the parent before the fork), the
#: slot's hook, the CA's metrics, ``argv[3]`` issuances, one refusal and one request; prints /metrics.
_WORKER = """
import sys
from pathlib import Path
from enclavekit.atls.metrics import CaMetrics, MultiprocessDir

CaMetrics().issuances.inc(100)  # single-process, before worker_init: never in the directory
d = MultiprocessDir(Path(sys.argv[1]))
d.worker_init(int(sys.argv[2]))
m = CaMetrics(multiprocess_dir=d.path)
for _ in range(int(sys.argv[3])):
    m.issuances.inc()
m.refusals.labels("verification").inc()
m.latency.labels("/v1/certificates").observe(0.01)
sys.stdout.buffer.write(m.render())
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _worker(
    path: Path, slot: int, issuances: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(path), str(slot), str(issuances)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return samples(done.stdout.decode())


def test_counts_of_all_workers_add_up_and_a_replacement_counts_on(tmp_path: Path) -> None:
    with MultiprocessDir.create(tmp_path) as d:
        assert stat.S_IMODE(d.path.stat().st_mode) == 0o700
        assert list(d.path.iterdir()) == []
        first = _worker(d.path, 0, 3)
        assert first[("enclavekit_ca_issuances_total", ())] == 3
        assert first[("enclavekit_ca_workers", ())] == 1
        # Slot 0 has exited but is not marked dead yet: its live gauge still counts.
        second = _worker(d.path, 1, 2)
        assert second[("enclavekit_ca_issuances_total", ())] == 5
        assert second[("enclavekit_ca_workers", ())] == 2
        assert second[("enclavekit_ca_refusals_total", (("reason", "verification"),))] == 2
        # Both exit (the parent's hook); slot 0 is replaced: it counts on from the dead one's total.
        d.on_worker_exit(0, 0)
        d.on_worker_exit(0, 1)
        third = _worker(d.path, 0, 1)
        assert third[("enclavekit_ca_issuances_total", ())] == 6  # 3 + 2 + 1: none lost or doubled
        assert third[("enclavekit_ca_workers", ())] == 1  # slot 1 marked dead
        count = ("enclavekit_ca_request_seconds_count", (("endpoint", "/v1/certificates"),))
        assert third[count] == 3
        # Bounded by slots, not by processes: three processes, files of two slots.
        assert sorted(p.name for p in d.path.iterdir()) == [
            "counter_worker0.db",
            "counter_worker1.db",
            "gauge_livesum_worker0.db",
            "histogram_worker0.db",
            "histogram_worker1.db",
        ]
    assert not d.path.exists()


def test_multiprocess_metrics_need_the_worker_hook_first(tmp_path: Path) -> None:
    """Without ``worker_init`` the counts would stay in this process and /metrics would miss them."""
    with pytest.raises(ValueError, match="worker_init"):
        CaMetrics(multiprocess_dir=tmp_path)


def test_single_process_metrics_have_their_own_registry() -> None:
    a, b = CaMetrics(), CaMetrics()
    a.issuances.inc()
    assert samples(a.render().decode())[("enclavekit_ca_issuances_total", ())] == 1
    assert samples(b.render().decode())[("enclavekit_ca_issuances_total", ())] == 0
    assert samples(b.render().decode())[("enclavekit_ca_workers", ())] == 1

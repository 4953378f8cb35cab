"""Limits with several CA workers, and the ``--limits`` file."""

from __future__ import annotations

from datetime import timedelta

import pytest

from enclavekit.atls.limits import CaLimits, limits_from_mapping
from enclavekit.errors import UsageError


def test_attack_n_workers_do_not_multiply_the_total_issuance_rate() -> None:
    """Each of N workers gets 1/N of the totals, so together they keep the configured bound."""
    limits = CaLimits(issuance_rate_total=25.0, issuance_burst_total=50, max_connections=256)
    mine = limits.per_worker(4)
    assert mine.issuance_rate_total * 4 == pytest.approx(25.0)
    assert mine.issuance_burst_total * 4 <= 50
    assert mine.max_connections * 4 <= 256
    # Per-client buckets and everything shared through the store are not divided.
    assert mine.issuance_rate == limits.issuance_rate
    assert mine.max_live_challenges == limits.max_live_challenges
    assert limits.per_worker(1) is limits
    assert CaLimits(issuance_burst_total=3).per_worker(8).issuance_burst_total == 1


def test_limits_file_overrides_named_numbers_only() -> None:
    base = CaLimits()
    got = limits_from_mapping(
        {"issuance_rate_total": 100, "max_body": 65536, "prune_interval": 30}, base, source="f"
    )
    assert (got.issuance_rate_total, got.max_body) == (100, 65536)
    assert got.prune_interval == timedelta(seconds=30)
    for bad in (
        [],
        {"no_such_limit": 1},
        {"max_body": "big"},
        {"max_body": True},
        {"max_body": 1.5},
        {"max_body": 0},
        {"audit_retention": 5},
    ):
        with pytest.raises(UsageError, match="f"):
            limits_from_mapping(bad, base, source="f")

"""The capacity soak's arithmetic: days of history from bytes per transaction."""

from __future__ import annotations

import pytest

from streams.tools.soak import SoakReport, days_of_history

pytestmark = pytest.mark.unit


def _report(projection: dict[str, float]) -> SoakReport:
    disk = {"chain_copy_bytes_per_tx": 250.0, "broker_bytes_per_tx": 1500.0,
            "snapshots_bytes": 10_000_000, "disk_free_bytes": 86_400 * 1_000 * 10_000,
            "disk_total_bytes": 86_400 * 1_000 * 20_000}
    return SoakReport(rate=1_000.0, minutes=3.0, submitted=180_000, committed=180_000,
                      rejected=0, undecided=0, per_minute=[], disk=disk, projection=projection,
                      nodes_cpu_us_per_tx=300.0)


def test_days_of_history_adds_five_chain_copies_the_broker_and_the_projection() -> None:
    days = days_of_history(_report({"bytes_per_tx": 1_250.0}))
    # per tx: 5 x 250 + 1500 + 1250 = 4,000 bytes; 86.4 M tx a day
    assert days["gb_per_day"] == pytest.approx(345.6)
    assert days["chain_copies_gb_per_day"] == pytest.approx(108.0)
    assert days["days_on_free_disk"] == pytest.approx(2.5)
    assert days["days_on_whole_disk"] == pytest.approx(5.0)


def test_broker_copies_scale_with_the_replication_factor() -> None:
    one = days_of_history(_report({}))
    three = days_of_history(_report({}), replication_factor=3)
    assert three["broker_gb_per_day"] == pytest.approx(3 * one["broker_gb_per_day"])
    assert one["projection_gb_per_day"] == 0.0

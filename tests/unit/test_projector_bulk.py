"""The projector's bulk settings: the cyclic collector's thresholds while projecting
(tuned, then restored, with overlapping users in any order) and the follow loop's
retry policy for an unreachable database (retried for as long as it lasts)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import psycopg
import pytest

from streams.projections import runner
from streams.projections.projector import (
    GC_YOUNG_THRESHOLD,
    ProjectionError,
    ProjectionStats,
    collector_tuned_for_bulk,
)

pytestmark = pytest.mark.unit


def test_collector_thresholds_are_tuned_then_restored_in_any_order() -> None:
    before = gc.get_threshold()
    first, second = collector_tuned_for_bulk(), collector_tuned_for_bulk()
    first.__enter__()
    assert gc.get_threshold()[0] == max(before[0], GC_YOUNG_THRESHOLD)
    second.__enter__()
    first.__exit__(None, None, None)  # the first user leaves while the second projects
    assert gc.get_threshold()[0] == max(before[0], GC_YOUNG_THRESHOLD)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), collector_tuned_for_bulk():
        raise RuntimeError("a failed run restores them too")
    assert gc.get_threshold() == before


class _Flaky:
    """Stands in for a Projector whose database is away for ``failures`` runs."""

    runs = 0

    def __init__(self, failures: list[BaseException], committed: bool = False) -> None:
        self.failures = failures
        self.stats = ProjectionStats(batches=1 if committed else 0)

    async def run(self, **_: Any) -> ProjectionStats:
        _Flaky.runs += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.stats


def _run(failures: list[BaseException], monkeypatch: pytest.MonkeyPatch,
         *, follow: bool = True) -> tuple[ProjectionStats, list[str]]:
    monkeypatch.setattr(runner, "RETRY_DELAY_S", 0.0)
    retries: list[str] = []
    _Flaky.runs = 0
    stats = asyncio.run(runner.run_projection(lambda: _Flaky(failures), follow=follow,
                                              rebuild=False, on_retry=retries.append))
    return stats, retries


def test_refused_connections_and_lost_sessions_are_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    refused = ProjectionError("cannot connect to PostgreSQL", code="projection-database")
    _, retries = _run([refused, psycopg.OperationalError("terminated"), refused], monkeypatch)
    assert len(retries) == 3 and _Flaky.runs == 4


def test_data_errors_and_once_mode_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProjectionError):
        _run([ProjectionError("other chain", code="projection-inconsistent")], monkeypatch)
    with pytest.raises(ProjectionError):
        _run([ProjectionError("away", code="projection-database")], monkeypatch, follow=False)
    assert _Flaky.runs == 1


def test_a_follower_waits_out_a_long_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions 0100/0102: a following projector never gives up on an outage."""
    monkeypatch.setattr(runner, "RETRY_DELAY_MAX_S", 0.0)
    away = [ProjectionError("away", code="projection-database") for _ in range(40)]
    _, retries = _run(away, monkeypatch)
    assert _Flaky.runs == 41 and len(retries) == 40

"""The cluster bench's outcome arithmetic: latency from each transaction's scheduled
send time, and the tail per window of the load (where a step's p99 came from)."""

from __future__ import annotations

from typing import Any

import pytest

from streams.client.ledger_client import Outcome
from streams.tools import bench

pytestmark = pytest.mark.unit


class _Client:
    def __init__(self, outcomes: dict[str, Outcome]) -> None:
        self._outcomes = outcomes

    def outcome(self, txid: str) -> Outcome | None:
        return self._outcomes.get(txid)


def test_the_tail_is_reported_per_window_of_the_load() -> None:
    rate = 10.0  # one transaction every 100 ms: 50 per 5 s window
    started_ms = 1_000_000.0
    delays = [100.0] * 50 + [900.0] * 50 + [200.0] * 20  # the second window was slow
    outcomes: dict[str, Outcome] = {}
    for index, delay in enumerate(delays):
        scheduled = started_ms + index * 1000 / rate
        outcomes[f"t{index}"] = Outcome(f"t{index}", True, decided_at_ms=int(scheduled + delay))
    outcomes["t120"] = Outcome("t120", False, code="tx-double-spend")
    client: Any = _Client(outcomes)
    result = bench._outcomes(client, [f"t{i}" for i in range(122)], rate, started_ms)
    assert result.p99_by_window_ms == [100.0, 900.0, 200.0]
    assert (result.committed, result.rejected) == (120, 1)
    assert result.codes == {"tx-double-spend": 1}
    assert result.latencies_ms[-1] == 900.0

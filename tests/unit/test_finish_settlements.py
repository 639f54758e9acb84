"""The API server's settlement finisher (decisions 0132, 0133): a settlement whose DvP
was sent but not confirmed is finished with no request, at start and whenever one is
left, with pauses that double while the brokers stay away."""

from __future__ import annotations

import asyncio

import pytest

from streams.api.app import _finish_settlements


class _Stop(Exception):
    """Ends the finisher's loop after the pauses a test wants to see."""


class _Market:
    """The two calls the finisher makes of a ``MarketService``: which agreements are
    left, and one pass that finishes them (or raises, as with the brokers away)."""

    def __init__(self, left: list[str], failures: int) -> None:
        self.left = list(left)
        self.failures = failures
        self.passes = 0

    def left_unfinished(self) -> list[str]:
        return list(self.left)

    async def finish_settlements(self) -> list[str]:
        self.passes += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("brokers away")
        finished, self.left = self.left, []
        return finished


def _run(market: _Market, pauses_wanted: int) -> list[float]:
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) >= pauses_wanted:
            raise _Stop

    with pytest.raises(_Stop):
        asyncio.run(_finish_settlements(market, sleep=sleep, first_pause_s=5.0,
                                        max_pause_s=60.0))
    return pauses


def test_a_settlement_left_by_a_failed_pass_is_tried_again_with_doubling_pauses() -> None:
    market = _Market(["agreement-1", "agreement-2"], failures=5)
    pauses = _run(market, pauses_wanted=7)
    # five failed passes, each followed by a longer pause (capped), then one that
    # finishes both; with none left the finisher only looks, at the longest pause
    assert pauses == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert market.passes == 6
    assert market.left == []


def test_nothing_left_means_no_pass_at_all() -> None:
    market = _Market([], failures=0)
    assert _run(market, pauses_wanted=3) == [60.0, 60.0, 60.0]
    assert market.passes == 0


def test_a_settlement_left_later_is_finished_at_the_next_look() -> None:
    market = _Market([], failures=1)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:  # a request ended without the ledger's verdict meanwhile
            market.left = ["agreement-3"]
        if len(pauses) >= 4:
            raise _Stop

    with pytest.raises(_Stop):
        asyncio.run(_finish_settlements(market, sleep=sleep, first_pause_s=5.0,
                                        max_pause_s=60.0))
    # looked (none), found one whose pass failed (pause 5), finished it, looked again
    assert pauses == [60.0, 5.0, 60.0, 60.0]
    assert market.passes == 2 and market.left == []

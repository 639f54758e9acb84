"""The proposer's adaptive block cut (decision 0110): bounded by the budget per block,
never above the chain's limit, never below the floor; small samples ignored."""

from __future__ import annotations

import pytest

from streams.node.cut import CUT_TXS_MIN, SAMPLE_TXS_MIN, BlockCutSizer

pytestmark = pytest.mark.unit


def test_no_measure_yet_cuts_at_the_chains_limit() -> None:
    assert BlockCutSizer.for_timeout(2_000).txs_max(10_000) == 10_000


def test_the_cut_follows_the_measured_cost_per_tx() -> None:
    sizer = BlockCutSizer.for_timeout(2_000)  # 500 ms a block
    sizer.observe(1_000, 250.0)  # 0.25 ms a tx
    assert sizer.txs_max(10_000) == 2_000
    assert sizer.txs_max(1_500) == 1_500  # never above the chain's limit
    for _ in range(30):
        sizer.observe(1_000, 25_000.0)  # the machine got very slow
    assert sizer.txs_max(10_000) == CUT_TXS_MIN
    assert sizer.txs_max(50) == 50  # the floor never exceeds the chain's limit


def test_samples_smooth_and_small_ones_are_ignored() -> None:
    sizer = BlockCutSizer(budget_ms=100.0)
    sizer.observe(SAMPLE_TXS_MIN - 1, 1_000_000.0)
    assert sizer.ms_per_tx is None
    sizer.observe(1_000, 100.0)
    sizer.observe(1_000, 200.0)
    assert sizer.ms_per_tx == pytest.approx(0.13)

"""``capledger bench stages``' arithmetic: each committed transaction's time split into
stages that add up to its total (decision 0111)."""

from __future__ import annotations

import pytest

from streams.tools.latency_stages import STAGES, HeightTimes, stage_samples, summarize

pytestmark = pytest.mark.unit


def _heights() -> dict[int, HeightTimes]:
    return {
        1: HeightTimes(proposed_ms=1_200, tx_offset_start=0, tx_offset_end=2,
                       quorum_ms=1_300, committed_ms=1_320),
        2: HeightTimes(proposed_ms=1_500, tx_offset_start=2, tx_offset_end=4,
                       quorum_ms=1_650, committed_ms=1_700),
    }


def test_the_stages_of_each_transaction_add_up_to_its_total() -> None:
    submitted = {0: (1_000, 1_005), 1: (1_100, 1_110), 2: (1_250, 1_260), 3: (1_400, 1_402)}
    samples = stage_samples(submitted, _heights())
    # offset 2 was logged at 1,260 while height 1 was still deciding (committed at 1,320)
    assert samples["send"] == [5, 10, 10, 2]
    assert samples["wait_previous_commit"] == [0, 0, 60, 0]
    assert samples["wait_cut"] == [195, 90, 180, 98]
    assert samples["validate_and_vote"] == [100, 100, 150, 150]
    assert samples["commit"] == [20, 20, 50, 50]
    assert samples["total"] == [320, 220, 450, 300]
    parts = [sum(samples[s][i] for s in STAGES[:-1]) for i in range(4)]
    assert parts == samples["total"]


def test_offsets_no_decided_block_holds_and_gaps_are_skipped() -> None:
    submitted = {0: (1_000, 1_005), 3: (1_400, 1_402), 9: (1_900, 1_901)}
    samples = stage_samples(submitted, _heights())
    assert samples["total"] == [320, 300]


def test_a_batch_record_counts_once_per_transaction_it_holds() -> None:
    submitted = {0: (1_000, 1_005, 3), 2: (1_250, 1_260, 1)}
    samples = stage_samples(submitted, _heights())
    assert samples["total"] == [320, 320, 320, 450]
    assert samples["wait_previous_commit"] == [0, 0, 0, 60]


def test_summaries_are_percentiles_of_each_stage() -> None:
    figures = summarize({"total": list(range(1, 101)), "send": []})
    assert figures == {"total": {"p50": 51.0, "p90": 91.0, "p99": 100.0, "mean": 50.5}}

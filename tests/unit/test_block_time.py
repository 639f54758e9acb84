"""Block time rules (ledger.block_time) and the node's nack when a proposal breaks them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.block import make_block
from ledger.block_time import (
    BLOCK_TIME_FUTURE_MS_MAX,
    BLOCK_TIME_PAST_MS_MAX,
    check_block_time,
    proposal_time_ms,
)
from ledger.errors import BlockError
from streams.node.ledger_node import now_ms
from tests.unit.test_block import KEYS
from tests.unit.test_node_isolation import _node

pytestmark = pytest.mark.unit

PARENT_MS = 1_000_000
NOW_MS = 2_000_000


@pytest.mark.parametrize(("time_ms", "code"), [
    (PARENT_MS, "block-time-not-after-parent"),
    (PARENT_MS - 1, "block-time-not-after-parent"),
    (NOW_MS + BLOCK_TIME_FUTURE_MS_MAX + 1, "block-time-future"),
    (2**64 - 1, "block-time-future"),
    (NOW_MS - BLOCK_TIME_PAST_MS_MAX - 1, "block-time-past"),
])
def test_block_times_out_of_bounds_are_refused_with_their_code(time_ms: int, code: str) -> None:
    with pytest.raises(BlockError) as caught:
        check_block_time(time_ms, parent_time_ms=PARENT_MS, now_ms=NOW_MS)
    assert caught.value.code == code


@pytest.mark.parametrize("time_ms", [
    NOW_MS, NOW_MS - 1, NOW_MS + BLOCK_TIME_FUTURE_MS_MAX, NOW_MS - BLOCK_TIME_PAST_MS_MAX,
])
def test_block_times_within_bounds_pass(time_ms: int) -> None:
    check_block_time(time_ms, parent_time_ms=PARENT_MS, now_ms=NOW_MS)


def test_an_honest_proposer_always_dates_after_the_parent() -> None:
    assert proposal_time_ms(now_ms=NOW_MS, parent_time_ms=PARENT_MS) == NOW_MS
    assert proposal_time_ms(now_ms=NOW_MS, parent_time_ms=NOW_MS + 5) == NOW_MS + 6


@pytest.mark.parametrize(("offset_ms", "code"), [
    (BLOCK_TIME_FUTURE_MS_MAX + 60_000, "block-time-future"),
    (-BLOCK_TIME_PAST_MS_MAX - 60_000, "block-time-past"),
    (0, None),
])
def test_the_node_nacks_a_proposal_with_a_bad_time(tmp_path: Path, offset_ms: int,
                                                   code: str | None) -> None:
    node = _node(tmp_path)
    proposer = node.genesis.member_ids[1]
    block = make_block(KEYS[proposer], height=1, prev_hash=node.state.head_hash,
                       time_ms=now_ms() + offset_ms, proposer=proposer, round_=0, txs=[])
    verdict = node._validate(block)
    assert verdict.error_code == code
    if code is not None:
        assert f"nack-{code}" in node.evidence_path.read_text().splitlines()[-1]

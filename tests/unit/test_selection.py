"""The deterministic selection of a block's transactions from a tx-log range."""

from __future__ import annotations

import pytest

from ledger.block import ZERO_HASH
from ledger.selection import Candidate, select_block_txs
from ledger.state import LedgerRules, LedgerState, apply_block, state_from_genesis
from ledger.tx import Transaction
from streams.tools.loadgen import Lanes, lane_chains, sign_p2pkh_payment

pytestmark = pytest.mark.unit

GENESIS_HASH = bytes(range(32))
RULES = LedgerRules()


def _setup(lanes: int = 3, per_lane: int = 4) -> tuple[LedgerState, list[list[Transaction]]]:
    plan = Lanes("selection-test", lanes)
    state = state_from_genesis(GENESIS_HASH, plan.allocations())
    return state, lane_chains(plan, GENESIS_HASH, per_lane)


def _candidates(txs: list[Transaction], start: int = 0) -> list[Candidate]:
    return [Candidate(start + i, tx, "securities-a", f"k{start + i}") for i, tx in enumerate(txs)]


def test_valid_chains_are_all_selected_in_log_order() -> None:
    state, chains = _setup()
    txs = [tx for chain in chains for tx in chain]
    selection = select_block_txs(state, _candidates(txs), RULES, range_end=len(txs))
    assert [tx.txid for tx in selection.txs] == [tx.txid for tx in txs]
    assert selection.rejections == ()
    assert selection.tx_offset_end == len(txs)


def test_child_before_parent_is_rejected_as_missing_input() -> None:
    state, chains = _setup(lanes=1, per_lane=2)
    parent, child = chains[0]
    selection = select_block_txs(state, _candidates([child, parent]), RULES, range_end=2)
    assert [tx.txid for tx in selection.txs] == [parent.txid]
    assert [(r.offset, r.code) for r in selection.rejections] == [(0, "missing-input")]


def test_double_spend_in_range_keeps_the_first() -> None:
    state, chains = _setup(lanes=1, per_lane=1)
    first = chains[0][0]
    plan = Lanes("selection-test", 1)
    key = plan.keys()[0]
    rival = sign_p2pkh_payment(key, first.inputs[0].prevout, 10_000_000, b"\x51", 7)
    selection = select_block_txs(state, _candidates([first, rival]), RULES, range_end=2)
    assert [tx.txid for tx in selection.txs] == [first.txid]
    assert [r.code for r in selection.rejections] == ["double-spend-in-block"]


def test_duplicates_and_undecodable_records_are_rejected_with_their_codes() -> None:
    state, chains = _setup(lanes=1, per_lane=1)
    tx = chains[0][0]
    candidates = [
        Candidate(0, tx, "securities-a", "a"),
        Candidate(1, tx, "securities-b", "b"),
        Candidate(2, None, error_code="avro-malformed", error_message="bad body"),
    ]
    selection = select_block_txs(state, candidates, RULES, range_end=3)
    assert [tx.txid for tx in selection.txs] == [tx.txid]
    assert [(r.offset, r.code) for r in selection.rejections] == [
        (1, "duplicate"), (2, "avro-malformed")
    ]


def test_already_committed_tx_resubmitted_is_a_duplicate() -> None:
    state, chains = _setup(lanes=1, per_lane=1)
    tx = chains[0][0]
    from ledger.block import make_block
    from ledger.keys import PrivateKey

    block = make_block(PrivateKey(b"\x01" * 32), height=1, prev_hash=GENESIS_HASH, time_ms=1,
                       proposer="koscom", round_=0, txs=[tx])
    state = apply_block(state, block, RULES)
    selection = select_block_txs(state, _candidates([tx]), RULES, range_end=1)
    assert selection.txs == ()
    assert [r.code for r in selection.rejections] == ["duplicate"]


def test_same_idempotency_key_in_range_is_rejected() -> None:
    state, chains = _setup(lanes=2, per_lane=1)
    candidates = [
        Candidate(0, chains[0][0], "securities-a", "order-1"),
        Candidate(1, chains[1][0], "securities-a", "order-1"),
    ]
    selection = select_block_txs(state, candidates, RULES, range_end=2)
    assert len(selection.txs) == 1
    assert [r.code for r in selection.rejections] == ["duplicate-idempotency-key"]


def test_limits_cut_the_range_before_the_first_tx_that_does_not_fit() -> None:
    state, chains = _setup(lanes=4, per_lane=5)
    txs = [tx for chain in chains for tx in chain]
    selection = select_block_txs(state, _candidates(txs, start=100), RULES,
                                 range_end=100 + len(txs), block_txs_max=7)
    assert len(selection.txs) == 7
    assert selection.tx_offset_end == 107
    # A validator given exactly the proposer's range reaches the same result.
    again = select_block_txs(state, _candidates(txs[:7], start=100), RULES, range_end=107)
    assert [t.txid for t in again.txs] == [t.txid for t in selection.txs]


def test_byte_limit_counts_block_overhead() -> None:
    state, chains = _setup(lanes=2, per_lane=10)
    txs = [tx for chain in chains for tx in chain]
    five = sum(tx.size_bytes for tx in txs[:5])
    selection = select_block_txs(state, _candidates(txs), RULES, range_end=len(txs),
                                 block_bytes_max=512 + five)
    assert len(selection.txs) == 5
    assert selection.tx_bytes == five
    assert selection.tx_offset_end == 5


def test_selection_never_mutates_the_state() -> None:
    state, chains = _setup()
    before = state.state_hash
    select_block_txs(state, _candidates([tx for c in chains for tx in c]), RULES, range_end=12)
    assert state.state_hash == before
    assert before != ZERO_HASH


def test_selection_delta_equals_validate_block_delta() -> None:
    from ledger.block import make_block
    from ledger.keys import PrivateKey
    from ledger.state import validate_block

    state, chains = _setup(lanes=3, per_lane=3)
    txs = [tx for chain in chains for tx in chain]
    selection = select_block_txs(state, _candidates(txs), RULES, range_end=len(txs))
    block = make_block(PrivateKey(b"\x02" * 32), height=1, prev_hash=GENESIS_HASH, time_ms=1,
                       proposer="koscom", round_=0, txs=selection.txs)
    assert selection.delta_for(state, block.header) == validate_block(state, block, RULES)

"""The node's validation paths against the real ``LedgerNode`` (no Kafka): the nack codes
for a block at the wrong tx offset (``block-tx-range``) and for one that leaves out or
reorders valid transactions (``block-tx-selection``), the specific code when the block
holds an invalid one, deferred validation, pool-full back-pressure and offset gaps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ledger import consensus
from ledger.block import Block, QuorumCertificate, make_block
from ledger.membership import INSTITUTION_IDS
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint, Transaction
from streams.common.clock import now_ms
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import signed_tx_submitted_record
from streams.node import ledger_node
from streams.node.ledger_node import LedgerNode, NodeHalted, NodeSettings
from streams.tools.loadgen import LANE_VALUE, Lanes, lane_chains, sign_p2pkh_payment, sink_script
from tests.unit.test_block import KEYS, make_genesis

pytestmark = pytest.mark.unit

LANES = Lanes("node-validation", 4)
GENESIS = dataclasses.replace(make_genesis(), allocations=LANES.allocations())
PAYMENTS = [chain[0] for chain in lane_chains(LANES, GENESIS.hash_le, 1)]
PROPOSER = INSTITUTION_IDS[1]


def _node(tmp_path: Path) -> LedgerNode:
    me = INSTITUTION_IDS[0]
    settings = NodeSettings(me, GENESIS, KEYS[me], "127.0.0.1:1", tmp_path)
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    node.quarantine.load(0)
    return node


def _record(offset: int, tx: Transaction) -> LogRecord:
    value = codec.encode("TxSubmitted", signed_tx_submitted_record(
        tx.serialize(), key=KEYS["securities-a"], genesis_hash=GENESIS.hash_le,
        submitter="securities-a", idempotency_key=f"k{offset}", now_ms=now_ms()))
    return LogRecord(offset, None, value, 0)


def _block(node: LedgerNode, txs: list[Transaction], start: int, end: int) -> Block:
    return make_block(KEYS[PROPOSER], height=1, prev_hash=node.state.head_hash,
                      time_ms=now_ms(), proposer=PROPOSER, round_=0,
                      txs=txs, tx_offset_start=start, tx_offset_end=end)


def _pooled(tmp_path: Path, offsets: list[int]) -> LedgerNode:
    node = _node(tmp_path)
    node._intake([_record(offset, tx) for offset, tx in zip(offsets, PAYMENTS, strict=False)])
    return node


def test_the_exact_valid_block_is_acked(tmp_path: Path) -> None:
    node = _pooled(tmp_path, [0, 1, 2])
    assert node._validate(_block(node, PAYMENTS[:3], 0, 3)).error_code is None


def test_a_block_at_the_wrong_tx_offset_is_nacked_block_tx_range(tmp_path: Path) -> None:
    node = _pooled(tmp_path, [0, 1, 2])
    assert node._validate(_block(node, PAYMENTS[1:3], 1, 3)).error_code == "block-tx-range"


@pytest.mark.parametrize("txs", [
    [PAYMENTS[0], PAYMENTS[2]],  # leaves out a valid tx
    [PAYMENTS[1], PAYMENTS[0], PAYMENTS[2]],  # reorders them
    [],  # takes none of the range
])
def test_a_block_that_leaves_out_or_reorders_valid_txs_is_nacked_block_tx_selection(
    tmp_path: Path, txs: list[Transaction],
) -> None:
    node = _pooled(tmp_path, [0, 1, 2])
    assert node._validate(_block(node, txs, 0, 3)).error_code == "block-tx-selection"


def test_a_block_with_an_invalid_tx_is_nacked_with_that_txs_code(tmp_path: Path) -> None:
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    conflict = sign_p2pkh_payment(LANES.keys()[0], OutPoint(allocation.hash_le, 0),
                                  LANE_VALUE, sink_script(LANES.seed), 7)
    node = _node(tmp_path)
    node._intake([_record(0, PAYMENTS[0]), _record(1, conflict)])
    verdict = node._validate(_block(node, [PAYMENTS[0], conflict], 0, 2))
    assert verdict.error_code == "double-spend-in-block"


def test_a_block_beyond_what_intake_has_read_waits_then_is_validated(tmp_path: Path) -> None:
    node = _pooled(tmp_path, [0])
    block = _block(node, PAYMENTS[:2], 0, 2)
    assert node._validate_or_defer(block) is None
    assert node.deferred_validation is block
    node._intake([_record(1, PAYMENTS[1])])
    assert node._validate(block).error_code is None  # what the retry does once read


def test_offset_gaps_in_the_tx_log_are_part_of_a_range(tmp_path: Path) -> None:
    """Offsets 1 and 3 are transaction markers: no record, still inside the range."""
    node = _pooled(tmp_path, [0, 2, 4])
    assert node.pool.end_offset == 5
    assert node._validate(_block(node, PAYMENTS[:3], 0, 5)).error_code is None
    assert node._validate(_block(node, PAYMENTS[:2], 0, 3)).error_code is None
    node.pool.drop_before(3)
    assert [c.offset for c in node.pool.candidates] == [4]


def test_a_full_pool_stops_reading_the_tx_log_until_a_commit_makes_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger_node, "POOL_TXS_MAX", 2)
    node = _pooled(tmp_path, [0, 1])
    assert node.pool.is_full and not node.tx_room.is_set()
    node.pool.drop_before(1)  # what a commit of offsets [0, 1) does
    node._update_tx_room()
    assert node.tx_room.is_set()


async def test_a_certified_block_that_does_not_apply_halts_the_node(tmp_path: Path) -> None:
    """The node's own invariant: a block a quorum certified must apply to its state;
    if it does not, the node stops loudly (NodeHalted, exit 70) instead of diverging."""
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    conflict = sign_p2pkh_payment(LANES.keys()[0], OutPoint(allocation.hash_le, 0),
                                  LANE_VALUE, sink_script(LANES.seed), 7)
    node = _pooled(tmp_path, [0, 1])
    block = _block(node, [PAYMENTS[0], conflict], 0, 2)
    qc = QuorumCertificate(1, 0, block.hash, ())
    with pytest.raises(NodeHalted, match="does not apply"):
        await node._act(consensus.Commit(block, qc))
    assert node.height == 0

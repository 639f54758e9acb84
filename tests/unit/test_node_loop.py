"""The node's loop order (decision 0129): a proposal whose tx range the node has fetched
but not taken in is validated from the pool, not parsed from its bodies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streams.kafka.logio import LogRecord
from streams.kafka.topics import PROPOSALS, TX
from streams.node import ledger_node
from streams.tools import bench_node as bench

pytestmark = pytest.mark.unit


def test_five_nodes_take_fetched_records_before_the_proposal_of_their_range() -> None:
    """In the in-process bench (the tx log fetched into ``tx_inbox`` as the readers do,
    consensus first): every payment commits and no block is parsed from its bodies."""
    figures = bench.bench_node(300, rate=1_000.0)
    assert figures["heights"] >= 2
    assert figures["bodies_used"] == {"proposal": 0, "commit": 0}


def test_without_taking_ahead_the_same_load_parses_proposals_from_their_bodies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter counts: with the step switched off, proposals come from bodies and
    every payment still commits (the step changes where transactions come from, not
    what is decided)."""
    async def never(self: ledger_node.LedgerNode, name: str, record: LogRecord) -> bool:
        return False

    monkeypatch.setattr(ledger_node.LedgerNode, "_take_fetched_for", never)
    figures = bench.bench_node(300, rate=1_000.0)
    assert figures["bodies_used"]["proposal"] > 0


def _one_node(tmp_path: Path) -> tuple[ledger_node.LedgerNode, list[bytes]]:
    genesis, keys, values = bench._workload(30, "p2pkh")
    logs = bench._MemoryLogs()
    nodes = bench._start(genesis, keys, tmp_path, logs, 1)
    node = nodes["koscom"]
    for other in nodes.values():
        if other is not node:
            other.verifier.close()
    return node, values


def test_a_hostile_proposal_takes_nothing_ahead_and_is_refused(tmp_path: Path) -> None:
    """Bytes that do not decode: the fetched tx records stay where they are (the loop
    takes them in later, in order) and the proposal is refused with evidence."""
    node, values = _one_node(tmp_path)
    fetched = [LogRecord(i, None, value, 0) for i, value in enumerate(values[:5])]
    node.tx_inbox.extend(fetched)
    try:
        asyncio.run(node._handle(PROPOSALS.name, [LogRecord(0, None, b"\xc3\x01junk", 0)]))
        assert list(node.tx_inbox) == fetched and node.pool.end_offset == 0
        assert node.evidence_path.read_text().count("proposal at offset 0") == 1
        asyncio.run(node._handle(TX.name, [node.tx_inbox.popleft() for _ in range(5)]))
        assert node.pool.end_offset == 5
    finally:
        node.verifier.close()


def test_a_proposal_takes_in_the_fetched_records_of_its_range_only(tmp_path: Path) -> None:
    """Records 0..9 fetched, a proposal for [0, 4): records 0..3 are taken in before it
    is handled, 4..9 wait for the loop's own intake."""
    from ledger.block import make_block, proposer_for
    from streams.kafka import codec
    from streams.kafka.records import proposal_record

    genesis, keys, values = bench._workload(10, "p2pkh")
    nodes = bench._start(genesis, keys, tmp_path, bench._MemoryLogs(), 1)
    proposer = proposer_for(genesis, 1, 0)
    node = next(n for me, n in nodes.items() if me != proposer)
    try:
        node.tx_inbox.extend(LogRecord(i, None, value, 0) for i, value in enumerate(values))
        block = make_block(keys[proposer], height=1, prev_hash=node.state.head_hash,
                           time_ms=genesis.time_ms + 1, proposer=proposer, round_=0,
                           txs=[], tx_offset_start=0, tx_offset_end=4)
        value = codec.encode("BlockProposed", proposal_record(block, now_ms=0))
        asyncio.run(node._handle(PROPOSALS.name, [LogRecord(0, None, value, 0)]))
        assert node.pool.end_offset == 4 and node.tx_inbox[0].offset == 4
        assert node.bodies_used == {"proposal": 0, "commit": 0}
    finally:
        for each in nodes.values():
            each.verifier.close()

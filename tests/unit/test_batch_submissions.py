"""Batch submissions (decision 0112): one TxBatchSubmitted record, one envelope
signature, many transactions. Each transaction is decided exactly as if it had come in
its own record at the batch's place, in the batch's order; a batch refused as a whole
refuses each of its transactions with an envelope-* code; a proposer never cuts inside
a batch; the node keeps going on every kind of bad batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from ledger.envelope import (
    BATCH_TXS_MAX,
    batch_digest,
    batch_refusal,
    batch_shape_refusal,
    sign_batch,
)
from ledger.hashing import sha256d
from ledger.membership import INSTITUTION_IDS
from ledger.selection import Candidate, select_block_txs
from ledger.state import LedgerRules, state_from_genesis
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import signed_tx_batch_record, signed_tx_submitted_record
from streams.node.intake import Intake, Verifier, intake_records
from streams.node.ledger_node import LedgerNode, NodeSettings, Pool
from streams.tools.loadgen import Lanes, interleave, lane_chains
from tests.unit.test_block import KEYS, make_genesis

pytestmark = pytest.mark.unit

LANES = Lanes("batch-submissions", 4)
GENESIS = dataclasses.replace(make_genesis(), allocations=LANES.allocations())
CHAINS = lane_chains(LANES, GENESIS.hash_le, 10)
GOOD = list(interleave(CHAINS))  # 40 payments, each lane spending its own change
ME = "securities-a"


def _batch(txs: Sequence[bytes], keys: Sequence[str], *, signer: str = ME,
           submitter: str = ME) -> bytes:
    return codec.encode("TxBatchSubmitted", signed_tx_batch_record(
        txs, key=KEYS[signer], genesis_hash=GENESIS.hash_le, submitter=submitter,
        idempotency_keys=keys, now_ms=1))


def _single(tx: bytes, key: str) -> bytes:
    return codec.encode("TxSubmitted", signed_tx_submitted_record(
        tx, key=KEYS[ME], genesis_hash=GENESIS.hash_le, submitter=ME, idempotency_key=key,
        now_ms=1))


def _intake(records: list[LogRecord], workers: int = 1) -> list[Intake]:
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    pool, verifier = Pool(0), Verifier(workers)
    try:
        outcomes = intake_records(records, genesis=GENESIS, genesis_hash=GENESIS.hash_le,
                                  state=state, pending_outputs=pool.pending_outputs,
                                  verifier=verifier)
    finally:
        verifier.close()
    return outcomes


Decided = tuple[list[str], list[tuple[str | None, str]], int]


def _decide(outcomes: list[Intake], **limits: int) -> Decided:
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    candidates = [o.candidate for o in outcomes if o.candidate is not None]
    verified = {o.candidate.tx.hash_le for o in outcomes
                if o.scripts_verified and o.candidate is not None and o.candidate.tx}
    selection = select_block_txs(state, candidates, LedgerRules.from_genesis(GENESIS),
                                 range_end=candidates[-1].offset + 1,
                                 script_verified=lambda tx: tx.hash_le in verified, **limits)
    return ([tx.txid for tx in selection.txs],
            [(r.txid, r.code) for r in selection.rejections], selection.tx_offset_end)


# ------------------------------------------------------------------ the signature


def test_one_signature_covers_every_key_txid_and_their_order() -> None:
    items = [(f"k{i}", tx.hash_le) for i, tx in enumerate(GOOD[:5])]
    signature = sign_batch(KEYS[ME], GENESIS.hash_le, ME,
                           [(f"k{i}", tx.serialize()) for i, tx in enumerate(GOOD[:5])])

    def refusal(items: list[tuple[str, bytes]], signature: bytes = signature,
                submitter: str = ME) -> str | None:
        found = batch_refusal(GENESIS, GENESIS.hash_le, submitter=submitter, items=items,
                              signature=signature)
        return None if found is None else found.code

    assert refusal(items) is None
    assert refusal(items[::-1]) == "envelope-signature"  # order is signed
    assert refusal(items[:4]) == "envelope-signature"  # so is the count
    assert refusal([("other", items[0][1]), *items[1:]]) == "envelope-signature"
    assert refusal([(items[0][0], b"\x01" * 32), *items[1:]]) == "envelope-signature"
    assert refusal(items, submitter="securities-b") == "envelope-signature"
    assert refusal(items, submitter="nobody") == "envelope-submitter-unknown"
    assert refusal(items, signature=b"") == "envelope-unsigned"
    assert refusal(items, signature=b"\x30" * 100) == "envelope-signature"
    # one transaction's single envelope is not a batch of one
    assert batch_digest(GENESIS.hash_le, ME, items[:1]) != sha256d(b"")


def test_batch_limits_include_the_block_limits() -> None:
    assert batch_shape_refusal(GENESIS, [200] * 10) is None
    assert batch_shape_refusal(GENESIS, []).code == "envelope-batch-empty"  # type: ignore[union-attr]
    too_many = batch_shape_refusal(GENESIS, [1] * (BATCH_TXS_MAX + 1))
    assert too_many is not None and too_many.code == "envelope-batch-too-many"
    small = dataclasses.replace(GENESIS, params=dataclasses.replace(
        GENESIS.params, block_txs_max=5, block_bytes_max=3_000))
    assert batch_shape_refusal(small, [10] * 6).code == "envelope-batch-too-many"  # type: ignore[union-attr]
    assert batch_shape_refusal(small, [1_000] * 2).code == "envelope-batch-oversized"  # type: ignore[union-attr]


# ------------------------------------------------------------------ intake and selection


def test_a_batch_decides_each_tx_as_single_records_would() -> None:
    raw = [tx.serialize() for tx in GOOD[:20]]
    keys = [f"k{i}" for i in range(20)]
    singles = [LogRecord(i, None, _single(tx, key), 0) for i, (tx, key) in
               enumerate(zip(raw, keys, strict=True))]
    batched = [LogRecord(7, None, _batch(raw, keys), 0)]
    by_batch = _intake(batched)
    assert [o.offset for o in by_batch] == [7] * 20
    assert all(o.scripts_verified for o in by_batch)  # children of earlier items too
    assert [o.candidate.tx.txid for o in by_batch] == [tx.txid for tx in GOOD[:20]]  # type: ignore[union-attr]
    assert [o.candidate.idempotency_key for o in by_batch] == keys  # type: ignore[union-attr]
    txids, rejections, end = _decide(by_batch)
    assert (txids, rejections) == _decide(_intake(singles))[:2]
    assert end == 8 and len(txids) == 20


def test_bad_transactions_inside_a_batch_are_refused_one_by_one() -> None:
    raw = [tx.serialize() for tx in GOOD[:8]]
    raw[2] = raw[2][:-1] + bytes([raw[2][-1] ^ 1])  # lock time changed: signature breaks
    raw[4] = b"\x01\x00"  # not a transaction
    raw[6] = raw[5]  # the same transaction twice
    keys = [f"k{i}" for i in range(8)]
    keys[7] = keys[0]  # an idempotency key used twice
    outcomes = _intake([LogRecord(0, None, _batch(raw, keys), 0)], workers=2)
    assert len(outcomes) == 8 and all(o.error is None for o in outcomes)
    txids, rejections, _ = _decide(outcomes)
    codes = dict(rejections)
    assert codes[Transaction.parse(raw[2]).txid].startswith("script")
    assert [code for txid, code in rejections if txid is None] == [
        next(o.candidate.error_code for o in outcomes  # type: ignore[union-attr]
             if o.candidate is not None and o.candidate.tx is None)]
    assert codes[GOOD[5].txid] == "duplicate"
    assert codes[GOOD[7].txid] == "duplicate-idempotency-key"
    assert txids == [GOOD[i].txid for i in (0, 1, 3, 5)]  # order kept, 6 refused


def test_a_batch_refused_as_a_whole_names_each_txid_and_the_node_goes_on() -> None:
    raw = [tx.serialize() for tx in GOOD[:3]]
    keys = ["a", "b", "c"]
    forged = _batch(raw, keys, signer="securities-b")  # b signs in a's name
    unknown = _batch(raw, keys, submitter="nobody")
    mismatched = codec.encode("TxBatchSubmitted", {
        **signed_tx_batch_record(raw, key=KEYS[ME], genesis_hash=GENESIS.hash_le,
                                 submitter=ME, idempotency_keys=keys, now_ms=1),
        "idempotency_keys": ["a", "b"]})
    empty = _batch([], [])
    too_many = codec.encode("TxBatchSubmitted", {
        "submitter": ME, "txs": [raw[0]] * (BATCH_TXS_MAX + 1),
        "idempotency_keys": ["x"] * (BATCH_TXS_MAX + 1), "submitted_at": 1,
        "signature": b"\x30"})
    good = _batch(raw, keys)
    records = [LogRecord(i, None, value, 0) for i, value in
               enumerate((forged, unknown, mismatched, empty, too_many, b"\xc3\x01junk", good))]
    outcomes = _intake(records)
    assert all(o.error is None for o in outcomes)
    by_offset: dict[int, list[tuple[str | None, str]]] = {}
    for o in outcomes:
        c = o.candidate
        assert c is not None
        by_offset.setdefault(o.offset, []).append((None if c.tx is None else c.tx.txid,
                                                   c.error_code))
    assert by_offset[0] == [(tx.txid, "envelope-signature") for tx in GOOD[:3]]
    assert by_offset[1] == [(tx.txid, "envelope-submitter-unknown") for tx in GOOD[:3]]
    assert by_offset[2] == [(None, "envelope-batch-malformed")]
    assert by_offset[3] == [(None, "envelope-batch-empty")]
    assert by_offset[4] == [(None, "envelope-batch-too-many")]
    assert by_offset[5][0][1].startswith("avro")
    assert by_offset[6] == [(tx.txid, "") for tx in GOOD[:3]]
    # the forgeries use up neither the txids nor the keys: the genuine batch commits
    txids, rejections, end = _decide(outcomes)
    assert txids == [tx.txid for tx in GOOD[:3]] and end == 7
    assert {code for _, code in rejections} == {
        "envelope-signature", "envelope-submitter-unknown", "envelope-batch-malformed",
        "envelope-batch-empty", "envelope-batch-too-many", by_offset[5][0][1]}


def test_duplicates_across_batches_and_singles_are_refused_as_today() -> None:
    raw = [tx.serialize() for tx in GOOD[:4]]
    records = [LogRecord(0, None, _batch(raw[:2], ["a", "b"]), 0),
               LogRecord(1, None, _single(raw[1], "c"), 0),  # same tx again
               LogRecord(2, None, _batch(raw[2:], ["b", "d"]), 0)]  # key b again
    txids, rejections, _ = _decide(_intake(records))
    assert txids == [GOOD[0].txid, GOOD[1].txid, GOOD[3].txid]
    assert rejections == [(GOOD[1].txid, "duplicate"),
                          (GOOD[2].txid, "duplicate-idempotency-key")]


def test_a_proposer_never_cuts_inside_a_batch() -> None:
    raw = [tx.serialize() for tx in GOOD[:12]]
    records = [LogRecord(0, None, _single(raw[0], "s0"), 0),
               LogRecord(1, None, _batch(raw[1:6], [f"k{i}" for i in range(1, 6)]), 0),
               LogRecord(2, None, _batch(raw[6:12], [f"k{i}" for i in range(6, 12)]), 0)]
    outcomes = _intake(records)
    # room for 4: the first batch does not fit behind the single record: cut before it
    txids, _, end = _decide(outcomes, block_txs_max=4)
    assert (len(txids), end) == (1, 1)
    # a batch first in the range is decided whole even over the proposer's cut (its
    # fifth tx spends the single record's change, not in this range: missing-input)
    txids, rejections, end = _decide([o for o in outcomes if o.offset >= 1], block_txs_max=3)
    assert (len(txids), end) == (4, 2)
    assert [code for _, code in rejections] == ["missing-input"]
    txids, _, end = _decide(outcomes, block_txs_max=6)
    assert (len(txids), end) == (6, 2)
    txids, _, end = _decide(outcomes, block_txs_max=100)
    assert (len(txids), end) == (12, 3)


def test_the_node_pools_every_tx_of_a_batch_at_its_offset(tmp_path: Path) -> None:
    me = INSTITUTION_IDS[0]
    settings = NodeSettings(me, GENESIS, KEYS[me], "127.0.0.1:1", tmp_path, verify_workers=1)
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    node.quarantine.load(0)
    raw = [tx.serialize() for tx in GOOD[:6]]
    records = [LogRecord(0, None, _batch(raw[:3], ["a", "b", "c"]), 0),
               LogRecord(1, None, b"garbage", 0),
               LogRecord(2, None, _batch(raw[3:], ["d", "e", "f"]), 0)]
    node._intake(records)
    node._intake(records)  # a re-read: already pooled, ignored
    assert node.pool.offsets == [0, 0, 0, 1, 2, 2, 2]
    assert node.pool.end_offset == 3
    assert len(node.pool.verified) == 6
    assert [c.tx.txid for c in node.pool.slice(2, 3)] == [tx.txid for tx in GOOD[3:6]]  # type: ignore[union-attr]
    node.pool.drop_before(2)
    assert node.pool.offsets == [2, 2, 2]
    with pytest.raises(ValueError):
        node.pool.add(Candidate(1, None), 0, same_record=True)
    node.verifier.close()


def test_worker_threads_decide_batches_exactly_as_one_thread() -> None:
    """Batches flattened onto the verifier's threads (phase 2b) give the same outcomes,
    in the same order, as checking everything in one thread."""
    raw = [tx.serialize() for tx in GOOD]
    raw[9] = raw[9][:-1] + bytes([raw[9][-1] ^ 1])  # a broken signature inside a batch
    records = [LogRecord(0, None, _batch(raw[:15], [f"k{i}" for i in range(15)]), 0),
               LogRecord(1, None, _single(raw[15], "k15"), 0),
               LogRecord(2, None, _batch(raw[16:30], [f"k{i}" for i in range(16, 30)],
                                         signer="securities-b"), 0),  # forged
               LogRecord(3, None, _batch(raw[30:], [f"k{i}" for i in range(30, 40)]), 0)]

    def summary(outcomes: list[Intake]) -> list[tuple[object, ...]]:
        return [(o.offset, o.scripts_verified, o.error,
                 None if o.candidate is None else (o.candidate.tx, o.candidate.error_code))
                for o in outcomes]

    reference = summary(_intake(records, workers=1))
    assert len(reference) == 40
    assert summary(_intake(records, workers=3)) == reference
    # batch 0: all but tx 9 (broken) and 13 (spends 9's change: prevout unknown); the
    # single record; none of the forged batch; all of the last batch
    assert sum(1 for row in reference if row[1]) == 13 + 1 + 0 + 10

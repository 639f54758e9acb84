"""Bad input against five real node processes: every kind is rejected with its own code,
recorded, and none crashes a node or stalls the chain.

One cluster for the whole module (starting five nodes costs seconds of CPU on this
machine); each test sends its own bad input and waits, with a timeout, for the
rejection records or evidence it expects, then checks a good transaction still commits
and every node is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger.block import make_block, proposer_for, sign_vote
from ledger.envelope import BATCH_TXS_MAX, sign_envelope
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.script import op_return_script
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.logio import LogWriter, read_all
from streams.kafka.records import (
    proposal_record,
    signed_tx_batch_record,
    tx_submitted_record,
    vote_record,
)
from streams.kafka.topics import PROPOSALS, REJECTED, TX, VOTES, ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.loadgen import LANE_VALUE, Lanes, sign_p2pkh_payment, sink_script

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

DECIDE_TIMEOUT_S = 60.0
POLL_S = 0.2
LANES = 13


@dataclass
class Chain:
    genesis: Genesis
    chain_dir: Path
    state_dir: Path
    prefix: str
    cluster: LocalCluster
    lanes: Lanes
    bootstrap: str

    def lane(self, index: int) -> tuple[PrivateKey, OutPoint, int]:
        """Key and genesis outpoint of lane ``index`` (each test uses its own lanes)."""
        allocation = genesis_allocation_tx(self.genesis.hash_le, self.lanes.allocations())
        return self.lanes.keys()[index], OutPoint(allocation.hash_le, index), LANE_VALUE

    def evidence(self) -> list[dict[str, Any]]:
        entries = []
        for path in (self.state_dir / "nodes" / self.genesis.chain_id).glob("*/evidence.jsonl"):
            entries.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return entries


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, stack_settings: Any) -> Iterator[Chain]:
    base = tmp_path_factory.mktemp("bad-input")
    prefix = f"bad{int(time.time() * 1000) % 10**9}."
    lanes = Lanes("bad-input", LANES)
    genesis = create_chain(base / "chain", chain_id=f"bad-input-{prefix}", lanes=lanes,
                           proposer_timeout_ms=1_500)
    asyncio.run(ensure_topics(stack_settings.kafka_bootstrap, prefix=prefix))
    cluster = LocalCluster(base / "chain", state_dir=base / "state", topic_prefix=prefix)
    cluster.start()
    try:
        yield Chain(genesis, base / "chain", base / "state", prefix, cluster, lanes,
                    stack_settings.kafka_bootstrap)
    finally:
        cluster.stop()


@contextlib.asynccontextmanager
async def _client(chain: Chain) -> AsyncIterator[LedgerClient]:
    ledger_client = LedgerClient(chain.bootstrap, chain.genesis, submitter="securities-a",
                                 topic_prefix=chain.prefix,
                                 signing_key=load_institution_key(chain.chain_dir,
                                                                  "securities-a"))
    await ledger_client.start(watch_from_start=True)
    try:
        yield ledger_client
    finally:
        await ledger_client.stop()


async def _send_raw(chain: Chain, topic: str, values: list[bytes]) -> list[int]:
    writer = LogWriter(chain.bootstrap, client_id="bad-input-test")
    await writer.start()
    try:
        return await writer.send_many(chain.prefix + topic, [(None, v) for v in values])
    finally:
        await writer.stop()


async def _rejections(chain: Chain) -> list[dict[str, Any]]:
    records = await read_all(chain.bootstrap, chain.prefix + REJECTED.name,
                             client_id="bad-input-r")
    return [codec.decode(r.value, expected="TxRejected").record for r in records]


async def _wait_rejected(chain: Chain, offsets: dict[int, str]) -> dict[int, set[str]]:
    """Wait until every tx-log offset has a rejection; the codes seen per offset."""
    deadline = time.monotonic() + DECIDE_TIMEOUT_S
    while True:
        seen: dict[int, set[str]] = {}
        for record in await _rejections(chain):
            if record["source_offset"] in offsets:
                seen.setdefault(record["source_offset"], set()).add(record["code"])
        if seen.keys() >= offsets.keys() or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(POLL_S)


async def _assert_chain_alive(chain: Chain, client: LedgerClient, lane: int) -> None:
    key, prevout, value = chain.lane(lane)
    good = sign_p2pkh_payment(key, prevout, value, sink_script(chain.lanes.seed), 5)
    await client.submit(good)
    outcome = (await client.wait([good.txid], timeout_s=DECIDE_TIMEOUT_S))[good.txid]
    assert outcome.committed, outcome
    assert all(code is None for code in chain.cluster.exit_codes().values()), (
        chain.cluster.exit_codes()
    )


def _envelope(raw_tx: bytes, key: str) -> bytes:
    return codec.encode("TxSubmitted", tx_submitted_record(
        raw_tx, submitter="securities-b", idempotency_key=key, now_ms=int(time.time() * 1000)))


async def test_undecodable_records_are_rejected_with_their_codes(chain: Chain) -> None:
    async with _client(chain) as client:
        valid = _envelope(b"\x01\x00", "x")
        unknown_fingerprint = valid[:2] + b"\xff" * 8 + valid[10:]
        offsets = await _send_raw(chain, TX.name, [
            b"not avro at all",                    # no single-object marker
            unknown_fingerprint,                   # a schema nobody knows
            valid[:-3],                            # truncated body
            _envelope(b"\x01\x00\x00\x00\x01", "truncated-tx"),  # Avro fine, tx truncated
        ])
        expected = dict(zip(offsets, ["avro-framing", "avro-unknown-schema", "avro-malformed",
                                      "truncated"], strict=True))
        seen = await _wait_rejected(chain, expected)
        for offset, code in expected.items():
            assert seen.get(offset) == {code}, (offset, seen.get(offset))
        await _assert_chain_alive(chain, client, lane=0)


async def test_invalid_transactions_are_rejected_with_specific_codes(chain: Chain) -> None:
    async with _client(chain) as client:
        sink = sink_script(chain.lanes.seed)
        key1, prevout1, value1 = chain.lane(1)
        key2, prevout2, value2 = chain.lane(2)
        key3, prevout3, value3 = chain.lane(3)
        first = sign_p2pkh_payment(key1, prevout1, value1, sink, 1)
        double_spend = sign_p2pkh_payment(key1, prevout1, value1, sink, 2)
        good = sign_p2pkh_payment(key2, prevout2, value2, sink, 1)
        signature_push = good.inputs[0].script_sig
        forged = good.with_script_sig(0, signature_push[:10] + bytes([signature_push[10] ^ 1])
                                      + signature_push[11:])
        wrong_key = sign_p2pkh_payment(key1, prevout3, value3, sink, 1)  # lane 3 signed by key 1
        unbalanced = Transaction(1, (TxIn(prevout3),), (TxOut(value3 + 1, sink),), 0)
        burn = Transaction(1, (TxIn(prevout3),), (TxOut(value3, op_return_script(b"x")),), 0)
        oversized = Transaction(1, (TxIn(prevout3),), (TxOut(0, b"\x51" * 9_000),) * 120, 0)
        unknown_input = sign_p2pkh_payment(key3, OutPoint(b"\x07" * 32, 0), value3, sink, 1)
        txs = [first, double_spend, forged, wrong_key, unbalanced, burn, oversized, unknown_input]
        offsets = await client.submit_many(txs)
        expected = {offsets[i]: txs[i].txid for i in range(1, len(txs))}
        seen = await _wait_rejected(chain, expected)
        codes = {txs[offsets.index(o)].txid: seen.get(o, set()) for o in expected}
        assert codes[double_spend.txid] == {"double-spend-in-block"}
        assert codes[forged.txid] and all(c.startswith("script-") for c in codes[forged.txid])
        assert codes[wrong_key.txid] and all(c.startswith("script-") for c in codes[wrong_key.txid])
        assert codes[unbalanced.txid] == {"value-not-conserved"}
        assert codes[burn.txid] == {"tx-value-burned"}
        assert codes[oversized.txid] == {"tx-oversized"}
        assert codes[unknown_input.txid] == {"missing-input"}
        outcome = (await client.wait([first.txid], timeout_s=DECIDE_TIMEOUT_S))[first.txid]
        assert outcome.committed
        # The same double spend once the first has committed: refused against the state.
        offset = await client.submit(sign_p2pkh_payment(key1, prevout1, value1, sink, 3))
        late = await _wait_rejected(chain, {offset: "late"})
        assert late[offset] == {"double-spend"}
        await _assert_chain_alive(chain, client, lane=4)


async def test_envelopes_not_signed_by_their_submitter_are_rejected(chain: Chain) -> None:
    """securities-b writes a record in securities-a's name (and unsigned, and for a
    non-member): each is refused with its code and the txid; the forgery does not use
    up the transaction, whose genuine submission then commits."""
    async with _client(chain) as client:
        key, prevout, value = chain.lane(7)
        payment = sign_p2pkh_payment(key, prevout, value, sink_script(chain.lanes.seed), 1)
        raw, genesis_hash = payment.serialize(), chain.genesis.hash_le
        other = load_institution_key(chain.chain_dir, "securities-b")
        now = int(time.time() * 1000)

        def record(submitter: str, signature: bytes) -> bytes:
            return codec.encode("TxSubmitted", tx_submitted_record(
                raw, submitter=submitter, idempotency_key="envelope-1", now_ms=now,
                signature=signature))

        forged = sign_envelope(other, genesis_hash, "securities-a", "envelope-1", raw)
        offsets = await _send_raw(chain, TX.name, [
            record("securities-a", forged),   # signed by securities-b, names securities-a
            record("securities-a", b""),       # unsigned
            record("mallory", forged),         # not a member
        ])
        expected = dict(zip(offsets, ["envelope-signature", "envelope-unsigned",
                                      "envelope-submitter-unknown"], strict=True))
        seen = await _wait_rejected(chain, expected)
        for offset, code in expected.items():
            assert seen.get(offset) == {code}, (offset, seen.get(offset))
        rejected = [r for r in await _rejections(chain) if r["source_offset"] in expected]
        assert all(bytes(r["txid"]) == payment.hash_le for r in rejected)
        await client.submit(payment, idempotency_key="envelope-1")  # genuine, same key
        outcome = (await client.wait([payment.txid], timeout_s=DECIDE_TIMEOUT_S))[payment.txid]
        assert outcome.committed, outcome


async def test_batches_refused_whole_or_decided_per_transaction(chain: Chain) -> None:
    """Decision 0112: a forged, malformed or oversized batch is refused as a whole
    with its envelope-* code (naming each txid it could parse) and uses up nothing;
    the genuine batch then decides each transaction on its own, in its order: the good
    ones commit, a bad script and a double spend inside it are rejected with their
    codes, and the nodes go on."""
    async with _client(chain) as client:
        sink = sink_script(chain.lanes.seed)
        (k8, o8, v8), (k9, o9, v9), (k10, o10, v10) = (chain.lane(i) for i in (8, 9, 10))
        _, o11, v11 = chain.lane(11)
        good = [sign_p2pkh_payment(k8, o8, v8, sink, 1), sign_p2pkh_payment(k9, o9, v9, sink, 1),
                sign_p2pkh_payment(k10, o10, v10, sink, 1)]
        wrong_key = sign_p2pkh_payment(k10, o11, v11, sink, 1)  # lane 10's key, lane 11's coin
        double = sign_p2pkh_payment(k8, o8, v8, sink, 2)  # lane 8's coin again
        other = load_institution_key(chain.chain_dir, "securities-b")
        now = int(time.time() * 1000)
        raw = [tx.serialize() for tx in good]
        forged = signed_tx_batch_record(raw, key=other, genesis_hash=chain.genesis.hash_le,
                                        submitter="securities-a",
                                        idempotency_keys=["b1", "b2", "b3"], now_ms=now)
        malformed = {**forged, "idempotency_keys": ["b1"]}
        oversized = {**forged, "txs": [raw[0]] * (BATCH_TXS_MAX + 1),
                     "idempotency_keys": ["x"] * (BATCH_TXS_MAX + 1)}
        offsets = await _send_raw(chain, TX.name, [
            codec.encode("TxBatchSubmitted", r) for r in (forged, malformed, oversized)])
        expected = dict(zip(offsets, ["envelope-signature", "envelope-batch-malformed",
                                      "envelope-batch-too-many"], strict=True))
        seen = await _wait_rejected(chain, expected)
        for offset, code in expected.items():
            assert seen.get(offset) == {code}, (offset, seen.get(offset))
        forged_txids = {bytes(r["txid"]) for r in await _rejections(chain)
                        if r["source_offset"] == offsets[0]}
        assert forged_txids == {tx.hash_le for tx in good}
        batch = [good[0], wrong_key, good[1], double, good[2]]
        await client.submit_batch(batch, idempotency_keys=["b1", "b2", "b3", "b4", "b5"])
        outcomes = await client.wait([tx.txid for tx in batch], timeout_s=DECIDE_TIMEOUT_S)
        assert [outcomes[tx.txid].committed for tx in batch] == [True, False, True, False, True]
        refused = outcomes[wrong_key.txid], outcomes[double.txid]
        assert (refused[0].code or "").startswith("script"), refused
        assert refused[1].code == "double-spend-in-block", refused
        heights = {outcomes[tx.txid].height for tx in good}
        assert len(heights) == 1  # one record, one block
        await _assert_chain_alive(chain, client, lane=12)


async def test_forged_votes_and_wrong_proposer_are_recorded_as_evidence(chain: Chain) -> None:
    async with _client(chain) as client:
        genesis = chain.genesis
        impostor = PrivateKey(b"\x42" * 32)
        forged = sign_vote(impostor, genesis.hash_le, voter="koscom", height=10_000, round_=0,
                           kind="ack", block_hash=b"\x11" * 32)
        unknown_member = sign_vote(impostor, genesis.hash_le, voter="mallory", height=10_000,
                                   round_=0, kind="ack", block_hash=b"\x11" * 32)
        now = int(time.time() * 1000)
        await _send_raw(chain, VOTES.name, [
            codec.encode("VoteCast", vote_record(forged, now_ms=now)),
            codec.encode("VoteCast", vote_record(unknown_member, now_ms=now)),
        ])
        # A correctly signed proposal from a member who is not the proposer of its slot.
        height = max((h for h, *_ in client.committed_blocks), default=0) + 1
        eligible = proposer_for(genesis, height, 0)
        intruder = next(m.id for m in genesis.members if m.id != eligible)
        key = load_institution_key(chain.chain_dir, intruder, genesis=genesis)
        block = make_block(key, height=height, prev_hash=b"\x00" * 32, time_ms=now,
                           proposer=intruder, round_=0, txs=[])
        await _send_raw(chain, PROPOSALS.name, [
            codec.encode("BlockProposed", proposal_record(block, now_ms=now)), b"garbage proposal"
        ])
        wanted = {"vote-forged", "vote-unknown-voter", "block-wrong-proposer", "avro-framing"}
        deadline = time.monotonic() + DECIDE_TIMEOUT_S
        while True:
            kinds = {entry["kind"] for entry in chain.evidence()}
            if wanted <= kinds or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        assert wanted <= kinds, kinds
        await _assert_chain_alive(chain, client, lane=5)


async def test_votes_at_the_edge_of_their_avro_types_are_refused_at_decode(chain: Chain) -> None:
    """The poison vote of issue 8: well-formed Avro, a real member's name, fields at the
    edge of their types. Before records.py checked ranges, the first two made every
    node exit (70) at the same offset on every restart (UnicodeEncodeError and
    struct.error while packing the vote's signed message)."""
    async with _client(chain) as client:
        now = int(time.time() * 1000)
        base = {"voter": "koscom", "height": 1_000_000, "round": 0, "kind": "nack",
                "block_hash": b"\x11" * 32, "reason_code": "x", "signature": b"\x30" * 70,
                "voted_at": now}
        poison = {
            "record-reason-code": {**base, "reason_code": "거부"},  # non-ASCII
            "record-round-range": {**base, "round": -1},  # below u32
            "record-height-range": {**base, "height": -(2**63)},
            "record-member-id": {**base, "voter": "koscom\x00"},
            "record-signature-length": {**base, "signature": b""},
        }
        at_the_top = {**base, "height": 2**63 - 1, "round": 2**31 - 1, "kind": "ack",
                      "reason_code": ""}  # in range: decodes, then fails its signature
        await _send_raw(chain, VOTES.name, [
            codec.encode("VoteCast", record) for record in (*poison.values(), at_the_top)
        ])
        wanted = {*poison, "vote-forged"}
        deadline = time.monotonic() + DECIDE_TIMEOUT_S
        while True:
            kinds = {entry["kind"] for entry in chain.evidence()}
            if wanted <= kinds or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        assert wanted <= kinds, (wanted - kinds, chain.cluster.exit_codes())
        assert "record-handling-failed" not in kinds
        await _assert_chain_alive(chain, client, lane=6)

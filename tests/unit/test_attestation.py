"""Signed committed records and the finality rule of readers without the votes log
(decision 0051): a certified *losing* block never becomes final for the client or the
chain view; the decided block does once a quorum of members signed its records."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from ledger.attestation import FinalityTally, check_commit_signature, commit_digest
from ledger.block import VOTE_ACK, Block, QuorumCertificate, make_block, sign_vote
from ledger.errors import ValidationError
from ledger.membership import INSTITUTION_IDS, Genesis
from streams.client.chain_view import ChainView
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.kafka import codec
from streams.kafka.records import (
    committed_from_record,
    committed_record,
    rejected_from_record,
    rejected_record,
    status_from_record,
    status_record,
)

pytestmark = pytest.mark.unit

TIME_MS = 1_764_000_000_000
GENESIS, KEYS = build_genesis(chain_id="attest-unit", time_ms=TIME_MS,
                              institutions=INSTITUTION_IDS,
                              entropy=seeded_entropy("attestation-unit"))
QUORUM = GENESIS.params.quorum


def _certified(height: int, prev_hash: bytes, *,
               offset_end: int) -> tuple[Block, QuorumCertificate]:
    proposer = INSTITUTION_IDS[height % len(INSTITUTION_IDS)]
    block = make_block(KEYS[proposer], height=height, prev_hash=prev_hash,
                       time_ms=TIME_MS + height, proposer=proposer, round_=0, txs=[],
                       tx_offset_start=0, tx_offset_end=offset_end)
    acks = tuple(sign_vote(KEYS[m], GENESIS.hash_le, voter=m, height=height, round_=0,
                           kind=VOTE_ACK, block_hash=block.hash)
                 for m in INSTITUTION_IDS[:QUORUM])
    return block, QuorumCertificate(height, 0, block.hash, acks)


DECIDED1, DECIDED1_QC = _certified(1, GENESIS.hash_le, offset_end=0)
LOSING1, LOSING1_QC = _certified(1, GENESIS.hash_le, offset_end=1)  # certified, not decided
DECIDED2, DECIDED2_QC = _certified(2, DECIDED1.hash, offset_end=0)


def _record(block: Block, qc: QuorumCertificate, committer: str, *,
            signed_by: str | None = "self", genesis: Genesis = GENESIS) -> dict[str, Any]:
    signer = committer if signed_by == "self" else signed_by
    return committed_record(block, qc, vote_offsets=list(range(len(qc.votes))),
                            proposal_offset=7, committer=committer, now_ms=TIME_MS,
                            key=None if signer is None else KEYS[signer],
                            genesis_hash=genesis.hash_le)


def _payload(block: Block, qc: QuorumCertificate, committer: str, **kw: Any) -> bytes:
    return codec.encode("BlockCommitted", _record(block, qc, committer, **kw))


def _checked(record: dict[str, Any]) -> None:
    decoded = codec.decode(codec.encode("BlockCommitted", record), expected="BlockCommitted")
    committed = committed_from_record(decoded.record, block_bytes_max=1_000_000)
    committed.check_signature(GENESIS, GENESIS.hash_le)


def test_a_committed_record_signed_by_its_committer_checks() -> None:
    _checked(_record(DECIDED1, DECIDED1_QC, "koscom"))


@pytest.mark.parametrize(("change", "code"), [
    ({"signature": b""}, "commit-unsigned"),
    ({"committer": "securities-b"}, "commit-signature"),  # koscom's signature, another name
    ({"committer": "outsider"}, "commit-committer-unknown"),
    ({"proposal_offset": 8}, "commit-signature"),
    ({"committed_at": TIME_MS + 1}, "commit-signature"),
])
def test_a_changed_or_unsigned_committed_record_is_refused(change: dict[str, Any],
                                                           code: str) -> None:
    record = {**_record(DECIDED1, DECIDED1_QC, "koscom"), **change}
    with pytest.raises(ValidationError) as caught:
        _checked(record)
    assert caught.value.code == code


def test_a_changed_vote_offset_breaks_the_signature() -> None:
    record = _record(DECIDED1, DECIDED1_QC, "koscom")
    votes = [dict(v) for v in record["certificate"]["votes"]]
    votes[0]["vote_offset"] += 1
    with pytest.raises(ValidationError) as caught:
        _checked({**record, "certificate": {**record["certificate"], "votes": votes}})
    assert caught.value.code == "commit-signature"


def test_the_digest_binds_the_chain() -> None:
    other = dataclasses.replace(GENESIS, chain_id="another-chain")
    fields: dict[str, Any] = dict(committer="koscom", block_hash=DECIDED1.hash, height=1,
                                  proposal_offset=7, committed_at_ms=TIME_MS, vote_offsets=[1])
    assert commit_digest(GENESIS.hash_le, **fields) != commit_digest(other.hash_le, **fields)
    signature = KEYS["koscom"].sign(commit_digest(other.hash_le, **fields))
    with pytest.raises(ValidationError):
        check_commit_signature(GENESIS, GENESIS.hash_le, signature=signature, **fields)


def test_finality_needs_a_quorum_of_distinct_committers() -> None:
    tally = FinalityTally(QUORUM)
    members = INSTITUTION_IDS[:QUORUM]
    for member in members[:-1]:
        assert not tally.add(1, DECIDED1.hash, member)
        assert not tally.add(1, DECIDED1.hash, member)  # a repeat counts once
        assert not tally.add(1, LOSING1.hash, member)  # a liar signs both: still not final
    assert tally.add(1, DECIDED1.hash, members[-1])
    assert tally.is_final(1)
    assert not tally.add(1, DECIDED1.hash, INSTITUTION_IDS[-1])  # true once per height


def _losing_then_decided(signed_losers: int) -> list[bytes]:
    """What a client reads: the losing block first, certified and signed by
    ``signed_losers`` real members (fewer than a quorum), plus one unsigned copy (a
    version-1 record) and one signed by the wrong member; then every member's copy of
    the decided block; then height 2."""
    losers = [_payload(LOSING1, LOSING1_QC, m) for m in INSTITUTION_IDS[:signed_losers]]
    losers.append(_payload(LOSING1, LOSING1_QC, INSTITUTION_IDS[-1], signed_by=None))
    losers.append(_payload(LOSING1, LOSING1_QC, INSTITUTION_IDS[-1], signed_by="koscom"))
    decided = [_payload(DECIDED1, DECIDED1_QC, m) for m in INSTITUTION_IDS]
    later = [_payload(DECIDED2, DECIDED2_QC, m) for m in INSTITUTION_IDS]
    return losers + decided[:2] + later[:1] + decided[2:] + later[1:]


def test_the_client_ignores_a_certified_losing_block() -> None:
    async def run() -> LedgerClient:
        client = LedgerClient("127.0.0.1:1", GENESIS, submitter="securities-a",
                              signing_key=KEYS["securities-a"])
        for value in _losing_then_decided(QUORUM - 1):
            try:
                client._on_block(value, TIME_MS)
            except ValidationError:
                continue
            if client.block_hash(1) is not None:
                assert client.block_hash(1) == DECIDED1.hash
        return client

    client = asyncio.run(run())
    assert client.block_hash(1) == DECIDED1.hash
    assert client.block_hash(2) == DECIDED2.hash
    assert [entry[0] for entry in client.committed_blocks] == [1, 2]


def test_the_chain_view_ignores_a_certified_losing_block() -> None:
    async def run() -> ChainView:
        view = ChainView("127.0.0.1:1", GENESIS)
        for value in _losing_then_decided(QUORUM - 1):
            try:
                view._apply(value, TIME_MS)
            except ValidationError:
                continue
            assert view.block_hashes.get(1, DECIDED1.hash) == DECIDED1.hash
        return view

    view = asyncio.run(run())
    assert view.height == 2
    assert view.block_hashes == {1: DECIDED1.hash, 2: DECIDED2.hash}


# --- rejections and heartbeats ----------------------------------------------------------

def _rejection(**change: Any) -> dict[str, Any]:
    from ledger.selection import Rejection
    rejection = Rejection(5, "11" * 32, "securities-a", "order-1", "double-spend",
                          "input 0 spent")
    record = rejected_record(rejection, stage="commit", institution="koscom",
                             source_topic="p.ledger.tx.v1", block_hash=DECIDED1.hash,
                             now_ms=TIME_MS, key=KEYS["koscom"], genesis_hash=GENESIS.hash_le)
    return {**record, **change}


def _rejection_checked(record: dict[str, Any]) -> None:
    decoded = codec.decode(codec.encode("TxRejected", record), expected="TxRejected").record
    rejected_from_record(decoded).check_signature(GENESIS, GENESIS.hash_le)


def test_a_rejection_signed_by_its_institution_checks() -> None:
    _rejection_checked(_rejection())


@pytest.mark.parametrize(("change", "code"), [
    ({"signature": b""}, "rejection-unsigned"),
    ({"institution": "securities-b"}, "rejection-signature"),
    ({"institution": "outsider"}, "rejection-writer-unknown"),
    ({"code": "missing-input"}, "rejection-signature"),
    ({"submitter": None}, "rejection-signature"),
    ({"source_offset": 6}, "rejection-signature"),
    ({"stage": "intake"}, "rejection-signature"),
])
def test_a_changed_or_unsigned_rejection_is_refused(change: dict[str, Any], code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _rejection_checked(_rejection(**change))
    assert caught.value.code == code


def test_the_client_takes_a_rejection_only_from_the_member_it_names() -> None:
    async def run() -> LedgerClient:
        client = LedgerClient("127.0.0.1:1", GENESIS, submitter="securities-a",
                              signing_key=KEYS["securities-a"])
        forged = codec.encode("TxRejected", _rejection(institution="securities-b"))
        with pytest.raises(ValidationError):
            client._on_rejection(forged, TIME_MS)
        assert client.outcome("11" * 32) is None
        client._on_rejection(codec.encode("TxRejected", _rejection()), TIME_MS)
        return client

    outcome = asyncio.run(run()).outcome("11" * 32)
    assert outcome is not None and outcome.code == "double-spend"
    assert outcome.rejected_by == "koscom"


def _status(**change: Any) -> dict[str, Any]:
    record = status_record(institution="koscom", chain_id=GENESIS.chain_id, height=3,
                           head_hash=DECIDED1.hash, state_hash=b"\x05" * 32, consumer_lag=0,
                           version="0.1.0", now_ms=TIME_MS, round_=0, pending_txs=2,
                           key=KEYS["koscom"], genesis_hash=GENESIS.hash_le)
    return {**record, **change}


def _status_checked(record: dict[str, Any]) -> None:
    decoded = codec.decode(codec.encode("NodeStatusReported", record),
                           expected="NodeStatusReported").record
    status_from_record(decoded).check_signature(GENESIS, GENESIS.hash_le)


def test_a_heartbeat_signed_by_its_node_checks() -> None:
    _status_checked(_status())


@pytest.mark.parametrize(("change", "code"), [
    ({"signature": b""}, "status-unsigned"),
    ({"institution": "securities-b"}, "status-signature"),  # reporting in another's name
    ({"height": 4}, "status-signature"),
    ({"head_hash": b"\x06" * 32}, "status-signature"),
    ({"reported_at": TIME_MS + 1}, "status-signature"),
])
def test_a_changed_or_unsigned_heartbeat_is_refused(change: dict[str, Any], code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _status_checked(_status(**change))
    assert caught.value.code == code


def test_the_status_watcher_counts_only_signed_heartbeats() -> None:
    from streams.client.status import StatusWatcher
    from streams.kafka.logio import LogRecord

    class Feed:
        def __init__(self, values: list[bytes]) -> None:
            self.values = values

        async def read(self, *, timeout_ms: int) -> list[LogRecord]:
            values, self.values = self.values, []
            return [LogRecord(n, None, v, TIME_MS) for n, v in enumerate(values)]

    async def run() -> StatusWatcher:
        watcher = StatusWatcher("127.0.0.1:1", genesis=GENESIS)
        watcher._reader = Feed([  # type: ignore[assignment]
            codec.encode("NodeStatusReported", _status(institution="securities-b")),
            codec.encode("NodeStatusReported", _status(signature=b"")),
            codec.encode("NodeStatusReported", _status()),
        ])
        await watcher.poll()
        return watcher

    watcher = asyncio.run(run())
    assert set(watcher.latest) == {"koscom"}
    assert watcher.refused == {"status-signature": 1, "status-unsigned": 1}


def test_a_reader_trusts_its_own_node_alone_and_nobody_else() -> None:
    tally = FinalityTally(QUORUM, trusted=frozenset({"securities-a"}))
    assert not tally.add(1, LOSING1.hash, "securities-b")  # another member: one of quorum
    assert tally.add(1, DECIDED1.hash, "securities-a")  # its own node: final at once
    assert not tally.add(1, LOSING1.hash, "koscom")

    async def run(trust_own_node: bool) -> LedgerClient:
        client = LedgerClient("127.0.0.1:1", GENESIS, submitter="securities-a",
                              signing_key=KEYS["securities-a"], trust_own_node=trust_own_node)
        client._on_block(_payload(DECIDED1, DECIDED1_QC, "securities-a"), TIME_MS)
        return client

    assert asyncio.run(run(True)).block_hash(1) == DECIDED1.hash
    assert asyncio.run(run(False)).block_hash(1) is None


def test_the_client_refuses_a_copy_whose_body_is_not_the_certified_one() -> None:
    """The signatures and the certificate cover the header only: a member's copy with
    the certified header and other transactions must not decide any outcome."""
    from tests.unit.test_block import fake_tx

    txs = [fake_tx(7), fake_tx(8)]
    block = make_block(KEYS["surveillance"], height=1, prev_hash=GENESIS.hash_le,
                       time_ms=TIME_MS + 1, proposer="surveillance", round_=0, txs=txs,
                       tx_offset_start=0, tx_offset_end=2)
    qc = QuorumCertificate(1, 0, block.hash, tuple(
        sign_vote(KEYS[m], GENESIS.hash_le, voter=m, height=1, round_=0, kind=VOTE_ACK,
                  block_hash=block.hash) for m in INSTITUTION_IDS[:QUORUM]))
    forged_body = Block(block.header, (fake_tx(9), txs[1]), block.proposer_signature)
    honest = [_payload(block, qc, m) for m in INSTITUTION_IDS[:QUORUM - 1]]
    forged = _payload(forged_body, qc, INSTITUTION_IDS[QUORUM - 1])
    last = _payload(block, qc, INSTITUTION_IDS[QUORUM])

    async def run() -> LedgerClient:
        client = LedgerClient("127.0.0.1:1", GENESIS, submitter="otc-operator",
                              signing_key=KEYS["otc-operator"], trust_own_node=False)
        for value in honest:
            client._on_block(value, TIME_MS)
        with pytest.raises(ValidationError) as caught:
            client._on_block(forged, TIME_MS)
        assert caught.value.code == "block-merkle"
        assert client.block_hash(1) is None and client.outcome(fake_tx(9).txid) is None
        client._on_block(last, TIME_MS)
        return client

    client = asyncio.run(run())
    assert client.block_hash(1) == block.hash
    assert {tx.txid for tx in txs} == {
        txid for txid in (tx.txid for tx in txs)
        if (outcome := client.outcome(txid)) is not None and outcome.committed}
    assert client.outcome(fake_tx(9).txid) is None

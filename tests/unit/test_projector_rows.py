"""The projector's pure part: rows from certified blocks, the first-record-per-height rule
(copies, forged copies, forks, gaps), genesis and rejection rows, the heartbeat audit.

Blocks are certified with a test genesis's own keys (``streams.tools.loadgen.certified_blocks``)
and fed to ``ChainFollower`` as the Avro records nodes write; expectations come from the
ledger core computed independently (``apply_block`` with scripts verified, the Open
Assets coloring function), never from the projector itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.address import script_to_address
from ledger.assets import AssetDefinition
from ledger.block import VOTE_ACK, Block, QuorumCertificate, Vote, make_block, sign_vote
from ledger.errors import ValidationError
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.oap import asset_id, color_outputs
from ledger.script import is_unspendable, p2pkh_script
from ledger.state import (
    LedgerRules,
    LedgerState,
    UtxoEntry,
    apply_block,
    genesis_allocation_tx,
    state_from_genesis,
)
from ledger.tx import OutPoint, Transaction
from ledger.wallet import KeyStore, Wallet
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import committed_record
from streams.projections.projector import (
    BlockRows,
    ChainFollower,
    CopyRows,
    ProjectionConflict,
    ResumeRefused,
    copy_rows_of,
    genesis_rows,
    rejection_row,
    resume_row,
    state_from_rows,
)
from streams.projections.runner import AGREES, AHEAD, DIFFERS, compare_heartbeats
from streams.tools.loadgen import (
    LANE_VALUE,
    Lanes,
    certified_blocks,
    lane_chains,
    sign_p2pkh_payment,
)

pytestmark = pytest.mark.unit

SEED = "projector-unit"
TIME_MS = 1_764_000_000_000
LANES = Lanes(SEED, 5)  # lanes 0-3 pay; lane 4 funds the issuer
FUNDING_LANE = 4
PER_LANE = 3
ISSUER_VALUE = 5_000
ISSUED = 1_000
TRANSFERRED = 400


def _key(name: str) -> PrivateKey:
    return PrivateKey(hashlib.sha256(f"{SEED}/{name}".encode()).digest())


ALICE, BOB = _key("alice"), _key("bob")
ALICE_SPK = p2pkh_script(ALICE.public_key.hash160)
BOB_SPK = p2pkh_script(BOB.public_key.hash160)
BOND = AssetDefinition("KR6000001234", "Bond A", "bond", "securities-a", "KRW",
                       maturity="2030-01-31", coupon_bp=350)


def _chain() -> tuple[Genesis, dict[str, PrivateKey]]:
    genesis, keys = build_genesis(chain_id="proj-unit", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS, entropy=seeded_entropy(SEED))
    return dataclasses.replace(genesis, allocations=LANES.allocations()), keys


GENESIS, KEYS = _chain()
ISSUER_SPK = p2pkh_script(KEYS["securities-a"].public_key.hash160)
BOND_ID = asset_id(ISSUER_SPK)
LANE_TXS = lane_chains(LANES, GENESIS.hash_le, PER_LANE)[:FUNDING_LANE]


def _asset_txs() -> tuple[Transaction, Transaction, Transaction]:
    """Lane 4 funds securities-a, which issues to Alice, who pays part of it to Bob."""
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    funding = sign_p2pkh_payment(LANES.keys()[FUNDING_LANE],
                                 OutPoint(allocation.hash_le, FUNDING_LANE), LANE_VALUE,
                                 ISSUER_SPK, ISSUER_VALUE)
    issuer_store = KeyStore().with_key(KEYS["securities-a"])
    issuer_coin = UtxoEntry(ISSUER_VALUE, ISSUER_SPK, None, 0, 1)
    issuance = (Wallet.from_utxos(issuer_store, [(OutPoint(funding.hash_le, 1), issuer_coin)])
                .issue(ISSUED, ALICE_SPK, issuer_script=ISSUER_SPK, definition=BOND)
                .add_signatures(issuer_store).finalize())
    alice_store = KeyStore().with_key(ALICE)
    coin = UtxoEntry(0, ALICE_SPK, BOND_ID, ISSUED, 1)
    transfer = (Wallet.from_utxos(alice_store, [(OutPoint(issuance.hash_le, 0), coin)])
                .pay(BOND_ID, TRANSFERRED, BOB_SPK)
                .add_signatures(alice_store).finalize())
    return funding, issuance, transfer


FUNDING, ISSUANCE, TRANSFER = _asset_txs()
# Block 1: every lane's first payment, lane 0's second (spends an output of this very
# block), the issuance and the transfer (which spends the issuance's output in-block).
BLOCK1_TXS = [chain[0] for chain in LANE_TXS] + [LANE_TXS[0][1], FUNDING, ISSUANCE, TRANSFER]
BLOCK2_TXS = [chain[1] for chain in LANE_TXS[1:]] + [chain[2] for chain in LANE_TXS]
CHAIN = certified_blocks(GENESIS, KEYS, [BLOCK1_TXS, BLOCK2_TXS], time_ms=TIME_MS)


def payload(block: Block, qc: QuorumCertificate, committer: str = "koscom") -> bytes:
    record = committed_record(block, qc, vote_offsets=[0] * len(qc.votes), proposal_offset=0,
                              committer=committer, now_ms=TIME_MS)
    return codec.encode("BlockCommitted", record)


def log_record(offset: int, block: Block, qc: QuorumCertificate,
               committer: str = "koscom") -> LogRecord:
    return LogRecord(offset, None, payload(block, qc, committer), TIME_MS)


def independent_states(blocks: Sequence[Block]) -> list[LedgerState]:
    """The ledger core's own states after each block (scripts verified), as copies."""
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    rules = LedgerRules.from_genesis(GENESIS)
    states = []
    for block in blocks:
        state = apply_block(state, block, rules, verify_scripts=True)
        states.append(state.copy())
    return states


def spent_outputs_of(tx: Transaction, outputs: dict[tuple[str, int], Any]) -> list[Any]:
    return [
        (outputs[(txin.prevout.txid, txin.prevout.index)][0],
         outputs[(txin.prevout.txid, txin.prevout.index)][1],
         outputs[(txin.prevout.txid, txin.prevout.index)][2])
        for txin in tx.inputs
    ]


# --------------------------------------------------------------------------- rows


def test_rows_of_a_block_match_its_transactions_and_the_ledger() -> None:
    follower = ChainFollower(GENESIS)
    states = independent_states([block for block, _ in CHAIN])
    projected: list[BlockRows] = []
    for offset, (block, qc) in enumerate(CHAIN):
        rows = follower.follow(log_record(offset, block, qc))
        assert rows is not None
        projected.append(rows)

    # (script, asset, quantity) of every output known so far, to color independently
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    known: dict[tuple[str, int], tuple[bytes, str | None, int]] = {
        (allocation.txid, i): (out.script_pubkey, None, 0)
        for i, out in enumerate(allocation.outputs)
    }
    for (block, qc), rows, state in zip(CHAIN, projected, states, strict=True):
        header = block.header
        b = rows.block
        assert (b.height, b.hash, b.prev_hash, b.merkle_root) == (
            header.height, block.hash_hex, display_hex(header.prev_hash),
            display_hex(header.merkle_root))
        assert (b.proposer, b.round, b.tx_count, b.size_bytes) == (
            header.proposer, header.round, len(block.txs), len(block.serialize()))
        assert b.state_hash == display_hex(state.state_hash)
        assert b.voters == qc.voters == GENESIS.member_ids[:GENESIS.params.quorum]
        assert (b.tx_offset_start, b.tx_offset_end) == (header.tx_offset_start,
                                                        header.tx_offset_end)
        assert b.source_offset == header.height - 1
        assert int(b.time_at.timestamp() * 1000) == header.time_ms

        assert [t.txid for t in rows.txs] == [tx.txid for tx in block.txs]
        assert [t.position for t in rows.txs] == list(range(len(block.txs)))
        assert all(t.raw == tx.serialize() and t.size_bytes == len(t.raw)
                   for t, tx in zip(rows.txs, block.txs, strict=True))

        expected_spends = {(txin.prevout.txid, txin.prevout.index, tx.txid)
                           for tx in block.txs for txin in tx.inputs}
        assert {(s.txid, s.index, s.spent_by_txid) for s in rows.spends} == expected_spends
        assert len(rows.spends) == len(expected_spends)

        by_output = {(o.txid, o.index): o for o in rows.outputs}
        assert len(by_output) == len(rows.outputs) == sum(len(tx.outputs) for tx in block.txs)
        for tx in block.txs:
            colors = color_outputs(tx, spent_outputs_of(tx, known))
            for index, (out, (asset, quantity)) in enumerate(
                    zip(tx.outputs, colors, strict=True)):
                row = by_output[(tx.txid, index)]
                assert (row.value, row.script_pubkey) == (out.value, out.script_pubkey)
                assert row.address == script_to_address(out.script_pubkey)
                assert (row.asset_id, row.quantity) == (
                    (asset, quantity) if asset is not None else (None, None))
                known[(tx.txid, index)] = (out.script_pubkey, asset, quantity or 0)

    issuance_row = next(t for t in projected[0].txs if t.txid == ISSUANCE.txid)
    assert (issuance_row.issued_asset_id, issuance_row.issued_quantity) == (BOND_ID, ISSUED)
    assert all(t.issued_asset_id is None and t.issued_quantity is None
               for rows in projected for t in rows.txs if t.txid != ISSUANCE.txid)
    transfer_outputs = [o for o in projected[0].outputs if o.txid == TRANSFER.txid]
    assert sorted((o.address, o.quantity) for o in transfer_outputs if o.asset_id) == sorted([
        (script_to_address(BOB_SPK), TRANSFERRED),
        (script_to_address(ALICE_SPK), ISSUED - TRANSFERRED)])
    assert follower.state.state_hash == states[-1].state_hash
    assert follower.counts == type(follower.counts)()


def unspent_from_rows(all_rows: Sequence[BlockRows]) -> dict[tuple[str, int], tuple[Any, ...]]:
    outputs = {(o.txid, o.index): o for rows in all_rows for o in rows.outputs}
    for rows in all_rows:
        for spend in rows.spends:
            del outputs[(spend.txid, spend.index)]  # KeyError: a spend of an unknown row
    return {
        key: (o.value, o.script_pubkey, o.asset_id, o.quantity or 0)
        for key, o in outputs.items()
        if not is_unspendable(o.script_pubkey)  # OP_RETURN never enters the UTXO set
    }


ALL_TXS = BLOCK1_TXS + BLOCK2_TXS


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=len(ALL_TXS)))
def test_rows_reproduce_the_utxo_set_however_txs_are_cut_into_blocks(cuts: list[int]) -> None:
    """Genesis rows plus every block's rows, minus every spend, are exactly the ledger
    state's unspent outputs (value, script, asset, quantity), for any block boundaries."""
    blocks_txs: list[list[Transaction]] = []
    position = 0
    for size in cuts:
        if position >= len(ALL_TXS):
            break
        blocks_txs.append(ALL_TXS[position:position + size])
        position += size
    if position < len(ALL_TXS):
        blocks_txs.append(ALL_TXS[position:])
    chain = certified_blocks(GENESIS, KEYS, blocks_txs, time_ms=TIME_MS)
    follower = ChainFollower(GENESIS)
    all_rows = [follower.genesis_rows()]
    for offset, (block, qc) in enumerate(chain):
        rows = follower.follow(log_record(offset, block, qc))
        assert rows is not None
        all_rows.append(rows)
    state = independent_states([block for block, _ in chain])[-1]
    expected = {
        (outpoint.txid, outpoint.index): (e.value, e.script_pubkey, e.asset_id, e.quantity)
        for outpoint, e in state.items()
    }
    assert unspent_from_rows(all_rows) == expected
    assert follower.state.state_hash == state.state_hash


def test_copy_rows_are_the_row_models_values_and_follow_only_moves_the_same_way() -> None:
    """The projector writes ``copy_rows`` (tuples); the audit and the tests read
    ``block_rows``: both hold the same values, for payments, an issuance, a transfer
    and an OP_RETURN output; ``follow_only`` (a replay) reaches the same state."""
    rows_follower, copy_follower, bare = (ChainFollower(GENESIS), ChainFollower(GENESIS),
                                          ChainFollower(GENESIS))
    all_copied: list[CopyRows] = []
    for offset, (block, qc) in enumerate(CHAIN):
        rows = rows_follower.follow(log_record(offset, block, qc))
        copied = copy_follower.follow_copy(log_record(offset, block, qc))
        assert rows is not None and copied is not None
        assert copy_rows_of(rows) == copied
        all_copied.append(copied)
        assert len(copied.outputs) == sum(len(tx.outputs) for tx in block.txs)
        assert bare.follow_only(log_record(offset, block, qc))
        assert not bare.follow_only(log_record(offset, block, qc))  # a copy: no block
    assert (bare.state.state_hash == copy_follower.state.state_hash
            == rows_follower.state.state_hash)
    assert bare.tx_offset_end == copy_follower.tx_offset_end == rows_follower.tx_offset_end
    outputs = [o for copied in all_copied for o in copied.outputs]
    assert any(o[5] is not None for o in outputs)  # colored (the issuance, the transfer)
    assert any(is_unspendable(o[3]) for o in outputs)  # the OAP marker (OP_RETURN)
    assert any(t.issued_asset_id == BOND_ID for copied in all_copied for t in copied.txs)
    assert sum(len(copied.spends) for copied in all_copied) == sum(
        len(tx.inputs) for block, _ in CHAIN for tx in block.txs)


def test_genesis_rows_hold_the_allocations() -> None:
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    rows = genesis_rows(GENESIS, state)
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    assert (rows.block.height, rows.block.hash, rows.block.state_hash) == (
        0, display_hex(GENESIS.hash_le), display_hex(state.state_hash))
    assert [t.txid for t in rows.txs] == [allocation.txid]
    assert [(o.index, o.value, o.script_pubkey, o.asset_id) for o in rows.outputs] == [
        (i, value, script, None) for i, (script, value) in enumerate(GENESIS.allocations)]
    assert rows.spends == ()
    # block 1 links to it
    assert display_hex(CHAIN[0][0].header.prev_hash) == rows.block.hash


# --------------------------------------------------------------------------- copies


def test_identical_copies_are_counted_not_projected() -> None:
    follower = ChainFollower(GENESIS)
    (block1, qc1), (block2, qc2) = CHAIN
    assert follower.follow(log_record(0, block1, qc1, "koscom")) is not None
    assert follower.follow(log_record(1, block1, qc1, "surveillance")) is None
    assert follower.follow(log_record(2, block2, qc2, "otc-operator")) is not None
    assert follower.follow(log_record(3, block1, qc1, "securities-b")) is None
    assert follower.follow(log_record(4, block2, qc2, "securities-a")) is None
    assert follower.counts.duplicates == 3
    assert follower.height == 2


def _other_block1() -> Block:
    """A different valid-looking block for height 1 (another tx set, same proposer)."""
    block1 = CHAIN[0][0]
    header = block1.header
    return make_block(KEYS[header.proposer], height=1, prev_hash=header.prev_hash,
                      time_ms=header.time_ms + 7, proposer=header.proposer, round_=0,
                      txs=BLOCK1_TXS[:2], tx_offset_start=0, tx_offset_end=2)


def certified_blocks_qc(block: Block) -> QuorumCertificate:
    """A genuine certificate for ``block`` from the last ``quorum`` members."""
    voters = GENESIS.member_ids[-GENESIS.params.quorum:]
    votes = tuple(sign_vote(KEYS[v], GENESIS.hash_le, voter=v, height=block.height, round_=0,
                            kind=VOTE_ACK, block_hash=block.hash) for v in voters)
    return QuorumCertificate(block.height, 0, block.hash, votes)


def test_a_copy_with_a_forged_certificate_is_refused_and_counted() -> None:
    follower = ChainFollower(GENESIS)
    block1, qc1 = CHAIN[0]
    other = _other_block1()
    good = certified_blocks_qc(other)
    forged_vote = dataclasses.replace(good.votes[0], signature=good.votes[1].signature)
    forged = QuorumCertificate(1, 0, other.hash, (forged_vote, *good.votes[1:]))
    # first record of height 1 forged: refused; the genuine one that follows projects
    assert follower.follow(log_record(0, other, forged)) is None
    assert follower.counts.invalid == 1 and follower.height == 0
    assert follower.follow(log_record(1, block1, qc1)) is not None
    # a forged copy of another block at the projected height: refused, not a fork
    assert follower.follow(log_record(2, other, forged)) is None
    assert follower.counts.invalid == 2
    too_few = QuorumCertificate(1, 0, other.hash, good.votes[:2])
    assert follower.follow(log_record(3, other, too_few)) is None
    assert follower.counts.invalid == 3 and follower.height == 1


def test_a_second_certified_block_at_a_height_is_a_fork() -> None:
    follower = ChainFollower(GENESIS)
    block1, qc1 = CHAIN[0]
    assert follower.follow(log_record(0, block1, qc1)) is not None
    other = _other_block1()
    with pytest.raises(ProjectionConflict) as caught:
        follower.follow(log_record(1, other, certified_blocks_qc(other)))
    assert caught.value.code == "fork"
    assert block1.hash_hex in caught.value.message and other.hash_hex in caught.value.message


def test_a_certified_block_off_the_projected_chain_is_a_conflict() -> None:
    follower = ChainFollower(GENESIS)
    other = _other_block1()
    assert follower.follow(log_record(0, other, certified_blocks_qc(other))) is not None
    block2, qc2 = CHAIN[1]  # links to CHAIN's block 1, not to ``other``
    with pytest.raises(ProjectionConflict) as caught:
        follower.follow(log_record(1, block2, qc2))
    assert caught.value.code == "block-link"


def test_a_height_ahead_is_skipped_and_undecodable_records_counted() -> None:
    follower = ChainFollower(GENESIS)
    (block1, qc1), (block2, qc2) = CHAIN
    assert follower.follow(log_record(0, block2, qc2)) is None
    assert follower.counts.ahead == 1
    assert follower.follow(LogRecord(1, None, b"\x00not avro", TIME_MS)) is None
    assert follower.counts.invalid == 1
    assert follower.follow(log_record(2, block1, qc1)) is not None
    assert follower.follow(log_record(3, block2, qc2)) is not None
    assert follower.height == 2


def test_a_certified_block_that_breaks_a_ledger_rule_stops_the_projection() -> None:
    """A quorum certified a double spend: the follower refuses to paper over it, with
    the code of the check that caught it (the projector quarantines the record)."""
    # The same tx twice is caught by the block's own structure check (duplicate txid).
    double = [LANE_TXS[0][0], LANE_TXS[0][0]]
    # Two different txs spending one output get past it: the ledger rules refuse.
    allocation = genesis_allocation_tx(GENESIS.hash_le, GENESIS.allocations)
    conflicting = sign_p2pkh_payment(LANES.keys()[1], OutPoint(allocation.hash_le, 1),
                                     LANE_VALUE, p2pkh_script(b"\x42" * 20), 1)
    spend_again = [LANE_TXS[1][0], conflicting]
    for txs, code in ((double, "block-link"), (spend_again, "block-does-not-apply")):
        chain = certified_blocks(GENESIS, KEYS, [txs], time_ms=TIME_MS)
        with pytest.raises(ProjectionConflict) as caught:
            ChainFollower(GENESIS).follow(log_record(0, *chain[0]))
        assert caught.value.code == code, caught.value.message


# --------------------------------------------------------------------------- rejections


def test_rejection_rows_show_hashes_in_display_order() -> None:
    txid = bytes(range(32))
    record = {
        "txid": txid, "stage": "commit", "code": "double-spend", "message": "x" * 3000,
        "institution": "koscom", "submitter": "securities-a", "idempotency_key": "k1",
        "block_hash": bytes(reversed(range(32))), "source_topic": "p.ledger.tx.v1",
        "source_partition": 0, "source_offset": 41, "rejected_at": TIME_MS,
    }
    row = rejection_row(7, record)
    assert row.txid == display_hex(txid) and row.block_hash == bytes(range(32)).hex()
    assert (row.log_offset, row.code, row.institution, row.source_offset) == (
        7, "double-spend", "koscom", 41)
    assert len(row.message) == 2000
    assert int(row.rejected_at.timestamp() * 1000) == TIME_MS
    unparsable = rejection_row(8, {**record, "txid": None, "submitter": None,
                                   "block_hash": None})
    assert (unparsable.txid, unparsable.submitter, unparsable.block_hash) == (None, None, None)
    for change, code in (
        ({"txid": b"short"}, "record-hash-length"),
        ({"submitter": "a\x00b"}, "record-text"),
        ({"source_offset": -2}, "record-offset-range"),  # the table's check would refuse it
        ({"source_partition": -1}, "record-offset-range"),
        ({"institution": ""}, "record-member-id"),
        ({"code": "거부"}, "record-reason-code"),
    ):
        with pytest.raises(ValidationError) as caught:
            rejection_row(9, {**record, **change})
        assert caught.value.code == code, change


# --------------------------------------------------------------------------- audit


@dataclasses.dataclass
class Beat:
    height: int
    head_hash: bytes
    state_hash: bytes


def test_compare_heartbeats() -> None:
    h1, s1 = bytes([1]) * 32, bytes([2]) * 32
    projected = {1: (display_hex(h1), display_hex(s1))}
    beats = {
        "koscom": Beat(1, h1, s1),
        "surveillance": Beat(1, h1, bytes([3]) * 32),
        "otc-operator": Beat(2, h1, s1),
    }
    verdicts = {c.institution: c.verdict
                for c in compare_heartbeats(beats, projected, projected_height=1)}
    assert verdicts == {"koscom": AGREES, "surveillance": DIFFERS, "otc-operator": AHEAD}


def test_votes_in_the_chain_are_genuine() -> None:
    """Guard for the fixtures above: the synthetic certificates check like real ones."""
    from ledger.block import check_certified_block

    for block, qc in CHAIN:
        check_certified_block(block, qc, GENESIS)
        assert all(isinstance(vote, Vote) for vote in qc.votes)


# --------------------------------------------------------------------------- resuming


def test_a_state_rebuilt_from_its_rows_hashes_as_projected_and_refuses_altered_rows() -> None:
    """What a restart loads (the unspent ``tx_output`` rows with their tx's height and
    the stored resume row) is the follower's state; a changed or lost row is refused."""
    follower = ChainFollower(GENESIS)
    projected = [follower.genesis_rows()]
    for offset, (block, qc) in enumerate(CHAIN):
        rows = follower.follow(log_record(offset, block, qc))
        assert rows is not None
        projected.append(rows)
    spent = {(s.txid, s.index) for r in projected for s in r.spends}
    heights = {t.txid: t.height for r in projected for t in r.txs}
    unspent = [(o.txid, o.index, o.value, o.script_pubkey, o.asset_id, o.quantity,
                heights[o.txid])
               for r in projected for o in r.outputs if (o.txid, o.index) not in spent]
    row = resume_row(follower.state, votes_offset=7, tx_offset_end=follower.tx_offset_end)
    assert row.bindings and row.supply == {BOND_ID: str(ISSUED)}
    state = state_from_rows(GENESIS, row, unspent)
    assert state.state_hash == follower.state.state_hash
    assert (state.height, state.head_hash) == (follower.state.height, follower.state.head_hash)
    assert state.supplies() == follower.state.supplies()
    assert list(state.items()) == list(follower.state.items())  # both in key order

    first = unspent[0]
    altered = [(*first[:2], first[2] + 1, *first[3:]), *unspent[1:]]
    for rows_given in (altered, unspent[1:]):  # a value changed; a row lost
        with pytest.raises(ResumeRefused) as refused:
            state_from_rows(GENESIS, row, rows_given)
        assert refused.value.code == "resume-state-hash"
    with pytest.raises(ResumeRefused):
        state_from_rows(GENESIS, dataclasses.replace(row, bindings={}), unspent)

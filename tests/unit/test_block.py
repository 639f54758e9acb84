"""Unit tests of ledger.block: Merkle root (mainnet vectors), headers, blocks, votes, QCs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.block import (
    BLOCK_VERSION,
    ZERO_HASH,
    Block,
    BlockHeader,
    QuorumCertificate,
    Vote,
    check_block_context_free,
    check_block_structure,
    check_certified_block,
    check_quorum_certificate,
    check_vote,
    make_block,
    merkle_root,
    parse_certified_block,
    proposer_for,
    serialize_certified_block,
    sign_vote,
)
from ledger.errors import BlockError, ConsensusError, DecodeError, QuorumError
from ledger.hashing import display_hex, hash_from_display_hex, sha256d
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, ChainParams, Genesis, Member
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

KEYS = {name: PrivateKey(hashlib.sha256(b"test-key/" + name.encode()).digest())
        for name in INSTITUTION_IDS}
OUTSIDER = PrivateKey(hashlib.sha256(b"test-key/outsider").digest())


def make_genesis(block_bytes_max: int = 2_000_000, block_txs_max: int = 10_000) -> Genesis:
    members = tuple(Member(name, name, "member", KEYS[name].public_key) for name in INSTITUTION_IDS)
    params = ChainParams(quorum=3, block_bytes_max=block_bytes_max, block_txs_max=block_txs_max)
    return Genesis("capital-ledger-test", 1_764_000_000_000, members, params)


GENESIS = make_genesis()
GENESIS_HASH = GENESIS.hash_le


def fake_tx(n: int) -> Transaction:
    prev = OutPoint(sha256d(b"prev" + n.to_bytes(8, "little")), 0)
    return Transaction(1, (TxIn(prev, b"\x51"),), (TxOut(n, b"\x51"),))


def signed_block(height: int = 1, round_: int = 0, txs: tuple[Transaction, ...] | None = None,
                 prev_hash: bytes | None = None, proposer: str | None = None) -> Block:
    proposer = proposer or proposer_for(GENESIS, height, round_)
    return make_block(
        KEYS[proposer], height=height, prev_hash=GENESIS_HASH if prev_hash is None else prev_hash,
        time_ms=1_764_000_000_500, proposer=proposer, round_=round_,
        txs=txs if txs is not None else (fake_tx(1), fake_tx(2), fake_tx(3)),
    )


# ------------------------------------------------------------------------ Merkle root

# Bitcoin mainnet block 100000 (hash 000000000003ba27aa200b1cecaad478d2b00432346c3f1f
# 3986da1afd33e506): its four txids and header Merkle root, displayed order, as any block
# explorer (or `bitcoin-cli getblock`) shows them.
BLOCK_100000_TXIDS = (
    "8c14f0db3df150123e6f3dbbf30f8b955a8249b62ac1d1ff16284aefa3d06d87",
    "fff2525b8931402dd09222c50775608f75787bd2b87e56995a7bdd30f79702c4",
    "6359f0868171b1d194cbee1af2f16ea598ae8fad666d9b012c8ed2b79a236ec4",
    "e9a66845e05d5abc0ad04ec80f774a7e585c6e8db975962d069a522137b80c1d",
)
BLOCK_100000_ROOT = "f3e94742aca4b5ef85488dc37c06c3282295ffec960994b2c0d5ac2a25a95766"


def le(text: str) -> bytes:
    return hash_from_display_hex(text)


def test_merkle_root_mainnet_block_100000() -> None:
    root = merkle_root([le(txid) for txid in BLOCK_100000_TXIDS])
    assert display_hex(root) == BLOCK_100000_ROOT


def test_merkle_root_order_matters() -> None:
    swapped = [le(BLOCK_100000_TXIDS[i]) for i in (1, 0, 2, 3)]
    assert display_hex(merkle_root(swapped)) != BLOCK_100000_ROOT


def test_merkle_root_single_and_empty() -> None:
    only = le(BLOCK_100000_TXIDS[0])
    assert merkle_root([only]) == only
    assert merkle_root([]) == ZERO_HASH


def test_merkle_root_odd_level_duplicates_last() -> None:
    a, b, c = (le(t) for t in BLOCK_100000_TXIDS[:3])
    expected = sha256d(sha256d(a + b) + sha256d(c + c))
    assert merkle_root([a, b, c]) == expected
    # Bitcoin's known ambiguity: [a, b, c] and [a, b, c, c] share a root (why
    # check_block_context_free refuses duplicate txids).
    assert merkle_root([a, b, c, c]) == expected


# -------------------------------------------------------------------- header / block


def test_header_round_trip_and_layout() -> None:
    header = BlockHeader(BLOCK_VERSION, 7, b"\x11" * 32, b"\x22" * 32, 123, "koscom", 2, 0)
    raw = header.serialize()
    assert raw[:12] == struct.pack("<IQ", 1, 7)
    assert raw[76:84] == struct.pack("<Q", 123)
    assert raw[84:91] == b"\x06koscom"
    assert BlockHeader.parse(raw) == header
    assert header.hash == sha256d(raw)
    assert header.hash_hex == display_hex(header.hash)
    with pytest.raises(DecodeError):
        BlockHeader.parse(raw + b"\x00")
    with pytest.raises(DecodeError):
        BlockHeader.parse(raw[:-1])


def test_block_round_trip_and_size() -> None:
    block = signed_block()
    raw = block.serialize()
    assert block.size_bytes == len(raw)
    parsed = Block.parse(raw)
    assert parsed == block
    assert [tx.txid for tx in parsed.txs] == [tx.txid for tx in block.txs]
    with pytest.raises(DecodeError) as trailing:
        Block.parse(raw + b"\x00")
    assert trailing.value.code == "trailing-bytes"
    with pytest.raises(DecodeError):
        Block.parse(raw[:-3])
    with pytest.raises(BlockError) as oversized:
        Block.parse(raw, block_bytes_max=len(raw) - 1)
    assert oversized.value.code == "block-oversized"


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_block_parse_never_crashes_on_junk(junk: bytes) -> None:
    with contextlib.suppress(DecodeError, BlockError):
        Block.parse(junk)


def test_block_structure_accepts_good_block() -> None:
    block = signed_block()
    check_block_structure(block, GENESIS, prev_hash=GENESIS_HASH, height=1)


def _code(block: Block, genesis: Genesis = GENESIS, *, prev_hash: bytes = GENESIS_HASH,
          height: int = 1) -> str:
    with pytest.raises(BlockError) as error:
        check_block_structure(block, genesis, prev_hash=prev_hash, height=height)
    return error.value.code


def test_block_structure_rejections() -> None:
    good = signed_block()
    assert _code(good, height=2) == "block-height"
    assert _code(good, prev_hash=b"\x01" * 32) == "block-prev-hash"
    assert _code(signed_block(txs=())) == "block-empty"
    assert _code(signed_block(txs=(fake_tx(1), fake_tx(1)))) == "block-duplicate-tx"
    assert _code(good, make_genesis(block_bytes_max=good.size_bytes - 1)) == "block-oversized"
    assert _code(good, make_genesis(block_txs_max=2)) == "block-too-many-txs"
    # Wrong proposer for (height, round), though correctly self-signed.
    wrong = next(m for m in INSTITUTION_IDS if m != proposer_for(GENESIS, 1, 0))
    assert _code(signed_block(proposer=wrong)) == "block-wrong-proposer"
    # Transactions swapped after signing: Merkle root no longer matches.
    tampered = Block(good.header, (fake_tx(9), *good.txs[1:]), good.proposer_signature)
    assert _code(tampered) == "block-merkle"
    # Header altered after signing: signature fails.
    header = good.header
    moved = BlockHeader(header.version, header.height, header.prev_hash, header.merkle_root,
                        header.time_ms + 1, header.proposer, header.round, header.shard)
    assert _code(Block(moved, good.txs, good.proposer_signature)) == "block-proposer-signature"
    # Signed by an outsider key under the eligible proposer's name.
    forged = Block(header, good.txs, OUTSIDER.sign(header.hash))
    assert _code(forged) == "block-proposer-signature"
    unknown = BlockHeader(header.version, header.height, header.prev_hash, header.merkle_root,
                          header.time_ms, "mallory", header.round, header.shard)
    assert _code(Block(unknown, good.txs, OUTSIDER.sign(unknown.hash))) == (
        "block-unknown-proposer")
    versioned = BlockHeader(2, header.height, header.prev_hash, header.merkle_root,
                            header.time_ms, header.proposer, header.round, header.shard)
    signed = Block(versioned, good.txs, KEYS[header.proposer].sign(versioned.hash))
    assert _code(signed) == "block-version"


def test_proposer_rotation() -> None:
    ids = GENESIS.member_ids
    assert [proposer_for(GENESIS, 0, r) for r in range(5)] == list(ids)
    assert proposer_for(GENESIS, 1, 0) == ids[1]
    assert proposer_for(GENESIS, 4, 3) == ids[(4 + 3) % 5]
    # Every member gets a turn within any five consecutive rounds of a height.
    assert {proposer_for(GENESIS, 9, r) for r in range(5)} == set(ids)


# ------------------------------------------------------------------------------ votes


def test_vote_sign_check_round_trip() -> None:
    block = signed_block()
    ack = sign_vote(KEYS["koscom"], GENESIS_HASH, voter="koscom", height=1, round_=0,
                    kind="ack", block_hash=block.hash)
    check_vote(ack, GENESIS)
    assert ack.ack and Vote.parse(ack.serialize()) == ack
    nack = sign_vote(KEYS["surveillance"], GENESIS_HASH, voter="surveillance", height=1,
                     round_=0, kind="nack", block_hash=block.hash, reason_code="double-spend")
    check_vote(nack, GENESIS, genesis_hash=GENESIS_HASH)
    assert not nack.ack and Vote.parse(nack.serialize()) == nack
    timeout = sign_vote(KEYS["otc-operator"], GENESIS_HASH, voter="otc-operator", height=1,
                        round_=3, kind="timeout")
    check_vote(timeout, GENESIS)
    assert timeout.is_timeout and timeout.block_hash == ZERO_HASH


def _vote_code(vote: Vote, genesis: Genesis = GENESIS) -> str:
    with pytest.raises(ConsensusError) as error:
        check_vote(vote, genesis)
    return error.value.code


def test_vote_rejections() -> None:
    block = signed_block()
    ack = sign_vote(KEYS["koscom"], GENESIS_HASH, voter="koscom", height=1, round_=0,
                    kind="ack", block_hash=block.hash)
    # Any field changed after signing breaks the signature.
    for changed in (
        dataclasses.replace(ack, height=2),
        dataclasses.replace(ack, round=1),
        dataclasses.replace(ack, block_hash=b"\x07" * 32),
        dataclasses.replace(ack, voter="securities-a"),
    ):
        assert _vote_code(changed) == "vote-forged"
    # A different chain (other genesis hash) does not accept it.
    other = Genesis("other-chain", GENESIS.time_ms, GENESIS.members, GENESIS.params)
    assert _vote_code(ack, other) == "vote-forged"
    # Signed by an outsider in a member's name; a non-member voter.
    forged = sign_vote(OUTSIDER, GENESIS_HASH, voter="koscom", height=1, round_=0,
                       kind="ack", block_hash=block.hash)
    assert _vote_code(forged) == "vote-forged"
    stranger = sign_vote(OUTSIDER, GENESIS_HASH, voter="mallory", height=1, round_=0,
                         kind="ack", block_hash=block.hash)
    assert _vote_code(stranger) == "vote-unknown-voter"
    # Kind flipped ack -> nack without a reason: malformed; ack -> timeout with a hash.
    assert _vote_code(dataclasses.replace(ack, kind="nack")) == "vote-malformed"
    assert _vote_code(dataclasses.replace(ack, kind="timeout")) == "vote-malformed"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_vote_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    vote = sign_vote(KEYS["koscom"], GENESIS_HASH, voter="koscom", height=5, round_=1,
                     kind="nack", block_hash=b"\x33" * 32, reason_code="block-merkle")
    raw = bytearray(vote.serialize())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        mutated = Vote.parse(bytes(raw))
    except DecodeError:
        return
    with pytest.raises(ConsensusError):
        check_vote(mutated, GENESIS)


# ------------------------------------------------------------------- quorum certificate


def acks(block: Block, voters: tuple[str, ...]) -> tuple[Vote, ...]:
    return tuple(
        sign_vote(KEYS[v], GENESIS_HASH, voter=v, height=block.height, round_=block.header.round,
                  kind="ack", block_hash=block.hash)
        for v in voters
    )


def test_quorum_certificate_valid_and_round_trip() -> None:
    block = signed_block()
    qc = QuorumCertificate(1, 0, block.hash, acks(block, INSTITUTION_IDS[:3]))
    check_quorum_certificate(qc, GENESIS, block.hash)
    check_certified_block(block, qc, GENESIS)
    assert QuorumCertificate.parse(qc.serialize()) == qc
    raw = serialize_certified_block(block, qc)
    assert parse_certified_block(raw) == (block, qc)


def _qc_code(qc: QuorumCertificate, block_hash: bytes) -> str:
    with pytest.raises(QuorumError) as error:
        check_quorum_certificate(qc, GENESIS, block_hash)
    return error.value.code


def test_quorum_certificate_rejections() -> None:
    block = signed_block()
    other = signed_block(txs=(fake_tx(7),))
    three = acks(block, INSTITUTION_IDS[:3])
    assert _qc_code(QuorumCertificate(1, 0, block.hash, three[:2]), block.hash) == (
        "qc-too-few-votes")
    assert _qc_code(QuorumCertificate(1, 0, block.hash, three), other.hash) == "qc-wrong-block"
    doubled = (*three[:2], three[0])
    assert _qc_code(QuorumCertificate(1, 0, block.hash, doubled), block.hash) == (
        "qc-duplicate-voter")
    mixed = (*three[:2], acks(other, INSTITUTION_IDS[3:4])[0])
    assert _qc_code(QuorumCertificate(1, 0, block.hash, mixed), block.hash) == (
        "qc-vote-mismatch")
    nack = sign_vote(KEYS["securities-b"], GENESIS_HASH, voter="securities-b", height=1,
                     round_=0, kind="nack", block_hash=block.hash, reason_code="double-spend")
    assert _qc_code(QuorumCertificate(1, 0, block.hash, (*three[:2], nack)), block.hash) == (
        "qc-vote-mismatch")
    forged = sign_vote(OUTSIDER, GENESIS_HASH, voter="securities-b", height=1, round_=0,
                       kind="ack", block_hash=block.hash)
    assert _qc_code(QuorumCertificate(1, 0, block.hash, (*three[:2], forged)), block.hash) == (
        "qc-vote-invalid")
    # A QC attached to a block of another round does not certify it.
    with pytest.raises(QuorumError):
        check_certified_block(block, QuorumCertificate(1, 1, block.hash, three), GENESIS)


def test_context_free_check_is_part_of_structure() -> None:
    check_block_context_free(signed_block(height=3, prev_hash=b"\x05" * 32), GENESIS)


def test_size_bytes_is_the_serialized_length() -> None:
    key = PrivateKey(b"\x05" * 32)
    txs = [Transaction(1, (TxIn(OutPoint(bytes([i]) * 32, i), b"\x51" * i),),
                       (TxOut(i, b"\x52" * (300 * i)),)) for i in range(1, 4)]
    block = make_block(key, height=3, prev_hash=b"\x01" * 32, time_ms=9, proposer="koscom",
                       round_=1, txs=txs, tx_offset_start=4, tx_offset_end=9)
    assert block.size_bytes == len(block.serialize())

"""The per-transaction cuts of decision 0113 give exactly what the plain code gives.

Each cut has its plain counterpart kept in the code (or written here), and these tests
hold them to the same bytes, verdicts and error codes: the txid hashed once by the
parser, the single-input SIGHASH_ALL message, the state hash's per-entry encoding,
the structure checks of ``check_tx`` in one pass, and the memo of a block's
context-free checks.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import struct

import pytest

from ledger.block import Block, check_block_context_free, merkle_root
from ledger.errors import BlockError, TxError
from ledger.hashing import sha256d
from ledger.membership import INSTITUTION_IDS
from ledger.serialization import ByteReader
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.state import (
    _ACCUMULATOR_BYTES,
    _NO_ASSETS,
    LedgerRules,
    UtxoEntry,
    _created_entries,
    _entry_element,
    _plain_created_entries,
    apply_block,
    check_tx,
    entry_bytes,
    genesis_allocation_tx,
    state_from_genesis,
)
from ledger.tx import COINBASE_INDEX, NULL_TXID, OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.projections.audit import older_objects_frozen
from streams.tools.loadgen import Lanes, certified_blocks, lane_chains

pytestmark = pytest.mark.unit

TIME_MS = 1_764_000_000_000
P2PKH = bytes.fromhex("76a914") + b"\x22" * 20 + bytes.fromhex("88ac")
KEY = b"\x33" * 32 + b"\x01\x00\x00\x00"


def _plain_element(key: bytes, entry: UtxoEntry) -> int:
    """The accumulator element as decision 0012 defines it, written out."""
    digest = hashlib.shake_256(b"utxo\x00" + entry_bytes(key, entry)).digest(_ACCUMULATOR_BYTES)
    return int.from_bytes(digest, "little")


@pytest.mark.parametrize("entry", [
    UtxoEntry(1000, P2PKH, None, 0, 1),
    UtxoEntry(0, b"", None, 0, 0),
    UtxoEntry(2**62, b"\x51" * 0xFC, None, 0, 2**40),   # the longest one-byte length
    UtxoEntry(5, b"\x51" * 0xFD, None, 0, 3),           # a three-byte length: plain path
    UtxoEntry(5, P2PKH, "AXYZ", 70, 3),                 # colored: plain path
    UtxoEntry(5, P2PKH, None, 9, 3),                    # a quantity without an asset
])
def test_entry_element_equals_the_plain_encoding(entry: UtxoEntry) -> None:
    assert _entry_element(KEY, entry) == _plain_element(KEY, entry)
    short_key = KEY[:35]  # never a real outpoint key, but never silently padded either
    assert _entry_element(short_key, entry) == _plain_element(short_key, entry)


def _genesis_and_blocks(count: int) -> tuple[object, list[Block]]:
    genesis, keys = build_genesis(chain_id="corecost", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("corecost"))
    lanes = Lanes("corecost", count)
    genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
    txs = [chain[0] for chain in lane_chains(lanes, genesis.hash_le, 1)]
    ((block, _),) = certified_blocks(genesis, keys, [txs], time_ms=TIME_MS)
    return genesis, [block]


def test_parsed_txids_are_hashed_from_the_exact_bytes_read() -> None:
    _, (block,) = _genesis_and_blocks(3)
    raw = block.serialize()
    parsed = Block.parse(raw)
    assert parsed == block and parsed.serialize() == raw
    for tx in parsed.txs:
        raw_tx = tx.serialize()
        assert tx.hash_le == sha256d(raw_tx)
        again = Transaction.parse(raw_tx)
        assert again.hash_le == tx.hash_le
        assert again.serialize() == raw_tx
        # a transaction read at an offset of a larger buffer keeps only its own bytes
        reader = ByteReader(b"\x00" * 7 + raw_tx + b"\xff" * 5)
        reader.read(7)
        read = Transaction.read(reader)
        assert read.serialize() == raw_tx and read.hash_le == sha256d(raw_tx)
        assert reader.remaining == 5
    assert merkle_root([tx.hash_le for tx in parsed.txs]) == block.header.merkle_root


def _one_input_tx(script_sig: bytes) -> Transaction:
    return Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 3), script_sig, 0xFFFFFFFE),),
                       (TxOut(700, P2PKH), TxOut(300, b"\x51")), lock_time=11)


@pytest.mark.parametrize("script_sig", [b"", b"\x51" * 5, b"\x52" * 0xFC, b"\x53" * 0x1FF])
@pytest.mark.parametrize("script_code", [P2PKH, b"", b"\x51\xab\x52", b"\x51" * 300])
@pytest.mark.parametrize("hash_type", [SIGHASH_ALL, 0x41, 0x04, 0xFFFFFF01])
def test_single_input_sighash_equals_the_segmented_message(
        script_sig: bytes, script_code: bytes, hash_type: int) -> None:
    built = _one_input_tx(script_sig)  # no recorded script spans: the general builder
    raw = built.serialize()
    parsed = Transaction.parse(raw)  # spans recorded: the one-input shortcut
    reader = ByteReader(b"\x09" * 13 + raw)
    reader.read(13)
    in_buffer = Transaction.read(reader)  # spans relative to the transaction's start
    expected = legacy_sighash(built, 0, script_code, hash_type)
    assert legacy_sighash(parsed, 0, script_code, hash_type) == expected
    assert legacy_sighash(in_buffer, 0, script_code, hash_type) == expected
    # the message by hand: the scriptSig replaced by the script code, OP_CODESEPARATOR
    # (0xab) removed outside pushes, the hash type as four bytes
    blank = Transaction(1, (TxIn(built.inputs[0].prevout,
                                 script_code.replace(b"\xab", b""), 0xFFFFFFFE),),
                        built.outputs, 11)
    assert expected == sha256d(blank.serialize() + struct.pack("<I", hash_type & 0xFFFFFFFF))


def _state_and_rules() -> tuple[object, LedgerRules, Transaction]:
    funding = TxOut(1000, P2PKH)
    state = state_from_genesis(b"\x07" * 32, [(funding.script_pubkey, funding.value)])
    funded = next(iter(state.items()))[0]  # the allocation's outpoint
    spend = Transaction(1, (TxIn(funded),),
                        (TxOut(600, P2PKH), TxOut(400, b"\x51")))
    genesis, _ = build_genesis(chain_id="corecost", time_ms=TIME_MS,
                               institutions=INSTITUTION_IDS, entropy=seeded_entropy("corecost"))
    return state, LedgerRules.from_genesis(genesis), spend


def test_plain_created_entries_equal_the_general_ones() -> None:
    _, _, spend = _state_and_rules()
    assert _plain_created_entries(spend, height=9) == _created_entries(spend, _NO_ASSETS,
                                                                       height=9)


@pytest.mark.parametrize(("inputs", "outputs", "code"), [
    # a coinbase-shaped input anywhere, alone or not
    ((TxIn(OutPoint(NULL_TXID, COINBASE_INDEX)),), (TxOut(1, P2PKH),), "tx-coinbase"),
    ((TxIn(OutPoint(b"\x01" * 32, 0)), TxIn(OutPoint(NULL_TXID, COINBASE_INDEX))),
     (TxOut(1, P2PKH),), "tx-coinbase"),
    ((TxIn(OutPoint(b"\x01" * 32, 0)),), (), "tx-no-outputs"),
    ((TxIn(OutPoint(b"\x01" * 32, 0)),), (TxOut(-1, P2PKH),), "tx-value-range"),
    ((TxIn(OutPoint(b"\x01" * 32, 0)),), (TxOut(5, b"\x6a\x01\x00"),), "tx-value-burned"),
    ((TxIn(OutPoint(b"\x01" * 32, 0)),),
     (TxOut(2 * 10**15, P2PKH), TxOut(2 * 10**15, P2PKH)), "tx-value-range"),
])
def test_structure_checks_in_one_pass_keep_their_codes(
        inputs: tuple[TxIn, ...], outputs: tuple[TxOut, ...], code: str) -> None:
    state, rules, _ = _state_and_rules()
    with pytest.raises(TxError) as raised:
        check_tx(state, Transaction(1, inputs, outputs), rules, verify_scripts=False)
    assert raised.value.code == code


def test_a_zero_value_marker_still_takes_the_asset_path() -> None:
    state, rules, spend = _state_and_rules()
    plain = check_tx(state, spend, rules, verify_scripts=False)
    assert [entry.value for _, entry in plain.created] == [600, 400]
    marked = Transaction(1, spend.inputs, (*spend.outputs, TxOut(0, b"\x6a\x00")))
    effects = check_tx(state, marked, rules, verify_scripts=False)
    # the unspendable output (index 2) never enters the set; the others keep their index
    assert [key[32:] for key, _ in effects.created] == [b"\x00\x00\x00\x00",
                                                         b"\x01\x00\x00\x00"]
    assert [key[:32] for key, _ in effects.created] == [marked.hash_le] * 2


def test_context_free_memo_is_per_membership_object() -> None:
    genesis, (block,) = _genesis_and_blocks(2)
    check_block_context_free(block, genesis)
    check_block_context_free(block, genesis)  # memo: same block, same membership
    others = tuple(m for m in genesis.members if m.id != block.header.proposer)
    stranger = dataclasses.replace(genesis, members=others)
    with pytest.raises(BlockError) as raised:
        check_block_context_free(block, stranger)
    assert raised.value.code in ("block-unknown-proposer", "block-wrong-proposer")
    tampered = Block(block.header, block.txs[:1], block.proposer_signature)
    with pytest.raises(BlockError) as raised:
        check_block_context_free(tampered, genesis)
    assert raised.value.code == "block-merkle"


def test_holds_output_of_equals_the_per_key_lookups() -> None:
    genesis, (block,) = _genesis_and_blocks(3)
    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    allocation = genesis_allocation_tx(genesis.hash_le, genesis.allocations)
    after = apply_block(state, block, LedgerRules.from_genesis(genesis), verify_scripts=True)
    for txid_le, count in [(allocation.hash_le, len(allocation.outputs)),
                           *((tx.hash_le, len(tx.outputs)) for tx in block.txs),
                           (b"\x42" * 32, 4), (allocation.hash_le, 0)]:
        plain = any(after.get_key(txid_le + struct.pack("<I", i)) is not None
                    or after.was_recently_spent(txid_le + struct.pack("<I", i))
                    for i in range(count))
        assert after.holds_output_of(txid_le, count) == plain
    assert after.holds_output_of(block.txs[0].hash_le, len(block.txs[0].outputs))
    assert not after.holds_output_of(b"\x42" * 32, 4)


def test_the_audit_freezes_older_objects_only_while_it_runs() -> None:
    before = gc.get_freeze_count()
    with older_objects_frozen():
        assert gc.get_freeze_count() > 0
        made_during = [object()]
        assert gc.is_tracked(made_during)  # the replay's own objects stay collectable
    assert gc.get_freeze_count() == 0 <= before

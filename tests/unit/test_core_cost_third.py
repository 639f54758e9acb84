"""The per-block and per-transaction cuts of decision 0121 give exactly what the plain
code gives.

Each cut is held to its plain form: the state's cache of recent outputs' accumulator
elements against the accumulator recomputed from scratch (hits, misses, an entry equal
but not the same object, eviction at its bound, a copy); a block's transactions taken
from the pool in log order against ``Block.parse`` (skipped, reordered and repeated
transactions, outsiders); the cached asset ids and markers against their plain
computation; the consensus state's copy through its slots against
``dataclasses.replace``; the one-input spend against the duplicate-input rule it skips.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import consensus, oap
from ledger.base58 import b58check_encode
from ledger.block import Block, make_block, parse_block_reusing
from ledger.errors import DoubleSpendError, MissingInputError, ValidationError
from ledger.governance import GOVERNANCE_TX_VERSION
from ledger.hashing import hash160, sha256d
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.script import OP_RETURN, is_unspendable, p2pkh_script
from ledger.serialization import ByteReader
from ledger.state import (
    VALUE_MAX,
    BlockDelta,
    BlockOverlay,
    LedgerRules,
    LedgerState,
    TxEffects,
    UtxoEntry,
    _entry_element,
    apply_block,
    apply_delta,
    check_tx,
    outpoint_key,
    plain_payment_effects,
    state_from_genesis,
    validate_block,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.tools.loadgen import Lanes, certified_blocks, lane_chains

pytestmark = pytest.mark.unit

TIME_MS = 1_700_000_000_000
KEY = PrivateKey(hashlib.sha256(b"test-key/third").digest())


def _chain(lanes: int, blocks: int) -> tuple[Genesis, list[Block]]:
    """A genesis and ``blocks`` certified blocks of ``lanes`` chained payments each:
    block h + 1 spends the change block h created."""
    genesis, keys = build_genesis(chain_id="corethird", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("corethird"))
    lane_set = Lanes("corethird", lanes)
    genesis = dataclasses.replace(genesis, allocations=lane_set.allocations())
    chains = lane_chains(lane_set, genesis.hash_le, blocks)
    per_block = [[chain[height] for chain in chains] for height in range(blocks)]
    certified = certified_blocks(genesis, keys, per_block, time_ms=TIME_MS)
    return genesis, [block for block, _ in certified]


def _replay(genesis: Genesis, blocks: list[Block]) -> Iterator[tuple[BlockDelta, LedgerState]]:
    """Each block's delta and the state after it (live until the next step: applying
    moves a state), checked against the accumulator recomputed from scratch."""
    rules = LedgerRules.from_genesis(genesis)
    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    for block in blocks:
        delta = validate_block(state, block, rules)
        state = apply_delta(state, delta)
        assert state.accumulator == state.recompute_accumulator()
        yield delta, state


def test_the_element_cache_gives_the_accumulator_from_scratch() -> None:
    genesis, blocks = _chain(6, 4)
    spent_before: tuple[tuple[bytes, UtxoEntry], ...] = ()
    for delta, state in _replay(genesis, blocks):
        assert delta.created_elements == tuple(
            _entry_element(key, entry) for key, entry in delta.created)
        # every cached element is its entry's, and held for an entry still unspent
        for key, (entry, element) in state._elements.items():
            assert state.get_key(key) is entry
            assert element == _entry_element(key, entry)
        # what block h spent (block h - 1's change) left the cache with it
        assert delta.spent and all(key not in state._elements for key, _ in delta.spent)
        spent_before += delta.spent
    assert len(spent_before) == 4 * 6


def test_a_cached_element_is_used_only_for_the_very_entry_object() -> None:
    genesis, blocks = _chain(4, 2)
    rules = LedgerRules.from_genesis(genesis)
    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    state = apply_delta(state, validate_block(state, blocks[0], rules))
    # An equal but distinct entry object under the key, with a wrong element: the
    # cache must not be trusted for it (nor for a key it does not hold).
    for key in list(state._elements):
        entry, _ = state._elements[key]
        state._elements[key] = (UtxoEntry(*entry), 12345)
    after = apply_delta(state, validate_block(state, blocks[1], rules))
    assert after.accumulator == after.recompute_accumulator()


def test_a_poisoned_element_for_the_same_object_would_show() -> None:
    """The cache is really read (so the tests above test something): a wrong element
    stored for the very entry object changes the accumulator."""
    genesis, blocks = _chain(2, 2)
    rules = LedgerRules.from_genesis(genesis)
    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    state = apply_delta(state, validate_block(state, blocks[0], rules))
    spent_key = outpoint_key(blocks[1].txs[0].inputs[0].prevout)
    entry, element = state._elements[spent_key]
    state._elements[spent_key] = (entry, element + 1)
    after = apply_delta(state, validate_block(state, blocks[1], rules))
    assert after.accumulator != after.recompute_accumulator()


def test_the_element_cache_is_bounded_and_keeps_the_newest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ledger.state.ELEMENT_CACHE_ENTRIES_MAX", 8)
    genesis, blocks = _chain(5, 3)  # 10 outputs per block: over the bound each time
    for delta, state in _replay(genesis, blocks):
        assert len(state._elements) <= 8
        newest = delta.created[-1][0]
        assert newest in state._elements


def test_a_copy_has_its_own_cache_and_deltas_compare_without_elements() -> None:
    genesis, blocks = _chain(3, 1)
    ((delta, state),) = list(_replay(genesis, blocks))
    copy = state.copy()
    assert copy._elements == state._elements and copy._elements is not state._elements
    assert dataclasses.replace(delta, created_elements=()) == delta
    assert "created_elements" not in repr(delta)
    # a state built without the cache (a snapshot, another process) gives the same hash
    rules = LedgerRules.from_genesis(genesis)
    plain = state_from_genesis(genesis.hash_le, genesis.allocations)
    assert apply_block(plain, blocks[0], rules).state_hash == state.state_hash


# -- a block's transactions taken from the pool in log order


def _tx(n: int) -> Transaction:
    prev = OutPoint(sha256d(b"third" + n.to_bytes(8, "little")), n % 3)
    return Transaction.parse(Transaction(1, (TxIn(prev, b"\x51" * (1 + n % 4)),),
                                         (TxOut(n, b"\x51"),)).serialize())


POOL = [_tx(n) for n in range(12)]


def _block(txs: tuple[Transaction, ...]) -> Block:
    return make_block(KEY, height=1, prev_hash=bytes(32), time_ms=1, proposer="x",
                      round_=0, txs=txs, tx_offset_start=0, tx_offset_end=12)


@pytest.mark.parametrize("picks", [
    (0, 1, 2, 3), (0, 2, 5, 11), (11, 0), (3, 3, 4), (1, 0, 2), (), (5,), (0, 11, 1, 10),
    tuple(range(12)),
])
def test_pool_transactions_in_any_order_parse_as_block_parse(picks: tuple[int, ...]) -> None:
    raw = _block(tuple(POOL[i] for i in picks)).serialize()
    got = parse_block_reusing(raw, lambda header: POOL)
    assert got == Block.parse(raw) and got.serialize() == raw
    assert all(tx is POOL[i] for tx, i in zip(got.txs, picks, strict=True))


def test_outsiders_between_pool_transactions_are_read_where_they_stand() -> None:
    outsiders = [_tx(100 + n) for n in range(2)]
    txs = (POOL[0], outsiders[0], POOL[1], POOL[4], outsiders[1], POOL[5])
    raw = _block(txs).serialize()
    got = parse_block_reusing(raw, lambda header: POOL)
    assert got == Block.parse(raw)
    assert got.txs[0] is POOL[0] and got.txs[2] is POOL[1] and got.txs[5] is POOL[5]
    assert got.txs[1] is not outsiders[0] and got.txs[1] == outsiders[0]


def test_a_pool_copy_with_other_bytes_in_front_is_not_taken() -> None:
    """A pool transaction is taken only where the block holds its exact bytes: a
    transaction that spends the same outpoint (same first bytes) is told apart."""
    twin = Transaction.parse(Transaction(1, POOL[2].inputs, (TxOut(7, b"\x52"),)).serialize())
    raw = _block((POOL[1], twin, POOL[3])).serialize()
    got = parse_block_reusing(raw, lambda header: POOL)
    assert got == Block.parse(raw)
    assert got.txs[1] is not POOL[2] and got.txs[1] == twin


def test_skip_moves_like_read_and_refuses_what_read_refuses() -> None:
    reader = ByteReader(b"abcdef", "thing")
    reader.skip(2)
    assert reader.position == 2 and reader.read(1) == b"c"
    with pytest.raises(Exception) as skipped:
        reader.skip(4)
    with pytest.raises(Exception) as read:
        ByteReader(b"abcdef", "thing").read(7)
    assert type(skipped.value) is type(read.value)
    assert getattr(skipped.value, "code", None) == getattr(read.value, "code", None) == "truncated"


# -- cached asset ids and markers


@pytest.mark.parametrize("version", [oap.ASSET_ID_VERSION, 115])
def test_cached_asset_ids_equal_the_plain_encoding(version: int) -> None:
    for n in range(20):
        script = p2pkh_script(hash160(n.to_bytes(2, "big")))
        plain = b58check_encode(bytes([version]) + hash160(script))
        assert oap.asset_id(script, version) == plain
        assert oap.asset_id(bytearray(script), version) == plain  # any bytes-like


def test_cached_markers_equal_the_plain_parse() -> None:
    plain = oap._parsed_marker.__wrapped__
    scripts = [oap.build_marker([1, 2, 300]), oap.build_marker([], b"meta"),
               oap.build_marker([0]), b"\x6a", b"\x6a\x04OA\x01\x00", b"\x51",
               oap.build_marker([5])[:-1], bytes([OP_RETURN, 2]) + b"OA"]
    for script in scripts + scripts:  # the second round hits the cache
        assert oap.parse_marker(script) == plain(script)
        assert oap.parse_marker(bytearray(script)) == plain(script)
        assert is_unspendable(script) == (script[:1] == bytes([OP_RETURN]))


# -- the consensus state's copy


def test_the_consensus_state_copy_equals_dataclasses_replace() -> None:
    genesis, _ = build_genesis(chain_id="corethird", time_ms=TIME_MS,
                               institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("corethird"))
    state = consensus.initial_state(
        consensus.ConsensusConfig(genesis, INSTITUTION_IDS[0], genesis.hash_le), now_ms=5)
    work = consensus._Work(state)
    for changes in ({}, {"now_ms": 9}, {"oldest_pending_ms": None, "pending_tx_count": 4},
                    {"my_voted": True, "timer_armed_ms": 77, "proposal_seen_ms": None}):
        before = work.state
        work.set(**changes)
        assert work.state == dataclasses.replace(before, **changes)
        assert work.state is not before


# -- one-input spends skip the duplicate set; several inputs keep the rule


def test_input_rules_keep_their_codes_with_one_and_several_inputs() -> None:
    script = p2pkh_script(b"\x11" * 20)
    state = state_from_genesis(b"\x05" * 32, [(script, 500), (script, 700)])
    outpoints = [outpoint for outpoint, _ in state.items()]
    genesis, _ = build_genesis(chain_id="corethird", time_ms=TIME_MS,
                               institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("corethird"))
    rules = LedgerRules.from_genesis(genesis)

    def spend(*inputs: OutPoint, value: int) -> Transaction:
        return Transaction(1, tuple(TxIn(o) for o in inputs), (TxOut(value, script),))

    twice = spend(outpoints[0], outpoints[0], value=1000)
    with pytest.raises(DoubleSpendError) as error:
        check_tx(state, twice, rules, verify_scripts=False)
    assert error.value.code == "duplicate-input"
    missing = spend(OutPoint(b"\x09" * 32, 0), value=1)
    with pytest.raises(MissingInputError) as missing_error:
        check_tx(state, missing, rules, verify_scripts=False)
    assert missing_error.value.code == "missing-input"
    one = spend(outpoints[0], value=state.get(outpoints[0]).value)  # type: ignore[union-attr]
    effects = check_tx(state, one, rules, verify_scripts=False)
    with pytest.raises(DoubleSpendError) as in_block:
        check_tx(state, one, rules, verify_scripts=False,
                 spent_in_block={key for key, _ in effects.spent})
    assert in_block.value.code == "double-spend-in-block"


# -- plain payments in one pass: the same verdicts and effects as check_tx


_SCRIPT = p2pkh_script(b"\x33" * 20)
_FUNDED = [OutPoint(sha256d(b"funded" + bytes([n])), n) for n in range(4)]
_IN_BLOCK = OutPoint(sha256d(b"in-block"), 1)
_SPENT_IN_BLOCK = OutPoint(sha256d(b"spent-in-block"), 0)
_OUTPOINTS = [*_FUNDED, _IN_BLOCK, _SPENT_IN_BLOCK, OutPoint(sha256d(b"missing"), 0),
              OutPoint(bytes(32), 0xFFFFFFFF)]
_OUTPUT_SCRIPTS = [_SCRIPT, b"\x51", bytes([OP_RETURN]) + b"\x01\x02", b""]


def _plain_world() -> tuple[LedgerState, BlockOverlay, LedgerRules]:
    """A state with four funded outputs (the last one colored), one output created and
    one spent earlier in the block (the overlay)."""
    utxos = {outpoint_key(o): UtxoEntry(1000 * (n + 1), _SCRIPT, None, 0, 1)
             for n, o in enumerate(_FUNDED)}
    utxos[outpoint_key(_FUNDED[3])] = UtxoEntry(4000, _SCRIPT, "Aasset", 5, 1)
    utxos[outpoint_key(_SPENT_IN_BLOCK)] = UtxoEntry(50, _SCRIPT, None, 0, 1)
    state = LedgerState(height=1, head_hash=bytes(32), utxos=utxos, bindings={}, supply={},
                        accumulator=0, native_total=0, script_index=None, spent_recent={},
                        spent_journal=deque())
    overlay = BlockOverlay()
    overlay.created[outpoint_key(_IN_BLOCK)] = UtxoEntry(500, _SCRIPT, None, 0, 2)
    overlay.spent.add(outpoint_key(_SPENT_IN_BLOCK))
    genesis, _ = build_genesis(chain_id="corethird", time_ms=TIME_MS,
                               institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("corethird"))
    return state, overlay, LedgerRules.from_genesis(genesis)


_WORLD = _plain_world()


@settings(max_examples=600, deadline=None)
@given(inputs=st.lists(st.integers(0, len(_OUTPOINTS) - 1), min_size=1, max_size=3),
       outputs=st.lists(st.tuples(st.sampled_from([0, 1, 250, 500, 1000, 1500, 2000, 3000,
                                                   -1, VALUE_MAX, VALUE_MAX + 1]),
                                  st.integers(0, len(_OUTPUT_SCRIPTS) - 1)), max_size=3),
       version=st.sampled_from([1, 2, GOVERNANCE_TX_VERSION]), scripts_checked=st.booleans())
def test_plain_payments_in_one_pass_equal_check_tx(
        inputs: list[int], outputs: list[tuple[int, int]], version: int,
        scripts_checked: bool) -> None:
    state, overlay, rules = _WORLD
    tx = Transaction.parse(Transaction(
        version, tuple(TxIn(_OUTPOINTS[i], b"\x51") for i in inputs),
        tuple(TxOut(value, _OUTPUT_SCRIPTS[s]) for value, s in outputs)).serialize())
    fast = plain_payment_effects(state, tx, overlay, scripts_checked=scripts_checked)
    try:
        general: TxEffects | ValidationError = check_tx(
            state, tx, rules, overlay=overlay, script_verified=lambda _: True)
    except ValidationError as error:
        general = error
    if fast is not None:
        assert scripts_checked and general == fast
        assert general.issued_asset_id is None and general.new_binding is None
    elif scripts_checked and isinstance(general, TxEffects):
        # the fast path declines only what it leaves to the general one
        assert (version == GOVERNANCE_TX_VERSION
                or any(s == 2 for _, s in outputs)
                or any(e.asset_id is not None for _, e in general.spent))


def test_plain_payments_are_taken_by_the_one_pass_path() -> None:
    """So the property above compares something: a valid payment of funded and
    in-block outputs gets its effects from the one-pass path."""
    state, overlay, _ = _WORLD
    tx = Transaction.parse(Transaction(1, (TxIn(_FUNDED[0]), TxIn(_IN_BLOCK)),
                                       (TxOut(1200, _SCRIPT), TxOut(300, b"\x51"))).serialize())
    effects = plain_payment_effects(state, tx, overlay, scripts_checked=True)
    assert effects is not None and len(effects.created) == 2
    assert plain_payment_effects(state, tx, overlay, scripts_checked=False) is None


@pytest.mark.parametrize("index", [0, 1, 2, 255, 256, 257, 65_535, 0xFFFFFFFF])
def test_outpoint_keys_with_the_inlined_table_equal_the_packed_ones(index: int) -> None:
    txid_le = sha256d(b"keys")
    assert outpoint_key(OutPoint(txid_le, index)) == txid_le + struct.pack("<I", index)

"""The cuts of decision 0125 give exactly what the plain code gives.

The one-pass check of plain Open Assets transfers (``plain_payment_effects`` with a
marker at output 0) against ``check_tx``: over transactions built from colored (two
assets, zero and several units), uncolored, in-block, spent-in-block, missing and
coinbase outpoints, valid, malformed and non-marker OP_RETURN outputs at any position,
marker quantity lists shorter, equal and longer than the outputs, values at and past
the limits — whenever it answers, ``check_tx`` returns equal effects; it declines only
what ``check_tx`` must decide (governance, an issuance, OP_RETURN outputs other than a
transfer's marker at output 0, scripts not checked).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import state as state_module
from ledger.errors import ValidationError
from ledger.governance import GOVERNANCE_TX_VERSION
from ledger.hashing import sha256d
from ledger.membership import INSTITUTION_IDS
from ledger.oap import MARKER_PREFIX, build_marker, parse_marker
from ledger.script import OP_RETURN, length_prefixed_push, p2pkh_script
from ledger.state import (
    VALUE_MAX,
    BlockDelta,
    BlockOverlay,
    LedgerRules,
    LedgerState,
    TxEffects,
    UtxoEntry,
    apply_delta,
    check_tx,
    outpoint_key,
    plain_payment_effects,
    state_from_genesis,
    validate_block,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.tools.loadgen import (
    OAP_ISSUER,
    Lanes,
    certified_blocks,
    oap_issuer_value,
    oap_workload,
)

pytestmark = pytest.mark.unit

TIME_MS = 1_700_000_000_000
_SCRIPT = p2pkh_script(b"\x44" * 20)
_ASSET_A = "Aasset-a"
_ASSET_B = "Aasset-b"
# (value, asset, quantity) of the funded outputs
_FUNDING = [(1000, _ASSET_A, 5), (2000, _ASSET_A, 3), (3000, _ASSET_B, 4), (500, None, 0),
            (700, _ASSET_A, 0), (900, _ASSET_B, 1)]
_FUNDED = [OutPoint(sha256d(b"funded/fourth" + bytes([n])), n)
           for n in range(len(_FUNDING))]
_IN_BLOCK = OutPoint(sha256d(b"in-block/fourth"), 1)
_SPENT_IN_BLOCK = OutPoint(sha256d(b"spent-in-block/fourth"), 0)
_OUTPOINTS = [*_FUNDED, _IN_BLOCK, _SPENT_IN_BLOCK, OutPoint(sha256d(b"missing/fourth"), 0),
              OutPoint(bytes(32), 0xFFFFFFFF)]
_MALFORMED_MARKER = bytes([OP_RETURN]) + length_prefixed_push(MARKER_PREFIX + b"\x05\x01")
_OTHER_OP_RETURN = bytes([OP_RETURN]) + b"\x01\x02"


def _world() -> tuple[LedgerState, BlockOverlay, LedgerRules]:
    utxos = {outpoint_key(o): UtxoEntry(value, _SCRIPT, asset, quantity, 1)
             for o, (value, asset, quantity) in zip(_FUNDED, _FUNDING, strict=True)}
    utxos[outpoint_key(_SPENT_IN_BLOCK)] = UtxoEntry(50, _SCRIPT, _ASSET_A, 2, 1)
    state = LedgerState(height=1, head_hash=bytes(32), utxos=utxos, bindings={}, supply={},
                        accumulator=0, native_total=0, script_index=None, spent_recent={},
                        spent_journal=deque())
    overlay = BlockOverlay()
    overlay.created[outpoint_key(_IN_BLOCK)] = UtxoEntry(600, _SCRIPT, _ASSET_B, 6, 2)
    overlay.spent.add(outpoint_key(_SPENT_IN_BLOCK))
    genesis, _ = build_genesis(chain_id="corefourth", time_ms=TIME_MS,
                               institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("corefourth"))
    return state, overlay, LedgerRules.from_genesis(genesis)


_WORLD = _world()

_quantities = st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 9]), max_size=5)
_special = st.one_of(
    _quantities.map(build_marker),
    st.tuples(_quantities, st.binary(max_size=3)).map(lambda q: build_marker(q[0], q[1])),
    st.just(_MALFORMED_MARKER), st.just(_OTHER_OP_RETURN))
_plain_output = st.tuples(
    st.sampled_from([0, 1, 100, 250, 500, 1000, 1500, 3000, -1, VALUE_MAX, VALUE_MAX + 1]),
    st.sampled_from([_SCRIPT, b"\x51", b""]))


@settings(max_examples=1500, deadline=None)
@given(inputs=st.lists(st.integers(0, len(_OUTPOINTS) - 1), min_size=1, max_size=3),
       outputs=st.lists(_plain_output, max_size=4),
       specials=st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0, 0, 0, 1]),
                                   _special), max_size=2),
       version=st.sampled_from([1, 1, 2, GOVERNANCE_TX_VERSION]), scripts_checked=st.booleans(),
       fit=st.sampled_from([True, True, True, False]))
def test_plain_transfers_in_one_pass_equal_check_tx(
        inputs: list[int], outputs: list[tuple[int, bytes]],
        specials: list[tuple[int, int, bytes]], version: int, scripts_checked: bool,
        fit: bool) -> None:
    state, overlay, rules = _WORLD
    for position, value, script in specials:  # markers and other OP_RETURNs, anywhere
        outputs.insert(min(position, len(outputs)), (value, script))
    if fit:  # a marker at 0 carrying each input's units, native value conserved
        outputs = _fitted(state, overlay, [_OUTPOINTS[i] for i in inputs], outputs)
    tx = Transaction.parse(Transaction(
        version, tuple(TxIn(_OUTPOINTS[i], b"\x51") for i in inputs),
        tuple(TxOut(value, script) for value, script in outputs)).serialize())
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
        # declined: something the one-pass path leaves to the general one
        op_returns = [i for i, o in enumerate(tx.outputs) if o.script_pubkey[:1] == b"\x6a"]
        assert (version == GOVERNANCE_TX_VERSION or general.issued_quantity > 0
                or op_returns not in ([], [0])
                or parse_marker(tx.outputs[0].script_pubkey) is None)


def _fitted(state: LedgerState, overlay: BlockOverlay, inputs: list[OutPoint],
            outputs: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """``outputs`` made a likely-valid transfer: output 0 a marker giving output n the
    units of input n, as many outputs as inputs, the last taking the native rest."""
    entries = [overlay.created.get(outpoint_key(o)) or state.get(o) for o in inputs]
    quantities = [0 if e is None or e.asset_id is None else e.quantity for e in entries]
    rest = [o for o in outputs if o[1][:1] != bytes([OP_RETURN])]
    rest += [(0, _SCRIPT)] * max(0, len(quantities) - len(rest))
    value_in = sum(0 if e is None else e.value for e in entries)
    rest[-1] = (value_in - sum(v for v, _ in rest[:-1]), rest[-1][1])
    return [(0, build_marker(quantities)), *rest]


def _transfer(inputs: list[OutPoint], outputs: list[tuple[int, bytes]]) -> Transaction:
    return Transaction.parse(Transaction(1, tuple(TxIn(o, b"\x51") for o in inputs),
                                         tuple(TxOut(v, s) for v, s in outputs)).serialize())


def test_a_plain_transfer_is_taken_by_the_one_pass_path() -> None:
    """So the property compares something: the bench's shape of transfer (marker, asset
    change, payment) spending a colored output, and one merging two inputs of an asset."""
    state, overlay, rules = _WORLD
    for tx in (_transfer([_FUNDED[0]], [(0, build_marker([4, 1])), (900, _SCRIPT),
                                        (100, b"\x51")]),
               _transfer([_FUNDED[0], _FUNDED[1], _FUNDED[3]],
                         [(0, build_marker([8])), (3500, _SCRIPT)]),
               _transfer([_IN_BLOCK, _FUNDED[5]], [(0, build_marker([7], b"memo")),
                                                   (1500, _SCRIPT)])):
        effects = plain_payment_effects(state, tx, overlay, scripts_checked=True)
        assert effects is not None
        assert effects == check_tx(state, tx, rules, overlay=overlay,
                                   script_verified=lambda _: True)
        assert any(entry.asset_id is not None for _, entry in effects.created)


@pytest.mark.parametrize("outputs", [
    [(0, build_marker([4])), (1000, _SCRIPT)],  # one unit left uncolored
    [(0, build_marker([5, 1])), (500, _SCRIPT), (500, _SCRIPT)],  # more out than in
    [(0, build_marker([5, 0, 0])), (1000, _SCRIPT)],  # more quantities than outputs
    [(1000, _SCRIPT), (0, build_marker([5]))],  # marker after an output: an issuance
    [(1, build_marker([5])), (999, _SCRIPT)],  # native value burned on the marker
    [(0, _MALFORMED_MARKER), (1000, _SCRIPT)],
])
def test_what_the_one_pass_path_declines_check_tx_decides(
        outputs: list[tuple[int, bytes]]) -> None:
    state, overlay, rules = _WORLD
    tx = _transfer([_FUNDED[0]], outputs)
    assert plain_payment_effects(state, tx, overlay, scripts_checked=True) is None
    with pytest.raises(ValidationError):
        check_tx(state, tx, rules, overlay=overlay, script_verified=lambda _: True)


def test_blocks_of_bench_transfers_give_the_general_paths_deltas(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the bench's Open Assets chain (an issuance, then each lane's chained
    transfers over several blocks, later blocks spending earlier blocks' asset change)
    validated with the one-pass path and with it turned off: equal deltas, state
    hashes and colored UTXO sets; the one-pass path answered for every transfer."""
    genesis, keys = build_genesis(chain_id="corefourth", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("corefourth"))
    lanes = Lanes("corefourth", 6, mix="oap")
    issuer = keys[OAP_ISSUER]
    genesis = dataclasses.replace(genesis, allocations=(
        (p2pkh_script(issuer.public_key.hash160), oap_issuer_value(lanes)),))
    txs = oap_workload(lanes, genesis, issuer, 1 + 6 * 3)
    per_block = [txs[:1], txs[1:7], txs[7:13], txs[13:]]
    blocks = [block for block, _ in certified_blocks(genesis, keys, per_block, time_ms=TIME_MS)]
    rules = LedgerRules.from_genesis(genesis)
    answered: list[int] = []
    # the one-pass path's entries, as validate_block takes them since 0127
    real = state_module.plain_payment_parts

    def counting(*args: object, **kwargs: bool) -> object:
        parts = real(*args, **kwargs)  # type: ignore[arg-type]
        answered.append(parts is not None)
        return parts

    def replay(one_pass: bool) -> list[tuple[BlockDelta, bytes]]:
        monkeypatch.setattr(state_module, "plain_payment_parts",
                            counting if one_pass else (lambda *a, **k: None))
        state = state_from_genesis(genesis.hash_le, genesis.allocations)
        out = []
        for block in blocks:
            # scripts as the node's intake leaves them: verified (the one-pass path
            # answers only then)
            delta = validate_block(state, block, rules, script_verified=lambda _: True)
            state = apply_delta(state, delta)
            assert state.accumulator == state.recompute_accumulator()
            out.append((delta, state.state_hash))
        return out

    with_cut, without = replay(True), replay(False)
    assert with_cut == without
    assert sum(answered) == 18  # every transfer; the issuance takes the general path
    assert any(entry.asset_id is not None for delta, _ in with_cut for _, entry in delta.created)

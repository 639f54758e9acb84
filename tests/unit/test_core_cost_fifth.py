"""The cuts of decision 0127 give exactly what the plain code gives.

* ``PrivateKey.sign`` through libsecp256k1's two calls gives coincurve's own
  ``PrivateKey(secret).sign(message, hasher=None)`` bytes, for any key and message.
* A multisig spend's hint (the keys that signed the redeem script's last spend) only
  orders the work: with any hint at all — learned, absent, or poisoned with any tuple
  (out of order, out of range, too short or long) — ``_verify_p2sh_multisig_fast``
  gives the verdict it gives with no hint, and the interpreter's; a learned hint
  saves the failed pair's verification; the hints are bounded.
* The pool's ``drop_before`` without a rescan gives the same pool as rebuilding its
  output map from the candidates left, with and without duplicate records.
* ``select_block_txs`` folding the one-pass path's entries straight into its overlay
  (``plain_payment_parts``, ``BlockOverlay.absorb_plain``) selects what it selects
  with that path off (``check_tx`` for every candidate): equal selections, overlays,
  rejections, for payments, duplicates, conflicting spends, malformed records,
  reused idempotency keys, batches and block limits.
* ``legacy_sighash``'s one-input SIGHASH_ALL shortcut equals the textbook definition
  for any scriptSig and script code (long ones and OP_CODESEPARATOR bytes included).
* A colored output's accumulator element built with struct calls equals
  ``_element(b"utxo\\x00", entry_bytes(key, entry))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import interpreter, selection
from ledger.errors import ValidationError
from ledger.hashing import hash160, sha256d
from ledger.interpreter import (
    MULTISIG_HINT_ENTRIES_MAX,
    _interpret_input,
    _verify_p2sh_multisig_fast,
)
from ledger.keys import SECP256K1_ORDER, PrivateKey, verify_der
from ledger.membership import INSTITUTION_IDS
from ledger.script import multisig_script, p2pkh_script, p2sh_multisig_script_sig, p2sh_script
from ledger.selection import BlockSelection, Candidate, select_block_txs, unrefused_candidate
from ledger.sighash import SIGHASH_ALL, legacy_sighash, remove_codeseparators
from ledger.state import (
    LedgerRules,
    UtxoEntry,
    _element,
    _entry_element,
    entry_bytes,
    state_from_genesis,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.node.ledger_node import Pool
from streams.tools.loadgen import Lanes, interleave, lane_chains

pytestmark = pytest.mark.unit

KEYS = [PrivateKey(bytes([n + 11]) * 32, compressed=n != 3) for n in range(5)]
STRANGER = PrivateKey(b"\x77" * 32)


# --- signing ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(secret=st.integers(1, SECP256K1_ORDER - 1), message=st.binary(min_size=32, max_size=32))
def test_sign_gives_coincurves_signature(secret: int, message: bytes) -> None:
    raw = secret.to_bytes(32, "big")
    signature = PrivateKey(raw).sign(message)
    assert signature == bytes(coincurve.PrivateKey(raw).sign(message, hasher=None))
    assert verify_der(PrivateKey(raw).public_key.sec, signature, message)


# --- multisig hints -----------------------------------------------------------------

def _spend(redeem: bytes, signers: list[PrivateKey], input_count: int = 1
           ) -> tuple[Transaction, int]:
    tx = Transaction(1, tuple(TxIn(OutPoint(bytes([n + 3]) * 32, n)) for n in range(input_count)),
                     (TxOut(1_000, p2pkh_script(b"\x01" * 20)),), 0)
    index = input_count - 1
    digest = legacy_sighash(tx, index, redeem, SIGHASH_ALL)
    sigs = [signer.sign(digest) + bytes([SIGHASH_ALL]) for signer in signers]
    return Transaction.parse(tx.with_script_sig(index, p2sh_multisig_script_sig(
        sigs, redeem)).serialize()), index


def _interpreted(tx: Transaction, index: int, script_pubkey: bytes) -> bool:
    try:
        _interpret_input(tx, index, script_pubkey, True)
    except ValidationError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(key_count=st.integers(1, 5), m_pick=st.integers(0, 4),
       signer_picks=st.lists(st.integers(0, 5), min_size=1, max_size=5),
       in_key_order=st.booleans(),
       hint=st.none() | st.lists(st.integers(-1, 6), min_size=0, max_size=6).map(tuple),
       input_count=st.integers(1, 2))
def test_any_hint_gives_the_verdict_of_no_hint_and_of_the_interpreter(
    key_count: int, m_pick: int, signer_picks: list[int], in_key_order: bool,
    hint: tuple[int, ...] | None, input_count: int,
) -> None:
    keys = KEYS[:key_count]
    m = m_pick % key_count + 1
    redeem = multisig_script(m, [key.public_key.sec for key in keys])
    script_pubkey = p2sh_script(hash160(redeem))
    # signers: members (5 is a stranger), any order and repeats unless in key order
    picks = [pick % key_count if pick < 5 else -1 for pick in signer_picks[:m]]
    if in_key_order:
        picks = sorted(set(picks))
    signers = [keys[pick] if pick >= 0 else STRANGER for pick in picks]
    tx, index = _spend(redeem, signers, input_count)
    hints = interpreter._multisig_hints
    hints.pop(redeem, None)
    plain = _verify_p2sh_multisig_fast(tx, index, script_pubkey)
    if hint is None:
        hints.pop(redeem, None)
    else:
        hints[redeem] = hint  # poisoned: whatever the tuple
    hinted = _verify_p2sh_multisig_fast(tx, index, script_pubkey)
    learned = _verify_p2sh_multisig_fast(tx, index, script_pubkey)  # with what it learned
    assert plain == hinted == learned
    if plain:
        assert _interpreted(tx, index, script_pubkey)
    elif len(picks) == m and in_key_order and all(p >= 0 for p in picks):
        raise AssertionError("a valid multisig spend missed the fast path")


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]

    def counted(*args: Any) -> bool:
        calls[0] += 1
        return verify_der(*args)

    monkeypatch.setattr(interpreter, "verify_der", counted)
    return calls


@pytest.mark.parametrize(("signer_indexes", "first", "then"),
                         [((0, 1), 3, 2), ((1, 2), 2, 2), ((0, 2), 3, 2)])
def test_a_learned_hint_saves_the_failed_pairs(monkeypatch: pytest.MonkeyPatch,
                                               signer_indexes: tuple[int, ...],
                                               first: int, then: int) -> None:
    keys = KEYS[:3]
    redeem = multisig_script(2, [key.public_key.sec for key in keys])
    script_pubkey = p2sh_script(hash160(redeem))
    interpreter._multisig_hints.pop(redeem, None)
    calls = _counting(monkeypatch)
    tx, index = _spend(redeem, [keys[n] for n in signer_indexes])
    assert _verify_p2sh_multisig_fast(tx, index, script_pubkey)
    assert calls[0] == first  # OP_CHECKMULTISIG's order: the last key first
    assert interpreter._multisig_hints[redeem] == signer_indexes
    calls[0] = 0
    other, index = _spend(redeem, [keys[n] for n in signer_indexes], 2)
    assert _verify_p2sh_multisig_fast(other, index, script_pubkey)
    assert calls[0] == then
    # a spend by other keys than the hint's: the hint's pairs fail, the usual order
    # decides (their verdicts reused), and the new signers become the hint
    calls[0] = 0
    changed = (0, 2) if signer_indexes != (0, 2) else (1, 2)
    third, index = _spend(redeem, [keys[n] for n in changed])
    assert _verify_p2sh_multisig_fast(third, index, script_pubkey)
    assert interpreter._multisig_hints[redeem] == changed
    assert calls[0] <= 4


def test_a_hint_never_makes_a_swapped_spend_pass() -> None:
    keys = KEYS[:3]
    redeem = multisig_script(2, [key.public_key.sec for key in keys])
    script_pubkey = p2sh_script(hash160(redeem))
    swapped, index = _spend(redeem, [keys[1], keys[0]])  # out of key order: invalid
    for hint in [(1, 0), (0, 1), (0, 0), (1, 1), (0,), (0, 1, 2), (-1, 0), (1, 3)]:
        interpreter._multisig_hints[redeem] = hint
        assert not _verify_p2sh_multisig_fast(swapped, index, script_pubkey)
    assert not _interpreted(swapped, index, script_pubkey)


def test_hints_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    hints: dict[bytes, tuple[int, ...]] = {
        bytes([n % 256, n // 256]): (0,) for n in range(MULTISIG_HINT_ENTRIES_MAX)}
    monkeypatch.setattr(interpreter, "_multisig_hints", hints)
    keys = KEYS[:2]
    redeem = multisig_script(1, [key.public_key.sec for key in keys])
    tx, index = _spend(redeem, [keys[1]])
    assert _verify_p2sh_multisig_fast(tx, index, p2sh_script(hash160(redeem)))
    assert hints == {redeem: (1,)}


# --- the pool -----------------------------------------------------------------------

def _tx(n: int) -> Transaction:
    return Transaction(1, (TxIn(OutPoint(bytes([n % 256, n // 256]) * 16, 0)),),
                       tuple(TxOut(100 + k, p2pkh_script(bytes([k]) * 20))
                             for k in range(n % 3)), 0)


def _reference_outputs(pool: Pool) -> dict[bytes, tuple[bytes, int]]:
    outputs: dict[bytes, tuple[bytes, int]] = {}
    for candidate in pool.candidates:
        if candidate.tx is not None:
            for key, output in zip(candidate.tx.output_keys, candidate.tx.outputs, strict=True):
                outputs[key] = (output.script_pubkey, output.value)
    return outputs


@settings(max_examples=200, deadline=None)
@given(picks=st.lists(st.integers(0, 12), min_size=1, max_size=40),
       cuts=st.lists(st.integers(0, 45), min_size=1, max_size=4))
def test_drop_before_leaves_the_outputs_of_what_stays(picks: list[int], cuts: list[int]
                                                      ) -> None:
    pool = Pool(0)
    for offset, pick in enumerate(picks):  # repeated picks: duplicate records
        pool.add(unrefused_candidate(offset, _tx(pick), "s", f"k{offset}"), 0)
        pool.verified.add(_tx(pick).hash_le)
    for cut in sorted(cuts):
        pool.drop_before(cut)
        assert pool.pending_outputs == _reference_outputs(pool)
        assert pool.bytes_total == sum(c.tx.size_bytes for c in pool.candidates if c.tx)
        assert pool.offsets == [c.offset for c in pool.candidates]
        counts: dict[bytes, int] = {}
        for candidate in pool.candidates:
            assert candidate.tx is not None
            counts[candidate.tx.hash_le] = counts.get(candidate.tx.hash_le, 0) + 1
        # every txid pooled twice (with outputs) is known as shared
        assert {t for t, n in counts.items() if n > 1 and _has_outputs(pool, t)} <= \
            pool.shared_txids


def _has_outputs(pool: Pool, txid: bytes) -> bool:
    return any(c.tx is not None and c.tx.hash_le == txid and c.tx.outputs
               for c in pool.candidates)


# --- colored outputs' accumulator elements ------------------------------------------

@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=36, max_size=36) | st.binary(min_size=0, max_size=40),
       value=st.integers(0, 2**63 - 1), script=st.binary(max_size=300),
       asset=st.none() | st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
       quantity=st.integers(0, 2**64 - 1), height=st.integers(0, 2**64 - 1))
def test_entry_elements_equal_the_canonical_bytes(key: bytes, value: int, script: bytes,
                                                  asset: str | None, quantity: int,
                                                  height: int) -> None:
    entry = UtxoEntry(value, script, asset, quantity, height)
    assert _entry_element(key, entry) == _element(b"utxo\x00", entry_bytes(key, entry))


def test_a_non_ascii_asset_id_fails_as_before() -> None:
    entry = UtxoEntry(1, b"\x51", "é", 1, 1)
    with pytest.raises(UnicodeEncodeError):
        entry_bytes(b"\x00" * 36, entry)
    with pytest.raises(UnicodeEncodeError):
        _entry_element(b"\x00" * 36, entry)


# --- the selection folds plain entries into its overlay -----------------------------

def _selection_pool() -> tuple[Any, list[Transaction]]:
    genesis, _ = build_genesis(chain_id="corefifth", time_ms=1_000_000,
                               institutions=INSTITUTION_IDS, entropy=seeded_entropy("corefifth"))
    lanes = Lanes("corefifth", 4, mix="mixed")
    genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 4)))
    # conflicting spends of the same outputs (another amount), a tx paying more than
    # it spends, and one spending an output nobody made
    conflicts = [_paying(tx, (TxOut(tx.outputs[0].value - 1, tx.outputs[0].script_pubkey),
                              *tx.outputs[1:])) for tx in txs[:3]]
    overpaying = _paying(txs[5], (TxOut(tx_value_max(txs[5]) + 1,
                                        txs[5].outputs[0].script_pubkey),))
    missing = Transaction(1, (TxIn(OutPoint(b"\x42" * 32, 0)),),
                          (TxOut(1, p2pkh_script(b"\x02" * 20)),), 0)
    return genesis, txs + conflicts + [overpaying, missing]


def _paying(tx: Transaction, outputs: tuple[TxOut, ...]) -> Transaction:
    return Transaction(tx.version, tx.inputs, outputs, tx.lock_time)


def tx_value_max(tx: Transaction) -> int:
    return sum(output.value for output in tx.outputs)


_GENESIS, _POOL = _selection_pool()


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(-1, len(_POOL) - 1), min_size=0, max_size=30),
       batch_every=st.integers(1, 4), keys=st.lists(st.integers(0, 5), min_size=30,
                                                    max_size=30),
       txs_max=st.none() | st.integers(1, 20), verified=st.booleans())
def test_selection_equals_the_general_paths(picks: list[int], batch_every: int,
                                            keys: list[int], txs_max: int | None,
                                            verified: bool) -> None:
    candidates = [Candidate(n // batch_every, None if pick < 0 else _POOL[pick], "s",
                            f"k{keys[n]}", "malformed" if pick < 0 else "")
                  for n, pick in enumerate(picks)]
    state = state_from_genesis(_GENESIS.hash_le, _GENESIS.allocations)
    rules = LedgerRules.from_genesis(_GENESIS)
    range_end = candidates[-1].offset + 1 if candidates else 0

    def select() -> BlockSelection:
        return select_block_txs(state, candidates, rules, range_end=range_end,
                                block_txs_max=txs_max,
                                script_verified=(lambda _: True) if verified else None,
                                strict=True)

    fast = select()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "plain_payment_parts", lambda *a, **k: None)
        general = select()
    assert fast == general
    assert fast.overlay.spent == general.overlay.spent
    assert fast.overlay.created == general.overlay.created


# --- the one-input SIGHASH_ALL sighash ----------------------------------------------

@settings(max_examples=300, deadline=None)
@given(script_sig=st.binary(max_size=300), script_code=st.binary(max_size=300),
       output_scripts=st.lists(st.binary(max_size=40), max_size=3),
       input_index=st.integers(0, 1), reparse=st.booleans())
def test_one_input_sighash_all_equals_the_textbook_definition(
    script_sig: bytes, script_code: bytes, output_scripts: list[bytes], input_index: int,
    reparse: bool,
) -> None:
    tx = Transaction(1, (TxIn(OutPoint(b"\x09" * 32, 3), script_sig, 7),),
                     tuple(TxOut(n, script) for n, script in enumerate(output_scripts)), 5)
    if reparse:
        tx = Transaction.parse(tx.serialize())
    if input_index:  # out of range: refused as before
        with pytest.raises(AssertionError):
            legacy_sighash(tx, input_index, script_code, SIGHASH_ALL)
        return
    blanked = Transaction(1, (TxIn(OutPoint(b"\x09" * 32, 3),
                                   remove_codeseparators(script_code), 7),), tx.outputs, 5)
    expected = sha256d(blanked.serialize() + SIGHASH_ALL.to_bytes(4, "little"))
    assert legacy_sighash(tx, 0, script_code, SIGHASH_ALL) == expected

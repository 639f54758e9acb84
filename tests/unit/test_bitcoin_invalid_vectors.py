"""Bitcoin Core's refusals, run here: the legacy (non-segwit) subset of ``tx_invalid.json``
and ``script_tests.json`` (valid and invalid side), unmodified copies pinned by sha256.

The interpreter has two policies (ledger/interpreter.py): consensus (``strict=False``,
Core's flag set {P2SH}) and strict (P2SH plus every policy flag in ``STRICT_FLAGS``).
Core's verification flags only ever restrict, so:

* a script Core accepts under flags F is accepted by every policy whose flags are a
  subset of F;
* a transaction or script Core refuses under F is refused by every policy whose flags
  include F, with the error Core names (or one a flag we add beyond F can cause).

A vector needing an opcode outside the templates (IF, arithmetic, CLTV/CSV, NOPn,
altstack...), a flag outside ``STRICT_FLAGS`` on its refusing side (CLTV, CSV,
CONST_SCRIPTCODE, WITNESS, MINIMALIF, DISCOURAGE_UPGRADABLE_NOPS...) or a witness is
skipped with that reason; the counts below say how many run.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Iterator

import pytest

import ledger.script as script_module
from ledger.errors import ScriptError, ValidationError
from ledger.hashing import hash_from_display_hex
from ledger.interpreter import verify_input
from ledger.membership import INSTITUTION_IDS
from ledger.state import LedgerRules, LedgerState, UtxoEntry, check_tx
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import build_genesis, seeded_entropy
from tests.unit.core_vectors import (
    FLAG_CODES,
    SUPPORTED_OPCODES,
    opcodes_of,
    parse_core_script,
    read_pinned,
)

pytestmark = pytest.mark.unit

CONSENSUS_FLAGS = frozenset({"P2SH"})
STRICT_FLAGS = CONSENSUS_FLAGS | frozenset(FLAG_CODES)
# Opcodes the interpreter refuses by name, as Core does when it executes them (no
# IF/ELSE here, so everything in a script executes): disabled, reserved, undefined.
REFUSED_OPCODES = (set(script_module.DISABLED_OPCODES) | {0x50, 0x62, 0x65, 0x66, 0x89, 0x8A}
                   | set(range(0xBA, 0x100)))
RUNNABLE_OPCODES = SUPPORTED_OPCODES | REFUSED_OPCODES
# Core's ScriptError names -> this interpreter's codes.
CORE_ERRORS = {
    "INVALID_STACK_OPERATION": {"script-stack-underflow"},
    "BAD_OPCODE": {"script-bad-opcode", "script-bad-push"},
    "DISABLED_OPCODE": {"script-disabled-opcode"},
    # a P2SH redeem script that leaves false is named apart here
    "EVAL_FALSE": {"script-eval-false", "script-p2sh-eval"},
    # a non-minimal number under MINIMALDATA: Core's SCRIPTNUM, this ledger's minimal-data
    "SCRIPTNUM": {"script-num", "script-minimal-data"},
    "SIG_DER": {"script-der"},
    "MINIMALDATA": {"script-minimal-data"},
    "CLEANSTACK": {"script-clean-stack"},
    "EQUALVERIFY": {"script-equal-verify"},
    "PUBKEYTYPE": {"script-pubkey-type"},
    "OP_RETURN": {"script-op-return"},
    "OP_COUNT": {"script-op-count"},
    "SIG_PUSHONLY": {"script-push-only"},
    "NULLFAIL": {"script-sig-verify"},
    "SIG_NULLDUMMY": {"script-nulldummy"},
    "PUSH_SIZE": {"script-push-size"},
    "STACK_SIZE": {"script-stack-size"},
    "PUBKEY_COUNT": {"script-pubkey-count"},
    "SIG_COUNT": {"script-sig-count"},
    "SIG_HASHTYPE": {"script-hashtype"},
    "VERIFY": {"script-verify"},
    "SCRIPT_SIZE": {"script-size"},
    "SIG_HIGH_S": {"script-high-s"},
}
# CheckTransaction's refusals (tx_invalid's BADTX) as this ledger names them.
BADTX_CODES = {"tx-no-inputs", "tx-no-outputs", "tx-value-range", "tx-coinbase",
               "duplicate-input"}


def _flags(text: str) -> frozenset[str]:
    return frozenset(f for f in text.split(",") if f and f != "NONE")


def _policies(flags: frozenset[str], *, refusing: bool) -> list[tuple[bool, frozenset[str]]]:
    """(strict, that policy's flags) for each policy the vector speaks about."""
    chosen = []
    for strict, policy in ((False, CONSENSUS_FLAGS), (True, STRICT_FLAGS)):
        if (flags <= policy) if refusing else (policy <= flags):
            chosen.append((strict, policy))
    return chosen


def _needed_opcodes(script_sig: bytes, script_pubkey: bytes) -> set[int]:
    needed = opcodes_of(script_pubkey) | opcodes_of(script_sig)
    if script_module.classify(script_pubkey) is script_module.ScriptTemplate.P2SH:
        try:
            pushes = [d for _, d in script_module.iter_ops(script_sig)]
        except ScriptError:
            pushes = []
        if pushes and pushes[-1] is not None:
            needed |= opcodes_of(pushes[-1])
    return needed


def _unrunnable(needed: set[int]) -> str | None:
    missing = sorted(needed - RUNNABLE_OPCODES)
    if not missing:
        return None
    return "needs opcodes outside the templates: " + ", ".join(f"0x{op:02x}" for op in missing)


# --- tx_invalid.json ------------------------------------------------------------------

def _tx_invalid_cases() -> Iterator[object]:
    entries = [e for e in json.loads(read_pinned("tx_invalid.json")) if isinstance(e[0], list)]
    for number, (prevouts, raw, flag_text) in enumerate(entries):
        spent = {(hash_from_display_hex(p[0]), p[1] & 0xFFFFFFFF): parse_core_script(p[2])
                 for p in prevouts}
        ident = f"tx_invalid{number}"
        try:
            tx = Transaction.parse(bytes.fromhex(raw))
        except ValidationError as error:
            if flag_text == "BADTX":
                yield pytest.param(None, spent, flag_text, error.code, id=ident)
            else:  # a zero-input marker: segwit serialization, legacy-only ledger
                yield pytest.param(None, spent, flag_text, error.code, id=ident,
                                   marks=pytest.mark.skip(reason="segwit serialization"))
            continue
        reason = None
        if flag_text != "BADTX":
            outside = sorted(_flags(flag_text) - STRICT_FLAGS)
            needed: set[int] = set()
            for txin in tx.inputs:
                needed |= _needed_opcodes(
                    txin.script_sig, spent[(txin.prevout.txid_le, txin.prevout.index)])
            reason = (f"refused under flags outside the policy: {', '.join(outside)}"
                      if outside else _unrunnable(needed))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(tx, spent, flag_text, None, id=ident, marks=marks)


TX_INVALID = list(_tx_invalid_cases())


def _state_with(spent: dict[tuple[bytes, int], bytes]) -> LedgerState:
    """A ledger state holding exactly the vector's prevouts (1 unit each)."""
    utxos = {txid + struct.pack("<I", index): UtxoEntry(1, script, None, 0, 0)
             for (txid, index), script in spent.items()}
    return LedgerState(height=0, head_hash=b"\x00" * 32, utxos=utxos, bindings={}, supply={},
                       accumulator=0, native_total=len(utxos), script_index=None,
                       spent_recent={}, spent_journal=deque())


RULES = LedgerRules.from_genesis(build_genesis(
    chain_id="core-vectors", time_ms=0, institutions=INSTITUTION_IDS,
    entropy=seeded_entropy("core-vectors"))[0])


def test_enough_of_tx_invalid_is_exercised() -> None:
    assert len(TX_INVALID) == 93
    assert len([p for p in TX_INVALID if not p.marks]) >= 25


@pytest.mark.parametrize(("tx", "spent", "flag_text", "parse_code"), TX_INVALID)
def test_core_tx_invalid(tx: Transaction | None, spent: dict[tuple[bytes, int], bytes],
                         flag_text: str, parse_code: str | None) -> None:
    if flag_text == "BADTX":  # CheckTransaction: refused before any script runs
        if tx is None:
            assert parse_code in BADTX_CODES
            return
        with pytest.raises(ValidationError) as caught:
            check_tx(_state_with(spent), tx, RULES, verify_scripts=False)
        assert caught.value.code in BADTX_CODES, caught.value
        return
    assert tx is not None
    policies = _policies(_flags(flag_text), refusing=True)
    assert policies, flag_text  # flags outside STRICT_FLAGS are skipped at collection
    for strict, _ in policies:
        codes = []
        for index, txin in enumerate(tx.inputs):
            script_pubkey = spent[(txin.prevout.txid_le, txin.prevout.index)]
            try:
                verify_input(tx, index, script_pubkey, 0, strict=strict)
            except ScriptError as error:
                codes.append(error.code)
        assert codes, f"strict={strict}: every input verified; Core refuses under {flag_text}"


# --- script_tests.json ----------------------------------------------------------------

def _spending_tx(script_sig: bytes, script_pubkey: bytes) -> Transaction:
    """Core's BuildCreditingTransaction + BuildSpendingTransaction (amount 0)."""
    credit = Transaction(1, (TxIn(OutPoint(b"\x00" * 32, 0xFFFFFFFF), b"\x00\x00",
                                  0xFFFFFFFF),), (TxOut(0, script_pubkey),), 0)
    return Transaction(1, (TxIn(OutPoint(credit.hash_le, 0), script_sig, 0xFFFFFFFF),),
                       (TxOut(0, b""),), 0)


def _script_cases() -> Iterator[object]:
    entries = [e for e in json.loads(read_pinned("script_tests.json")) if len(e) >= 4]
    for number, entry in enumerate(entries):
        ident = f"script{number}"
        if isinstance(entry[0], list):
            yield pytest.param(b"", b"", frozenset(), "", id=ident,
                               marks=pytest.mark.skip(reason="witness"))
            continue
        sig_text, pubkey_text, flag_text, expected = entry[:4]
        try:
            script_sig, script_pubkey = (parse_core_script(sig_text),
                                         parse_core_script(pubkey_text))
        except KeyError as error:
            yield pytest.param(b"", b"", frozenset(), expected, id=ident,
                               marks=pytest.mark.skip(reason=f"opcode name {error}"))
            continue
        flags = _flags(flag_text)
        if script_module.classify(script_pubkey) is not script_module.ScriptTemplate.P2SH:
            flags |= CONSENSUS_FLAGS  # P2SH changes nothing for other scripts
        reason = _unrunnable(_needed_opcodes(script_sig, script_pubkey))
        refusing = expected != "OK"
        if reason is None and refusing and expected not in CORE_ERRORS:
            reason = f"error {expected} belongs to a rule outside the templates"
        if reason is None and not _policies(flags, refusing=refusing):
            outside = sorted(flags - STRICT_FLAGS)
            reason = (f"refused under flags outside the policy: {', '.join(outside)}"
                      if refusing else f"accepted only under fewer flags than {flag_text}")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(script_sig, script_pubkey, flags, expected, id=ident, marks=marks)


SCRIPT_CASES = list(_script_cases())


def test_enough_of_script_tests_is_exercised() -> None:
    assert len(SCRIPT_CASES) == 1222
    run = [p for p in SCRIPT_CASES if not p.marks]
    assert len([p for p in run if p.values[3] == "OK"]) >= 150
    assert len([p for p in run if p.values[3] != "OK"]) >= 100


@pytest.mark.parametrize(("script_sig", "script_pubkey", "flags", "expected"), SCRIPT_CASES)
def test_core_script(script_sig: bytes, script_pubkey: bytes, flags: frozenset[str],
                     expected: str) -> None:
    tx = _spending_tx(script_sig, script_pubkey)
    refusing = expected != "OK"
    for strict, policy in _policies(flags, refusing=refusing):
        if not refusing:
            verify_input(tx, 0, script_pubkey, 0, strict=strict)
            continue
        with pytest.raises(ScriptError) as caught:
            verify_input(tx, 0, script_pubkey, 0, strict=strict)
        added = set().union(*(FLAG_CODES.get(flag, set()) for flag in policy - flags))
        assert caught.value.code in CORE_ERRORS[expected] | added, (
            f"strict={strict}: {caught.value.code} ({caught.value}), Core says {expected}")

"""Legacy sighash against Bitcoin Core's sighash.json and the rules it encodes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.hashing import display_hex, sha256d
from ledger.sighash import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    legacy_sighash,
    remove_codeseparators,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent.parent / "data" / "bitcoin" / "sighash.json"
SIGHASH_JSON_SHA256 = "52cf23c2076e7f129c71d5508631d3e5ae3be1b1cb0585c0e23bbb4bb373e924"


def _vectors() -> list[list[object]]:
    entries = json.loads(DATA.read_text())
    return [entry for entry in entries if len(entry) == 5]


VECTORS = _vectors()


def test_vector_file_is_the_unmodified_core_copy() -> None:
    assert hashlib.sha256(DATA.read_bytes()).hexdigest() == SIGHASH_JSON_SHA256
    assert len(VECTORS) == 500


@pytest.mark.parametrize(("raw", "script", "index", "hash_type", "expected"), VECTORS,
                         ids=[f"v{n}" for n in range(len(VECTORS))])
def test_core_sighash_vector(raw: str, script: str, index: int, hash_type: int,
                             expected: str) -> None:
    tx = Transaction.parse(bytes.fromhex(raw))
    digest = legacy_sighash(tx, index, bytes.fromhex(script), hash_type)
    # sighash.json prints uint256 in display order (reversed bytes)
    assert display_hex(digest) == expected


def _tx(inputs: int, outputs: int) -> Transaction:
    return Transaction(
        1,
        tuple(TxIn(OutPoint(bytes([n + 1]) * 32, n), b"\x51", 0xFFFFFFF0 + n)
              for n in range(inputs)),
        tuple(TxOut(1000 + n, b"\x76\xa9") for n in range(outputs)),
        lock_time=7,
    )


def _reference(tx: Transaction, index: int, script: bytes, hash_type: int) -> bytes:
    """Straight rendering of Bitcoin's algorithm (copy, blank, serialize), no caching."""
    base = hash_type & 0x1F
    inputs = []
    for n, txin in enumerate(tx.inputs):
        script_sig = script.replace(b"\xab", b"") if n == index else b""
        sequence = txin.sequence
        if n != index and base in (SIGHASH_NONE, SIGHASH_SINGLE):
            sequence = 0
        inputs.append(TxIn(txin.prevout, script_sig, sequence))
    if hash_type & SIGHASH_ANYONECANPAY:
        inputs = [inputs[index]]
    outputs = list(tx.outputs)
    if base == SIGHASH_NONE:
        outputs = []
    elif base == SIGHASH_SINGLE:
        outputs = [TxOut(-1, b"")] * index + [tx.outputs[index]]
    copy = Transaction(tx.version, tuple(inputs), tuple(outputs), tx.lock_time)
    return sha256d(copy.serialize() + struct.pack("<I", hash_type))


@pytest.mark.parametrize("hash_type", [1, 2, 3, 0x81, 0x82, 0x83, 0, 4, 0x41])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_matches_naive_reference(hash_type: int, index: int) -> None:
    tx = _tx(3, 3)
    script = bytes.fromhex("76a914") + bytes(20) + bytes.fromhex("88ac")
    assert legacy_sighash(tx, index, script, hash_type) == _reference(tx, index, script,
                                                                      hash_type)


def test_single_out_of_range_returns_one() -> None:
    tx = _tx(3, 1)
    for hash_type in (SIGHASH_SINGLE, SIGHASH_SINGLE | SIGHASH_ANYONECANPAY):
        assert legacy_sighash(tx, 2, b"", hash_type) == b"\x01" + bytes(31)
    assert legacy_sighash(tx, 0, b"", SIGHASH_SINGLE) != b"\x01" + bytes(31)


def test_codeseparator_removed_but_not_inside_push_data() -> None:
    # OP_CODESEPARATOR OP_1 <push of 0xab> OP_CODESEPARATOR
    script = bytes([0xAB, 0x51, 0x01, 0xAB, 0xAB])
    assert remove_codeseparators(script) == bytes([0x51, 0x01, 0xAB])
    tx = _tx(1, 1)
    assert legacy_sighash(tx, 0, script, SIGHASH_ALL) == legacy_sighash(
        tx, 0, bytes([0x51, 0x01, 0xAB]), SIGHASH_ALL)


def test_anyonecanpay_ignores_other_inputs_and_all_commits_to_them() -> None:
    tx = _tx(2, 2)
    other = Transaction(tx.version, (tx.inputs[0], TxIn(OutPoint(b"\x99" * 32, 9))),
                        tx.outputs, tx.lock_time)
    acp = SIGHASH_ALL | SIGHASH_ANYONECANPAY
    assert legacy_sighash(tx, 0, b"", acp) == legacy_sighash(other, 0, b"", acp)
    assert legacy_sighash(tx, 0, b"", SIGHASH_ALL) != legacy_sighash(other, 0, b"", SIGHASH_ALL)


def test_none_ignores_outputs() -> None:
    tx = _tx(1, 2)
    fewer = Transaction(tx.version, tx.inputs, tx.outputs[:1], tx.lock_time)
    assert legacy_sighash(tx, 0, b"", SIGHASH_NONE) == legacy_sighash(fewer, 0, b"", SIGHASH_NONE)
    assert legacy_sighash(tx, 0, b"", SIGHASH_ALL) != legacy_sighash(fewer, 0, b"", SIGHASH_ALL)


def test_hash_type_is_committed_as_four_bytes() -> None:
    tx = _tx(1, 1)
    assert legacy_sighash(tx, 0, b"", 0x01) != legacy_sighash(tx, 0, b"", 0x0101)


_scripts = st.binary(max_size=300)
_inputs = st.builds(TxIn, st.builds(OutPoint, st.binary(min_size=32, max_size=32),
                                    st.integers(0, 0xFFFFFFFF)),
                    _scripts, st.integers(0, 0xFFFFFFFF))
_outputs = st.builds(TxOut, st.integers(-(2**63), 2**63 - 1), _scripts)


@settings(max_examples=150, deadline=None)
@given(inputs=st.lists(_inputs, min_size=1, max_size=4), outputs=st.lists(_outputs, max_size=4),
       data=st.data())
def test_sighash_of_arbitrary_transactions_matches_reference(
        inputs: list[TxIn], outputs: list[TxOut], data: st.DataObject) -> None:
    tx = Transaction(2, tuple(inputs), tuple(outputs), 99)
    if data.draw(st.booleans()):
        tx = Transaction.parse(tx.serialize())  # pieces sliced from parsed bytes too
    index = data.draw(st.integers(0, len(inputs) - 1))
    hash_type = data.draw(st.sampled_from([1, 2, 3, 0x81, 0x82, 0x83]))
    script = data.draw(st.binary(max_size=50)).replace(b"\xab", b"")
    expected = (b"\x01" + bytes(31) if hash_type & 0x1F == 3 and index >= len(outputs)
                else _reference(tx, index, script, hash_type))
    for _ in range(2):  # second call uses the cached pieces
        assert legacy_sighash(tx, index, script, hash_type) == expected

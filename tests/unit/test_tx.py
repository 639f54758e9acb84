"""Legacy transaction serialization: round trips, txid, bounded parsing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import DecodeError
from ledger.hashing import hash_from_display_hex
from ledger.serialization import ByteReader, compact_size
from ledger.tx import (
    SCRIPT_BYTES_MAX,
    TX_BYTES_MAX,
    OutPoint,
    Transaction,
    TxIn,
    TxOut,
    _parse_fast,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent.parent / "data" / "bitcoin" / "tx_valid.json"


def _legacy_core_transactions() -> list[str]:
    raws = [entry[1] for entry in json.loads(DATA.read_text()) if isinstance(entry[0], list)]
    # segwit-serialized entries carry the 0x00 marker where the input count would be
    return [raw for raw in raws if raw[8:10] != "00"]


LEGACY = _legacy_core_transactions()
# The first tx_valid entry is mainnet tx 23b397ed… (as the file's comment says).
FIRST_TXID = "23b397edccd3740a74adb603c9756370fafcde9bcc4483eb271ecad09a94dd63"


def test_core_transactions_round_trip() -> None:
    assert len(LEGACY) >= 80
    for raw in LEGACY:
        tx = Transaction.parse(bytes.fromhex(raw))
        assert tx.serialize().hex() == raw
        rebuilt = Transaction(tx.version, tx.inputs, tx.outputs, tx.lock_time)
        assert rebuilt.serialize().hex() == raw  # not only the cached bytes
        assert rebuilt.txid == tx.txid


def test_known_mainnet_txid() -> None:
    assert Transaction.parse(bytes.fromhex(LEGACY[0])).txid == FIRST_TXID


def test_every_truncation_and_trailing_byte_is_refused() -> None:
    raw = bytes.fromhex(LEGACY[0])
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            Transaction.parse(raw[:cut])
    with pytest.raises(DecodeError) as caught:
        Transaction.parse(raw + b"\x00")
    assert caught.value.code == "trailing-bytes"


def _one_input_tx(script_sig: bytes) -> bytes:
    return (struct.pack("<i", 1) + b"\x01" + b"\x11" * 32 + struct.pack("<I", 0)
            + compact_size(len(script_sig)) + script_sig + b"\xff" * 4
            + b"\x01" + struct.pack("<q", 5) + b"\x01\x51" + bytes(4))


def test_script_size_limit() -> None:
    Transaction.parse(_one_input_tx(b"\x51" * SCRIPT_BYTES_MAX))
    with pytest.raises(DecodeError) as caught:
        Transaction.parse(_one_input_tx(b"\x51" * (SCRIPT_BYTES_MAX + 1)))
    assert caught.value.code == "oversized"


def test_transaction_size_limit_and_segwit_marker() -> None:
    with pytest.raises(DecodeError) as caught:
        Transaction.parse(bytes(TX_BYTES_MAX + 1))
    assert caught.value.code == "tx-oversized"
    segwit = struct.pack("<i", 1) + b"\x00\x01" + _one_input_tx(b"")[5:]
    with pytest.raises(DecodeError) as caught:
        Transaction.parse(segwit)
    assert caught.value.code == "tx-no-inputs"


def test_non_canonical_compact_size_is_refused() -> None:
    raw = _one_input_tx(b"\x51")
    non_canonical = raw[:4] + b"\xfd\x01\x00" + raw[5:]
    with pytest.raises(DecodeError) as caught:
        Transaction.parse(non_canonical)
    assert caught.value.code == "non-canonical"


def test_huge_declared_length_is_refused_before_reading() -> None:
    raw = _one_input_tx(b"")
    lying = raw[:41] + b"\xfe\xff\xff\xff\x7f" + raw[42:]
    with pytest.raises(DecodeError):
        Transaction.parse(lying)


def test_outpoint_display_order() -> None:
    outpoint = OutPoint.from_txid(FIRST_TXID, 3)
    assert outpoint.txid == FIRST_TXID
    assert outpoint.txid_le == hash_from_display_hex(FIRST_TXID)
    assert str(outpoint) == f"{FIRST_TXID}:3"


_scripts = st.binary(max_size=300)
_inputs = st.builds(TxIn, st.builds(OutPoint, st.binary(min_size=32, max_size=32),
                                    st.integers(0, 0xFFFFFFFF)),
                    _scripts, st.integers(0, 0xFFFFFFFF))
_outputs = st.builds(TxOut, st.integers(-(2**63), 2**63 - 1), _scripts)
_transactions = st.builds(Transaction, st.integers(-(2**31), 2**31 - 1),
                          st.lists(_inputs, min_size=1, max_size=5).map(tuple),
                          st.lists(_outputs, max_size=5).map(tuple),
                          st.integers(0, 0xFFFFFFFF))


@settings(max_examples=200, deadline=None)
@given(_transactions)
def test_serialize_parse_round_trip(tx: Transaction) -> None:
    raw = tx.serialize()
    parsed = Transaction.parse(raw)
    assert parsed == tx
    assert parsed.inputs == tx.inputs and parsed.outputs == tx.outputs
    assert (parsed.version, parsed.lock_time) == (tx.version, tx.lock_time)
    assert parsed.txid == tx.txid
    assert Transaction(tx.version, tx.inputs, tx.outputs, tx.lock_time).serialize() == raw


def _careful(raw: bytes) -> Transaction | None:
    reader = ByteReader(raw, "transaction")
    try:
        tx = Transaction.read(reader)
        reader.finish()
    except DecodeError:
        return None
    return tx


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_parser_agrees_with_careful_parser(data: st.DataObject) -> None:
    raw = bytearray(bytes.fromhex(data.draw(st.sampled_from(LEGACY[:40]))))
    for _ in range(data.draw(st.integers(0, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw) + 2))
    mutated = bytes(raw[:cut]) + (b"\x00" * max(0, cut - len(raw)))
    fast = _parse_fast(mutated)
    careful = _careful(mutated)
    if careful is None:
        assert fast is None
    elif fast is not None:
        assert fast == careful and fast.inputs == careful.inputs
        assert fast.outputs == careful.outputs

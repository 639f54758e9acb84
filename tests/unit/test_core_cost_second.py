"""The per-transaction cuts of decision 0116 give exactly what the plain code gives.

Each cut is held to its plain form: the libsecp256k1 calls against coincurve's own
``PublicKey.verify`` (valid, tampered, high-S, malformed and hostile inputs), the
parsed-key cache against its key (the exact encoding), a transaction's stored size and
output keys against the serialization and ``outpoint_key``, the one-input sighash at
the edges of the one-byte script length, the effects and candidates built without the
frozen dataclasses' ``__init__`` against the ones built with it, and the value and
colored-input checks in one pass.
"""

from __future__ import annotations

import struct

import coincurve
import pytest

from ledger.errors import TxError
from ledger.interpreter import _is_low_s
from ledger.keys import PrivateKey, _parsed_public_key, normalize_s, verify_der
from ledger.selection import Candidate, unrefused_candidate
from ledger.serialization import ByteReader
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.state import (
    _NO_ASSETS,
    LedgerRules,
    TxEffects,
    UtxoEntry,
    _check_value_conserved,
    _plain_effects,
    check_tx,
    outpoint_key,
    state_from_genesis,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut, index_bytes, output_keys
from streams.node import intake

pytestmark = pytest.mark.unit

P2PKH = bytes.fromhex("76a914") + b"\x22" * 20 + bytes.fromhex("88ac")
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _coincurve_verdict(pubkey: bytes, signature: bytes, message: bytes) -> bool:
    """What ``verify_der`` answered before 0116: coincurve's objects, False on errors."""
    try:
        return bool(coincurve.PublicKey(bytes(pubkey)).verify(signature, message, hasher=None))
    except (ValueError, TypeError):
        return False


def _high_s(signature: bytes) -> bytes:
    """The same signature with S replaced by N - S (valid math, refused encoding)."""
    len_r = signature[3]
    r = int.from_bytes(signature[4:4 + len_r], "big")
    s = int.from_bytes(signature[6 + len_r:], "big")
    high = SECP256K1_ORDER - s

    def integer(value: int) -> bytes:
        body = value.to_bytes((value.bit_length() + 8) // 8, "big")
        return b"\x02" + bytes([len(body)]) + body

    content = integer(r) + integer(high)
    return b"\x30" + bytes([len(content)]) + content


def _cases() -> list[tuple[str, bytes, bytes, bytes]]:
    key = PrivateKey(b"\x11" * 32)
    loose = PrivateKey(b"\x11" * 32, compressed=False)
    message = bytes(range(32))
    signature = key.sign(message)
    compressed, uncompressed = key.public_key.sec, loose.public_key.sec
    other = PrivateKey(b"\x12" * 32).public_key.sec
    not_a_point = b"\x02" + b"\xff" * 32
    return [
        ("valid compressed", compressed, signature, message),
        ("valid uncompressed", uncompressed, signature, message),
        ("hybrid encoding", b"\x06" + uncompressed[1:], signature, message),
        ("other key", other, signature, message),
        ("other message", compressed, signature, bytes(32)),
        ("high S", compressed, _high_s(signature), message),
        ("high S normalised", compressed, normalize_s(_high_s(signature)), message),
        ("truncated DER", compressed, signature[:-1], message),
        ("empty DER", compressed, b"", message),
        ("garbage DER", compressed, b"\x30" * 70, message),
        ("short message", compressed, signature, message[:31]),
        ("long message", compressed, signature, message + b"\x00"),
        ("key not on the curve", not_a_point, signature, message),
        ("key of 32 bytes", compressed[1:], signature, message),
        ("empty key", b"", signature, message),
        ("bytearray key", bytearray(compressed), signature, message),  # type: ignore[list-item]
        ("bytearray message", compressed, signature, bytearray(message)),  # type: ignore[list-item]
        ("str key", "not bytes", signature, message),  # type: ignore[list-item]
    ]


@pytest.mark.parametrize(("name", "pubkey", "signature", "message"), _cases(),
                         ids=[case[0] for case in _cases()])
def test_verify_der_answers_as_coincurve(name: str, pubkey: bytes, signature: bytes,
                                         message: bytes) -> None:
    expected = _coincurve_verdict(pubkey, signature, message)
    assert verify_der(pubkey, signature, message) is expected
    # twice: the second call goes through the parsed-key cache
    assert verify_der(pubkey, signature, message) is expected
    assert expected == (name in VALID_CASES)


VALID_CASES = {"valid compressed", "valid uncompressed", "high S normalised", "bytearray key"}


def test_the_parsed_key_cache_is_keyed_by_the_exact_encoding() -> None:
    key = PrivateKey(b"\x21" * 32)
    compressed = key.public_key.sec
    uncompressed = PrivateKey(b"\x21" * 32, compressed=False).public_key.sec
    _parsed_public_key.cache_clear()
    assert _parsed_public_key(compressed) is not None
    assert _parsed_public_key(uncompressed) is not None
    assert _parsed_public_key(compressed) is _parsed_public_key(compressed)
    assert _parsed_public_key(compressed) is not _parsed_public_key(uncompressed)
    assert _parsed_public_key(b"\x02" + b"\xff" * 32) is None  # refused, not cached as valid
    message = b"\x07" * 32
    signature = key.sign(message)
    assert verify_der(compressed, signature, message)
    assert verify_der(uncompressed, signature, message)
    assert not verify_der(b"\x02" + b"\xff" * 32, signature, message)


def _parsed_forms(tx: Transaction) -> list[Transaction]:
    raw = tx.serialize()
    reader = ByteReader(b"\x01" * 9 + raw + b"\x02" * 4)
    reader.read(9)
    return [Transaction.parse(raw), Transaction.read(reader)]


@pytest.mark.parametrize("outputs", [1, 2, 255, 256, 257, 300])
def test_size_and_output_keys_equal_the_plain_ones(outputs: int) -> None:
    built = Transaction(2, (TxIn(OutPoint(b"\x5a" * 32, 7), b"\x51" * 3),),
                        tuple(TxOut(index, P2PKH) for index in range(outputs)), 9)
    for tx in [built, *_parsed_forms(built)]:
        assert tx.size_bytes == len(tx.serialize()) == len(built.serialize())
        expected = tuple(outpoint_key(tx.outpoint(index)) for index in range(outputs))
        assert tx.output_keys == expected
        assert tx.output_keys == tuple(tx.hash_le + struct.pack("<I", index)
                                       for index in range(outputs))
    assert output_keys(b"\x01" * 32, 0) == ()


@pytest.mark.parametrize("index", [0, 1, 255, 256, 65_535, 0xFFFFFFFF])
def test_index_bytes_equal_struct_pack(index: int) -> None:
    assert index_bytes(index) == struct.pack("<I", index)
    assert outpoint_key(OutPoint(b"\x03" * 32, index)) == b"\x03" * 32 + struct.pack("<I", index)


@pytest.mark.parametrize("script_code", [b"\x51" * 0xFC, b"\x51" * 0xFD, b"\xab" * 3,
                                         b"\x4c\x01\xab"])  # 0xab inside a push stays
def test_one_input_sighash_at_the_one_byte_length_edge(script_code: bytes) -> None:
    built = Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 3), b"\x51\x52", 5),),
                        (TxOut(700, P2PKH),), lock_time=3)
    parsed = Transaction.parse(built.serialize())  # spans recorded: the shortcut
    for hash_type in (SIGHASH_ALL, 0x7F01):
        assert legacy_sighash(parsed, 0, script_code, hash_type) == legacy_sighash(
            built, 0, script_code, hash_type)


def test_plain_effects_and_unrefused_candidates_equal_the_constructed_ones() -> None:
    tx = Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 3)),), (TxOut(1, P2PKH),))
    spent = ((b"\x01" * 36, UtxoEntry(1, P2PKH, None, 0, 2)),)
    created = ((tx.output_keys[0], UtxoEntry(1, P2PKH, None, 0, 3)),)
    fast = _plain_effects(tx, spent, created)
    plain = TxEffects(tx, spent, created, _NO_ASSETS.issued_asset_id,
                      _NO_ASSETS.issued_quantity, _NO_ASSETS.new_binding)
    assert fast == plain and hash(fast) == hash(plain) and repr(fast) == repr(plain)
    candidate = unrefused_candidate(5, tx, "securities-a", "k1")
    assert candidate == Candidate(5, tx, "securities-a", "k1")
    assert repr(candidate) == repr(Candidate(5, tx, "securities-a", "k1"))
    with pytest.raises(AttributeError):
        candidate.offset = 6  # type: ignore[misc]  # still frozen


def test_value_check_reports_colored_inputs_and_keeps_its_code() -> None:
    tx = Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 3)),), (TxOut(5, P2PKH),))
    plain = [(b"\x01" * 36, UtxoEntry(5, P2PKH, None, 0, 1))]
    colored = [(b"\x01" * 36, UtxoEntry(5, P2PKH, "asset", 10, 1))]
    assert _check_value_conserved(tx, plain) is False
    assert _check_value_conserved(tx, colored) is True
    with pytest.raises(TxError) as raised:
        _check_value_conserved(tx, [(b"\x01" * 36, UtxoEntry(4, P2PKH, None, 0, 1))])
    assert raised.value.code == "value-not-conserved"


def test_check_tx_returns_effects_equal_to_the_constructed_ones() -> None:
    state = state_from_genesis(b"\x07" * 32, [(P2PKH, 1000)])
    funded = next(iter(state.items()))[0]
    spend = Transaction(1, (TxIn(funded),), (TxOut(600, P2PKH), TxOut(400, b"\x51")))
    rules = LedgerRules()
    effects = check_tx(state, spend, rules, verify_scripts=False)
    entry = state.get(funded)
    assert entry is not None
    assert effects == TxEffects(
        spend, ((outpoint_key(funded), entry),),
        ((spend.output_keys[0], UtxoEntry(600, P2PKH, None, 0, 1)),
         (spend.output_keys[1], UtxoEntry(400, b"\x51", None, 0, 1))),
        None, 0, None)


HALF_ORDER = SECP256K1_ORDER // 2


@pytest.mark.parametrize("s_bytes", [
    b"", b"\x00", b"\x01", b"\x00\x01", b"\x7f" + b"\xff" * 30,
    (HALF_ORDER - 1).to_bytes(32, "big"), HALF_ORDER.to_bytes(32, "big"),
    (HALF_ORDER + 1).to_bytes(32, "big"), b"\x00" + (HALF_ORDER + 1).to_bytes(32, "big"),
    b"\x00\x00" + HALF_ORDER.to_bytes(32, "big"), (SECP256K1_ORDER - 1).to_bytes(32, "big"),
    b"\xff" * 32, b"\x01" + b"\x00" * 32, b"\x00" * 33,
])
def test_low_s_by_bytes_equals_the_integer_comparison(s_bytes: bytes) -> None:
    r = b"\x01" * 5
    der = b"\x30" + bytes([4 + len(r) + len(s_bytes)]) + b"\x02" + bytes([len(r)]) + r \
        + b"\x02" + bytes([len(s_bytes)]) + s_bytes
    assert _is_low_s(der) is (int.from_bytes(s_bytes, "big") <= HALF_ORDER)


def test_intake_items_built_without_init_equal_the_constructed_ones() -> None:
    tx = Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 3)),), (TxOut(1, P2PKH),))
    spends = ((P2PKH, 1),)
    for item_spends in (spends, None):
        fast = intake._sealed_item(7, tx, "securities-a", "k", item_spends)
        plain = intake._Decoded(7, tx, "securities-a", "k", b"", item_spends, sealed=True)
        assert fast == plain and repr(fast) == repr(plain)
    candidate = Candidate(7, tx, "securities-a", "k")
    verified = intake._verified_intake(7, candidate)
    assert verified == intake.Intake(7, candidate, scripts_verified=True)
    assert repr(verified) == repr(intake.Intake(7, candidate, scripts_verified=True))
    assert intake._outputs(tx) == {outpoint_key(tx.outpoint(0)): (P2PKH, 1)}

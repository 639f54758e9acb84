"""Scripts: parsing, minimal pushes, templates, classification, and the interpreter's
limits, policies and error codes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import DecodeError, ScriptError
from ledger.hashing import hash160
from ledger.interpreter import (
    cast_to_bool,
    decode_num,
    encode_num,
    eval_script,
    find_and_delete,
    is_strict_der,
    parse_der_lax,
    verify_input,
)
from ledger.keys import SECP256K1_ORDER, PrivateKey, encode_der, parse_der_integers
from ledger.script import (
    MULTISIG_KEYS_MAX,
    OP_0,
    OP_1,
    OP_1NEGATE,
    OP_2,
    OP_3,
    OP_16,
    OP_CAT,
    OP_CHECKMULTISIG,
    OP_DROP,
    OP_DUP,
    OP_EQUAL,
    OP_HASH160,
    OP_IF,
    OP_NOP,
    OP_NOP1,
    OP_PUSHDATA1,
    OP_PUSHDATA2,
    OP_PUSHDATA4,
    OP_RETURN,
    OP_VERIFY,
    SCRIPT_BYTES_MAX,
    SCRIPT_ELEMENT_BYTES_MAX,
    SCRIPT_OPS_MAX,
    STACK_SIZE_MAX,
    ScriptTemplate,
    classify,
    is_minimal_push,
    is_push_only,
    is_unspendable,
    iter_ops,
    multisig_params,
    multisig_script,
    multisig_script_sig,
    op_return_script,
    p2pk_script,
    p2pk_script_sig,
    p2pkh_script,
    p2pkh_script_sig,
    p2sh_multisig_script_sig,
    p2sh_script,
    push_data,
    read_op,
)
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

KEYS = [PrivateKey(bytes([0x11 * (n + 1)]) * 32) for n in range(3)]
PUBS = [k.public_key.sec for k in KEYS]


def _unsigned(outputs: int = 2) -> Transaction:
    outs = tuple(TxOut(1000 * (n + 1), p2pkh_script(bytes(20))) for n in range(outputs))
    return Transaction(1, (TxIn(OutPoint(b"\x42" * 32, 1)),), outs)


def _sign(tx: Transaction, key: PrivateKey, script_code: bytes, hash_type: int = SIGHASH_ALL,
          index: int = 0) -> bytes:
    return key.sign(legacy_sighash(tx, index, script_code, hash_type)) + bytes([hash_type])


def _p2pkh_spend() -> tuple[Transaction, bytes]:
    tx = _unsigned()
    spk = p2pkh_script(KEYS[0].public_key.hash160)
    return tx.with_script_sig(0, p2pkh_script_sig(_sign(tx, KEYS[0], spk), PUBS[0])), spk


def _p2sh_spend() -> tuple[Transaction, bytes, bytes]:
    tx = _unsigned()
    redeem = multisig_script(2, PUBS)
    sigs = [_sign(tx, KEYS[n], redeem) for n in (0, 1)]
    return (tx.with_script_sig(0, p2sh_multisig_script_sig(sigs, redeem)),
            p2sh_script(hash160(redeem)), redeem)


def _code(call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(ScriptError) as caught:
        call(*args, **kwargs)
    assert caught.value.message.startswith("input ")
    return caught.value.code


# --- parsing and pushes -------------------------------------------------------------

@pytest.mark.parametrize(("size", "prefix"), [
    (1, bytes([1])), (75, bytes([75])), (76, bytes([OP_PUSHDATA1, 76])),
    (255, bytes([OP_PUSHDATA1, 255])), (256, bytes([OP_PUSHDATA2, 0, 1])),
    (65535, bytes([OP_PUSHDATA2, 0xFF, 0xFF])), (65536, bytes([OP_PUSHDATA4, 0, 0, 1, 0])),
])
def test_push_data_uses_the_shortest_form(size: int, prefix: bytes) -> None:
    data = b"\xaa" * size
    encoded = push_data(data)
    assert encoded == prefix + data
    assert list(iter_ops(encoded)) == [(encoded[0], data)]


def test_push_data_small_numbers_use_opcodes() -> None:
    assert push_data(b"") == bytes([OP_0])
    assert push_data(b"\x01") == bytes([OP_1])
    assert push_data(b"\x10") == bytes([OP_16])
    assert push_data(b"\x81") == bytes([OP_1NEGATE])
    assert push_data(b"\x11") == b"\x01\x11"
    assert push_data(b"\x00") == b"\x01\x00"


@pytest.mark.parametrize("script", [
    b"\x05abc", bytes([OP_PUSHDATA1]), bytes([OP_PUSHDATA1, 3, 1]), bytes([OP_PUSHDATA2, 1]),
    bytes([OP_PUSHDATA4, 1, 0, 0]), bytes([OP_PUSHDATA4, 1, 0, 0, 0]),
])
def test_truncated_pushes_raise(script: bytes) -> None:
    with pytest.raises(ScriptError) as caught:
        list(iter_ops(script))
    assert caught.value.code == "script-bad-push"
    assert not is_push_only(script)


@pytest.mark.parametrize(("script", "pos", "expected"), [
    (bytes([OP_0]), 0, (OP_0, b"", 1)),
    (b"\x02ab", 0, (2, b"ab", 3)),
    (bytes([OP_DUP, OP_PUSHDATA1, 2]) + b"xy", 1, (OP_PUSHDATA1, b"xy", 5)),
    (bytes([OP_PUSHDATA2, 1, 0]) + b"z", 0, (OP_PUSHDATA2, b"z", 4)),
    (bytes([OP_PUSHDATA4, 0, 0, 0, 0]), 0, (OP_PUSHDATA4, b"", 5)),
    (bytes([OP_1]), 0, (OP_1, None, 1)),
    (bytes([OP_DUP, OP_HASH160]), 1, (OP_HASH160, None, 2)),
])
def test_read_op_gives_opcode_data_and_next_offset(
    script: bytes, pos: int, expected: tuple[int, bytes | None, int]
) -> None:
    assert read_op(script, pos) == expected


@pytest.mark.parametrize(("script", "expected"), [
    (op_return_script(b"data"), True),
    (bytes([OP_RETURN]), True),
    (bytes([OP_RETURN, 0xFF, 0xFF]), True),  # unspendable even when it does not parse
    (b"", False),
    (p2pkh_script(bytes(20)), False),
    (bytes([OP_NOP, OP_RETURN]), False),  # OP_RETURN only counts as the first opcode
])
def test_is_unspendable(script: bytes, expected: bool) -> None:
    assert is_unspendable(script) is expected


def test_is_push_only() -> None:
    assert is_push_only(push_data(b"x" * 80) + bytes([OP_1NEGATE, OP_16, OP_0]))
    assert not is_push_only(push_data(b"x") + bytes([OP_DUP]))
    assert is_push_only(b"")


@given(st.lists(st.binary(max_size=600), max_size=8))
def test_iter_ops_round_trips_pushes(chunks: list[bytes]) -> None:
    script = b"".join(push_data(c) for c in chunks)
    decoded = []
    for opcode, data in iter_ops(script):
        if data is None:  # OP_1..OP_16 and OP_1NEGATE carry their value in the opcode
            assert OP_1 <= opcode <= OP_16 or opcode == OP_1NEGATE
            data = b"\x81" if opcode == OP_1NEGATE else bytes([opcode - OP_1 + 1])
        decoded.append(data)
    assert decoded == chunks
    assert is_push_only(script)


# --- templates and classification ----------------------------------------------------

def test_templates_classify() -> None:
    h = bytes(range(20))
    assert classify(p2pkh_script(h)) is ScriptTemplate.P2PKH
    assert classify(p2sh_script(h)) is ScriptTemplate.P2SH
    assert classify(p2pk_script(PUBS[0])) is ScriptTemplate.P2PK
    assert classify(p2pk_script(KEYS[0].public_key.uncompressed().sec)) is ScriptTemplate.P2PK
    assert classify(multisig_script(2, PUBS)) is ScriptTemplate.MULTISIG
    assert classify(op_return_script(b"OA\x01\x00")) is ScriptTemplate.NULL_DATA
    assert classify(bytes([OP_RETURN])) is ScriptTemplate.NULL_DATA
    assert classify(b"") is ScriptTemplate.NONSTANDARD
    assert classify(p2pkh_script(h)[:-1]) is ScriptTemplate.NONSTANDARD
    assert classify(p2pkh_script(h) + b"\x00") is ScriptTemplate.NONSTANDARD
    assert classify(bytes([OP_RETURN, OP_DUP])) is ScriptTemplate.NONSTANDARD
    assert p2pkh_script(h).hex() == "76a914" + h.hex() + "88ac"
    assert p2sh_script(h).hex() == "a914" + h.hex() + "87"


def test_multisig_params() -> None:
    assert multisig_params(multisig_script(2, PUBS)) == (2, tuple(PUBS))
    assert multisig_params(multisig_script(1, PUBS[:1])) == (1, (PUBS[0],))
    bad_m = bytes([OP_3]) + b"".join(push_data(p) for p in PUBS[:2]) + bytes(
        [OP_2, OP_CHECKMULTISIG])
    assert multisig_params(bad_m) is None
    assert multisig_params(p2pkh_script(bytes(20))) is None
    assert multisig_params(bytes([OP_1, 5]) + b"abcde" + bytes([OP_1, OP_CHECKMULTISIG])) is None


def test_multisig_template_limits() -> None:
    keys = [PrivateKey(bytes([n + 1]) * 32).public_key.sec for n in range(16)]
    assert classify(multisig_script(15, keys[:15])) is ScriptTemplate.MULTISIG
    with pytest.raises(AssertionError):
        multisig_script(2, keys)  # 16 keys: over the standard 15
    with pytest.raises(AssertionError):
        multisig_script(4, keys[:3])
    assert MULTISIG_KEYS_MAX == 20


def test_op_return_limit() -> None:
    assert classify(op_return_script(b"x" * 80)) is ScriptTemplate.NULL_DATA
    with pytest.raises(AssertionError):
        op_return_script(b"x" * 81)


# --- numbers, truth, DER --------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, -128, 255, 256, -32768, 2**31 - 1,
                                   -(2**31 - 1)])
def test_script_numbers_round_trip(value: int) -> None:
    assert decode_num(encode_num(value), require_minimal=True, where="t") == value


def test_script_number_rules() -> None:
    assert encode_num(128) == b"\x80\x00"
    assert encode_num(-1) == b"\x81"
    with pytest.raises(ScriptError):
        decode_num(b"\x01\x00", require_minimal=True, where="t")
    assert decode_num(b"\x01\x00", require_minimal=False, where="t") == 1
    with pytest.raises(ScriptError):
        decode_num(b"\x01\x00\x00\x00\x00", require_minimal=False, where="t")
    assert not cast_to_bool(b"\x00\x80") and not cast_to_bool(b"") and cast_to_bool(b"\x80\x00")


def test_der_strict_and_lax() -> None:
    sig = KEYS[0].sign(bytes(32))
    assert is_strict_der(sig + b"\x01")
    assert parse_der_lax(sig) == parse_der_integers(sig)
    r, s = parse_der_integers(sig)
    padded_r = b"\x00\x00" + r.to_bytes(32, "big")  # more zero padding than DER allows
    content = b"\x02\x22" + padded_r + b"\x02\x20" + s.to_bytes(32, "big")
    non_canonical = b"\x30" + bytes([len(content)]) + content  # excess zero padding
    assert not is_strict_der(non_canonical + b"\x01")
    assert parse_der_lax(non_canonical) == (r, s)
    long_form = b"\x30\x81" + bytes([len(content)]) + content
    assert parse_der_lax(long_form) == (r, s)
    assert parse_der_lax(b"\x31\x00") is None
    assert encode_der(r, s) == sig


def test_find_and_delete_respects_op_boundaries() -> None:
    assert find_and_delete(bytes([1, 0xAB, 0xAB]), bytes([0xAB])) == bytes([1, 0xAB])
    # [1, 2] inside push data is not an op boundary; after a 2-byte push it is
    assert find_and_delete(bytes([3, 1, 2, 0x51]), bytes([1, 2])) == bytes([3, 1, 2, 0x51])
    assert find_and_delete(bytes([2, 1, 2, 1, 2]), bytes([1, 2])) == bytes([2, 1, 2])
    assert find_and_delete(bytes([1, 2, 1, 2, 0x51]), bytes([1, 2])) == bytes([0x51])


# --- verify_input: success and every error code -----------------------------------------

def test_p2pkh_p2sh_p2pk_and_bare_multisig_verify() -> None:
    tx, spk = _p2pkh_spend()
    verify_input(tx, 0, spk, 0)
    tx2, spk2, _ = _p2sh_spend()
    verify_input(tx2, 0, spk2, 0)
    base = _unsigned()
    p2pk = p2pk_script(PUBS[2])
    verify_input(base.with_script_sig(0, p2pk_script_sig(_sign(base, KEYS[2], p2pk))), 0, p2pk, 0)
    bare = multisig_script(1, PUBS)
    verify_input(base.with_script_sig(0, multisig_script_sig([_sign(base, KEYS[1], bare)])), 0,
                 bare, 0)


def test_wrong_key_and_wrong_tx_fail() -> None:
    tx, spk = _p2pkh_spend()
    assert _code(verify_input, tx, 0, p2pkh_script(KEYS[1].public_key.hash160), 0) == (
        "script-equal-verify")
    other = Transaction(tx.version, tx.inputs, tx.outputs[:1], tx.lock_time)
    assert _code(verify_input, other, 0, spk, 0) == "script-sig-verify"
    assert _code(verify_input, tx, 1, spk, 0) == "script-input-index"


def test_high_s_strict_refuses_consensus_accepts() -> None:
    tx = _unsigned()
    spk = p2pkh_script(KEYS[0].public_key.hash160)
    r, s = parse_der_integers(KEYS[0].sign(legacy_sighash(tx, 0, spk, SIGHASH_ALL)))
    high = encode_der(r, SECP256K1_ORDER - s) + b"\x01"
    spent = tx.with_script_sig(0, p2pkh_script_sig(high, PUBS[0]))
    assert _code(verify_input, spent, 0, spk, 0) == "script-high-s"
    verify_input(spent, 0, spk, 0, strict=False)


def test_undefined_hash_type_strict_only() -> None:
    tx = _unsigned()
    spk = p2pkh_script(KEYS[0].public_key.hash160)
    spent = tx.with_script_sig(0, p2pkh_script_sig(_sign(tx, KEYS[0], spk, 0x04), PUBS[0]))
    assert _code(verify_input, spent, 0, spk, 0) == "script-hashtype"
    verify_input(spent, 0, spk, 0, strict=False)


def test_non_der_signature_strict_only() -> None:
    tx = _unsigned()
    spk = p2pkh_script(KEYS[0].public_key.hash160)
    r, s = parse_der_integers(KEYS[0].sign(legacy_sighash(tx, 0, spk, SIGHASH_ALL)))
    content = b"\x02\x22\x00\x00" + r.to_bytes(32, "big") + b"\x02\x20" + s.to_bytes(32, "big")
    sig = b"\x30" + bytes([len(content)]) + content + b"\x01"
    spent = tx.with_script_sig(0, p2pkh_script_sig(sig, PUBS[0]))
    assert _code(verify_input, spent, 0, spk, 0) == "script-der"
    verify_input(spent, 0, spk, 0, strict=False)


def test_push_only_and_clean_stack() -> None:
    tx, spk = _p2pkh_spend()
    sig_script = tx.inputs[0].script_sig
    not_push_only = tx.with_script_sig(0, sig_script + bytes([OP_1, OP_DROP]))
    assert _code(verify_input, not_push_only, 0, spk, 0) == "script-push-only"
    verify_input(not_push_only, 0, spk, 0, strict=False)
    extra = tx.with_script_sig(0, bytes([OP_1]) + sig_script)
    assert _code(verify_input, extra, 0, spk, 0) == "script-clean-stack"
    verify_input(extra, 0, spk, 0, strict=False)


def test_p2sh_rules() -> None:
    tx, spk, redeem = _p2sh_spend()
    sigs = [d for _, d in iter_ops(tx.inputs[0].script_sig)][1:3]
    one_sig = tx.with_script_sig(0, p2sh_multisig_script_sig([s for s in sigs[:1] if s], redeem))
    assert _code(verify_input, one_sig, 0, spk, 0, strict=False) == "script-stack-underflow"
    non_push = tx.with_script_sig(0, bytes([OP_NOP]) + tx.inputs[0].script_sig)
    assert _code(verify_input, non_push, 0, spk, 0, strict=False) == "script-push-only"
    wrong_redeem = tx.with_script_sig(0, p2sh_multisig_script_sig(
        [s for s in sigs if s], multisig_script(2, PUBS[::-1])))
    assert _code(verify_input, wrong_redeem, 0, spk, 0) == "script-eval-false"


def test_nulldummy_strict_only() -> None:
    tx, spk, _ = _p2sh_spend()
    body = tx.inputs[0].script_sig[1:]
    dummy = tx.with_script_sig(0, bytes([OP_1]) + body)
    assert _code(verify_input, dummy, 0, spk, 0) == "script-nulldummy"
    verify_input(dummy, 0, spk, 0, strict=False)


def _eval(script: bytes, stack: list[bytes] | None = None, strict: bool = True) -> list[bytes]:
    return eval_script(script, [] if stack is None else stack, _unsigned(), 0, strict=strict)


def test_limit_script_size() -> None:
    assert _code(_eval, bytes([OP_NOP]) * (SCRIPT_BYTES_MAX + 1)) == "script-size"
    _eval(bytes([OP_1]) * 200 + bytes([OP_DROP]) * 200)


def test_limit_element_size() -> None:
    _eval(push_data(b"x" * SCRIPT_ELEMENT_BYTES_MAX))
    assert _code(_eval, push_data(b"x" * (SCRIPT_ELEMENT_BYTES_MAX + 1))) == "script-push-size"


def test_limit_op_count() -> None:
    _eval(bytes([OP_NOP]) * SCRIPT_OPS_MAX)
    assert _code(_eval, bytes([OP_NOP]) * (SCRIPT_OPS_MAX + 1)) == "script-op-count"
    # CHECKMULTISIG counts its keys: 190 NOPs + 1 + 20 keys > 201
    keys = push_data(PUBS[0]) * 20
    script = (bytes([OP_NOP]) * 190 + bytes([OP_0, OP_0]) + keys
              + bytes([0x01, 20, OP_CHECKMULTISIG]))
    assert _code(_eval, script, strict=False) == "script-op-count"


def test_limit_stack_size() -> None:
    _eval(bytes([OP_1]) * STACK_SIZE_MAX)
    assert _code(_eval, bytes([OP_1]) * (STACK_SIZE_MAX + 1)) == "script-stack-size"


def test_disabled_bad_and_return_opcodes() -> None:
    assert _code(_eval, bytes([OP_1, OP_1, OP_CAT])) == "script-disabled-opcode"
    assert _code(_eval, bytes([OP_1, OP_IF])) == "script-bad-opcode"
    assert _code(_eval, bytes([0x50])) == "script-bad-opcode"
    assert _code(_eval, bytes([0xFF])) == "script-bad-opcode"
    assert _code(_eval, bytes([OP_RETURN])) == "script-op-return"
    assert _code(_eval, bytes([OP_0, OP_VERIFY])) == "script-verify"
    assert _code(_eval, bytes([OP_DUP])) == "script-stack-underflow"
    assert _code(_eval, bytes([OP_NOP1])) == "script-bad-opcode"
    assert _eval(bytes([OP_NOP1]), strict=False) == []
    assert _code(_eval, b"\x02\x01") == "script-bad-push"
    assert _code(_eval, bytes([OP_PUSHDATA1, 1, 7])) == "script-minimal-data"
    assert _eval(bytes([OP_PUSHDATA1, 1, 7]), strict=False) == [b"\x07"]


def test_eval_hash_and_equal() -> None:
    data = b"capital"
    assert _eval(push_data(data) + bytes([OP_HASH160]) + push_data(hash160(data))
                 + bytes([OP_EQUAL])) == [b"\x01"]
    assert _code(verify_input, _unsigned(), 0, op_return_script(b"x"), 0) == "script-op-return"
    assert _code(verify_input, _unsigned(), 0, b"", 0) == "script-eval-false"


def test_checkmultisig_wrong_order_and_sig_count() -> None:
    tx = _unsigned()
    redeem = multisig_script(2, PUBS)
    sigs = [_sign(tx, KEYS[n], redeem) for n in (0, 2)]
    spk = p2sh_script(hash160(redeem))
    verify_input(tx.with_script_sig(0, p2sh_multisig_script_sig(sigs, redeem)), 0, spk, 0)
    swapped = tx.with_script_sig(0, p2sh_multisig_script_sig(sigs[::-1], redeem))
    assert _code(verify_input, swapped, 0, spk, 0) == "script-sig-verify"
    assert _code(verify_input, swapped, 0, spk, 0, strict=False) == "script-p2sh-eval"
    too_many = bytes([OP_0, OP_2]) + push_data(PUBS[0]) + bytes([OP_1])
    assert _code(_eval, too_many + bytes([OP_CHECKMULTISIG])) == "script-sig-count"


# --- Hypothesis: any flipped bit breaks a signed transaction ------------------------------

SIGNED = [_p2pkh_spend(), _p2sh_spend()[:2]]


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from([0, 1]), data=st.data())
def test_any_flipped_bit_fails(which: int, data: st.DataObject) -> None:
    tx, spk = SIGNED[which]
    raw = bytearray(tx.serialize())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        mutated = Transaction.parse(bytes(raw))
    except DecodeError:
        return
    with pytest.raises(ScriptError):
        verify_input(mutated, 0, spk, 0)


@given(st.binary(max_size=70_000))
def test_minimal_push_check_agrees_with_push_data(data: bytes) -> None:
    encoded = push_data(data)
    assert is_minimal_push(encoded[0], data)
    for opcode in (OP_PUSHDATA1, OP_PUSHDATA2, OP_PUSHDATA4):
        if opcode != encoded[0]:
            assert not is_minimal_push(opcode, data)


def test_limit_multisig_key_count() -> None:
    keys = push_data(PUBS[0]) * 21
    script = bytes([OP_0, OP_0]) + keys + bytes([0x01, 21, OP_CHECKMULTISIG])
    assert _code(_eval, script, strict=False) == "script-pubkey-count"
    ok = bytes([OP_0, OP_0]) + push_data(PUBS[0]) * 20 + bytes([0x01, 20, OP_CHECKMULTISIG])
    assert _eval(ok, strict=False) == [b"\x01"]  # 0-of-20 succeeds, as in Bitcoin

"""The hot path's shortcuts agree with the general code they bypass.

Three shortcuts, each with a general path that stays the authority:

* ``verify_input``'s P2PKH / P2PK fast path versus the full interpreter
  (``_interpret_input``): same verdict, and on failure the same code and message,
  for valid spends and random mutations of them (flipped bytes, other hash types,
  high S, non-strict DER, non-minimal pushes, wrong keys, extra items).
* ``legacy_sighash``'s SIGHASH_ALL road (cached blanked segments) versus the
  textbook definition (copy the transaction, blank every scriptSig, put the
  script code in the signed input, append the hash type, SHA-256d).
* ``codec.decode``'s strict flat-record reader versus fastavro plus the canonical
  re-encode check: same record, or the same error code and message, for encoded
  records and random mutations of their bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.block import Block, make_block
from ledger.errors import ValidationError
from ledger.hashing import hash160, sha256d
from ledger.interpreter import (
    _interpret_input,
    _verify_p2pk_fast,
    _verify_p2pkh_fast,
    _verify_p2sh_multisig_fast,
    verify_input,
)
from ledger.keys import SECP256K1_ORDER, PrivateKey, encode_der, parse_der_integers
from ledger.script import (
    OP_1,
    OP_NOP,
    OP_PUSHDATA1,
    OP_PUSHDATA2,
    multisig_script,
    multisig_script_sig,
    p2pk_script,
    p2pk_script_sig,
    p2pkh_script,
    p2pkh_script_sig,
    p2sh_multisig_script_sig,
    p2sh_script,
    push_data,
)
from ledger.serialization import ByteReader
from ledger.sighash import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    legacy_sighash,
    remove_codeseparators,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.kafka import codec
from streams.kafka.codec import SchemaRegistry, _read_flat

pytestmark = pytest.mark.unit

KEYS = [PrivateKey(bytes([n + 1]) * 32, compressed=n % 3 != 2) for n in range(4)]
HASH_TYPES = [SIGHASH_ALL, SIGHASH_NONE, SIGHASH_SINGLE,
              SIGHASH_ALL | SIGHASH_ANYONECANPAY, SIGHASH_NONE | SIGHASH_ANYONECANPAY,
              SIGHASH_SINGLE | SIGHASH_ANYONECANPAY,
              0x00, 0x04, 0x21, 0x41, 0x84, 0xFF]  # undefined ones too


# --- script verification ------------------------------------------------------------

def _unsigned(input_count: int, output_count: int) -> Transaction:
    return Transaction(
        1,
        tuple(TxIn(OutPoint(bytes([n + 7]) * 32, n), b"", 0xFFFFFFFE - n)
              for n in range(input_count)),
        tuple(TxOut(5_000 + n, p2pkh_script(bytes([n]) * 20)) for n in range(output_count)),
        lock_time=3,
    )


def _signed_spend(
    key: PrivateKey, kind: str, hash_type: int, input_count: int, input_index: int,
    output_count: int, *, signer: PrivateKey | None = None, script_flip: int = 0,
) -> tuple[Transaction, bytes, bytes]:
    """(unsigned tx, scriptPubKey, signature with hash type) for one input.

    ``signer`` signs instead of ``key`` (a wrong key with a good signature);
    ``script_flip`` (position << 8 | mask) alters the scriptPubKey *before* signing,
    so the signature covers the altered script and only template checks can fail.
    """
    pubkey = key.public_key.sec
    script_pubkey = p2pkh_script(hash160(pubkey)) if kind == "p2pkh" else p2pk_script(pubkey)
    if script_flip:
        flipped = bytearray(script_pubkey)
        flipped[(script_flip >> 8) % len(flipped)] ^= script_flip & 0xFF or 1
        script_pubkey = bytes(flipped)
    tx = _unsigned(input_count, output_count)
    message = legacy_sighash(tx, input_index, script_pubkey, hash_type)
    return tx, script_pubkey, (signer or key).sign(message) + bytes([hash_type])


def _high_s(sig: bytes) -> bytes:
    r, s = parse_der_integers(sig[:-1])
    return encode_der(r, SECP256K1_ORDER - s) + sig[-1:]


def _padded_r(sig: bytes) -> bytes:
    """Same (r, s) with a superfluous leading zero in r: not strict DER."""
    der = sig[:-1]
    len_r = der[3]
    body = b"\x02" + bytes([len_r + 1]) + b"\x00" + der[4 : 4 + len_r] + der[4 + len_r :]
    return b"\x30" + bytes([len(body)]) + body + sig[-1:]


MUTATIONS = ["none", "flip-sig-script", "flip-script-pubkey", "retag-hash-type", "high-s",
             "padded-r", "pushdata1-sig", "other-key", "extra-push", "extra-nop",
             "truncate", "empty-sig", "swap-order", "signed-flip-script-pubkey",
             "signed-by-other-key"]


def _mutate(mutation: str, kind: str, sig: bytes, pubkey: bytes, script_pubkey: bytes,
            position: int, mask: int, other: bytes) -> tuple[bytes, bytes]:
    """(scriptSig, scriptPubKey) after one mutation of a valid spend."""
    def script_sig_of(signature: bytes, key: bytes = pubkey) -> bytes:
        return p2pkh_script_sig(signature, key) if kind == "p2pkh" else p2pk_script_sig(signature)

    script_sig = script_sig_of(sig)
    if mutation == "flip-sig-script":
        index = position % len(script_sig)
        flipped = bytearray(script_sig)
        flipped[index] ^= mask
        return bytes(flipped), script_pubkey
    if mutation == "flip-script-pubkey":
        index = position % len(script_pubkey)
        flipped = bytearray(script_pubkey)
        flipped[index] ^= mask
        return script_sig, bytes(flipped)
    if mutation == "retag-hash-type":
        return script_sig_of(sig[:-1] + bytes([mask])), script_pubkey
    if mutation == "high-s":
        return script_sig_of(_high_s(sig)), script_pubkey
    if mutation == "padded-r":
        return script_sig_of(_padded_r(sig)), script_pubkey
    if mutation == "pushdata1-sig":
        rest = script_sig[1 + len(sig) :]
        return bytes([OP_PUSHDATA1, len(sig)]) + sig + rest, script_pubkey
    if mutation == "other-key":
        if kind == "p2pkh":
            return script_sig_of(sig, other), script_pubkey
        return script_sig, p2pk_script(other)
    if mutation == "extra-push":
        return push_data(bytes([mask])) + script_sig, script_pubkey
    if mutation == "extra-nop":
        return script_sig, script_pubkey + bytes([OP_NOP])
    if mutation == "truncate":
        return script_sig[: position % len(script_sig)], script_pubkey
    if mutation == "empty-sig":
        return script_sig_of(b""), script_pubkey
    if mutation == "swap-order" and kind == "p2pkh":
        return push_data(pubkey) + push_data(sig), script_pubkey
    return script_sig, script_pubkey


def _verdict(check: Any, *args: Any) -> str | None:
    """None when ``check`` accepts; otherwise the error's code and message."""
    try:
        check(*args)
    except ValidationError as error:
        return f"{error.code}: {error.message}"
    return None


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["p2pkh", "p2pk"]), key_index=st.integers(0, len(KEYS) - 1),
       hash_type=st.sampled_from(HASH_TYPES), input_count=st.integers(1, 3),
       input_pick=st.integers(0, 2), output_count=st.integers(0, 3),
       mutation=st.sampled_from(MUTATIONS), position=st.integers(0, 200),
       mask=st.integers(1, 255), reparse=st.booleans())
def test_fast_path_verdict_equals_the_interpreter(
    kind: str, key_index: int, hash_type: int, input_count: int, input_pick: int,
    output_count: int, mutation: str, position: int, mask: int, reparse: bool,
) -> None:
    key = KEYS[key_index]
    other = KEYS[(key_index + 1) % len(KEYS)].public_key.sec
    input_index = input_pick % input_count
    signer = KEYS[(key_index + 1) % len(KEYS)] if mutation == "signed-by-other-key" else None
    script_flip = position << 8 | mask if mutation == "signed-flip-script-pubkey" else 0
    tx, script_pubkey, sig = _signed_spend(key, kind, hash_type, input_count, input_index,
                                           output_count, signer=signer,
                                           script_flip=script_flip)
    script_sig, script_pubkey = _mutate(mutation, kind, sig, key.public_key.sec,
                                        script_pubkey, position, mask, other)
    tx = tx.with_script_sig(input_index, script_sig)
    if reparse:  # a parsed transaction carries its script spans (sighash shortcut)
        tx = Transaction.parse(tx.serialize())
    fast = _verdict(verify_input, tx, input_index, script_pubkey, 0)
    full = _verdict(_interpret_input, tx, input_index, script_pubkey, True)
    assert fast == full
    # Whenever the shortcut itself says yes, the interpreter agrees.
    if _verify_p2pkh_fast(tx, input_index, script_pubkey) or _verify_p2pk_fast(
            tx, input_index, script_pubkey):
        assert full is None


@pytest.mark.parametrize("kind", ["p2pkh", "p2pk"])
@pytest.mark.parametrize("key", [KEYS[0], KEYS[2]], ids=["compressed", "uncompressed"])
def test_every_byte_of_both_scripts_flipped(kind: str, key: PrivateKey) -> None:
    """Exhaustive over positions: each scriptPubKey byte altered before signing (so
    only the template checks stand between it and acceptance), and each scriptSig
    byte altered after signing."""
    masks = (0x01, 0x80, 0xFF)
    pubkey = key.public_key.sec
    _, plain_script, _ = _signed_spend(key, kind, SIGHASH_ALL, 1, 0, 1)
    for position in range(len(plain_script)):
        for mask in masks:
            tx, script_pubkey, sig = _signed_spend(key, kind, SIGHASH_ALL, 1, 0, 1,
                                                   script_flip=position << 8 | mask)
            script_sig = (p2pkh_script_sig(sig, pubkey) if kind == "p2pkh"
                          else p2pk_script_sig(sig))
            spend = Transaction.parse(tx.with_script_sig(0, script_sig).serialize())
            assert (_verdict(verify_input, spend, 0, script_pubkey, 0)
                    == _verdict(_interpret_input, spend, 0, script_pubkey, True))
    tx, script_pubkey, sig = _signed_spend(key, kind, SIGHASH_ALL, 1, 0, 1)
    script_sig = p2pkh_script_sig(sig, pubkey) if kind == "p2pkh" else p2pk_script_sig(sig)
    for position in range(len(script_sig)):
        for mask in masks:
            flipped = bytearray(script_sig)
            flipped[position] ^= mask
            spend = Transaction.parse(tx.with_script_sig(0, bytes(flipped)).serialize())
            assert (_verdict(verify_input, spend, 0, script_pubkey, 0)
                    == _verdict(_interpret_input, spend, 0, script_pubkey, True))


@pytest.mark.parametrize("kind", ["p2pkh", "p2pk"])
@pytest.mark.parametrize("hash_type", HASH_TYPES[:6])
def test_fast_path_accepts_standard_spends(kind: str, hash_type: int) -> None:
    """The shortcut is really taken for every defined hash type (not just a fallback)."""
    for key in KEYS:
        tx, script_pubkey, sig = _signed_spend(key, kind, hash_type, 2, 1, 2)
        pubkey = key.public_key.sec
        script_sig = p2pkh_script_sig(sig, pubkey) if kind == "p2pkh" else p2pk_script_sig(sig)
        tx = Transaction.parse(tx.with_script_sig(1, script_sig).serialize())
        fast = _verify_p2pkh_fast if kind == "p2pkh" else _verify_p2pk_fast
        assert fast(tx, 1, script_pubkey)
        verify_input(tx, 1, script_pubkey, 0)


def test_fast_path_refuses_what_the_interpreter_refuses() -> None:
    """Spot checks with the expected codes (the property above covers the rest)."""
    key = KEYS[0]
    tx, script_pubkey, sig = _signed_spend(key, "p2pkh", SIGHASH_ALL, 1, 0, 1)
    pubkey = key.public_key.sec
    cases = {
        "script-high-s": p2pkh_script_sig(_high_s(sig), pubkey),
        "script-der": p2pkh_script_sig(_padded_r(sig), pubkey),
        "script-hashtype": p2pkh_script_sig(sig[:-1] + b"\x04", pubkey),
        "script-sig-verify": p2pkh_script_sig(sig[:-1] + b"\x02", pubkey),
        "script-equal-verify": p2pkh_script_sig(sig, KEYS[1].public_key.sec),
        "script-minimal-data": bytes([OP_PUSHDATA1, len(sig)]) + sig + push_data(pubkey),
        "script-clean-stack": push_data(b"\x01") + p2pkh_script_sig(sig, pubkey),
    }
    for code, script_sig in cases.items():
        spend = Transaction.parse(tx.with_script_sig(0, script_sig).serialize())
        with pytest.raises(ValidationError) as info:
            verify_input(spend, 0, script_pubkey, 0)
        assert info.value.code == code


# --- P2SH multisig ------------------------------------------------------------------

MULTISIG_MUTATIONS = ["none", "flip-script-sig", "signed-flip-redeem", "dummy-one",
                      "extra-push", "pushdata2-redeem", "high-s", "retag-hash-type",
                      "drop-sig", "extra-sig", "foreign-redeem", "random-signers"]


@settings(max_examples=250, deadline=None)
@given(key_picks=st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=4, unique=True),
       m_pick=st.integers(0, 3), signer_picks=st.lists(st.integers(0, 4), min_size=1,
                                                        max_size=4),
       hash_types=st.lists(st.sampled_from(HASH_TYPES), min_size=4, max_size=4),
       input_count=st.integers(1, 2), mutation=st.sampled_from(MULTISIG_MUTATIONS),
       position=st.integers(0, 400), mask=st.integers(1, 255))
def test_multisig_fast_path_verdict_equals_the_interpreter(
    key_picks: list[int], m_pick: int, signer_picks: list[int], hash_types: list[int],
    input_count: int, mutation: str, position: int, mask: int,
) -> None:
    keys = [KEYS[n] for n in key_picks]
    m = m_pick % len(keys) + 1
    redeem = multisig_script(m, [key.public_key.sec for key in keys])
    if mutation == "signed-flip-redeem":
        flipped = bytearray(redeem)
        flipped[position % len(flipped)] ^= mask
        redeem = bytes(flipped)
    script_pubkey = p2sh_script(hash160(redeem))
    if mutation == "foreign-redeem":  # the output commits to another redeem script
        script_pubkey = p2sh_script(hash160(multisig_script(1, [KEYS[3].public_key.sec])))
    input_index = input_count - 1
    tx = _unsigned(input_count, 2)
    # Valid signers (an ordered choice of m of the keys) unless the mutation picks
    # them at random: any order, repeats, a stranger (pick 4).
    if mutation == "random-signers":
        signers = [keys[pick % len(keys)] if pick < 4 else PrivateKey(b"\x55" * 32)
                   for pick in signer_picks[:m]]
    else:
        chosen = sorted({pick % len(keys) for pick in signer_picks} | set(range(len(keys))),
                        key=lambda n: (n not in signer_picks, n))[:m]
        signers = [keys[n] for n in sorted(chosen)]
    sigs = [signer.sign(legacy_sighash(tx, input_index, redeem, hash_types[n]))
            + bytes([hash_types[n]]) for n, signer in enumerate(signers)]
    if mutation == "high-s":
        sigs[0] = _high_s(sigs[0])
    elif mutation == "retag-hash-type":
        sigs[-1] = sigs[-1][:-1] + bytes([mask])
    elif mutation == "drop-sig":
        sigs = sigs[1:]
    elif mutation == "extra-sig":
        sigs = sigs + sigs[:1]
    script_sig = p2sh_multisig_script_sig(sigs, redeem)
    if mutation == "flip-script-sig":
        flipped = bytearray(script_sig)
        flipped[position % len(flipped)] ^= mask
        script_sig = bytes(flipped)
    elif mutation == "dummy-one":
        script_sig = bytes([OP_1]) + script_sig[1:]
    elif mutation == "extra-push":
        script_sig = script_sig[:1] + push_data(bytes([mask]) * 3) + script_sig[1:]
    elif mutation == "pushdata2-redeem":
        script_sig = (multisig_script_sig(sigs) + bytes([OP_PUSHDATA2])
                      + len(redeem).to_bytes(2, "little") + redeem)
    spend = Transaction.parse(tx.with_script_sig(input_index, script_sig).serialize())
    fast = _verdict(verify_input, spend, input_index, script_pubkey, 0)
    full = _verdict(_interpret_input, spend, input_index, script_pubkey, True)
    assert fast == full
    if _verify_p2sh_multisig_fast(spend, input_index, script_pubkey):
        assert full is None
    elif mutation == "none" and all(1 <= t & 0x7F <= 3 for t in hash_types[:m]):
        raise AssertionError("a valid standard multisig spend missed the fast path")


@pytest.mark.parametrize(("m", "signer_indexes"), [(1, (0,)), (1, (2,)), (2, (0, 1)),
                                                    (2, (0, 2)), (2, (1, 2)), (3, (0, 1, 2))])
def test_multisig_fast_path_accepts_standard_spends(m: int,
                                                     signer_indexes: tuple[int, ...]) -> None:
    keys = KEYS[:3]  # two compressed keys, one uncompressed
    redeem = multisig_script(m, [key.public_key.sec for key in keys])
    script_pubkey = p2sh_script(hash160(redeem))
    tx = _unsigned(2, 1)
    digest = legacy_sighash(tx, 1, redeem, SIGHASH_ALL)
    sigs = [keys[n].sign(digest) + bytes([SIGHASH_ALL]) for n in signer_indexes]
    spend = Transaction.parse(
        tx.with_script_sig(1, p2sh_multisig_script_sig(sigs, redeem)).serialize())
    assert _verify_p2sh_multisig_fast(spend, 1, script_pubkey)
    verify_input(spend, 1, script_pubkey, 0)
    # signatures out of key order fail in both (CHECKMULTISIG keeps the order)
    if len(sigs) > 1:
        swapped = Transaction.parse(tx.with_script_sig(
            1, p2sh_multisig_script_sig(sigs[::-1], redeem)).serialize())
        assert not _verify_p2sh_multisig_fast(swapped, 1, script_pubkey)
        with pytest.raises(ValidationError) as info:
            verify_input(swapped, 1, script_pubkey, 0)
        assert info.value.code == "script-sig-verify"


# --- reading transactions inside a larger buffer (blocks) ---------------------------

def _read_verdict(read: Any, buffer: bytes, start: int) -> tuple[str, Any]:
    reader = ByteReader(buffer, "block")
    reader.read(start)
    try:
        tx = read(reader)
    except ValidationError as error:
        return "error", (error.code, error.message)
    return "ok", (tx.version, tx.inputs, tx.outputs, tx.lock_time, tx.serialize(),
                  reader.position)


@settings(max_examples=300, deadline=None)
@given(script_sigs=st.lists(st.binary(max_size=300), min_size=0, max_size=3),
       output_scripts=st.lists(st.binary(max_size=300), max_size=3),
       prefix=st.binary(max_size=8), suffix=st.binary(max_size=8),
       flips=st.lists(st.tuples(st.integers(0, 2_000), st.integers(1, 255)), max_size=3),
       cut=st.integers(0, 2_000))
def test_read_in_a_buffer_equals_the_careful_reader(
    script_sigs: list[bytes], output_scripts: list[bytes], prefix: bytes, suffix: bytes,
    flips: list[tuple[int, int]], cut: int,
) -> None:
    tx = Transaction(
        1, tuple(TxIn(OutPoint(bytes([n]) * 32, n), sig, n) for n, sig in enumerate(script_sigs)),
        tuple(TxOut(n - 1, script) for n, script in enumerate(output_scripts)), lock_time=5)
    body = bytearray(tx.serialize())
    for position, mask in flips:
        body[position % len(body)] ^= mask
    buffer = prefix + bytes(body[: max(cut, len(body) // 2)]) + suffix
    fast = _read_verdict(Transaction.read, buffer, len(prefix))
    careful = _read_verdict(Transaction._read_careful, buffer, len(prefix))
    assert fast == careful


def test_block_parse_reads_through_the_fast_path() -> None:
    """Transactions read out of a block carry the fast parser's script spans, and the
    block's sighashes equal those of the same transactions parsed alone."""
    key = KEYS[0]
    txs = []
    for n in range(3):
        tx, script_pubkey, sig = _signed_spend(key, "p2pkh", SIGHASH_ALL, n + 1, n, 2)
        txs.append(tx.with_script_sig(n, p2pkh_script_sig(sig, key.public_key.sec)))
    block = make_block(key, height=1, prev_hash=bytes(32), time_ms=0, proposer="otc-operator",
                       round_=0, txs=txs)
    parsed = Block.parse(block.serialize())
    for n, (alone, inside) in enumerate(zip(txs, parsed.txs, strict=True)):
        assert "script_spans" in inside._cache
        assert inside.serialize() == alone.serialize()
        script_pubkey = p2pkh_script(hash160(key.public_key.sec))
        assert legacy_sighash(inside, n, script_pubkey, SIGHASH_ALL) == _reference_sighash_all(
            alone, n, script_pubkey, SIGHASH_ALL)
        verify_input(inside, n, script_pubkey, 0)


# --- SIGHASH_ALL --------------------------------------------------------------------

def _reference_sighash_all(tx: Transaction, input_index: int, script_code: bytes,
                           hash_type: int) -> bytes:
    inputs = tuple(
        TxIn(txin.prevout, remove_codeseparators(script_code) if k == input_index else b"",
             txin.sequence)
        for k, txin in enumerate(tx.inputs))
    blanked = Transaction(tx.version, inputs, tx.outputs, tx.lock_time)
    return sha256d(blanked.serialize() + struct.pack("<I", hash_type & 0xFFFFFFFF))


@settings(max_examples=200, deadline=None)
@given(script_sigs=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       output_scripts=st.lists(st.binary(max_size=40), max_size=3),
       script_code=st.binary(max_size=60), input_pick=st.integers(0, 3),
       hash_type=st.sampled_from([SIGHASH_ALL, 0, 4, 0x21, 0x41, 0x7F, 0x1_00000001,
                                  -0x7FFFFFFF]),
       reparse=st.booleans())
def test_sighash_all_equals_the_textbook_definition(
    script_sigs: list[bytes], output_scripts: list[bytes], script_code: bytes,
    input_pick: int, hash_type: int, reparse: bool,
) -> None:
    tx = Transaction(
        2,
        tuple(TxIn(OutPoint(bytes([n]) * 32, n), sig, n) for n, sig in enumerate(script_sigs)),
        tuple(TxOut(n, script) for n, script in enumerate(output_scripts)),
        lock_time=99,
    )
    if reparse:
        tx = Transaction.parse(tx.serialize())
    input_index = input_pick % len(script_sigs)
    assert legacy_sighash(tx, input_index, script_code, hash_type) == _reference_sighash_all(
        tx, input_index, script_code, hash_type)


# --- codec ---------------------------------------------------------------------------

FAST = SchemaRegistry()
GENERAL = SchemaRegistry()
GENERAL._flat_plans.clear()  # fastavro plus the canonical re-encode check, always

int64 = st.integers(-(2**63), 2**63 - 1)
DATETIME_MS_MIN = -62_135_596_800_000  # 0001-01-01T00:00:00Z
DATETIME_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
RECORDS = {
    "TxSubmitted": st.fixed_dictionaries({
        "tx": st.binary(max_size=300), "submitter": st.text(max_size=20),
        "idempotency_key": st.text(max_size=40), "submitted_at": int64,
        "signature": st.binary(max_size=80)}),
    "VoteCast": st.fixed_dictionaries({
        "voter": st.text(max_size=20), "height": int64,
        "round": st.integers(-(2**31), 2**31 - 1),
        "kind": st.sampled_from(["ack", "nack", "timeout"]), "block_hash": st.binary(max_size=40),
        "reason_code": st.text(max_size=20), "signature": st.binary(max_size=80),
        "voted_at": st.integers(0, 2**45)}),
    "StackPinged": st.fixed_dictionaries({
        "ping_id": st.text(max_size=20), "sender": st.text(max_size=20), "sent_at_ms": int64,
        "payload": st.binary(max_size=100), "note": st.text(max_size=20)}),
}


def _decode_verdict(registry: SchemaRegistry, data: bytes) -> tuple[str, Any]:
    try:
        decoded = registry.decode(data)
    except ValidationError as error:
        return "error", (error.code, error.message)
    return "ok", (decoded.name, decoded.record, decoded.fingerprint)


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    body = bytearray(data[codec.HEADER_BYTES:])
    kind = draw(st.sampled_from(["none", "flip", "insert", "delete", "truncate", "append",
                                 "widen-varint", "high-byte"]))
    position = draw(st.integers(0, max(0, len(body) - 1)))
    byte = draw(st.integers(0, 255))
    if kind == "flip" and body:
        body[position] ^= byte or 1
    elif kind == "insert":
        body.insert(position, byte)
    elif kind == "delete" and body:
        del body[position]
    elif kind == "truncate":
        del body[position:]
    elif kind == "append":
        body.append(byte)
    elif kind == "widen-varint" and body and body[position] < 0x80:
        # the same number as a two-byte varint: decodes alike in lenient readers
        body[position : position + 1] = bytes([body[position] | 0x80, 0x00])
    elif kind == "high-byte" and body:
        body[position] |= 0x80
    return data[: codec.HEADER_BYTES] + bytes(body)


@settings(max_examples=400, deadline=None)
@given(data=st.sampled_from(sorted(RECORDS)).flatmap(
    lambda name: RECORDS[name].map(lambda record: codec.encode(name, record))).flatmap(_mutated))
def test_flat_reader_decodes_exactly_as_the_general_path(data: bytes) -> None:
    assert _decode_verdict(FAST, data) == _decode_verdict(GENERAL, data)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(RECORDS)), data=st.data())
def test_flat_reader_takes_every_canonical_record(name: str, data: st.DataObject) -> None:
    record: dict[str, Any] = data.draw(RECORDS[name])
    encoded = codec.encode(name, record)
    version = FAST.schema(name)
    flat = _read_flat(FAST._flat_plans[version.fingerprint], encoded[codec.HEADER_BYTES:])
    # datetime spans years 1..9999; beyond it both paths refuse the timestamp
    in_range = all(DATETIME_MS_MIN <= value <= DATETIME_MS_MAX
                   for key, value in record.items() if key.endswith("_at"))
    if in_range:
        assert flat == GENERAL.decode(encoded).record


def test_flat_reader_covers_the_hot_records() -> None:
    for name in ("TxSubmitted", "VoteCast", "BlockProposed", "StackPinged"):
        assert FAST.schema(name).fingerprint in FAST._flat_plans
    # records with unions or nested records keep the general path only
    for name in ("TxRejected", "BlockCommitted", "MembershipChanged"):
        assert FAST.schema(name).fingerprint not in FAST._flat_plans

"""The script interpreter for the standard templates, and ``verify_input``.

Owns: evaluation of legacy Bitcoin scripts over a byte-string stack (pushes,
OP_0..OP_16, OP_1NEGATE, OP_NOP, stack and hash opcodes, OP_EQUAL(VERIFY),
OP_VERIFY, OP_RETURN, OP_CODESEPARATOR, OP_CHECKSIG(VERIFY),
OP_CHECKMULTISIG(VERIFY) with Bitcoin's extra pop), P2SH redeem-script
evaluation, the named limits, and the two policies:

* ``strict=True`` (default; every new transaction): strict DER (BIP 66 shape),
  low-S (BIP 62), defined hash types, SEC-shaped public keys, minimal pushes,
  push-only scriptSig, clean stack, NULLDUMMY and NULLFAIL (a failed signature
  check with a non-empty signature is an error, not a ``false``).
* ``strict=False``: what Bitcoin's consensus accepted for historical mainnet
  transactions: DER parsed laxly (as OpenSSL did), high-S normalised before
  verification, any hash type, any stack left behind.

Fast paths: under strict policy, ``verify_input`` first tries the three standard
templates (P2PKH, P2PK, P2SH multisig) without the stack machine, checking in
direct code everything the interpreter would check on that path. A fast path
only ever answers "verified"; for anything unusual and on any failure the full
interpreter runs and decides, so verdicts, error codes and messages are the
interpreter's (tests/unit/test_fastpath.py checks the equivalence). An invalid
signature on a standard spend is therefore verified twice, once per path.

Every failure raises ``ScriptError`` with a stable ``code`` and a message naming
the input index. Opcodes outside this set fail with ``script-bad-opcode`` (or
``script-disabled-opcode`` for the ones Bitcoin disabled); this ledger never
needs them and refusing is safer than a half-implemented opcode.

"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from functools import lru_cache

from ledger.errors import ScriptError
from ledger.hashing import hash160, ripemd160, sha256, sha256d
from ledger.keys import PUBLIC_KEY_CACHE_ENTRIES_MAX, SECP256K1_ORDER, encode_der, verify_der
from ledger.script import (
    DISABLED_OPCODES,
    MULTISIG_KEYS_MAX,
    OP_1,
    OP_1NEGATE,
    OP_16,
    OP_CHECKMULTISIG,
    OP_CHECKMULTISIGVERIFY,
    OP_CHECKSIG,
    OP_CHECKSIGVERIFY,
    OP_CODESEPARATOR,
    OP_DROP,
    OP_DUP,
    OP_EQUAL,
    OP_EQUALVERIFY,
    OP_HASH160,
    OP_HASH256,
    OP_NOP,
    OP_NOP1,
    OP_NOP10,
    OP_PUSHDATA2,
    OP_RETURN,
    OP_RIPEMD160,
    OP_SHA1,
    OP_SHA256,
    OP_SIZE,
    OP_SWAP,
    OP_VERIFY,
    SCRIPT_BYTES_MAX,
    SCRIPT_ELEMENT_BYTES_MAX,
    SCRIPT_NUM_BYTES_MAX,
    SCRIPT_OPS_MAX,
    STACK_SIZE_MAX,
    is_minimal_push,
    length_prefixed_push,
    read_op,
)
from ledger.sighash import SIGHASH_ANYONECANPAY, SIGHASH_SINGLE, legacy_sighash
from ledger.tx import Transaction

_SECP256K1_HALF_ORDER = SECP256K1_ORDER // 2
_HALF_ORDER_BYTES = 32
_SECP256K1_HALF_ORDER_BE = _SECP256K1_HALF_ORDER.to_bytes(_HALF_ORDER_BYTES, "big")
PARSED_SCRIPT_CACHE_ENTRIES_MAX = 8192

# One parsed operation: opcode, push data (None for non-push) and the byte offset
# just past it (OP_CODESEPARATOR needs offsets to cut the script code).
_Op = tuple[int, bytes | None, int]


@lru_cache(maxsize=PARSED_SCRIPT_CACHE_ENTRIES_MAX)
def _parse(script: bytes) -> tuple[_Op, ...] | None:
    """Parsed operations of ``script`` with end offsets; None when a push is truncated.

    Cached: the same output scripts and redeem scripts recur across transactions.
    """
    ops: list[_Op] = []
    pos = 0
    length = len(script)
    try:
        while pos < length:
            opcode, data, pos = read_op(script, pos)
            ops.append((opcode, data, pos))
    except ScriptError:
        return None
    return tuple(ops)


def find_and_delete(script: bytes, pattern: bytes) -> bytes:
    """Bitcoin's FindAndDelete: remove ``pattern`` where it starts at an op boundary."""
    if not pattern or pattern not in script:
        return script
    out: list[bytes] = []
    pos = 0
    kept_from = 0
    length = len(script)
    found = False
    while True:
        out.append(script[kept_from:pos])
        while length - pos >= len(pattern) and script.startswith(pattern, pos):
            pos += len(pattern)
            found = True
        kept_from = pos
        if pos >= length:
            break
        # advance over one operation; stop (keeping the rest) on a truncated push
        try:
            _, _, pos = read_op(script, pos)
        except ScriptError:
            break
    if not found:
        return script
    out.append(script[kept_from:])
    return b"".join(out)


# --- numbers and truth -----------------------------------------------------------------

def encode_num(value: int) -> bytes:
    """CScriptNum serialization: little-endian sign-magnitude, minimal."""
    if value == 0:
        return b""
    negative = value < 0
    magnitude = -value if negative else value
    out = bytearray()
    while magnitude:
        out.append(magnitude & 0xFF)
        magnitude >>= 8
    if out[-1] & 0x80:
        out.append(0x80 if negative else 0x00)
    elif negative:
        out[-1] |= 0x80
    return bytes(out)


def decode_num(data: bytes, *, require_minimal: bool, where: str) -> int:
    if len(data) > SCRIPT_NUM_BYTES_MAX:
        raise ScriptError(f"{where}: number of {len(data)} bytes exceeds 4", code="script-num")
    if not data:
        return 0
    if require_minimal and (data[-1] & 0x7F) == 0 and (len(data) == 1 or not data[-2] & 0x80):
        raise ScriptError(f"{where}: non-minimally encoded number", code="script-minimal-data")
    value = int.from_bytes(data, "little")
    if data[-1] & 0x80:
        return -(value & ~(0x80 << (8 * (len(data) - 1))))
    return value


def cast_to_bool(data: bytes) -> bool:
    """Bitcoin truth: any non-zero byte, except a lone sign bit (negative zero)."""
    for index, byte in enumerate(data):
        if byte:
            return not (index == len(data) - 1 and byte == 0x80)
    return False


# --- signature encodings ----------------------------------------------------------------

def is_strict_der(sig_with_hashtype: bytes) -> bool:
    """BIP 66's IsValidSignatureEncoding: strict DER plus one hash-type byte."""
    sig = sig_with_hashtype
    if len(sig) < 9 or len(sig) > 73:
        return False
    if sig[0] != 0x30 or sig[1] != len(sig) - 3:
        return False
    len_r = sig[3]
    if 5 + len_r >= len(sig):
        return False
    len_s = sig[5 + len_r]
    if len_r + len_s + 7 != len(sig):
        return False
    if sig[2] != 0x02 or len_r == 0 or sig[4] & 0x80:
        return False
    if len_r > 1 and sig[4] == 0x00 and not sig[5] & 0x80:
        return False
    if sig[len_r + 4] != 0x02 or len_s == 0 or sig[len_r + 6] & 0x80:
        return False
    return not (len_s > 1 and sig[len_r + 6] == 0x00 and not sig[len_r + 7] & 0x80)


def parse_der_lax(signature_der: bytes) -> tuple[int, int] | None:
    """(r, s) from a DER-ish signature, accepting what OpenSSL historically accepted:
    long-form lengths, excess leading zeros, negative-looking integers, trailing
    garbage after the sequence. None when even that shape is missing; (0, 0) when a
    value does not fit 32 bytes (it then simply fails verification, as in Bitcoin).
    """
    data = signature_der
    length = len(data)
    pos = 0

    def read_length() -> int | None:
        nonlocal pos
        if pos >= length:
            return None
        first = data[pos]
        pos += 1
        if not first & 0x80:
            return first
        count = first & 0x7F
        if count > length - pos:
            return None
        while count and data[pos] == 0:
            pos += 1
            count -= 1
        if count >= 8:
            return None
        value = 0
        for _ in range(count):
            value = (value << 8) | data[pos]
            pos += 1
        return value

    if pos >= length or data[pos] != 0x30:
        return None
    pos += 1
    if pos >= length:
        return None
    seq_len_byte = data[pos]
    pos += 1
    if seq_len_byte & 0x80:
        skip = seq_len_byte - 0x80
        if skip > length - pos:
            return None
        pos += skip
    values: list[int] = []
    overflow = False
    for _ in range(2):
        if pos >= length or data[pos] != 0x02:
            return None
        pos += 1
        size = read_length()
        if size is None or size > length - pos:
            return None
        body = data[pos : pos + size].lstrip(b"\x00")
        pos += size
        if len(body) > 32:
            overflow = True
            values.append(0)
        else:
            values.append(int.from_bytes(body, "big"))
    if overflow:
        return 0, 0
    r, s = values
    if r >= SECP256K1_ORDER or s >= SECP256K1_ORDER:
        return 0, 0
    return r, s


def _is_low_s(sig_der: bytes) -> bool:
    """S <= n/2. S's big-endian bytes without leading zeros are compared as bytes: a
    shorter one is smaller, one of equal length compares as its number (decision 0116;
    ``tests/unit/test_core_cost_second.py`` holds it to the integer comparison)."""
    len_r = sig_der[3]
    len_s = sig_der[5 + len_r]
    s = sig_der[6 + len_r : 6 + len_r + len_s].lstrip(b"\x00")
    # s == 0 passes here and fails verification, as in Core
    return len(s) < _HALF_ORDER_BYTES or (len(s) == _HALF_ORDER_BYTES
                                          and s <= _SECP256K1_HALF_ORDER_BE)


def _is_sec_pubkey(data: bytes) -> bool:
    if len(data) == 33:
        return data[0] in (0x02, 0x03)
    return len(data) == 65 and data[0] == 0x04


class _Context:
    """What one input's evaluation needs besides the stack."""

    __slots__ = ("input_index", "strict", "tx", "where")

    def __init__(self, tx: Transaction, input_index: int, strict: bool) -> None:
        self.tx = tx
        self.input_index = input_index
        self.strict = strict
        self.where = f"input {input_index}"

    def fail(self, code: str, detail: str) -> ScriptError:
        return ScriptError(f"{self.where}: {detail}", code=code)

    def check_signature_encoding(self, sig: bytes) -> None:
        if not sig or not self.strict:
            return
        if not is_strict_der(sig):
            raise self.fail("script-der", "signature is not strict DER (BIP 66)")
        if not _is_low_s(sig[:-1]):
            raise self.fail("script-high-s", "signature S value is not low (BIP 62)")
        base = sig[-1] & ~SIGHASH_ANYONECANPAY
        if not 1 <= base <= SIGHASH_SINGLE:
            raise self.fail("script-hashtype", f"undefined hash type 0x{sig[-1]:02x}")

    def check_pubkey_encoding(self, pubkey: bytes) -> None:
        if self.strict and not _is_sec_pubkey(pubkey):
            raise self.fail("script-pubkey-type", "public key is not a SEC encoding")

    def check_sig(self, sig: bytes, pubkey: bytes, script_code: bytes) -> bool:
        if not sig:
            return False
        hash_type = sig[-1]
        der = sig[:-1]
        if not self.strict:
            parsed = parse_der_lax(der)
            if parsed is None:
                return False
            r, s = parsed
            if r == 0 or s == 0:
                return False
            if s > _SECP256K1_HALF_ORDER:
                s = SECP256K1_ORDER - s
            der = encode_der(r, s)
        message = legacy_sighash(self.tx, self.input_index, script_code, hash_type)
        return verify_der(pubkey, der, message)


def eval_script(
    script: bytes,
    stack: list[bytes],
    tx: Transaction,
    input_index: int,
    *,
    strict: bool = True,
) -> list[bytes]:
    """Evaluate ``script`` on ``stack`` (modified in place and returned).

    Raises ``ScriptError`` on any failure; leaves the truth of the top item to the
    caller, as Bitcoin's EvalScript does.
    """
    context = _Context(tx, input_index, strict)
    _eval(script, stack, context)
    return stack


def _eval(script: bytes, stack: list[bytes], ctx: _Context) -> None:
    if len(script) > SCRIPT_BYTES_MAX:
        raise ctx.fail("script-size", f"script of {len(script)} bytes exceeds {SCRIPT_BYTES_MAX}")
    ops = _parse(script)
    if ops is None:
        raise ctx.fail("script-bad-push", "script ends inside a push")
    op_count = 0
    code_start = 0  # byte offset just past the last OP_CODESEPARATOR
    strict = ctx.strict
    for opcode, data, end in ops:
        if data is not None:
            if len(data) > SCRIPT_ELEMENT_BYTES_MAX:
                raise ctx.fail("script-push-size",
                               f"push of {len(data)} bytes exceeds {SCRIPT_ELEMENT_BYTES_MAX}")
            if strict and not is_minimal_push(opcode, data):
                raise ctx.fail("script-minimal-data", "push is not minimally encoded")
            stack.append(data)
        elif opcode > OP_16:
            op_count += 1
            if op_count > SCRIPT_OPS_MAX:
                raise ctx.fail("script-op-count", f"more than {SCRIPT_OPS_MAX} opcodes")
            if opcode in DISABLED_OPCODES:
                raise ctx.fail("script-disabled-opcode", f"disabled opcode 0x{opcode:02x}")
            op_count = _execute(opcode, stack, ctx, script, code_start, op_count)
            if opcode == OP_CODESEPARATOR:
                code_start = end
        elif opcode == OP_1NEGATE:
            stack.append(b"\x81")
        elif OP_1 <= opcode <= OP_16:
            stack.append(bytes([opcode - OP_1 + 1]))
        else:  # OP_RESERVED (0x50): fails when executed
            raise ctx.fail("script-bad-opcode", f"reserved opcode 0x{opcode:02x}")
        if len(stack) > STACK_SIZE_MAX:
            raise ctx.fail("script-stack-size", f"stack exceeds {STACK_SIZE_MAX} items")


def _pop(stack: list[bytes], ctx: _Context, opcode: int) -> bytes:
    if not stack:
        raise ctx.fail("script-stack-underflow", f"opcode 0x{opcode:02x} on an empty stack")
    return stack.pop()


def _execute(
    opcode: int, stack: list[bytes], ctx: _Context, script: bytes, code_start: int, op_count: int
) -> int:
    """Run one non-push opcode; returns the (possibly raised) opcode count."""
    if opcode == OP_DUP:
        if not stack:
            raise ctx.fail("script-stack-underflow", "OP_DUP on an empty stack")
        stack.append(stack[-1])
    elif opcode == OP_HASH160:
        stack.append(hash160(_pop(stack, ctx, opcode)))
    elif opcode in (OP_EQUAL, OP_EQUALVERIFY):
        right = _pop(stack, ctx, opcode)
        left = _pop(stack, ctx, opcode)
        equal = left == right
        if opcode == OP_EQUALVERIFY:
            if not equal:
                raise ctx.fail("script-equal-verify", "OP_EQUALVERIFY: items differ")
        else:
            stack.append(b"\x01" if equal else b"")
    elif opcode in (OP_CHECKSIG, OP_CHECKSIGVERIFY):
        pubkey = _pop(stack, ctx, opcode)
        sig = _pop(stack, ctx, opcode)
        script_code = find_and_delete(script[code_start:], length_prefixed_push(sig))
        ctx.check_signature_encoding(sig)
        ctx.check_pubkey_encoding(pubkey)
        ok = ctx.check_sig(sig, pubkey, script_code)
        if not ok and sig and (ctx.strict or opcode == OP_CHECKSIGVERIFY):
            raise ctx.fail("script-sig-verify", "signature does not verify")
        if opcode == OP_CHECKSIG:
            stack.append(b"\x01" if ok else b"")
    elif opcode in (OP_CHECKMULTISIG, OP_CHECKMULTISIGVERIFY):
        op_count = _check_multisig(opcode, stack, ctx, script[code_start:], op_count)
    elif opcode == OP_VERIFY:
        if not cast_to_bool(_pop(stack, ctx, opcode)):
            raise ctx.fail("script-verify", "OP_VERIFY on a false value")
    elif opcode == OP_RETURN:
        raise ctx.fail("script-op-return", "OP_RETURN executed (output is unspendable)")
    elif opcode == OP_SHA256:
        stack.append(sha256(_pop(stack, ctx, opcode)))
    elif opcode == OP_HASH256:
        stack.append(sha256d(_pop(stack, ctx, opcode)))
    elif opcode == OP_RIPEMD160:
        stack.append(ripemd160(_pop(stack, ctx, opcode)))
    elif opcode == OP_SHA1:
        stack.append(hashlib.sha1(_pop(stack, ctx, opcode)).digest())
    elif opcode == OP_DROP:
        _pop(stack, ctx, opcode)
    elif opcode == OP_SWAP:
        if len(stack) < 2:
            raise ctx.fail("script-stack-underflow", "OP_SWAP needs two items")
        stack[-1], stack[-2] = stack[-2], stack[-1]
    elif opcode == OP_SIZE:
        if not stack:
            raise ctx.fail("script-stack-underflow", "OP_SIZE on an empty stack")
        stack.append(encode_num(len(stack[-1])))
    elif opcode in (OP_NOP, OP_CODESEPARATOR):
        pass
    elif OP_NOP1 <= opcode <= OP_NOP10:
        # Reserved for soft forks (CLTV, CSV are NOP2/NOP3 here: legacy-only ledger).
        if ctx.strict:
            raise ctx.fail("script-bad-opcode", f"upgradable NOP 0x{opcode:02x} refused")
    else:
        raise ctx.fail("script-bad-opcode", f"unsupported opcode 0x{opcode:02x}")
    return op_count


def _check_multisig(
    opcode: int, stack: list[bytes], ctx: _Context, script_code: bytes, op_count: int
) -> int:
    """OP_CHECKMULTISIG(VERIFY) exactly as Bitcoin: keys and signatures matched in
    order, a failing match consumes the key, and one extra item is popped."""
    strict = ctx.strict
    where = ctx.where
    if not stack:
        raise ctx.fail("script-stack-underflow", "OP_CHECKMULTISIG on an empty stack")
    key_count = decode_num(stack[-1], require_minimal=strict, where=where)
    if not 0 <= key_count <= MULTISIG_KEYS_MAX:
        raise ctx.fail("script-pubkey-count", f"{key_count} keys (0..{MULTISIG_KEYS_MAX})")
    op_count += key_count
    if op_count > SCRIPT_OPS_MAX:
        raise ctx.fail("script-op-count", f"more than {SCRIPT_OPS_MAX} opcodes")
    if len(stack) < key_count + 2:
        raise ctx.fail("script-stack-underflow", "OP_CHECKMULTISIG: too few keys on stack")
    keys = [stack[-2 - k] for k in range(key_count)]  # first key first
    sig_count = decode_num(stack[-2 - key_count], require_minimal=strict, where=where)
    if not 0 <= sig_count <= key_count:
        raise ctx.fail("script-sig-count", f"{sig_count} signatures for {key_count} keys")
    # Items: count, keys, count, sigs, dummy.
    consumed = key_count + sig_count + 3
    if len(stack) < consumed:
        raise ctx.fail("script-stack-underflow", "OP_CHECKMULTISIG: too few items on stack")
    sigs = [stack[-3 - key_count - k] for k in range(sig_count)]
    for sig in sigs:
        script_code = find_and_delete(script_code, length_prefixed_push(sig))
    success = True
    sig_index = 0
    key_index = 0
    sigs_left = sig_count
    keys_left = key_count
    while success and sigs_left > 0:
        sig = sigs[sig_index]
        pubkey = keys[key_index]
        ctx.check_signature_encoding(sig)
        ctx.check_pubkey_encoding(pubkey)
        if ctx.check_sig(sig, pubkey, script_code):
            sig_index += 1
            sigs_left -= 1
        key_index += 1
        keys_left -= 1
        if sigs_left > keys_left:
            success = False
    dummy = stack[-consumed]
    if not success and strict and any(sigs):
        raise ctx.fail("script-sig-verify", "multisig signatures do not verify")
    if strict and dummy:
        raise ctx.fail("script-nulldummy", "OP_CHECKMULTISIG dummy element is not empty")
    del stack[-consumed:]
    if opcode == OP_CHECKMULTISIGVERIFY:
        if not success:
            raise ctx.fail("script-sig-verify", "multisig signatures do not verify")
    else:
        stack.append(b"\x01" if success else b"")
    return op_count


def _is_push_only(script: bytes) -> bool:
    """``ledger.script.is_push_only`` on the cached parse (no second walk)."""
    ops = _parse(script)
    return ops is not None and all(opcode <= OP_16 for opcode, _, _ in ops)


def _is_p2sh(script_pubkey: bytes) -> bool:
    return (
        len(script_pubkey) == 23
        and script_pubkey[0] == OP_HASH160
        and script_pubkey[1] == 20
        and script_pubkey[22] == OP_EQUAL
    )


# The standard output templates the fast paths recognise (ledger.script builds them).
_P2PKH_HEAD = bytes([OP_DUP, OP_HASH160, 20])
_P2PKH_TAIL = bytes([OP_EQUALVERIFY, OP_CHECKSIG])
_P2PKH_SCRIPT_BYTES = 25
_SIG_PUSH_BYTES_MIN = 9  # is_strict_der's shortest signature, hash type included
_SIG_PUSH_BYTES_MAX = 73
_SEC_PUBKEY_BYTES = (33, 65)


# HASH160 of the public keys P2PKH spends reveal, bounded like the parsed-key cache:
# the keys of members and wallets recur, and the hash is half the template's checks.
_pubkey_hash160 = lru_cache(maxsize=PUBLIC_KEY_CACHE_ENTRIES_MAX)(hash160)
# Likewise for the redeem scripts multisig spends reveal: a wallet's recurs (0127).
_redeem_hash160 = lru_cache(maxsize=PARSED_SCRIPT_CACHE_ENTRIES_MAX)(hash160)


def _standard_sig_push(script_sig: bytes, pos: int) -> int:
    """End offset of a direct push of a strict-DER-sized signature at ``pos``; 0 if the
    byte there is not one (every such push is minimal: sizes 9..73 need opcode = size)."""
    size = script_sig[pos]
    if size < _SIG_PUSH_BYTES_MIN or size > _SIG_PUSH_BYTES_MAX:
        return 0
    return pos + 1 + size


def _is_standard_signature(sig: bytes) -> bool:
    """What ``_Context.check_signature_encoding`` demands under strict policy."""
    if not is_strict_der(sig) or not _is_low_s(sig[:-1]):
        return False
    base = sig[-1] & ~SIGHASH_ANYONECANPAY
    return 1 <= base <= SIGHASH_SINGLE


def _verify_p2pkh_fast(tx: Transaction, input_index: int, script_pubkey: bytes) -> bool:
    """True when input ``input_index`` is a standard P2PKH spend that verifies.

    False means "not shown here" (another template, an unusual encoding, or any
    failure): the caller then runs the full interpreter, which decides and names
    the error. Everything the interpreter checks on this path under strict policy
    is checked here, in the same terms: push-only minimal scriptSig of exactly
    <sig> <pubkey>, HASH160 match, strict DER, low S, defined hash type, SEC key,
    clean stack (true by construction), and the signature itself over the script
    code, which is the whole scriptPubKey because FindAndDelete has nothing to
    remove (checked) and a P2PKH script holds no OP_CODESEPARATOR opcode.
    """
    if (
        len(script_pubkey) != _P2PKH_SCRIPT_BYTES
        or script_pubkey[:3] != _P2PKH_HEAD
        or script_pubkey[23:] != _P2PKH_TAIL
    ):
        return False
    script_sig = tx.inputs[input_index].script_sig
    if len(script_sig) < 2 + _SIG_PUSH_BYTES_MIN + _SEC_PUBKEY_BYTES[0]:
        return False
    sig_end = _standard_sig_push(script_sig, 0)
    if not sig_end or sig_end >= len(script_sig):
        return False
    pubkey_size = script_sig[sig_end]
    if pubkey_size not in _SEC_PUBKEY_BYTES or sig_end + 1 + pubkey_size != len(script_sig):
        return False
    pubkey = script_sig[sig_end + 1 :]
    if not _is_sec_pubkey(pubkey) or _pubkey_hash160(pubkey) != script_pubkey[3:23]:
        return False
    sig = script_sig[1:sig_end]
    # FindAndDelete has nothing to remove: the signature's push is not in the script
    # (a push longer than the 25-byte script cannot be; no slice built for it then)
    if not _is_standard_signature(sig) or (sig_end <= _P2PKH_SCRIPT_BYTES
                                           and script_sig[:sig_end] in script_pubkey):
        return False
    message = legacy_sighash(tx, input_index, script_pubkey, sig[-1])
    return verify_der(pubkey, sig[:-1], message)


def _verify_p2pk_fast(tx: Transaction, input_index: int, script_pubkey: bytes) -> bool:
    """True when input ``input_index`` is a standard P2PK spend (<pubkey> OP_CHECKSIG
    paid with <sig>) that verifies; False sends the caller to the interpreter, as
    for ``_verify_p2pkh_fast``."""
    pubkey_size = len(script_pubkey) - 2
    if (
        pubkey_size not in _SEC_PUBKEY_BYTES
        or script_pubkey[0] != pubkey_size
        or script_pubkey[-1] != OP_CHECKSIG
    ):
        return False
    pubkey = script_pubkey[1:-1]
    script_sig = tx.inputs[input_index].script_sig
    if not script_sig or _standard_sig_push(script_sig, 0) != len(script_sig):
        return False
    sig = script_sig[1:]
    if (
        not _is_sec_pubkey(pubkey)
        or not _is_standard_signature(sig)
        or script_sig in script_pubkey
    ):
        return False
    message = legacy_sighash(tx, input_index, script_pubkey, sig[-1])
    return verify_der(pubkey, sig[:-1], message)


def _script_sig_pushes(script_sig: bytes) -> list[bytes] | None:
    """The items of a scriptSig made only of minimal data pushes of 2 bytes or more
    (OP_PUSHDATA4 never needed: elements stop at 520 bytes); None for anything else."""
    pushes: list[bytes] = []
    pos = 0
    length = len(script_sig)
    try:
        while pos < length:
            opcode, data, pos = read_op(script_sig, pos)
            # 2 <= opcode: one-byte pushes (and OP_0) never appear in these scriptSigs
            if not 2 <= opcode <= OP_PUSHDATA2 or data is None:
                return None
            if not is_minimal_push(opcode, data):
                return None
            pushes.append(data)
    except ScriptError:
        return None
    return pushes


@lru_cache(maxsize=PARSED_SCRIPT_CACHE_ENTRIES_MAX)
def _multisig_keys(redeem_script: bytes) -> tuple[int, tuple[bytes, ...]] | None:
    """(m, keys) of ``OP_m <SEC key>... OP_n OP_CHECKMULTISIG`` with 1 <= m <= n <= 16
    and every key directly pushed; None for any other script. Cached by the script's
    exact bytes, of which it is a pure function (a wallet's script recurs; 0127)."""
    ops = _parse(redeem_script)
    if ops is None or len(ops) < 4 or ops[-1][0] != OP_CHECKMULTISIG:
        return None
    m = ops[0][0] - OP_1 + 1
    n = ops[-2][0] - OP_1 + 1
    if not 1 <= m <= n <= OP_16 - OP_1 + 1 or len(ops) != n + 3:
        return None
    keys: list[bytes] = []
    for opcode, data, _ in ops[1:-2]:
        if data is None or opcode != len(data) or not _is_sec_pubkey(data):
            return None
        keys.append(data)
    return m, tuple(keys)


def _verify_p2sh_multisig_fast(tx: Transaction, input_index: int, script_pubkey: bytes) -> bool:
    """True when input ``input_index`` is a standard P2SH multisig spend
    (``OP_0 <sig>... <OP_m <key>... OP_n OP_CHECKMULTISIG>``) that verifies;
    False sends the caller to the interpreter, as for ``_verify_p2pkh_fast``.

    Mirrors OP_CHECKMULTISIG under strict policy: signatures and keys are matched
    from the top of the stack (last signature against last key first), a failed
    match consumes the key, the dummy is the empty OP_0 push (NULLDUMMY), and the
    script code is the redeem script, FindAndDelete having nothing to remove
    (checked). Every signature must be standard and every key SEC-shaped (stricter
    than the interpreter, which checks only the pairs it tries: the difference
    falls back). One sighash per hash type serves all the signatures. The keys that
    signed this redeem script's last spend are tried first (``_multisig_hints``).
    """
    if not _is_p2sh(script_pubkey):
        return False
    script_sig = tx.inputs[input_index].script_sig
    if not script_sig or script_sig[0] != 0:  # OP_0, the dummy
        return False
    pushes = _script_sig_pushes(script_sig[1:])
    if not pushes or len(pushes) < 2:
        return False
    redeem_script = pushes[-1]
    if (
        len(redeem_script) > SCRIPT_ELEMENT_BYTES_MAX
        or _redeem_hash160(redeem_script) != script_pubkey[2:22]
    ):
        return False
    params = _multisig_keys(redeem_script)
    sigs = pushes[:-1]
    if params is None or params[0] != len(sigs):
        return False
    keys = params[1]
    for sig in sigs:
        if (
            not _SIG_PUSH_BYTES_MIN <= len(sig) <= _SIG_PUSH_BYTES_MAX
            or not _is_standard_signature(sig)
            or length_prefixed_push(sig) in redeem_script
        ):
            return False
    messages: dict[int, bytes] = {}
    verdicts: dict[tuple[int, int], bool] = {}

    def verifies(sig_index: int, key_index: int) -> bool:
        verdict = verdicts.get((sig_index, key_index))
        if verdict is None:
            sig = sigs[sig_index]
            message = messages.get(sig[-1])
            if message is None:
                message = legacy_sighash(tx, input_index, redeem_script, sig[-1])
                messages[sig[-1]] = message
            verdict = verdicts[(sig_index, key_index)] = verify_der(keys[key_index], sig[:-1],
                                                                    message)
        return verdict

    hint = _multisig_hints.get(redeem_script)
    if (hint is not None and _is_matching_shape(hint, len(sigs), len(keys))
            and all(verifies(sig_index, key_index) for sig_index, key_index in enumerate(hint))):
        return True
    matched = _multisig_matching(len(sigs), len(keys), verifies)
    if matched is None:
        return False
    if len(_multisig_hints) >= MULTISIG_HINT_ENTRIES_MAX:
        _multisig_hints.clear()
    _multisig_hints[redeem_script] = matched
    return True


# Which keys of a multisig redeem script signed the last spend of it that verified
# here (key index per signature, increasing): a wallet usually signs with the same
# keys, so they are tried first and OP_CHECKMULTISIG's failed pairs (a key skipped
# costs a whole verification) are not paid again. A hint only orders the work: it
# is taken only when every one of its pairs verifies, which is an increasing
# matching, and OP_CHECKMULTISIG succeeds exactly when one exists (decision 0127).
MULTISIG_HINT_ENTRIES_MAX = 4096
_multisig_hints: dict[bytes, tuple[int, ...]] = {}


def _is_matching_shape(hint: tuple[int, ...], sig_count: int, key_count: int) -> bool:
    """A key index per signature, increasing, each a key: what a matching can be."""
    return (len(hint) == sig_count and hint[0] >= 0 and hint[-1] < key_count
            and all(a < b for a, b in itertools.pairwise(hint)))


def _multisig_matching(sig_count: int, key_count: int,
                       verifies: Callable[[int, int], bool]) -> tuple[int, ...] | None:
    """OP_CHECKMULTISIG's matching under strict policy: signatures and keys from the
    top of the stack (last signature against last key first), a failed pair consumes
    the key; the key index of each signature, or None when it fails."""
    matched = [0] * sig_count
    sig_index, key_index = sig_count - 1, key_count - 1
    while sig_index >= 0:
        if sig_index > key_index:
            return None
        if verifies(sig_index, key_index):
            matched[sig_index] = key_index
            sig_index -= 1
        key_index -= 1
    return tuple(matched)


def verify_input(
    tx: Transaction,
    input_index: int,
    script_pubkey: bytes,
    amount: int,
    *,
    strict: bool = True,
) -> None:
    """Verify that input ``input_index`` of ``tx`` may spend ``script_pubkey``.

    ``amount`` (the value of the spent output) does not enter the legacy sighash;
    it is part of the API so that a future segwit-style sighash, which commits to
    it, needs no caller change. Raises ``ScriptError`` on failure; returns None.
    """
    del amount  # legacy sighash does not commit to the spent amount (see docstring)
    if not 0 <= input_index < len(tx.inputs):
        raise ScriptError(f"input {input_index}: no such input in a transaction of "
                          f"{len(tx.inputs)} inputs", code="script-input-index")
    # Standard single-signature spends are checked without the stack machine; on
    # anything else, and on any failure, the interpreter decides and names the error.
    if strict and (
        _verify_p2pkh_fast(tx, input_index, script_pubkey)
        or _verify_p2pk_fast(tx, input_index, script_pubkey)
        or _verify_p2sh_multisig_fast(tx, input_index, script_pubkey)
    ):
        return
    _interpret_input(tx, input_index, script_pubkey, strict)


def _interpret_input(
    tx: Transaction, input_index: int, script_pubkey: bytes, strict: bool
) -> None:
    """``verify_input`` by the full interpreter alone (no template fast path): the
    verdict and the error for every input the fast paths do not accept."""
    ctx = _Context(tx, input_index, strict)
    script_sig = tx.inputs[input_index].script_sig
    p2sh = _is_p2sh(script_pubkey)
    if (strict or p2sh) and not _is_push_only(script_sig):
        raise ctx.fail("script-push-only", "scriptSig is not push-only")
    stack: list[bytes] = []
    _eval(script_sig, stack, ctx)
    stack_after_sig = list(stack) if p2sh else stack
    _eval(script_pubkey, stack, ctx)
    if not stack or not cast_to_bool(stack[-1]):
        raise ctx.fail("script-eval-false", "script evaluated to false")
    if p2sh:
        stack = stack_after_sig
        if not stack:
            raise ctx.fail("script-p2sh-eval", "P2SH spend without a redeem script")
        redeem_script = stack.pop()
        _eval(redeem_script, stack, ctx)
        if not stack or not cast_to_bool(stack[-1]):
            raise ctx.fail("script-p2sh-eval", "P2SH redeem script evaluated to false")
    if strict and len(stack) != 1:
        raise ctx.fail("script-clean-stack", f"{len(stack)} items left on the stack (need 1)")


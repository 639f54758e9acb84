"""Bitcoin scripts as bytes: opcodes, parsing, minimal pushes, standard templates.

Owns: the opcode constants, the named script limits, ``iter_ops`` (the one parser
of script bytes, refusing truncated pushes), ``push_data`` (minimal pushes),
builders for the standard output scripts (P2PK, P2PKH, P2SH, bare multisig,
OP_RETURN data) and their scriptSigs, and ``classify`` / ``multisig_params``.
Evaluation lives in ``ledger.interpreter``.

"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence

from ledger.errors import ScriptError

# --- named limits (Bitcoin consensus unless noted) --------------------------------
SCRIPT_BYTES_MAX = 10_000  # MAX_SCRIPT_SIZE
SCRIPT_ELEMENT_BYTES_MAX = 520  # MAX_SCRIPT_ELEMENT_SIZE
SCRIPT_OPS_MAX = 201  # MAX_OPS_PER_SCRIPT (non-push opcodes; CHECKMULTISIG adds its n)
STACK_SIZE_MAX = 1000  # MAX_STACK_SIZE (main stack plus alt stack)
MULTISIG_KEYS_MAX = 20  # MAX_PUBKEYS_PER_MULTISIG (consensus)
MULTISIG_KEYS_STANDARD_MAX = 15  # P2SH redeem script must fit 520 bytes: n <= 15
OP_RETURN_DATA_BYTES_MAX = 80  # Bitcoin's standard -datacarriersize payload
SCRIPT_NUM_BYTES_MAX = 4  # CScriptNum default size

# --- opcodes -----------------------------------------------------------------------
OP_0 = OP_FALSE = 0x00
OP_PUSHDATA1 = 0x4C
OP_PUSHDATA2 = 0x4D
OP_PUSHDATA4 = 0x4E
OP_1NEGATE = 0x4F
OP_RESERVED = 0x50
OP_1 = OP_TRUE = 0x51
OP_2 = 0x52
OP_3 = 0x53
OP_4 = 0x54
OP_5 = 0x55
OP_6 = 0x56
OP_7 = 0x57
OP_8 = 0x58
OP_9 = 0x59
OP_10 = 0x5A
OP_11 = 0x5B
OP_12 = 0x5C
OP_13 = 0x5D
OP_14 = 0x5E
OP_15 = 0x5F
OP_16 = 0x60
OP_NOP = 0x61
OP_VER = 0x62
OP_IF = 0x63
OP_NOTIF = 0x64
OP_VERIF = 0x65
OP_VERNOTIF = 0x66
OP_ELSE = 0x67
OP_ENDIF = 0x68
OP_VERIFY = 0x69
OP_RETURN = 0x6A
OP_TOALTSTACK = 0x6B
OP_FROMALTSTACK = 0x6C
OP_2DROP = 0x6D
OP_2DUP = 0x6E
OP_3DUP = 0x6F
OP_2OVER = 0x70
OP_2ROT = 0x71
OP_2SWAP = 0x72
OP_IFDUP = 0x73
OP_DEPTH = 0x74
OP_DROP = 0x75
OP_DUP = 0x76
OP_NIP = 0x77
OP_OVER = 0x78
OP_PICK = 0x79
OP_ROLL = 0x7A
OP_ROT = 0x7B
OP_SWAP = 0x7C
OP_TUCK = 0x7D
OP_CAT = 0x7E
OP_SUBSTR = 0x7F
OP_LEFT = 0x80
OP_RIGHT = 0x81
OP_SIZE = 0x82
OP_INVERT = 0x83
OP_AND = 0x84
OP_OR = 0x85
OP_XOR = 0x86
OP_EQUAL = 0x87
OP_EQUALVERIFY = 0x88
OP_RESERVED1 = 0x89
OP_RESERVED2 = 0x8A
OP_1ADD = 0x8B
OP_1SUB = 0x8C
OP_2MUL = 0x8D
OP_2DIV = 0x8E
OP_NEGATE = 0x8F
OP_ABS = 0x90
OP_NOT = 0x91
OP_0NOTEQUAL = 0x92
OP_ADD = 0x93
OP_SUB = 0x94
OP_MUL = 0x95
OP_DIV = 0x96
OP_MOD = 0x97
OP_LSHIFT = 0x98
OP_RSHIFT = 0x99
OP_BOOLAND = 0x9A
OP_BOOLOR = 0x9B
OP_NUMEQUAL = 0x9C
OP_NUMEQUALVERIFY = 0x9D
OP_NUMNOTEQUAL = 0x9E
OP_LESSTHAN = 0x9F
OP_GREATERTHAN = 0xA0
OP_LESSTHANOREQUAL = 0xA1
OP_GREATERTHANOREQUAL = 0xA2
OP_MIN = 0xA3
OP_MAX = 0xA4
OP_WITHIN = 0xA5
OP_RIPEMD160 = 0xA6
OP_SHA1 = 0xA7
OP_SHA256 = 0xA8
OP_HASH160 = 0xA9
OP_HASH256 = 0xAA
OP_CODESEPARATOR = 0xAB
OP_CHECKSIG = 0xAC
OP_CHECKSIGVERIFY = 0xAD
OP_CHECKMULTISIG = 0xAE
OP_CHECKMULTISIGVERIFY = 0xAF
OP_NOP1 = 0xB0
OP_NOP10 = 0xB9
OP_INVALIDOPCODE = 0xFF

# Opcodes Bitcoin disabled in 2010: a script containing one fails even unexecuted.
DISABLED_OPCODES = frozenset({
    OP_CAT, OP_SUBSTR, OP_LEFT, OP_RIGHT, OP_INVERT, OP_AND, OP_OR, OP_XOR,
    OP_2MUL, OP_2DIV, OP_MUL, OP_DIV, OP_MOD, OP_LSHIFT, OP_RSHIFT,
})

_SMALL_INT_OPS = {OP_1 + n - 1: n for n in range(1, 17)}


def small_int_opcode(n: int) -> int:
    """The opcode that pushes the small integer ``n`` (0..16)."""
    assert 0 <= n <= 16
    return OP_0 if n == 0 else OP_1 + n - 1


def decode_small_int(opcode: int) -> int | None:
    """0..16 for OP_0 and OP_1..OP_16; None for any other opcode."""
    if opcode == OP_0:
        return 0
    return _SMALL_INT_OPS.get(opcode)


def read_op(script: bytes, pos: int) -> tuple[int, bytes | None, int]:
    """The operation at ``script[pos]``: ``(opcode, push data or None, offset after it)``.

    The one push-data parser of the core. Push opcodes (0x00..0x4e) give their data
    (``b""`` for OP_0); others give None. A push that runs past the end of the script
    raises ``ScriptError`` (code ``script-bad-push``).
    """
    length = len(script)
    opcode = script[pos]
    pos += 1
    if opcode > OP_PUSHDATA4:
        return opcode, None, pos
    if opcode < OP_PUSHDATA1:
        size = opcode
    else:
        width = 1 if opcode == OP_PUSHDATA1 else 2 if opcode == OP_PUSHDATA2 else 4
        if pos + width > length:
            raise ScriptError(
                f"script truncated in the length of a push at offset {pos - 1}",
                code="script-bad-push",
            )
        size = int.from_bytes(script[pos : pos + width], "little")
        pos += width
    if pos + size > length:
        raise ScriptError(
            f"script truncated: push of {size} bytes at offset {pos} has "
            f"{length - pos} bytes left",
            code="script-bad-push",
        )
    return opcode, script[pos : pos + size], pos + size


def iter_ops(script: bytes) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(opcode, push data or None)`` for each operation of ``script``
    (``read_op`` one after the other; a truncated push raises ``ScriptError``)."""
    pos = 0
    length = len(script)
    while pos < length:
        opcode, data, pos = read_op(script, pos)
        yield opcode, data


def parse_ops(script: bytes) -> tuple[tuple[int, bytes | None], ...]:
    """All operations of ``script`` at once (``iter_ops`` materialised)."""
    return tuple(iter_ops(script))


def push_data(data: bytes) -> bytes:
    """The minimal push of ``data`` (BIP 62 MINIMALDATA): OP_0, OP_1..OP_16,
    OP_1NEGATE, a direct push, or OP_PUSHDATA1/2/4 as the length requires."""
    size = len(data)
    if size == 0:
        return bytes([OP_0])
    if size == 1 and 1 <= data[0] <= 16:
        return bytes([OP_1 + data[0] - 1])
    if size == 1 and data[0] == 0x81:
        return bytes([OP_1NEGATE])
    return length_prefixed_push(data)


def length_prefixed_push(data: bytes) -> bytes:
    """``data`` pushed with the shortest length prefix and never an OP_n shortcut: what
    Bitcoin's ``CScript() << data`` writes (FindAndDelete patterns, OAP markers)."""
    size = len(data)
    if size < OP_PUSHDATA1:
        return bytes([size]) + data
    if size <= 0xFF:
        return bytes([OP_PUSHDATA1, size]) + data
    if size <= 0xFFFF:
        return bytes([OP_PUSHDATA2]) + size.to_bytes(2, "little") + data
    return bytes([OP_PUSHDATA4]) + size.to_bytes(4, "little") + data


def is_push_only(script: bytes) -> bool:
    """True when every operation is a push (OP_1NEGATE, OP_1..OP_16 count as pushes,
    as in Bitcoin's ``IsPushOnly``); False for a truncated script."""
    try:
        return all(opcode <= OP_16 for opcode, _ in iter_ops(script))
    except ScriptError:
        return False


def is_minimal_push(opcode: int, data: bytes) -> bool:
    """Whether ``opcode`` is the shortest way to push ``data`` (Bitcoin's CheckMinimalPush)."""
    size = len(data)
    if size == 0:
        return opcode == OP_0
    if size == 1 and 1 <= data[0] <= 16:
        return opcode == OP_1 + data[0] - 1
    if size == 1 and data[0] == 0x81:
        return opcode == OP_1NEGATE
    if size < OP_PUSHDATA1:
        return opcode == size
    if size <= 0xFF:
        return opcode == OP_PUSHDATA1
    if size <= 0xFFFF:
        return opcode == OP_PUSHDATA2
    return opcode == OP_PUSHDATA4


# --- templates -----------------------------------------------------------------------

class ScriptTemplate(enum.Enum):
    P2PK = "p2pk"
    P2PKH = "p2pkh"
    P2SH = "p2sh"
    MULTISIG = "multisig"
    NULL_DATA = "null-data"
    NONSTANDARD = "nonstandard"


def _is_pubkey_shape(data: bytes) -> bool:
    if len(data) == 33:
        return data[0] in (0x02, 0x03)
    if len(data) == 65:
        return data[0] == 0x04
    return False


def p2pk_script(pubkey_sec: bytes) -> bytes:
    assert _is_pubkey_shape(pubkey_sec), "P2PK needs a 33- or 65-byte SEC public key"
    return push_data(pubkey_sec) + bytes([OP_CHECKSIG])


def p2pkh_script(pubkey_hash20: bytes) -> bytes:
    assert len(pubkey_hash20) == 20
    return bytes([OP_DUP, OP_HASH160, 20]) + pubkey_hash20 + bytes([OP_EQUALVERIFY, OP_CHECKSIG])


def p2sh_script(script_hash20: bytes) -> bytes:
    assert len(script_hash20) == 20
    return bytes([OP_HASH160, 20]) + script_hash20 + bytes([OP_EQUAL])


def multisig_script(m: int, pubkeys_sec: Sequence[bytes]) -> bytes:
    """``OP_m <pubkey>... OP_n OP_CHECKMULTISIG`` with 1 <= m <= n <= 15."""
    n = len(pubkeys_sec)
    assert 1 <= m <= n <= MULTISIG_KEYS_STANDARD_MAX, "multisig needs 1 <= m <= n <= 15"
    assert all(_is_pubkey_shape(key) for key in pubkeys_sec)
    body = b"".join(push_data(key) for key in pubkeys_sec)
    return bytes([small_int_opcode(m)]) + body + bytes([small_int_opcode(n), OP_CHECKMULTISIG])


def is_unspendable(script_pubkey: bytes) -> bool:
    """An output script starting with OP_RETURN can never be spent: the output never
    enters the UTXO set (python-bitcoinlib's ``CScript.is_unspendable``)."""
    return script_pubkey[:1] == _OP_RETURN_BYTE


_OP_RETURN_BYTE = bytes([OP_RETURN])


def op_return_script(data: bytes) -> bytes:
    """``OP_RETURN <data>``: a provably unspendable data carrier."""
    assert len(data) <= OP_RETURN_DATA_BYTES_MAX, "OP_RETURN payload over 80 bytes"
    return bytes([OP_RETURN]) + push_data(data)


def p2pk_script_sig(sig_with_hashtype: bytes) -> bytes:
    return push_data(sig_with_hashtype)


def p2pkh_script_sig(sig_with_hashtype: bytes, pubkey_sec: bytes) -> bytes:
    return push_data(sig_with_hashtype) + push_data(pubkey_sec)


def multisig_script_sig(sigs_with_hashtype: Sequence[bytes]) -> bytes:
    """``OP_0 <sig>...`` for a bare multisig output (OP_0 feeds Bitcoin's extra pop)."""
    return bytes([OP_0]) + b"".join(push_data(sig) for sig in sigs_with_hashtype)


def p2sh_multisig_script_sig(sigs_with_hashtype: Sequence[bytes], redeem_script: bytes) -> bytes:
    """``OP_0 <sig>... <redeem script>``; signatures in the order of their keys."""
    assert len(redeem_script) <= SCRIPT_ELEMENT_BYTES_MAX, "redeem script over 520 bytes"
    return multisig_script_sig(sigs_with_hashtype) + push_data(redeem_script)


def multisig_params(script: bytes) -> tuple[int, tuple[bytes, ...]] | None:
    """``(m, pubkeys)`` when ``script`` is exactly ``OP_m <keys> OP_n OP_CHECKMULTISIG``
    (1 <= m <= n <= 20, each key SEC-shaped, small ints and keys minimally pushed)."""
    try:
        ops = parse_ops(script)
    except ScriptError:
        return None
    if len(ops) < 4 or ops[-1][0] != OP_CHECKMULTISIG:
        return None
    m = decode_small_int(ops[0][0])
    n = decode_small_int(ops[-2][0])
    if m is None or n is None or not 1 <= m <= n <= MULTISIG_KEYS_MAX:
        return None
    keys = ops[1:-2]
    if len(keys) != n:
        return None
    pubkeys: list[bytes] = []
    for opcode, data in keys:
        if data is None or not _is_pubkey_shape(data) or opcode != len(data):
            return None
        pubkeys.append(data)
    return m, tuple(pubkeys)


def classify(script_pubkey: bytes) -> ScriptTemplate:
    """Which standard template ``script_pubkey`` follows, by exact byte shape."""
    size = len(script_pubkey)
    if (
        size == 25
        and script_pubkey[:3] == bytes([OP_DUP, OP_HASH160, 20])
        and script_pubkey[23:] == bytes([OP_EQUALVERIFY, OP_CHECKSIG])
    ):
        return ScriptTemplate.P2PKH
    if (
        size == 23
        and script_pubkey[:2] == bytes([OP_HASH160, 20])
        and script_pubkey[22] == OP_EQUAL
    ):
        return ScriptTemplate.P2SH
    if (
        size in (35, 67)
        and script_pubkey[0] == size - 2
        and script_pubkey[-1] == OP_CHECKSIG
        and _is_pubkey_shape(script_pubkey[1:-1])
    ):
        return ScriptTemplate.P2PK
    if is_unspendable(script_pubkey):
        rest = script_pubkey[1:]
        if len(rest) <= OP_RETURN_DATA_BYTES_MAX + 3 and is_push_only(rest):
            return ScriptTemplate.NULL_DATA
        return ScriptTemplate.NONSTANDARD
    params = multisig_params(script_pubkey)
    if params is not None and len(params[1]) <= MULTISIG_KEYS_STANDARD_MAX:
        return ScriptTemplate.MULTISIG
    return ScriptTemplate.NONSTANDARD

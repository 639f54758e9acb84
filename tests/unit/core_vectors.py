"""Reading Bitcoin Core's test data (``tests/data/bitcoin/``): its textual script
notation, the opcodes and policy flags this ledger's interpreter implements, and the
pinned sha256 of each copied file (tests/data/bitcoin/README.md).

Shared by tests/unit/test_bitcoin_crosscheck.py (tx_valid.json) and
tests/unit/test_bitcoin_invalid_vectors.py (tx_invalid.json, script_tests.json).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import ledger.script as script_module
from ledger.errors import ScriptError
from ledger.interpreter import encode_num
from ledger.script import push_data, small_int_opcode

DATA_DIR = Path(__file__).parent.parent / "data" / "bitcoin"
SHA256 = {
    "tx_valid.json": "f8a9e275c581aa24650695bd2b1c718d30f948452934accee83cb32331a9a7a0",
    "tx_invalid.json": "0c02ce44ff3a880458f9569a25589315a07f924fcaadac828613d4615776ca52",
    "script_tests.json": "bc23cb1dfa760d50042f534da23cbbe4b6fbb03d7def0b64f8de049453d6ead5",
}


def read_pinned(name: str) -> str:
    """A copied Core file's text, after checking it is the pinned, unmodified copy."""
    raw = (DATA_DIR / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SHA256[name], f"{name} is not the pinned copy"
    return raw.decode("utf-8")


_NAMES = {name: value for name, value in vars(script_module).items()
          if name.startswith("OP_") and isinstance(value, int)}
_NAMES.update({f"OP_NOP{i}": 0xAF + i for i in range(1, 11)})
_NAMES.update({"OP_CHECKLOCKTIMEVERIFY": 0xB1, "OP_CHECKSEQUENCEVERIFY": 0xB2,
               "OP_CHECKSIGADD": 0xBA})
# Core's names for opcodes this ledger's script module does not name (script_tests).
_CORE_ONLY_NAMES = {
    "OP_FALSE": 0x00, "OP_TRUE": 0x51, "OP_RESERVED": 0x50, "OP_VER": 0x62, "OP_IF": 0x63,
    "OP_NOTIF": 0x64, "OP_VERIF": 0x65, "OP_VERNOTIF": 0x66, "OP_ELSE": 0x67,
    "OP_ENDIF": 0x68, "OP_TOALTSTACK": 0x6B, "OP_FROMALTSTACK": 0x6C, "OP_2DROP": 0x6D,
    "OP_2DUP": 0x6E, "OP_3DUP": 0x6F, "OP_2OVER": 0x70, "OP_2ROT": 0x71, "OP_2SWAP": 0x72,
    "OP_IFDUP": 0x73, "OP_DEPTH": 0x74, "OP_NIP": 0x77, "OP_OVER": 0x78, "OP_PICK": 0x79,
    "OP_ROLL": 0x7A, "OP_ROT": 0x7B, "OP_TUCK": 0x7D, "OP_CAT": 0x7E, "OP_SUBSTR": 0x7F,
    "OP_LEFT": 0x80, "OP_RIGHT": 0x81, "OP_INVERT": 0x83, "OP_AND": 0x84, "OP_OR": 0x85,
    "OP_XOR": 0x86, "OP_RESERVED1": 0x89, "OP_RESERVED2": 0x8A, "OP_1ADD": 0x8B,
    "OP_1SUB": 0x8C, "OP_2MUL": 0x8D, "OP_2DIV": 0x8E, "OP_NEGATE": 0x8F, "OP_ABS": 0x90,
    "OP_NOT": 0x91, "OP_0NOTEQUAL": 0x92, "OP_ADD": 0x93, "OP_SUB": 0x94, "OP_MUL": 0x95,
    "OP_DIV": 0x96, "OP_MOD": 0x97, "OP_LSHIFT": 0x98, "OP_RSHIFT": 0x99,
    "OP_BOOLAND": 0x9A, "OP_BOOLOR": 0x9B, "OP_NUMEQUAL": 0x9C, "OP_NUMEQUALVERIFY": 0x9D,
    "OP_NUMNOTEQUAL": 0x9E, "OP_LESSTHAN": 0x9F, "OP_GREATERTHAN": 0xA0,
    "OP_LESSTHANOREQUAL": 0xA1, "OP_GREATERTHANOREQUAL": 0xA2, "OP_MIN": 0xA3,
    "OP_MAX": 0xA4, "OP_WITHIN": 0xA5, "OP_SHA1": 0xA7, "OP_SHA256": 0xA8,
    "OP_SIZE": 0x82, "OP_INVALIDOPCODE": 0xFF,
}
for _name, _value in _CORE_ONLY_NAMES.items():
    _NAMES.setdefault(_name, _value)


def parse_core_script(text: str) -> bytes:
    """Core's ParseScript: decimal numbers, 0x raw bytes, 'strings', opcode names."""
    out = bytearray()
    for token in text.split():
        if re.fullmatch(r"-?\d+", token):
            number = int(token)
            if number == -1:
                out.append(script_module.OP_1NEGATE)
            elif 0 <= number <= 16:
                out.append(small_int_opcode(number))
            else:
                data = encode_num(number)
                out += bytes([len(data)]) + data
        elif token.startswith("0x"):
            out += bytes.fromhex(token[2:])
        elif len(token) >= 2 and token[0] == token[-1] == "'":
            out += push_data(token[1:-1].encode())
        else:
            out.append(_NAMES[token if token.startswith("OP_") else "OP_" + token])
    return bytes(out)


# Opcodes this interpreter implements; a vector needing any other is skipped (the
# ledger's templates never use them: IF/ELSE, arithmetic, CLTV/CSV, altstack...).
SUPPORTED_OPCODES = (
    set(range(0x00, 0x4F + 1)) | set(range(0x51, 0x60 + 1))
    | {0x61, 0x69, 0x6A, 0x75, 0x76, 0x7C, 0x82, 0x87, 0x88, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA,
       0xAB, 0xAC, 0xAD, 0xAE, 0xAF}
)
# Which strict-policy error each Core verify flag can cause.
FLAG_CODES = {
    "DERSIG": {"script-der"},
    "LOW_S": {"script-high-s"},
    "STRICTENC": {"script-der", "script-pubkey-type", "script-hashtype"},
    "NULLDUMMY": {"script-nulldummy"},
    "CLEANSTACK": {"script-clean-stack"},
    "SIGPUSHONLY": {"script-push-only"},
    "MINIMALDATA": {"script-minimal-data"},
    "NULLFAIL": {"script-sig-verify"},
}


def opcodes_of(script: bytes) -> set[int]:
    """The opcodes of ``script``; {0xFF} when it does not even parse (a bad push)."""
    try:
        return {opcode for opcode, _ in script_module.iter_ops(script)}
    except ScriptError:
        return {0xFF}

"""Bitcoin Core's JSON shapes for transactions, scripts and amounts.

Owns: ``script_asm`` (Core's ``ScriptToAsmStr``), the output script type names Core
prints, ``amount`` (minor units -> an exact 8-decimal amount), ``decode_tx`` (the
object of ``decoderawtransaction`` / verbose ``getrawtransaction``) and
``dumps_exact`` (JSON with those amounts as plain numbers, never through a float).
Presentation only: nothing here decides whether anything is valid.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from ledger import script as opcodes
from ledger.address import script_to_address
from ledger.errors import ValidationError
from ledger.membership import ChainParams
from ledger.script import ScriptTemplate, classify, iter_ops
from ledger.tx import Transaction

COIN = 100_000_000
AMOUNT_QUANTUM = Decimal("0.00000001")
SIGHASH_NAMES = {1: "ALL", 2: "NONE", 3: "SINGLE", 0x81: "ALL|ANYONECANPAY",
                 0x82: "NONE|ANYONECANPAY", 0x83: "SINGLE|ANYONECANPAY"}
SCRIPT_TYPES = {
    ScriptTemplate.P2PKH: "pubkeyhash", ScriptTemplate.P2SH: "scripthash",
    ScriptTemplate.P2PK: "pubkey", ScriptTemplate.MULTISIG: "multisig",
    ScriptTemplate.NULL_DATA: "nulldata", ScriptTemplate.NONSTANDARD: "nonstandard",
}
_OPCODE_NAMES: dict[int, str] = {}
for _name, _value in sorted(vars(opcodes).items()):
    if _name.startswith("OP_") and isinstance(_value, int) and _name not in (
            "OP_FALSE", "OP_TRUE"):
        _OPCODE_NAMES.setdefault(_value, _name)
_DECIMAL_MARK = "\u0000dec:"
_DECIMAL_PATTERN = re.compile(r'"\\u0000dec:(-?[0-9]+\.[0-9]+)"')
SCRIPT_NUM_BYTES_MAX = 4


def amount(minor_units: int) -> Decimal:
    """Minor units as Core's 8-decimal amount (exact)."""
    return (Decimal(minor_units) / COIN).quantize(AMOUNT_QUANTUM)


def _script_num(data: bytes) -> int:
    if not data:
        return 0
    value = int.from_bytes(data, "little")
    if data[-1] & 0x80:
        return -(value & ~(0x80 << (8 * (len(data) - 1))))
    return value


def _signature_text(data: bytes) -> str | None:
    """DER signature + sighash byte as Core shows it in a scriptSig, else None."""
    if 9 <= len(data) <= 73 and data[0] == 0x30 and data[1] == len(data) - 3:
        name = SIGHASH_NAMES.get(data[-1])
        if name is not None:
            return f"{data[:-1].hex()}[{name}]"
    return None


def script_asm(script: bytes, *, decode_signatures: bool = False) -> str:
    """Core's ``ScriptToAsmStr``; a script that does not parse ends in ``[error]``."""
    parts: list[str] = []
    try:
        for opcode, data in iter_ops(script):
            if data is not None:
                shown = _signature_text(data) if decode_signatures else None
                if shown is None:
                    shown = (str(_script_num(data)) if len(data) <= SCRIPT_NUM_BYTES_MAX
                             else data.hex())
                parts.append(shown)
            elif opcode == opcodes.OP_1NEGATE:
                parts.append("-1")
            elif opcodes.OP_1 <= opcode <= opcodes.OP_16:
                parts.append(str(opcode - opcodes.OP_1 + 1))
            else:
                parts.append(_OPCODE_NAMES.get(opcode, "OP_UNKNOWN"))
    except ValidationError:
        parts.append("[error]")
    return " ".join(parts)


def script_pubkey_json(script: bytes, params: ChainParams) -> dict[str, Any]:
    kind = classify(script)
    shown: dict[str, Any] = {"asm": script_asm(script), "desc": "", "hex": script.hex(),
                             "type": SCRIPT_TYPES[kind]}
    address = script_to_address(script, p2pkh_version=params.p2pkh_version,
                                 p2sh_version=params.p2sh_version)
    if address is not None:
        shown["address"] = address
        shown["desc"] = f"addr({address})"
    else:
        shown["desc"] = f"raw({script.hex()})"
    return shown


def decode_tx(tx: Transaction, params: ChainParams) -> dict[str, Any]:
    """The object Core's ``decoderawtransaction`` returns (legacy transactions)."""
    size = tx.size_bytes
    vin: list[dict[str, Any]] = []
    for tx_in in tx.inputs:
        if tx_in.prevout.is_null():
            vin.append({"coinbase": tx_in.script_sig.hex(), "sequence": tx_in.sequence})
            continue
        vin.append({
            "txid": tx_in.prevout.txid, "vout": tx_in.prevout.index,
            "scriptSig": {"asm": script_asm(tx_in.script_sig, decode_signatures=True),
                          "hex": tx_in.script_sig.hex()},
            "sequence": tx_in.sequence,
        })
    vout = [
        {"value": amount(out.value), "n": index,
         "scriptPubKey": script_pubkey_json(out.script_pubkey, params)}
        for index, out in enumerate(tx.outputs)
    ]
    return {"txid": tx.txid, "hash": tx.txid, "version": tx.version, "size": size,
            "vsize": size, "weight": 4 * size, "locktime": tx.lock_time, "vin": vin,
            "vout": vout}


def _mark(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _DECIMAL_MARK + format(value, "f")
    if isinstance(value, dict):
        return {key: _mark(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mark(item) for item in value]
    return value


def dumps_exact(value: Any) -> str:
    """JSON in which every Decimal is a plain number with all its digits."""
    text = json.dumps(_mark(value), separators=(",", ":"), ensure_ascii=False)
    return _DECIMAL_PATTERN.sub(r"\1", text)

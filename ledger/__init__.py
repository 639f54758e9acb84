"""capital-ledger's pure core: no Kafka, no database, no asyncio, no clock, no randomness.

Public API (see docs/api.md): re-exported here so callers write ``from ledger import X``.
"""

from __future__ import annotations

from ledger.address import address_to_script, p2pkh_address, p2sh_address, script_to_address
from ledger.errors import ScriptError, ValidationError
from ledger.interpreter import eval_script, verify_input
from ledger.oap import asset_id, color_outputs, parse_marker
from ledger.sighash import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    legacy_sighash,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

__all__ = [
    "SIGHASH_ALL",
    "SIGHASH_ANYONECANPAY",
    "SIGHASH_NONE",
    "SIGHASH_SINGLE",
    "OutPoint",
    "ScriptError",
    "Transaction",
    "TxIn",
    "TxOut",
    "ValidationError",
    "address_to_script",
    "asset_id",
    "color_outputs",
    "eval_script",
    "legacy_sighash",
    "p2pkh_address",
    "p2sh_address",
    "parse_marker",
    "script_to_address",
    "verify_input",
]

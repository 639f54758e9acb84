"""capital-ledger's pure core: no Kafka, no database, no asyncio, no clock, no randomness.

Public API (see docs/api.md): re-exported here so callers write ``from ledger import X``.
"""

from __future__ import annotations

from ledger.errors import ScriptError, ValidationError
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

__all__ = [
    "OutPoint",
    "ScriptError",
    "Transaction",
    "TxIn",
    "TxOut",
    "ValidationError",
]

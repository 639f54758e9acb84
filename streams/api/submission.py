"""Sending a signed transaction to the ledger and learning its outcome.

Owns: :func:`submit_and_wait` (one write to ``ledger.tx.v1`` through the API's
``LedgerClient``, then a bounded wait for committed/rejected and, once committed, for
the projection to show it, so a caller reads back what it just wrote). Both the
JSON-RPC ``sendrawtransaction`` and the seed surface's ``/v1/transactions/send`` use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from ledger.tx import Transaction
from streams.api.context import deps_of, services

PROJECTED_WAIT_S = 5.0
PROJECTED_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Submitted:
    txid: str
    decided: bool  # False: sent, no outcome within the wait (sending again is safe)
    committed: bool = False
    height: int | None = None
    code: str | None = None
    message: str | None = None


async def submit_and_wait(request: Request, tx: Transaction, *,
                          idempotency_key: str | None,
                          sent: Callable[[Transaction], None] | None = None) -> Submitted:
    """``sent``: called once the broker acknowledged the transaction (a fault point)."""
    found = services(request)
    assert found.ledger is not None
    deps = deps_of(request)
    await found.ledger.submit(tx, idempotency_key=idempotency_key or f"api-{tx.txid}")
    if sent is not None:
        sent(tx)
    try:
        outcome = (await found.ledger.wait([tx.txid], timeout_s=deps.submit_wait_s))[tx.txid]
    except TimeoutError:
        return Submitted(tx.txid, decided=False)
    if not outcome.committed:
        return Submitted(tx.txid, True, False, code=outcome.code, message=outcome.message)
    deadline = time.monotonic() + PROJECTED_WAIT_S
    while time.monotonic() < deadline and await found.projection.tx(tx.txid) is None:
        await asyncio.sleep(PROJECTED_POLL_S)
    return Submitted(tx.txid, True, True, height=outcome.height)

"""Submitting one signed transaction and waiting for its outcome; describing a transaction.

Owns: :func:`submit_tx` (send through :class:`LedgerClient`, optionally wait for
committed/rejected) and :func:`describe_tx` (the JSON view of ``capledger tx decode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.tx import Transaction

WAIT_TIMEOUT_S_DEFAULT = 30.0


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What ``submit_tx`` learned: the tx-log offset and, when waited for, the outcome."""

    txid: str
    offset: int
    committed: bool | None  # None: not waited for
    height: int | None = None
    block_hash: str | None = None
    code: str | None = None
    message: str | None = None


async def submit_tx(
    tx: Transaction,
    *,
    bootstrap: str,
    genesis: Genesis,
    submitter: str,
    signing_key: PrivateKey,
    topic_prefix: str = "",
    idempotency_key: str | None = None,
    wait: bool = True,
    timeout_s: float = WAIT_TIMEOUT_S_DEFAULT,
    watch_from_start: bool = False,
) -> SubmitResult:
    """Send ``tx``; with ``wait``, its outcome (TimeoutError when none comes in time).
    ``watch_from_start``: read the blocks log from its start (learns every governance
    change, so certificates after a key rotation check; slower on a long chain)."""
    from streams.client.ledger_client import LedgerClient

    client = LedgerClient(bootstrap, genesis, submitter=submitter, signing_key=signing_key,
                          topic_prefix=topic_prefix)
    # Watchers positioned (at the log ends, by default) before we send.
    await client.start(watch_from_start=watch_from_start)
    try:
        offset = await client.submit(tx, idempotency_key=idempotency_key)
        if not wait:
            return SubmitResult(tx.txid, offset, None)
        outcome = (await client.wait([tx.txid], timeout_s=timeout_s))[tx.txid]
        if not outcome.committed:
            return SubmitResult(tx.txid, offset, False, code=outcome.code,
                                message=outcome.message)
        assert outcome.height is not None
        block_hash = client.block_hash(outcome.height)
        return SubmitResult(tx.txid, offset, True, height=outcome.height,
                            block_hash=None if block_hash is None else display_hex(block_hash))
    finally:
        await client.stop()


def describe_tx(tx: Transaction) -> dict[str, Any]:
    return {
        "txid": tx.txid,
        "version": tx.version,
        "lock_time": tx.lock_time,
        "bytes": len(tx.serialize()),
        "inputs": [
            {"prevout": f"{display_hex(tx_in.prevout.txid_le)}:{tx_in.prevout.index}",
             "script_sig": tx_in.script_sig.hex(), "sequence": tx_in.sequence}
            for tx_in in tx.inputs
        ],
        "outputs": [
            {"value": tx_out.value, "script_pubkey": tx_out.script_pubkey.hex()}
            for tx_out in tx.outputs
        ],
    }

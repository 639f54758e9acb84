"""Chain resources: blocks, transactions and the status of the five nodes.

Owns: ``/api/chain/...`` (any signed-in principal may read the chain: it is the
members' shared ledger) and the keyset pagination used by every long list
(``limit`` and an opaque ``cursor``; the answer carries ``next_cursor`` or null).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from ledger.errors import ValidationError
from ledger.tx import Transaction
from streams.api.auth import Principal
from streams.api.bitcoin_format import decode_tx
from streams.api.context import deps_of, principal, projection, services
from streams.api.problems import ApiProblem
from streams.common.clock import now_ms as clock_now_ms

PAGE_LIMIT_DEFAULT = 20
PAGE_LIMIT_MAX = 100
HEX64 = re.compile(r"^[0-9a-f]{64}$")
CURSOR_DIGITS_MAX = 19
HEIGHT_MAX = 2**63 - 1  # PostgreSQL bigint

router = APIRouter(prefix="/api/chain", tags=["chain"])


def page_cursor(cursor: str | None) -> int | None:
    """The height a page starts below; ``cursor-invalid`` for anything else."""
    if cursor is None:
        return None
    if not cursor.isdigit() or len(cursor) > CURSOR_DIGITS_MAX or int(cursor) > HEIGHT_MAX:
        raise ApiProblem(400, "cursor-invalid", "cursor is a value from next_cursor")
    return int(cursor)


def check_hex64(value: str, what: str) -> str:
    if not HEX64.match(value):
        raise ApiProblem(400, f"{what}-malformed", f"a {what} is 64 lowercase hex digits")
    return value


def block_json(row: Any) -> dict[str, Any]:
    return {"height": row.height, "hash": row.hash, "prev_hash": row.prev_hash,
            "merkle_root": row.merkle_root, "proposer": row.proposer, "round": row.round,
            "time": row.time_at.isoformat(), "tx_count": row.tx_count,
            "size_bytes": row.size_bytes, "state_hash": row.state_hash,
            "voters": list(row.voters)}


@router.get("/blocks")
async def list_blocks(request: Request, limit: int = Query(PAGE_LIMIT_DEFAULT, ge=1,
                                                           le=PAGE_LIMIT_MAX),
                      cursor: str | None = None,
                      caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    below = page_cursor(cursor)
    rows = await projection(request).blocks(limit=limit, below_height=below)
    more = len(rows) == limit and rows[-1].height > 0
    return {"items": [block_json(row) for row in rows],
            "next_cursor": str(rows[-1].height) if more else None}


@router.get("/blocks/{block_id}")
async def get_block(request: Request, block_id: str,
                    caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    by_height = (block_id.isdigit() and len(block_id) <= CURSOR_DIGITS_MAX
                 and int(block_id) <= HEIGHT_MAX)
    if not by_height:
        check_hex64(block_id, "block-hash")
    found = projection(request)
    row = await (found.block_at(int(block_id)) if by_height else found.block_by_hash(block_id))
    if row is None:
        raise ApiProblem(404, "block-not-found", f"no projected block {block_id[:64]}")
    return {**block_json(row), "txids": await found.txids_at(row.height)}


@router.get("/transactions/{txid}")
async def get_transaction(request: Request, txid: str,
                          caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    row = await projection(request).tx(check_hex64(txid, "txid"))
    if row is None:
        raise ApiProblem(404, "tx-not-found", f"no committed transaction {txid}")
    try:
        decoded = decode_tx(Transaction.parse(row.raw), deps_of(request).genesis.params)
    except ValidationError:
        raise ApiProblem(500, "projection-corrupt", "the projected transaction does not parse") \
            from None
    for out in decoded["vout"]:
        out["value"] = str(out["value"])
    return {"txid": row.txid, "height": row.height, "position": row.position,
            "block_hash": row.block_hash, "time": row.time_at.isoformat(),
            "hex": row.raw.hex(), "decoded": decoded}


@router.get("/status")
async def node_status(request: Request,
                      caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    from streams.client.status import classify, report_json

    found = services(request)
    deps = deps_of(request)
    latest = dict(found.status.latest) if found.status is not None else {}
    report = classify(latest, now_ms=clock_now_ms(), members=deps.genesis.member_ids,
                      chain_id=deps.genesis.chain_id)
    head = await projection(request).head()
    return {**report_json(report), "chain_id": deps.genesis.chain_id,
            "projected_height": None if head is None else head.height,
            "watch_error": found.status_error}


"""The market projector: the ``market.*.v1`` topics into the PostgreSQL tables of
revision 0003 (assets with terms, participants, orders and their history,
negotiations as metadata, agreements, trades; ``market_balance`` joins the chain's
``address_balance``).

Owns: ``project_market`` — reads the three market topics to their end, checks every
envelope (writer, signature; a bad record is counted and skipped, never applied), folds
them with ``ledger.market.apply_event`` and writes every row as an upsert plus its
tracking rows in ``projection_offset``, all in one transaction: running it again (or
after a crash) is harmless. The market is small (one row per order), so each run
replays the topics from offset 0 and the database converges on the fold.
Ciphertext of negotiation messages is removed before ``market_event`` stores a payload.
``follow_market`` keeps the projection current: it watches the three topics' end
offsets and projects again whenever one moved (what the API reads, decision 0081).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ledger.address import p2pkh_address
from ledger.errors import ValidationError
from ledger.hashing import hash160
from ledger.market import Agreement, Board, UserRef, apply_event, price_text
from ledger.membership import Genesis
from streams.kafka.logio import LogReader
from streams.kafka.market_log import Recorded, read_events
from streams.kafka.topics import MARKET_ASSETS, MARKET_BOARD, MARKET_NEGOTIATION

CONSUMER = "market-projector"
HIDDEN_FIELDS = frozenset({"ciphertext", "sealed_keys"})
BOARD_WRITERS = frozenset({"otc-operator"})
FOLLOW_POLL_S = 0.1
logger = logging.getLogger("capledger.projections.market")


@dataclass(frozen=True, slots=True)
class MarketProjection:
    events: int
    refused: int
    orders: int
    trades: int


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _address(user: UserRef) -> str:
    return p2pkh_address(hash160(bytes.fromhex(user.pubkey_hex)))


async def project_market(dsn: str, bootstrap: str, genesis: Genesis, *,
                         topic_prefix: str = "") -> MarketProjection:
    """Project the market's logs as they are now; the counts written."""
    issuers = frozenset(m.id for m in genesis.members if m.may_issue)
    recorded: list[tuple[str, Recorded]] = []
    refused = 0
    ends: dict[str, int] = {}
    for spec, writers in ((MARKET_ASSETS, issuers), (MARKET_BOARD, BOARD_WRITERS),
                          (MARKET_NEGOTIATION, BOARD_WRITERS)):
        topic = topic_prefix + spec.name
        events, bad = await read_events(bootstrap, topic, genesis, writers,
                                        client_id=CONSUMER)
        refused += len(bad)
        recorded += [(spec.name, r) for r in events]
        ends[topic] = max([r.offset + 1 for r in events], default=0)
    board = Board()
    for _, item in recorded:
        try:
            board = apply_event(board, item.event)
        except (ValidationError, KeyError, TypeError, ValueError):
            refused += 1
    with psycopg.connect(dsn) as conn, conn.transaction():
        _write(conn, board, recorded, ends)
    return MarketProjection(len(recorded), refused, len(board.orders), len(board.trades))


async def follow_market(dsn: str, bootstrap: str, genesis: Genesis, *, stop: asyncio.Event,
                        topic_prefix: str = "", poll_s: float = FOLLOW_POLL_S) -> int:
    """Project the market again whenever a market topic grew, until ``stop``; the
    number of projection runs. A failed run (broker or database hiccup) is logged and
    retried at the next poll: nothing is lost, every run replays the topics."""
    topics = [topic_prefix + spec.name for spec in (MARKET_ASSETS, MARKET_BOARD,
                                                    MARKET_NEGOTIATION)]
    readers = [LogReader(bootstrap, topic, client_id=CONSUMER + "-ends") for topic in topics]
    seen: list[int] = [-1] * len(readers)
    started: list[LogReader] = []
    runs = 0
    try:
        while not stop.is_set():
            try:
                for reader in readers[len(started):]:  # the topics may not exist yet
                    await reader.start(0)
                    started.append(reader)
                ends = [await reader.end_offset() for reader in readers]
                if ends != seen:
                    await project_market(dsn, bootstrap, genesis, topic_prefix=topic_prefix)
                    seen, runs = ends, runs + 1
            except Exception as error:  # keep following; the next run converges
                logger.warning("market projection failed: %s", type(error).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
    finally:
        for reader in started:
            with contextlib.suppress(Exception):
                await reader.stop()
    return runs


def _visible(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in HIDDEN_FIELDS}


def _write(conn: psycopg.Connection[Any], board: Board, recorded: list[tuple[str, Recorded]],
           ends: Mapping[str, int]) -> None:
    for registered in board.assets.values():
        d = registered.definition
        conn.execute(
            "INSERT INTO market_asset VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (asset_id) DO NOTHING",
            (registered.asset_id, d.security_code, d.name, d.kind, d.issuer, d.unit,
             d.decimals, d.issue_date, d.maturity, d.coupon_bp, d.face_value,
             d.definition_hash.hex(), Jsonb(d.to_dict()), _ts(registered.registered_at_ms)))
    _write_participants(conn, _participants(board))
    for o in board.orders.values():
        conn.execute(
            "INSERT INTO market_order VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (order_id) DO UPDATE SET price = EXCLUDED.price, "
            "quantity = EXCLUDED.quantity, status = EXCLUDED.status, "
            "version = EXCLUDED.version, negotiation_id = EXCLUDED.negotiation_id, "
            "updated_at = EXCLUDED.updated_at",
            (o.order_id, o.security_code, o.asset_id, o.side.value, o.price, o.quantity,
             o.poster.firm, o.poster.user_id, o.status.value, o.version, o.negotiation_id,
             _ts(o.posted_at_ms), _ts(o.updated_at_ms)))
    for n in board.negotiations.values():
        conn.execute(
            "INSERT INTO market_negotiation VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (negotiation_id) DO UPDATE SET messages = EXCLUDED.messages, "
            "closed = EXCLUDED.closed",
            (n.negotiation_id, n.order_id, n.poster.firm, n.poster.user_id, n.joiner.firm,
             n.joiner.user_id, _ts(n.opened_at_ms), n.messages, n.closed))
    for a in board.agreements.values():
        _write_agreement(conn, a)
    for t in board.trades.values():
        terms = t.terms
        conn.execute(
            "INSERT INTO market_trade VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (agreement_id) DO NOTHING",
            (t.agreement_id, t.order_id, t.negotiation_id, t.txid, t.height, t.block_hash,
             _ts(t.committed_at_ms), terms.asset_id, terms.security_code, terms.price,
             terms.quantity, terms.amount, terms.seller.firm, terms.seller.user_id,
             terms.buyer.firm, terms.buyer.user_id))
    _write_events(conn, board, recorded)
    for topic, offset in ends.items():
        conn.execute(
            'INSERT INTO projection_offset (consumer, topic, partition, "offset") '
            "VALUES (%s, %s, 0, %s) ON CONFLICT (consumer, topic, partition) DO UPDATE "
            'SET "offset" = EXCLUDED."offset", updated_at = now()',
            (CONSUMER, topic, offset))


def _participants(board: Board) -> dict[str, UserRef]:
    users: dict[str, UserRef] = {}
    for order in board.orders.values():
        users[order.poster.key] = order.poster
    for negotiation in board.negotiations.values():
        users[negotiation.joiner.key] = negotiation.joiner
    return users


def _write_participants(conn: psycopg.Connection[Any], users: Mapping[str, UserRef]) -> None:
    for user in users.values():
        conn.execute(
            "INSERT INTO market_participant VALUES (%s,%s,%s,%s) "
            "ON CONFLICT (firm, user_id) DO NOTHING",
            (user.firm, user.user_id, user.pubkey_hex, _address(user)))


def _write_agreement(conn: psycopg.Connection[Any], a: Agreement) -> None:
    terms = a.terms
    status = ("settled" if a.settled_txid else "failed" if a.failed_code else
              "agreed" if a.is_complete else "signing")
    conn.execute(
        "INSERT INTO market_agreement VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
        "ON CONFLICT (agreement_id) DO UPDATE SET signatures = EXCLUDED.signatures, "
        "status = EXCLUDED.status, failed_code = EXCLUDED.failed_code, "
        "expires_at = EXCLUDED.expires_at",
        (a.agreement_id, terms.negotiation_id, terms.order_id, terms.asset_id,
         price_text(terms.price), terms.quantity, terms.amount, terms.seller.firm,
         terms.seller.user_id, terms.buyer.firm, terms.buyer.user_id, len(a.signatures),
         status, a.failed_code, _ts(a.expires_at_ms) if a.expires_at_ms else None))


def _order_of(board: Board, payload: Mapping[str, Any]) -> str | None:
    if isinstance(payload.get("order_id"), str):
        return str(payload["order_id"])
    if isinstance(payload.get("negotiation_id"), str) and (
            payload["negotiation_id"] in board.negotiations):
        return board.negotiations[str(payload["negotiation_id"])].order_id
    if isinstance(payload.get("agreement_id"), str) and (
            payload["agreement_id"] in board.agreements):
        return board.agreements[str(payload["agreement_id"])].terms.order_id
    terms = payload.get("terms")
    return str(terms["order_id"]) if isinstance(terms, dict) and "order_id" in terms else None


def _write_events(conn: psycopg.Connection[Any], board: Board,
                  recorded: Iterable[tuple[str, Recorded]]) -> None:
    for topic, item in recorded:
        payload = _visible(item.event.payload)
        conn.execute(
            "INSERT INTO market_event VALUES (%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (topic, log_offset) DO NOTHING",
            (topic, item.offset, item.event.kind, item.stream_id,
             _order_of(board, item.event.payload), item.writer,
             Jsonb(json.loads(json.dumps(payload))), _ts(item.recorded_at_ms)))

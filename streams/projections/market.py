"""The market projector: the ``market.*.v1`` topics into the PostgreSQL tables of
revision 0003 (assets with terms, participants, orders and their history,
negotiations as metadata, agreements, trades; ``market_balance`` joins the chain's
``address_balance``).

Owns: ``project_market`` — reads the three market topics to their end, checks every
envelope (writer, signature; a bad record is counted and skipped, never applied), folds
them with ``ledger.market.apply_event`` and writes every row as an upsert plus its
tracking rows in ``projection_offset``, all in one transaction: running it again (or
after a crash) is harmless. ``MarketFollower`` keeps the fold in memory
(replayed from offset 0 when it starts) and each step writes only the rows its new
events touched; a fresh start rewrites every row, so the database converges on the fold.
Ciphertext of negotiation messages is removed before ``market_event`` stores a payload.
``follow_market`` keeps the projection current (what the API reads, decision 0081):
idle, it long-polls the board topic (a post, amend, cancel, join or signature wakes it
at once) and every step's transaction ends with ``NOTIFY market_projected`` carrying
the positions it wrote, so an API waiting to read its own write wakes when the
transaction commits instead of polling (decision 0082).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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
from streams.kafka.logio import EndOffsets, LogReader, LogRecord
from streams.kafka.market_log import READ_TIMEOUT_MS, Recorded, open_envelope
from streams.kafka.topics import MARKET_ASSETS, MARKET_BOARD, MARKET_NEGOTIATION

CONSUMER = "market-projector"
HIDDEN_FIELDS = frozenset({"ciphertext", "sealed_keys", "raw_tx"})  # raw_tx: on the chain
BOARD_WRITERS = frozenset({"otc-operator"})
# idle: a long-poll of the board topic this long (a board record wakes the follower
# at once), then the topics' ends (3 offset requests): assets and messages are seen
# within it
FOLLOW_POLL_S = 0.02
NOTIFY_CHANNEL = "market_projected"  # payload: {"topic": offset, ...} just committed
FOLLOW_RETRY_S = 1.0  # after a failure (a topic not created yet, a broker hiccup)
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
    """Project the market's logs as they are now (from offset 0); the counts written."""
    follower = MarketFollower(dsn, bootstrap, genesis, topic_prefix=topic_prefix)
    await follower.start()
    try:
        await follower.step()
    finally:
        await follower.stop()
    return MarketProjection(follower.events, follower.refused, len(follower.board.orders),
                            len(follower.board.trades))


class MarketFollower:
    """The market projection kept current incrementally: one reader per market topic,
    the fold in memory (replayed from offset 0 at start), and each :meth:`step` writes
    only the rows its new events touched, with the readers' positions, in one
    PostgreSQL transaction."""

    def __init__(self, dsn: str, bootstrap: str, genesis: Genesis, *,
                 topic_prefix: str = "") -> None:
        issuers = frozenset(m.id for m in genesis.members if m.may_issue)
        # in the order the market writes them: an asset before its orders, a
        # negotiation's opening (board) before its messages
        self._topics = [(topic_prefix + spec.name, spec.name, writers) for spec, writers in
                        ((MARKET_ASSETS, issuers), (MARKET_BOARD, BOARD_WRITERS),
                         (MARKET_NEGOTIATION, BOARD_WRITERS))]
        self._dsn = dsn
        self._genesis = genesis
        self._readers = {topic: LogReader(bootstrap, topic, client_id=CONSUMER)
                         for topic, _, _ in self._topics}
        self._started: list[LogReader] = []
        self._end_offsets = EndOffsets(  # dependants first: see _ends
            bootstrap, [topic for topic, _, _ in reversed(self._topics)],
            client_id=CONSUMER + "-ends")
        self._ends_started = False
        self._conn: psycopg.Connection[Any] | None = None
        # records a long-poll (``wait_for_records``) read ahead, per topic, for the next step
        self._held: dict[str, list[LogRecord]] = {}
        self.board = Board()
        self.events = 0
        self.refused = 0

    async def start(self) -> None:
        """Start the readers at offset 0 (a topic missing yet raises; call again)."""
        if not self._ends_started:
            await self._end_offsets.start()
            self._ends_started = True
        for reader in list(self._readers.values())[len(self._started):]:
            await reader.start(0)
            self._started.append(reader)

    async def stop(self) -> None:
        for reader in self._started:
            with contextlib.suppress(Exception):
                await reader.stop()
        self._started.clear()
        if self._ends_started:
            with contextlib.suppress(Exception):
                await self._end_offsets.stop()
            self._ends_started = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _ends(self) -> dict[str, int]:
        """End offsets, dependants first: whatever lies below the negotiation topic's
        end was written after the board records it depends on were acknowledged, so
        they lie below the board's end asked after it (and likewise board -> assets)."""
        return await self._end_offsets.ends()

    async def wait_for_records(self, *, timeout_ms: int) -> bool:
        """Idle wait: a long-poll of the board topic, which returns as soon as the broker
        appends a record there (or after ``timeout_ms``). What it read is held for the
        next :meth:`step`; True when it read something."""
        topic = self._topics[1][0]  # the board: where the API's writes mostly go
        if self._held.get(topic):
            return True
        records = await self._readers[topic].read(timeout_ms=timeout_ms)
        if records:
            self._held[topic] = records
        return bool(records)

    async def _read_to(self, topic: str, end: int, timeout_ms: int) -> list[LogRecord]:
        """The records of ``topic`` from the reader's position (held ones first) below
        ``end``; anything read past it is read again next step."""
        reader = self._readers[topic]
        found = [r for r in self._held.pop(topic, []) if r.offset < end]
        while reader.position < end:
            records = await reader.read(timeout_ms=timeout_ms)
            if not records:
                break
            found.extend(r for r in records if r.offset < end)
        if reader.position > end:  # read past the end taken: again next step
            reader.seek(end)
        return found

    async def step(self, *, timeout_ms: int = READ_TIMEOUT_MS) -> int:
        """Project every record up to the ends as of now; the number of records read."""
        ends = await self._ends()
        new: list[tuple[str, Recorded]] = []
        read = 0
        for topic, name, writers in self._topics:
            for record in await self._read_to(topic, ends[topic], timeout_ms):
                read += 1
                try:
                    new.append((name, open_envelope(record.value, self._genesis, writers,
                                                    record.offset)))
                except ValidationError as error:
                    self.refused += 1
                    logger.warning("market record %s@%d refused: %s", topic,
                                   record.offset, error.code)
        if read == 0:
            return 0
        for _, item in new:
            try:
                self.board = apply_event(self.board, item.event)
            except (ValidationError, KeyError, TypeError, ValueError):
                self.refused += 1
        self.events += len(new)
        positions = {topic: self._readers[topic].position for topic, _, _ in self._topics}
        # in a worker thread: the demo runs this beside the API server in one loop
        await asyncio.to_thread(self._write, self.board, new, positions)
        return read

    def _write(self, board: Board, new: list[tuple[str, Recorded]],
               positions: Mapping[str, int]) -> None:
        """One transaction on the follower's own connection (reopened after a failure)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn)
        try:
            with self._conn.transaction():
                _write(self._conn, board, new, positions, touched=_touched(board, new))
        except Exception:
            self._conn.close()
            self._conn = None
            raise


def _touched(board: Board, new: Iterable[tuple[str, Recorded]]) -> frozenset[str]:
    """The orders whose rows (order, negotiations, agreements, trades) new events change."""
    return frozenset(order_id for _, item in new
                     if (order_id := _order_of(board, item.event.payload)) is not None)


async def follow_market(dsn: str, bootstrap: str, genesis: Genesis, *, stop: asyncio.Event,
                        topic_prefix: str = "", poll_s: float = FOLLOW_POLL_S) -> int:
    """Keep the market projection current until ``stop``; the number of steps that
    projected something. A failed step (broker or database hiccup) is logged and the
    follower starts over from offset 0 (nothing is lost: rows are upserts)."""
    follower: MarketFollower | None = None
    steps = 0
    try:
        while not stop.is_set():
            try:
                if follower is None:
                    follower = MarketFollower(dsn, bootstrap, genesis,
                                              topic_prefix=topic_prefix)
                await follower.start()  # the topics may not exist yet
                if await follower.step():  # it read to the ends: wait for more
                    steps += 1
                await follower.wait_for_records(timeout_ms=int(poll_s * 1000))
                continue
            except Exception as error:  # keep following; start over
                logger.warning("market projection failed: %s", type(error).__name__)
                if follower is not None:
                    await follower.stop()
                follower = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_RETRY_S)
    finally:
        if follower is not None:
            await follower.stop()
    return steps


def _visible(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in HIDDEN_FIELDS}


def _write(conn: psycopg.Connection[Any], board: Board, recorded: list[tuple[str, Recorded]],
           ends: Mapping[str, int], *, touched: frozenset[str] | None = None) -> None:
    """Upsert the rows of ``touched`` orders (None: all) and the new events' rows."""
    def wanted(order_id: str) -> bool:
        return touched is None or order_id in touched

    if touched is None or any(item.event.kind == "asset-registered" for _, item in recorded):
        _write_assets(conn, board)
    orders = [o for o in board.orders.values() if wanted(o.order_id)]
    negotiations = [n for n in board.negotiations.values() if wanted(n.order_id)]
    users = {o.poster.key: o.poster for o in orders}
    users.update({n.joiner.key: n.joiner for n in negotiations})
    _write_participants(conn, users)
    for o in orders:
        conn.execute(
            "INSERT INTO market_order VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (order_id) DO UPDATE SET price = EXCLUDED.price, "
            "quantity = EXCLUDED.quantity, status = EXCLUDED.status, "
            "version = EXCLUDED.version, negotiation_id = EXCLUDED.negotiation_id, "
            "updated_at = EXCLUDED.updated_at",
            (o.order_id, o.security_code, o.asset_id, o.side.value, o.price, o.quantity,
             o.poster.firm, o.poster.user_id, o.status.value, o.version, o.negotiation_id,
             _ts(o.posted_at_ms), _ts(o.updated_at_ms)))
    for n in negotiations:
        conn.execute(
            "INSERT INTO market_negotiation VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (negotiation_id) DO UPDATE SET messages = EXCLUDED.messages, "
            "closed = EXCLUDED.closed",
            (n.negotiation_id, n.order_id, n.poster.firm, n.poster.user_id, n.joiner.firm,
             n.joiner.user_id, _ts(n.opened_at_ms), n.messages, n.closed))
    for a in board.agreements.values():
        if wanted(a.terms.order_id):
            _write_agreement(conn, a)
    for t in board.trades.values():
        if wanted(t.order_id):
            _write_trade(conn, t)
    _write_events(conn, board, recorded)
    _write_sealed(conn, recorded)
    for topic, offset in ends.items():
        conn.execute(
            'INSERT INTO projection_offset (consumer, topic, partition, "offset") '
            "VALUES (%s, %s, 0, %s) ON CONFLICT (consumer, topic, partition) DO UPDATE "
            'SET "offset" = EXCLUDED."offset", updated_at = now()',
            (CONSUMER, topic, offset))
    # delivered when this transaction commits: an API waiting for these rows wakes then
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, json.dumps(dict(ends))))


def _write_assets(conn: psycopg.Connection[Any], board: Board) -> None:
    for registered in board.assets.values():
        d = registered.definition
        conn.execute(
            "INSERT INTO market_asset VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (asset_id) DO NOTHING",
            (registered.asset_id, d.security_code, d.name, d.kind, d.issuer, d.unit,
             d.decimals, d.issue_date, d.maturity, d.coupon_bp, d.face_value,
             d.definition_hash.hex(), Jsonb(d.to_dict()), _ts(registered.registered_at_ms)))


def _write_trade(conn: psycopg.Connection[Any], t: Any) -> None:
    terms = t.terms
    conn.execute(
        "INSERT INTO market_trade VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        " ON CONFLICT (agreement_id) DO NOTHING",
        (t.agreement_id, t.order_id, t.negotiation_id, t.txid, t.height, t.block_hash,
         _ts(t.committed_at_ms), terms.asset_id, terms.security_code, terms.price,
         terms.quantity, terms.amount, terms.seller.firm, terms.seller.user_id,
         terms.buyer.firm, terms.buyer.user_id))


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


def _sealed_rows(item: Recorded) -> list[tuple[str, tuple[Any, ...]]]:
    """Rows of revision 0012 for one event: a message's ciphertext, or the negotiation
    key sealed to each reader. A field of the wrong shape (the envelope was signed by
    the operator, but still) skips the event's rows, with a warning."""
    payload, kind = item.event.payload, item.event.kind
    try:
        if kind == "message-sent":
            return [("INSERT INTO market_sealed_message VALUES (%s,%s,%s,%s,%s) "
                     "ON CONFLICT (negotiation_id, sequence) DO NOTHING",
                     (str(payload["negotiation_id"]), int(payload["sequence"]),
                      str(payload["sender"]),
                      base64.b64decode(str(payload["ciphertext"]), validate=True),
                      _ts(int(payload["at_ms"]))))]
        if kind == "negotiation-opened":
            nonce = str(payload["command"]["nonce"])
            return [("INSERT INTO market_sealed_key VALUES (%s,%s,%s,%s,%s) "
                     "ON CONFLICT (negotiation_id, role) DO NOTHING",
                     (str(payload["negotiation_id"]), str(role), str(payload["order_id"]),
                      nonce, bytes.fromhex(str(sealed))))
                    for role, sealed in dict(payload["sealed_keys"]).items()]
    except (KeyError, TypeError, ValueError, binascii.Error):
        logger.warning("market record @%d: sealed fields malformed, not projected", item.offset)
    return []


def _write_sealed(conn: psycopg.Connection[Any], recorded: Iterable[tuple[str, Recorded]]) -> None:
    for _, item in recorded:
        for sql, params in _sealed_rows(item):
            conn.execute(sql, params)

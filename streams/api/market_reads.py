"""What the API reads of the market: the PostgreSQL projection of revision 0003.

Owns: the market queries (assets, the board, negotiations as metadata, agreements,
trades, a user's balance, the surveillance summary, the projection's version) over the
API's read-only pool, shaped as the market resources answer them, and
:func:`wait_projected` (read-your-writes: a market write is answered once the
projection shows it, bounded). The market projector (``follow_market``) runs beside
the API and writes these tables; the API keeps no copy (decision 0081).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from streams.projections.market import CONSUMER, NOTIFY_CHANNEL

PROJECTED_WAIT_S = 5.0
PROJECTED_POLL_S = 0.02  # without a listening watch: how often a waiter reads the offsets
# with one: a waiter still reads projection_offset itself this often when notified of
# nothing (a notification lost while the listener reconnected)
PROJECTED_RECHECK_S = 0.25
LISTEN_RETRY_S = 1.0
_OFFSETS_SQL = 'SELECT topic, "offset" FROM projection_offset WHERE consumer = %s'
OPEN_STATUSES = ("waiting", "negotiating", "agreed")
CASH_KINDS = ("cash", "deposit")

_ORDER = ("o.order_id, o.security_code, coalesce(a.name, o.security_code), a.maturity, "
          "o.side, o.price, o.quantity, o.poster_firm, o.poster_user, o.status, o.posted_at, "
          "o.updated_at, o.version, o.negotiation_id")
_ORDER_FROM = "market_order o LEFT JOIN market_asset a ON a.asset_id = o.asset_id"
_AGREEMENT = ("g.agreement_id, g.negotiation_id, g.order_id, g.asset_id, "
              "coalesce(a.security_code, ''), g.price, g.quantity, g.amount, g.seller_firm, "
              "g.seller_user, g.buyer_firm, g.buyer_user, g.status, g.failed_code, "
              "(SELECT t.txid FROM market_trade t WHERE t.agreement_id = g.agreement_id), "
              "coalesce((SELECT array_agg(e.payload->>'user' ORDER BY e.payload->>'user') "
              "FROM market_event e WHERE e.kind = 'agreement-signed' "
              "AND e.payload->>'agreement_id' = g.agreement_id), '{}')")
_AGREEMENT_FROM = "market_agreement g LEFT JOIN market_asset a ON a.asset_id = g.asset_id"
_TRADE = ("t.agreement_id, t.order_id, t.negotiation_id, t.txid, t.height, t.block_hash, "
          "t.committed_at, t.asset_id, t.security_code, t.price, t.quantity, t.amount, "
          "t.seller_firm, t.seller_user, t.buyer_firm, t.buyer_user")


def _ms(at: dt.datetime | None) -> int | None:
    return None if at is None else int(at.timestamp() * 1000)


def _user(firm: str, user_id: str) -> dict[str, str]:
    return {"user_id": user_id, "firm": firm, "key": f"{firm}/{user_id}"}


def _date(value: Any) -> str | None:
    return None if value is None else str(value)


def order_row(row: Sequence[Any], me: str | None) -> dict[str, Any]:
    poster = _user(row[7], row[8])
    return {"order_id": row[0], "security_code": row[1], "name": row[2],
            "maturity": _date(row[3]), "side": row[4], "price": str(row[5]),
            "quantity": int(row[6]), "poster": poster, "status": row[9],
            "posted_at_ms": _ms(row[10]), "updated_at_ms": _ms(row[11]),
            "version": int(row[12]), "negotiation_id": row[13], "mine": me == poster["key"]}


def _agreement_terms(r: Sequence[Any]) -> dict[str, Any]:
    return {"security_code": r[4], "asset_id": r[3], "price": str(r[5]),
            "quantity": int(r[6]), "amount_krw": int(r[7]), "seller": _user(r[8], r[9]),
            "buyer": _user(r[10], r[11]), "order_id": r[2], "negotiation_id": r[1]}


def agreement_row(row: Sequence[Any]) -> dict[str, Any]:
    terms = _agreement_terms(row)
    return {"agreement_id": row[0], "terms": terms, "signed_by": list(row[15]),
            "complete": row[12] in ("agreed", "settled"), "settled_txid": row[14],
            "failed_code": row[13], "status": row[12]}


def trade_row(row: Sequence[Any]) -> dict[str, Any]:
    terms = {"security_code": row[8], "asset_id": row[7], "price": str(row[9]),
             "quantity": int(row[10]), "amount_krw": int(row[11]),
             "seller": _user(row[12], row[13]), "buyer": _user(row[14], row[15]),
             "order_id": row[1], "negotiation_id": row[2]}
    return {"agreement_id": row[0], "order_id": row[1], "txid": row[3],
            "height": int(row[4]), "block_hash": row[5], "committed_at_ms": _ms(row[6]),
            "terms": terms}


class MarketReads:
    """The market's queries over the projection's read-only pool."""

    def __init__(self, projection: Any) -> None:
        self._projection = projection

    async def _rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
                    ) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._projection.query(sql, params)
        return rows

    async def version(self) -> int:
        rows = await self._rows('SELECT coalesce(sum("offset"), 0) FROM projection_offset '
                                "WHERE consumer = %s", (CONSUMER,))
        return int(rows[0][0])

    async def offsets(self) -> dict[str, int]:
        rows = await self._rows(_OFFSETS_SQL, (CONSUMER,))
        return {str(row[0]): int(row[1]) for row in rows}

    async def assets(self) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT asset_id, security_code, name, kind, issuer, unit, maturity, coupon_bp, "
            "face_value FROM market_asset ORDER BY security_code")
        return [{"asset_id": r[0], "security_code": r[1], "name": r[2], "kind": r[3],
                 "issuer": r[4], "unit": r[5], "maturity": _date(r[6]), "coupon_bp": r[7],
                 "face_value": r[8]} for r in rows]

    async def orders(self, *, include_closed: bool, me: str | None, limit: int,
                     after: tuple[dt.datetime, str] | None) -> list[dict[str, Any]]:
        """Newest first; keyset ``after`` = (posted_at, order_id) of the last one seen."""
        where: list[str] = ["TRUE"]
        params: list[Any] = []
        if not include_closed:
            where.append("o.status = ANY(%s)")
            params.append(list(OPEN_STATUSES))
        if after is not None:
            where.append("(o.posted_at, o.order_id) < (%s, %s)")
            params.extend(after)
        rows = await self._rows(
            f"SELECT {_ORDER} FROM {_ORDER_FROM} WHERE {' AND '.join(where)} "
            "ORDER BY o.posted_at DESC, o.order_id DESC LIMIT %s", (*params, limit))
        return [order_row(r, me) for r in rows]

    async def order(self, order_id: str, me: str | None) -> dict[str, Any] | None:
        rows = await self._rows(f"SELECT {_ORDER} FROM {_ORDER_FROM} WHERE o.order_id = %s",
                                (order_id,))
        return order_row(rows[0], me) if rows else None

    async def order_cursor(self, order_id: str) -> tuple[dt.datetime, str] | None:
        rows = await self._rows("SELECT posted_at, order_id FROM market_order "
                                "WHERE order_id = %s", (order_id,))
        return (rows[0][0], str(rows[0][1])) if rows else None

    async def negotiations(self, who: str, me: str | None, firm: str | None
                           ) -> list[dict[str, Any]]:
        """``who``: "all", "firm" (either party a customer of ``firm``) or "user"."""
        condition = {"all": "TRUE",
                     "firm": "(n.poster_firm = %(firm)s OR n.joiner_firm = %(firm)s)",
                     "user": "(n.poster_firm || '/' || n.poster_user = %(me)s OR "
                             "n.joiner_firm || '/' || n.joiner_user = %(me)s)"}[who]
        rows = await self._rows(
            "SELECT n.negotiation_id, n.order_id, n.poster_firm, n.poster_user, "
            "n.joiner_firm, n.joiner_user, n.opened_at, n.messages, n.closed "
            f"FROM market_negotiation n WHERE {condition} "
            "ORDER BY n.opened_at DESC, n.negotiation_id", {"firm": firm, "me": me})
        found = []
        for r in rows:
            found.append({"negotiation_id": r[0], "order_id": r[1],
                          "poster": _user(r[2], r[3]), "joiner": _user(r[4], r[5]),
                          "opened_at_ms": _ms(r[6]), "messages": int(r[7]),
                          "closed": bool(r[8]), "order": await self.order(r[1], None)})
        return found

    async def agreements(self, me: str | None) -> list[dict[str, Any]]:
        """All agreements (``me`` None) or the user's own."""
        condition = "TRUE" if me is None else (
            "(g.seller_firm || '/' || g.seller_user = %(me)s OR "
            "g.buyer_firm || '/' || g.buyer_user = %(me)s)")
        rows = await self._rows(f"SELECT {_AGREEMENT} FROM {_AGREEMENT_FROM} "
                                f"WHERE {condition} ORDER BY g.agreement_id", {"me": me})
        return [agreement_row(r) for r in rows]

    async def trades(self, me: str | None, firm: str | None) -> list[dict[str, Any]]:
        """All trades, a firm's customers' or a user's own, in chain order."""
        if me is not None:
            condition = ("(t.seller_firm || '/' || t.seller_user = %(me)s OR "
                         "t.buyer_firm || '/' || t.buyer_user = %(me)s)")
        elif firm is not None:
            condition = "(t.seller_firm = %(firm)s OR t.buyer_firm = %(firm)s)"
        else:
            condition = "TRUE"
        rows = await self._rows(f"SELECT {_TRADE} FROM market_trade t WHERE {condition} "
                                "ORDER BY t.height, t.txid", {"me": me, "firm": firm})
        return [trade_row(r) for r in rows]

    async def balance(self, user_key: str, address: str) -> dict[str, Any]:
        """나의 잔고: units per security code and KRW cash at ``address`` (the chain's
        unspent outputs), and what the user's open orders and agreements hold back."""
        rows = await self._rows(
            "SELECT a.security_code, a.kind, a.unit, b.asset_id, b.amount::bigint "
            "FROM address_balance b JOIN market_asset a ON a.asset_id = b.asset_id "
            "WHERE b.address = %s", (address,))
        securities: dict[str, int] = {}
        cash = 0
        for code, kind, unit, _, amount in rows:
            if kind in CASH_KINDS and unit == "KRW":
                cash += int(amount)
            elif int(amount):
                securities[str(code)] = securities.get(str(code), 0) + int(amount)
        height = await self._rows("SELECT coalesce(max(height), 0) FROM block")
        return {"user": user_key, "address": address, "securities": securities,
                "cash_krw": cash, "committed": await self._committed(user_key),
                "height": int(height[0][0])}

    async def _committed(self, user_key: str) -> dict[str, int]:
        rows = await self._rows(
            "SELECT side, asset_id, sum(quantity)::bigint, sum(price * quantity)::bigint "
            "FROM market_order WHERE poster_firm || '/' || poster_user = %s "
            "AND status IN ('waiting', 'negotiating') GROUP BY side, asset_id "
            "UNION ALL SELECT CASE WHEN seller_firm || '/' || seller_user = %s THEN 'sell' "
            "ELSE 'buy' END, asset_id, sum(quantity)::bigint, sum(amount)::bigint "
            "FROM market_agreement WHERE status = 'agreed' AND (seller_firm || '/' || "
            "seller_user = %s OR buyer_firm || '/' || buyer_user = %s) GROUP BY 1, 2",
            (user_key, user_key, user_key, user_key))
        held: dict[str, int] = {}
        for side, asset_id, quantity, amount in rows:
            unit, value = (str(asset_id), int(quantity)) if side == "sell" else (
                "KRW", int(amount))
            held[unit] = held.get(unit, 0) + value
        return held

    async def refused_by_code(self) -> dict[str, int]:
        rows = await self._rows(
            "SELECT payload->>'code', count(*) FROM market_event "
            "WHERE kind = 'command-refused' GROUP BY 1 ORDER BY 1")
        return {str(r[0]): int(r[1]) for r in rows}

    async def sealed_negotiation(self, negotiation_id: str) -> tuple[str, str] | None:
        """(poster key, joiner key) of a negotiation, None when unknown."""
        rows = await self._rows(
            "SELECT poster_firm || '/' || poster_user, joiner_firm || '/' || joiner_user "
            "FROM market_negotiation WHERE negotiation_id = %s", (negotiation_id,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def sealed_key(self, negotiation_id: str, role: str) -> tuple[str, str, bytes] | None:
        """(order id, opening command's nonce, the key sealed to ``role``) (0012)."""
        rows = await self._rows(
            "SELECT order_id, command_nonce, sealed_key FROM market_sealed_key "
            "WHERE negotiation_id = %s AND role = %s", (negotiation_id, role))
        return (str(rows[0][0]), str(rows[0][1]), bytes(rows[0][2])) if rows else None

    async def sealed_messages(self, negotiation_id: str) -> list[tuple[int, str, bytes, int]]:
        """(sequence, sender, ciphertext, sent at ms) of a negotiation's messages, in
        order (at most ``ROWS_MAX``: a negotiation is a conversation, not a log)."""
        rows = await self._rows(
            "SELECT sequence, sender, ciphertext, sent_at FROM market_sealed_message "
            "WHERE negotiation_id = %s ORDER BY sequence", (negotiation_id,))
        return [(int(r[0]), str(r[1]), bytes(r[2]), _ms(r[3]) or 0) for r in rows]

    async def event_count(self) -> int:
        return int((await self._rows("SELECT count(*) FROM market_event"))[0][0])


class ProjectedWatch:
    """The market projector's committed positions, refreshed when it commits.

    ``run`` holds one connection that LISTENs on the projector's ``NOTIFY`` channel;
    each notification only wakes it (anyone may NOTIFY: the payload is not trusted),
    then it reads ``projection_offset`` and wakes the waiters. So a write is answered
    one commit after the projector wrote it, with no polling in between."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.offsets: dict[str, int] = {}
        self.listening = False
        self.changed = asyncio.Event()  # replaced by a fresh one at every change

    def _update(self, rows: Sequence[Sequence[Any]]) -> None:
        self.offsets = {str(row[0]): int(row[1]) for row in rows}
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def run(self) -> None:
        """Listen until cancelled; reconnect (after ``LISTEN_RETRY_S``) on any failure."""
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database restarted or refused: waiters poll meanwhile
                self.listening = False
                await asyncio.sleep(LISTEN_RETRY_S)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._update(await (await conn.execute(_OFFSETS_SQL, (CONSUMER,))).fetchall())
            self.listening = True
            try:
                while True:
                    # the generator holds the connection: leave it to read the offsets
                    # (what arrives meanwhile waits in psycopg's backlog)
                    async for _ in conn.notifies(stop_after=1):
                        pass
                    rows = await (await conn.execute(_OFFSETS_SQL, (CONSUMER,))).fetchall()
                    self._update(rows)
            finally:
                self.listening = False


def _reached(offsets: Mapping[str, int], written: Mapping[str, int]) -> bool:
    return all(offsets.get(topic, 0) >= end for topic, end in written.items())


async def wait_projected(reads: MarketReads, written: Mapping[str, int], *,
                         watch: ProjectedWatch | None = None,
                         timeout_s: float = PROJECTED_WAIT_S) -> bool:
    """Wait until the projection reached every offset in ``written`` (topic -> offset
    after the last write); False when it did not within ``timeout_s``. With a
    listening ``watch`` it wakes at the projector's commit; else it polls."""
    deadline = time.monotonic() + timeout_s
    ask_database = True
    while True:
        listening = watch is not None and watch.listening
        changed = watch.changed if watch is not None else None
        if listening and watch is not None and _reached(watch.offsets, written):
            return True
        if (ask_database or not listening) and _reached(await reads.offsets(), written):
            return True
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        if listening and changed is not None:
            try:
                await asyncio.wait_for(changed.wait(), min(remaining_s, PROJECTED_RECHECK_S))
                ask_database = False
            except TimeoutError:
                ask_database = True
        else:
            await asyncio.sleep(min(remaining_s, PROJECTED_POLL_S))

"""What the API reads: the PostgreSQL projection (migrations 0001/0002), read-only.

Owns: the connection pool (bounded, read-only sessions with a statement timeout) and
every query the API runs: blocks, transactions, outputs, balances of addresses and
the activity of addresses. The API never reads a private copy of the chain: what it
shows is what the projector wrote, and every row is checked before it is returned.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

POOL_CONNECTIONS_MIN = 1
POOL_CONNECTIONS_MAX = 8
STATEMENT_TIMEOUT_MS = 5_000
POOL_TIMEOUT_S = 5.0
ROWS_MAX = 1_000  # no single query returns more
ADDRESSES_MAX = 1_000
TX_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class BlockRow:
    height: int
    hash: str
    prev_hash: str
    merkle_root: str
    proposer: str
    round: int
    time_at: dt.datetime
    tx_count: int
    size_bytes: int
    state_hash: str | None
    voters: tuple[str, ...]

    @property
    def time_s(self) -> int:
        return int(self.time_at.timestamp())


@dataclass(frozen=True, slots=True)
class TxRow:
    txid: str
    height: int
    position: int
    raw: bytes
    block_hash: str
    time_at: dt.datetime


@dataclass(frozen=True, slots=True)
class OutputRow:
    txid: str
    index: int
    value: int
    script_pubkey: bytes
    address: str | None
    asset_id: str | None
    quantity: int | None
    spent_by_txid: str | None
    height: int


_BLOCK_COLUMNS = ("height, hash, prev_hash, merkle_root, proposer, round, time_at, tx_count, "
                  "size_bytes, state_hash, coalesce(voters, '{}')")
_OUTPUT_COLUMNS = ('o.txid, o."index", o.value, o.script_pubkey, o.address, o.asset_id, '
                   "o.quantity, o.spent_by_txid, t.height")


def _block(row: Sequence[Any]) -> BlockRow:
    return BlockRow(int(row[0]), row[1], row[2], row[3], row[4], int(row[5]), row[6],
                    int(row[7]), int(row[8]), row[9], tuple(row[10]))


def _output(row: Sequence[Any]) -> OutputRow:
    return OutputRow(row[0], int(row[1]), int(row[2]), bytes(row[3]), row[4], row[5],
                     None if row[6] is None else int(row[6]), row[7], int(row[8]))


async def _configure(conn: AsyncConnection[Any]) -> None:
    await conn.set_read_only(True)
    await conn.set_autocommit(True)
    await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


class Projection:
    """Read-only queries over the projection database."""

    def __init__(self, dsn: str, *, connections_max: int = POOL_CONNECTIONS_MAX) -> None:
        self.pool = AsyncConnectionPool(dsn, min_size=POOL_CONNECTIONS_MIN,
                                        max_size=connections_max, open=False,
                                        configure=_configure, timeout=POOL_TIMEOUT_S)

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchmany(ROWS_MAX))

    async def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
                    ) -> list[tuple[Any, ...]]:
        """Rows of a read-only query (at most ``ROWS_MAX``); the market's reads use it."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchmany(ROWS_MAX))

    async def wait_for_tx(self, txid: str, *, timeout_s: float) -> bool:
        """Wait until the projector wrote ``txid``; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while await self.tx(txid) is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(TX_POLL_S)
        return True

    async def ping(self) -> bool:
        return (await self._rows("SELECT 1")) == [(1,)]

    async def head(self) -> BlockRow | None:
        rows = await self._rows(f"SELECT {_BLOCK_COLUMNS} FROM block ORDER BY height DESC "
                                "LIMIT 1")
        return _block(rows[0]) if rows else None

    async def blocks(self, *, limit: int, below_height: int | None) -> list[BlockRow]:
        """Newest first, at most ``limit``, heights under ``below_height`` if given."""
        bound = 2**62 if below_height is None else below_height
        rows = await self._rows(f"SELECT {_BLOCK_COLUMNS} FROM block WHERE height < %s "
                                "ORDER BY height DESC LIMIT %s", (bound, min(limit, ROWS_MAX)))
        return [_block(row) for row in rows]

    async def block_at(self, height: int) -> BlockRow | None:
        rows = await self._rows(f"SELECT {_BLOCK_COLUMNS} FROM block WHERE height = %s",
                                (height,))
        return _block(rows[0]) if rows else None

    async def block_by_hash(self, block_hash: str) -> BlockRow | None:
        rows = await self._rows(f"SELECT {_BLOCK_COLUMNS} FROM block WHERE hash = %s",
                                (block_hash,))
        return _block(rows[0]) if rows else None

    async def txids_at(self, height: int) -> list[str]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT txid FROM tx WHERE height = %s ORDER BY position",
                                        (height,))
            return [row[0] for row in await cursor.fetchall()]

    async def tx(self, txid: str) -> TxRow | None:
        rows = await self._rows(
            "SELECT t.txid, t.height, t.position, t.raw, b.hash, b.time_at FROM tx t "
            "JOIN block b ON b.height = t.height WHERE t.txid = %s", (txid,))
        if not rows:
            return None
        row = rows[0]
        return TxRow(row[0], int(row[1]), int(row[2]), bytes(row[3]), row[4], row[5])

    async def output(self, txid: str, index: int) -> OutputRow | None:
        rows = await self._rows(f"SELECT {_OUTPUT_COLUMNS} FROM tx_output o JOIN tx t "
                                'ON t.txid = o.txid WHERE o.txid = %s AND o."index" = %s',
                                (txid, index))
        return _output(rows[0]) if rows else None

    async def unspent_of(self, addresses: Sequence[str]) -> list[OutputRow]:
        """Unspent outputs paying these addresses (oldest first)."""
        rows = await self._rows(
            f"SELECT {_OUTPUT_COLUMNS} FROM tx_output o JOIN tx t ON t.txid = o.txid "
            "WHERE o.address = ANY(%s) AND o.spent_by_txid IS NULL "
            'ORDER BY t.height, t.position, o."index"', (list(addresses[:ADDRESSES_MAX]),))
        return [_output(row) for row in rows]

    async def balances(self, addresses: Sequence[str]) -> dict[str | None, int]:
        """Native (key None) and per-asset holdings of these addresses (address_balance)."""
        rows = await self._rows("SELECT asset_id, sum(amount)::bigint FROM address_balance "
                                "WHERE address = ANY(%s) GROUP BY asset_id",
                                (list(addresses[:ADDRESSES_MAX]),))
        return {row[0]: int(row[1]) for row in rows}

    async def activity(self, addresses: Sequence[str], *, limit: int,
                       below_height: int | None = None) -> list[dict[str, Any]]:
        """Per transaction touching the addresses: what they received and sent, per asset."""
        bound = 2**62 if below_height is None else below_height
        wanted = list(addresses[:ADDRESSES_MAX])
        rows = await self._rows(
            "WITH moves AS ("
            "  SELECT o.txid AS txid, coalesce(o.asset_id, '') AS asset, "
            "         coalesce(o.quantity, o.value) AS amount FROM tx_output o "
            "  WHERE o.address = ANY(%s) "
            "  UNION ALL "
            "  SELECT o.spent_by_txid, coalesce(o.asset_id, ''), -coalesce(o.quantity, o.value) "
            "  FROM tx_output o WHERE o.address = ANY(%s) AND o.spent_by_txid IS NOT NULL) "
            "SELECT m.txid, t.height, b.time_at, m.asset, sum(m.amount)::bigint "
            "FROM moves m JOIN tx t ON t.txid = m.txid JOIN block b ON b.height = t.height "
            "WHERE t.height < %s GROUP BY m.txid, t.height, t.position, b.time_at, m.asset "
            "ORDER BY t.height DESC, t.position DESC, m.asset LIMIT %s",
            (wanted, wanted, bound, min(limit, ROWS_MAX)))
        return [{"txid": r[0], "height": int(r[1]), "time_at": r[2], "asset_id": r[3] or None,
                 "net": int(r[4])} for r in rows]

    async def projected_offsets(self) -> dict[str, int]:
        rows = await self._rows('SELECT topic, "offset" FROM projection_offset')
        return {row[0]: int(row[1]) for row in rows}

    async def asset_exists(self, asset: str) -> bool:
        rows = await self._rows("SELECT 1 FROM tx_output WHERE asset_id = %s LIMIT 1", (asset,))
        return bool(rows)

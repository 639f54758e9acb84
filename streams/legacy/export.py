"""The daily legacy export: the day's settlements and the end-of-day balances, as CSV and
as a fixed-width file (header, detail records, trailer with counts and totals).

Owns: the layouts (pure functions from rows to bytes: ``settlement_csv``,
``balance_csv``, ``fixed_width``), :func:`fetch_day` (the rows, from the views
``legacy_settlement`` and ``legacy_balance_at`` of migration 0005, which legacy systems
may also read directly) and :func:`export_day` (writes the three files atomically).
Everything is ordered and nothing depends on the clock, so re-running for the same date
gives byte-identical files. The layout is documented in docs/legacy.md.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from ledger.errors import ValidationError

LAYOUT_VERSION = "001"
RECORD_CHARS = 180  # every fixed-width record, without its "\n"
ADDRESS_CHARS = 35
ASSET_CHARS = 35
AMOUNT_DIGITS = 20
TOTAL_DIGITS = 24
COUNT_DIGITS = 9
HEIGHT_DIGITS = 12
ROWS_MAX = 10_000_000  # records per file; a day at 1,000 tx/s stays below

SETTLEMENT_HEADER = ("settlement_date", "height", "time_at", "txid", "position",
                     "output_index", "address", "asset_id", "amount", "is_issuance")
BALANCE_HEADER = ("balance_date", "address", "asset_id", "amount", "outputs")


class ExportError(ValidationError):
    code = "legacy-export"


@dataclass(frozen=True, slots=True)
class Settlement:
    height: int
    time_at: dt.datetime
    txid: str
    position: int
    output_index: int
    address: str
    asset_id: str | None
    amount: Decimal
    is_issuance: bool


@dataclass(frozen=True, slots=True)
class Balance:
    address: str
    asset_id: str | None
    amount: Decimal
    outputs: int


@dataclass(frozen=True, slots=True)
class DayExport:
    day: dt.date
    settlements: tuple[Settlement, ...]
    balances: tuple[Balance, ...]


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("ascii")


def _time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def settlement_csv(export: DayExport) -> bytes:
    return _csv(SETTLEMENT_HEADER, [
        (export.day.isoformat(), s.height, _time(s.time_at), s.txid, s.position, s.output_index,
         s.address, s.asset_id or "", s.amount, "Y" if s.is_issuance else "N")
        for s in export.settlements])


def balance_csv(export: DayExport) -> bytes:
    return _csv(BALANCE_HEADER, [(export.day.isoformat(), b.address, b.asset_id or "",
                                  b.amount, b.outputs) for b in export.balances])


def _text(value: str, width: int, what: str) -> str:
    if len(value) > width or not value.isascii():
        raise ExportError(f"{what} {value!r} does not fit {width} ASCII characters",
                          code="legacy-field-width")
    return value.ljust(width)


def _number(value: int | Decimal, width: int, what: str) -> str:
    if value < 0 or value != int(value) or len(str(int(value))) > width:
        raise ExportError(f"{what} {value} does not fit {width} digits",
                          code="legacy-field-width")
    return str(int(value)).zfill(width)


def _record(body: str) -> str:
    assert len(body) <= RECORD_CHARS
    return body.ljust(RECORD_CHARS) + "\n"


def fixed_width(export: DayExport) -> bytes:
    """Header H, one S record per settlement, one B per balance, trailer T."""
    day = export.day.strftime("%Y%m%d")
    heights = [s.height for s in export.settlements] or [0]
    lines = [_record("H" + "CAPLEDGR" + day + LAYOUT_VERSION
                     + _number(min(heights), HEIGHT_DIGITS, "height")
                     + _number(max(heights), HEIGHT_DIGITS, "height"))]
    for s in export.settlements:
        lines.append(_record(
            "S" + _number(s.height, HEIGHT_DIGITS, "height") + s.txid
            + _number(s.position, 6, "position") + _number(s.output_index, 6, "output index")
            + _text(s.address, ADDRESS_CHARS, "address")
            + _text(s.asset_id or "", ASSET_CHARS, "asset id")
            + _number(s.amount, AMOUNT_DIGITS, "amount") + ("Y" if s.is_issuance else "N")))
    for b in export.balances:
        lines.append(_record(
            "B" + _text(b.address, ADDRESS_CHARS, "address")
            + _text(b.asset_id or "", ASSET_CHARS, "asset id")
            + _number(b.amount, AMOUNT_DIGITS, "amount")
            + _number(b.outputs, COUNT_DIGITS, "outputs")))
    records = len(lines) + 1
    lines.append(_record(
        "T" + _number(len(export.settlements), COUNT_DIGITS, "count")
        + _number(sum((s.amount for s in export.settlements), Decimal(0)), TOTAL_DIGITS,
                  "total")
        + _number(len(export.balances), COUNT_DIGITS, "count")
        + _number(sum((b.amount for b in export.balances), Decimal(0)), TOTAL_DIGITS, "total")
        + _number(records, COUNT_DIGITS, "records")))
    return "".join(lines).encode("ascii")


async def fetch_day(dsn: str, day: dt.date) -> DayExport:
    """The day's (UTC) settlements and the balances at the end of it, ordered."""
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with connection as conn, conn.transaction():  # one snapshot for both
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        settlements = await (await conn.execute(
            "SELECT height, time_at, txid, position, output_index, address, asset_id, "
            "amount, is_issuance FROM legacy_settlement WHERE settlement_date = %s "
            "ORDER BY height, position, output_index LIMIT %s", (day, ROWS_MAX + 1))
        ).fetchall()
        balances = await (await conn.execute(
            "SELECT address, asset_id, amount, outputs FROM legacy_balance_at(%s) "
            "WHERE amount <> 0 ORDER BY address, asset_id NULLS FIRST LIMIT %s",
            (end, ROWS_MAX + 1))).fetchall()
    if len(settlements) > ROWS_MAX or len(balances) > ROWS_MAX:
        raise ExportError(f"more than {ROWS_MAX} records for {day}", code="legacy-too-many")
    return DayExport(day, tuple(Settlement(*row) for row in settlements),
                     tuple(Balance(*row) for row in balances))


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


async def export_day(dsn: str, day: dt.date, out_dir: Path) -> dict[str, Path]:
    """Write settlement-D.csv, balance-D.csv and legacy-D.txt (D = YYYYMMDD)."""
    export = await fetch_day(dsn, day)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = day.strftime("%Y%m%d")
    files = {
        "settlements": (out_dir / f"settlement-{stamp}.csv", settlement_csv(export)),
        "balances": (out_dir / f"balance-{stamp}.csv", balance_csv(export)),
        "fixed-width": (out_dir / f"legacy-{stamp}.txt", fixed_width(export)),
    }
    for path, data in files.values():
        _write_atomic(path, data)
    return {name: path for name, (path, _) in files.items()}

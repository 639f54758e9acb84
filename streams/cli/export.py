"""``capledger export``: files for legacy back offices (streams/legacy/export.py).

Exit codes: 0 files written; 2 bad arguments or a value that does not fit the layout;
1 no database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path

import click
import psycopg

from streams.cli import exit_codes
from streams.common import config
from streams.legacy.export import ExportError, export_day


@click.group("export")
def cli() -> None:
    """Exports for legacy systems."""


@cli.command("legacy")
@click.option("--date", "day", type=click.DateTime(formats=["%Y-%m-%d"]), required=True,
              help="Business date (UTC), YYYY-MM-DD.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Directory for the three files.")
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (default "
                                          "CAPLEDGER_PG_DSN).")
def legacy(day: dt.datetime, out_dir: Path, dsn: str | None) -> None:
    """The day's settlements and end-of-day balances as CSV and fixed-width files
    (docs/legacy.md); the same date gives byte-identical files."""
    settings = config.load()
    try:
        files = asyncio.run(export_day(dsn or settings.pg_dsn, day.date(), out_dir))
    except ExportError as error:
        click.echo(f"error ({error.code}): {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    except (psycopg.Error, OSError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    for name, path in files.items():
        click.echo(f"{name}: {path}")

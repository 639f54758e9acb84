"""``capledger status``: the five nodes side by side, from their heartbeats.

Owns: reading ``ledger.status.v1`` (the latest ``NodeStatusReported`` of each
institution), the pure classification of a set of heartbeats (:func:`classify`:
which nodes agree, disagree, lag behind or have gone silent) and its display as a
rich table or JSON. Exit codes make it usable from scripts:

  0  every member reports, recently, at or near the highest height, all agreeing
  5  some member is silent, missing, behind or reports a full disk (no disagreement)
  4  a disagreement: two nodes at the same height with different head or state
     hashes, or a node on another chain (with --genesis)

Without --watch it also shows how far the PostgreSQL projection is behind (its height
against the highest node's, its cursor against the blocks log's end), read from
--dsn (default CAPLEDGER_PG_DSN); that line never changes the exit code.

"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console

from ledger.errors import ValidationError
from ledger.membership import Genesis
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.client.status import (
    BEHIND_BLOCKS_MAX,
    StatusError,
    StatusReport,
    StatusWatcher,
    membership_line,
    read_status,
    report_json,
    report_table,
)
from streams.common import config
from streams.common.clock import now_ms

WATCH_INTERVAL_S = 1.0



# ---------------------------------------------------------------- rendering


# ---------------------------------------------------------------- reading the topic


async def _watch(bootstrap: str, *, topic_prefix: str, members: Sequence[str] | None,
                 chain_id: str | None, behind_blocks_max: int, as_json: bool,
                 genesis: Genesis | None = None) -> int:
    from rich.live import Live

    watcher = StatusWatcher(bootstrap, topic_prefix=topic_prefix, genesis=genesis)
    report: StatusReport | None = None
    try:
        await watcher.start()
        await watcher.catch_up()
        live = None if as_json else Live(console=Console(), auto_refresh=False)
        with live if live is not None else contextlib.nullcontext():
            while True:
                report = watcher.report(now_ms=now_ms(), members=members, chain_id=chain_id,
                                        behind_blocks_max=behind_blocks_max)
                if live is None:
                    print(json.dumps(report_json(report)), flush=True)
                else:
                    live.update(report_table(report, title=_title(report, topic_prefix)),
                                refresh=True)
                deadline = time.monotonic() + WATCH_INTERVAL_S
                while (remaining := deadline - time.monotonic()) > 0:
                    await watcher.poll(timeout_ms=max(1, int(remaining * 1000)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        await watcher.stop()
    return exit_code_for(report) if report is not None else exit_codes.DEGRADED


def _title(report: StatusReport, topic_prefix: str) -> str:
    verdict = ("[bold red]DISAGREEMENT[/]" if report.disagreement
               else "[green]all agree[/]" if report.healthy else "[yellow]degraded[/]")
    where = f" prefix {topic_prefix!r}" if topic_prefix else ""
    return (f"capital-ledger nodes{where}: height {report.height_max}, {verdict} "
            f"({time.strftime('%H:%M:%S', time.gmtime(report.now_ms / 1000))} UTC)")


def exit_code_for(report: StatusReport) -> int:
    """CONFLICT when nodes disagree, DEGRADED when any is flagged, else OK."""
    if report.disagreement:
        return exit_codes.CONFLICT
    return exit_codes.OK if report.healthy else exit_codes.DEGRADED


@click.command("status")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), default=None,
              help="genesis.json or its directory: expect its members and chain id; count only "
                   "heartbeats signed by the member they name.")
@topic_prefix_option
@click.option("--watch", is_flag=True, help="Keep reading and refresh every second (Ctrl-C).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (one object; with --watch one line per second).")
@click.option("--behind", "behind_blocks_max", type=click.IntRange(0), default=BEHIND_BLOCKS_MAX,
              show_default=True, help="Flag BEHIND a node more than this many blocks back.")
@click.option("--projection/--no-projection", default=True, show_default=True,
              help="Show the projection's lag (not with --watch).")
@click.option("--dsn", default=None,
              help="The projection database (default CAPLEDGER_PG_DSN).")
@click.option("--consumer", default="projector", show_default=True,
              help="The projector's name in projection_offset.")
def cli(genesis_path: Path | None, topic_prefix: str, watch: bool, as_json: bool,
        behind_blocks_max: int, projection: bool, dsn: str | None, consumer: str) -> None:
    """Show the nodes' latest heartbeats side by side; flag disagreement and silence.

    Exit code 0 when all agree and report, 5 when a node is silent, missing, behind
    or its disk is full, 4 when two nodes disagree at the same height (or one runs another chain).
    """
    members: Sequence[str] | None = None
    chain_id: str | None = None
    genesis = None
    if genesis_path is not None:
        from streams.common.genesis_files import load_genesis

        try:
            genesis = load_genesis(genesis_path)
        except ValidationError as error:
            click.echo(f"error: {error.message}", err=True)
            sys.exit(exit_codes.USAGE)
        members = [member.id for member in genesis.members]
        chain_id = genesis.chain_id
    settings = config.load()
    bootstrap = settings.kafka_bootstrap
    try:
        if watch:
            with contextlib.suppress(KeyboardInterrupt):
                sys.exit(asyncio.run(_watch(
                    bootstrap, topic_prefix=topic_prefix, members=members, chain_id=chain_id,
                    behind_blocks_max=behind_blocks_max, as_json=as_json, genesis=genesis)))
            sys.exit(exit_codes.DEGRADED)
        report = asyncio.run(read_status(bootstrap, topic_prefix=topic_prefix, members=members,
                                         chain_id=chain_id, genesis=genesis,
                                         behind_blocks_max=behind_blocks_max))
    except StatusError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    lag = None
    if projection:
        from streams.projections.metrics import projection_lag

        lag = asyncio.run(projection_lag(bootstrap=bootstrap, dsn=dsn or settings.pg_dsn,
                                         topic_prefix=topic_prefix, consumer=consumer))
    if as_json:
        data = report_json(report)
        if lag is not None:
            data["projection"] = lag.to_json(report.height_max)
        click.echo(json.dumps(data, indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 140).print(
            report_table(report, title=_title(report, topic_prefix)))
        if lag is not None:
            click.echo(lag.line(report.height_max))
        line = membership_line(report)
        if line is not None:
            click.echo(line)
    sys.exit(exit_code_for(report))

"""``capledger project``: the PostgreSQL projection of one chain, once, following, or rebuilt.

Owns: the command line over ``streams.projections.projector.Projector`` — options, progress lines,
the summary (counts, final height, head hash, state hash), the audit after a rebuild
(the projector's state hash at each node's reported height compared with the node's
heartbeat, :func:`compare_heartbeats`) and the exit codes:

  0  projected (and, with --check-heartbeats, every reporting node agrees)
  1  the projection cannot proceed (no broker or database, old schema, inconsistent
     database, another projector writing)
  2  bad arguments (genesis unreadable)
  4  a conflict: two certified blocks at one height, a certified block that does not
     extend the projected chain, or a node's heartbeat disagreeing with the replay

With --follow, a transient PostgreSQL or Kafka error (the database refusing connections
or writes, or gone; the broker away) restarts the projector from the stored offsets once
it is back, waiting as long as it takes (a line ``WAITING: retry N ...`` per attempt,
the delay bounded); with --metrics-port it serves /metrics, /healthz and /readyz
(streams/projections/metrics.py).

Touches: the database named by --dsn (projection tables only); reads the chain's topics.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import psycopg
from aiokafka.errors import KafkaError

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.cli.options import metrics_options, topic_prefix_option
from streams.common import config
from streams.projections.projector import (
    BATCH_BLOCKS_MAX,
    CONFLICT_CODES,
    CONSUMER_DEFAULT,
    ProjectionConflict,
    ProjectionError,
    ProjectionStats,
    Projector,
)
from streams.projections.runner import (
    DIFFERS,
    ProbeOptions,
    _heartbeat_checks,
    run_projection_serving,
)


def _start_line(stats: ProjectionStats) -> str:
    if stats.resumed_from_height is not None:
        how = f"resumed from the stored state at height {stats.resumed_from_height}"
    else:
        how = f"replayed {stats.replayed_blocks} blocks from the log"
    return (f"start: {how} in {stats.startup_s:.2f} s; read {stats.blocks_records_read} block "
            f"and {stats.votes_records_read} vote records")


def _summary(stats: ProjectionStats) -> str:
    copies = stats.copies
    rate = stats.txs / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    lines = [
        f"projected {stats.blocks} blocks, {stats.txs} txs, {stats.outputs} outputs, "
        f"{stats.rejections} rejection records in {stats.batches} transactions "
        f"({stats.elapsed_s:.1f} s, {rate:.0f} tx/s)",
        _start_line(stats),
        f"copies: {copies.duplicates} "
        f"identical, {copies.invalid} invalid, {copies.ahead} ahead, {copies.unchecked} "
        f"unchecked, {copies.different_bytes} other bytes; "
        f"{stats.invalid_rejections} unusable rejection records",
        f"quarantined {stats.quarantined} records (table projection_quarantine); "
        f"{copies.times_clamped} block times clamped",
        f"offsets: blocks {stats.blocks_offset}, rejected {stats.rejected_offset}",
        f"height {stats.height}",
        f"head hash {stats.head_hash}",
        f"state hash {stats.state_hash}",
    ]
    return "\n".join(lines)


def _progress(stats: ProjectionStats) -> str:
    waiting = ("" if stats.waiting_for_height is None
               else f"  WAITING for height {stats.waiting_for_height}")
    return (f"height {stats.height}  blocks +{stats.blocks}  txs +{stats.txs}  rejections "
            f"+{stats.rejections}  quarantined +{stats.quarantined}  offsets "
            f"{stats.blocks_offset}/{stats.rejected_offset}{waiting}")


def _probe_options(settings: config.Settings, dsn: str, topic_prefix: str, follow: bool,
                   port: int | None, host: str | None) -> ProbeOptions | None:
    """Where to serve metrics: only a following projector, only with a port."""
    port = settings.metrics_port if port is None else port
    if not follow or not port:
        return None
    return ProbeOptions(settings.kafka_bootstrap, dsn, topic_prefix,
                        host or settings.metrics_host, port)


@click.command("project")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="genesis.json or its directory (the chain whose logs are projected).")
@topic_prefix_option
@click.option("--dsn", default=None,
              help="PostgreSQL DSN of the projection database (default CAPLEDGER_PG_DSN). "
                   "One database per chain.")
@click.option("--as-projector-role", "as_role", is_flag=True,
              help="Connect as the capledger_projector role (rows only, no DDL; password "
                   "from $CAPLEDGER_STATE_DIR/postgres/, 0600) on the DSN's server and "
                   "database, instead of the DSN's user.")
@click.option("--follow/--once", default=False, show_default=True,
              help="--once: project what the logs hold now and exit; --follow: keep going "
                   "(Ctrl-C stops after the current transaction).")
@click.option("--rebuild", is_flag=True,
              help="Drop every projected row and replay the logs from offset 0 (the audit "
                   "replay); prints the final height, head hash and state hash.")
@click.option("--check-heartbeats", is_flag=True,
              help="After projecting, compare each node's latest heartbeat (height, head "
                   "hash, state hash) with the projection at that height; exit 4 on a "
                   "difference.")
@click.option("--consumer", default=CONSUMER_DEFAULT, show_default=True,
              help="Name of the tracking rows in projection_offset.")
@click.option("--batch-blocks", type=click.IntRange(1, 10_000), default=BATCH_BLOCKS_MAX,
              show_default=True, help="Blocks per PostgreSQL transaction at most.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@metrics_options  # served only with --follow
def cli(genesis_path: Path, topic_prefix: str, dsn: str | None, as_role: bool, follow: bool,
        rebuild: bool, check_heartbeats: bool, consumer: str, batch_blocks: int,
        quiet: bool, metrics_port: int | None, metrics_host: str | None) -> None:
    """Project the committed chain and its rejections into PostgreSQL.

    Reads ledger.blocks.v1 (the block ledger.votes.v1 decided at each height, quorum
    certificate checked against genesis) and ledger.rejected.v1 from the offsets stored in
    projection_offset, writing rows and offsets in one transaction per batch.
    """
    from streams.common.genesis_files import load_genesis

    try:
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    settings = config.load()
    dsn = dsn or settings.pg_dsn
    if as_role:
        from psycopg.conninfo import make_conninfo

        from streams.common import db_roles

        try:
            dsn = make_conninfo(**db_roles.connect_kwargs(settings, db_roles.PROJECTOR,
                                                          dsn=dsn))
        except ValidationError as error:
            click.echo(f"error ({error.code}): {error.message}", err=True)
            sys.exit(exit_codes.USAGE)

    def make_projector() -> Projector:
        return Projector(genesis, bootstrap=settings.kafka_bootstrap, dsn=dsn,
                         topic_prefix=topic_prefix, consumer=consumer,
                         batch_blocks_max=batch_blocks)

    probes = _probe_options(settings, dsn, topic_prefix, follow, metrics_port, metrics_host)
    try:
        stats = asyncio.run(run_projection_serving(
            make_projector, follow=follow, rebuild=rebuild,
            on_progress=None if quiet else lambda s: click.echo(_progress(s), err=True),
            on_retry=lambda message: click.echo(message, err=True),
            probes=probes))
    except ProjectionConflict as error:
        click.echo(f"CONFLICT ({error.code}): {error.message}", err=True)
        sys.exit(exit_codes.CONFLICT)
    except ProjectionError as error:
        click.echo(f"error ({error.code}): {error.message}", err=True)
        sys.exit(exit_codes.ERROR)
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    click.echo(_summary(stats))
    conflicts = {c: n for c, n in stats.quarantined_codes.items() if c in CONFLICT_CODES}
    if conflicts:
        click.echo(f"CONFLICT: certified records the projection could not take, quarantined "
                   f"in projection_quarantine: {conflicts}", err=True)
        sys.exit(exit_codes.CONFLICT)
    if not check_heartbeats:
        sys.exit(exit_codes.OK)
    try:
        checks = asyncio.run(_heartbeat_checks(settings.kafka_bootstrap, dsn, topic_prefix,
                                               stats.height, genesis))
    except ValidationError as error:
        click.echo(f"error: heartbeats unreadable: {error.message}", err=True)
        sys.exit(exit_codes.ERROR)
    for check in checks:
        click.echo(f"heartbeat {check.institution:<14} height {check.height:<8} "
                   f"{check.verdict} {check.detail}".rstrip())
    sys.exit(exit_codes.CONFLICT if any(c.verdict == DIFFERS for c in checks) else exit_codes.OK)

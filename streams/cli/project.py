"""``capledger project``: the PostgreSQL projection of one chain, once, following, or rebuilt.

Owns: the command line over ``streams.projector.Projector`` — options, progress lines,
the summary (counts, final height, head hash, state hash), the audit after a rebuild
(the projector's state hash at each node's reported height compared with the node's
heartbeat, :func:`compare_heartbeats`) and the exit codes:

  0  projected (and, with --check-heartbeats, every reporting node agrees)
  1  the projection cannot proceed (no broker or database, old schema, inconsistent
     database, another projector writing)
  2  bad arguments (genesis unreadable)
  4  a conflict: two certified blocks at one height, a certified block that does not
     extend the projected chain, or a node's heartbeat disagreeing with the replay

With --follow, a transient PostgreSQL or Kafka error restarts the projector from the
stored offsets (at most FOLLOW_RETRIES_MAX times, with a growing delay).

Imports: click, the standard library, psycopg, aiokafka (errors), ``ledger``, ``streams.projector``,
``streams.config``, ``streams.genesis_cli`` (loader), ``streams.status_cli`` (heartbeats).
Touches: the database named by --dsn (projection tables only); reads the chain's topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psycopg
from aiokafka.errors import KafkaError

from ledger.errors import ValidationError
from streams import config
from streams.projector import (
    BATCH_BLOCKS_MAX,
    CONSUMER_DEFAULT,
    ProjectionConflict,
    ProjectionError,
    ProjectionStats,
    Projector,
    display_hex,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 4
PROGRESS_INTERVAL_S = 1.0
FOLLOW_RETRIES_MAX = 5  # --follow restarts after transient I/O errors, then gives up
RETRY_DELAY_S = 2.0  # times the attempt number

AGREES = "agrees"
DIFFERS = "DIFFERS"
AHEAD = "ahead"  # the node is above the projected height: nothing to compare yet


@dataclass(frozen=True, slots=True)
class HeartbeatCheck:
    institution: str
    height: int
    verdict: str
    detail: str = ""


def compare_heartbeats(
    heartbeats: Mapping[str, Any],
    projected: Mapping[int, tuple[str, str]],
    *,
    projected_height: int,
) -> list[HeartbeatCheck]:
    """Each node's reported (height, head hash, state hash) against the projection's
    (block hash, state hash) at that height. ``heartbeats`` maps institution to an
    object with ``height``, ``head_hash`` and ``state_hash`` (internal byte order);
    ``projected`` maps height to (hash, state hash) in display hex. Pure."""
    checks = []
    for institution in sorted(heartbeats):
        beat = heartbeats[institution]
        height = int(beat.height)
        if height > projected_height:
            checks.append(HeartbeatCheck(institution, height, AHEAD,
                                         f"projection at {projected_height}"))
            continue
        reported = (display_hex(beat.head_hash), display_hex(beat.state_hash))
        ours = projected.get(height)
        if ours == reported:
            checks.append(HeartbeatCheck(institution, height, AGREES))
        else:
            checks.append(HeartbeatCheck(
                institution, height, DIFFERS,
                f"node head {reported[0][:16]} state {reported[1][:16]}, projection "
                f"{'none' if ours is None else f'head {ours[0][:16]} state {ours[1][:16]}'}",
            ))
    return checks


async def _projected_hashes(dsn: str, heights: Sequence[int]) -> dict[int, tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT height, hash, state_hash FROM block WHERE height = ANY(%s)", (list(heights),)
        )
        return {int(h): (str(block_hash), str(state)) for h, block_hash, state
                in await cursor.fetchall()}


async def _heartbeat_checks(bootstrap: str, dsn: str, topic_prefix: str,
                            projected_height: int) -> list[HeartbeatCheck]:
    from streams.status_cli import StatusWatcher

    watcher = StatusWatcher(bootstrap, topic_prefix=topic_prefix)
    try:
        await watcher.start()
        await watcher.catch_up()
    finally:
        await watcher.stop()
    heights = sorted({beat.height for beat in watcher.latest.values()})
    projected = await _projected_hashes(dsn, heights)
    return compare_heartbeats(watcher.latest, projected, projected_height=projected_height)


def _summary(stats: ProjectionStats) -> str:
    copies = stats.copies
    rate = stats.txs / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    lines = [
        f"projected {stats.blocks} blocks, {stats.txs} txs, {stats.outputs} outputs, "
        f"{stats.rejections} rejection records in {stats.batches} transactions "
        f"({stats.elapsed_s:.1f} s, {rate:.0f} tx/s)",
        f"replayed on start {stats.replayed_blocks} blocks; copies: {copies.duplicates} "
        f"identical, {copies.invalid} invalid, {copies.ahead} ahead, {copies.unchecked} "
        f"unchecked, {copies.different_bytes} other bytes; "
        f"{stats.invalid_rejections} unusable rejection records",
        f"offsets: blocks {stats.blocks_offset}, rejected {stats.rejected_offset}",
        f"height {stats.height}",
        f"head hash {stats.head_hash}",
        f"state hash {stats.state_hash}",
    ]
    return "\n".join(lines)


def _progress(stats: ProjectionStats) -> str:
    return (f"height {stats.height}  blocks +{stats.blocks}  txs +{stats.txs}  rejections "
            f"+{stats.rejections}  offsets {stats.blocks_offset}/{stats.rejected_offset}")


async def _run(
    make_projector: Callable[[], Projector], *, follow: bool, rebuild: bool, quiet: bool
) -> ProjectionStats:
    projector = make_projector()
    if rebuild:
        await projector.reset()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    last = [0.0]

    def on_batch(stats: ProjectionStats) -> None:
        now = time.monotonic()
        if not quiet and now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            click.echo(_progress(stats), err=True)

    for attempt in range(1, FOLLOW_RETRIES_MAX + 1):
        try:
            return await projector.run(follow=follow, stop=stop, on_batch=on_batch)
        except (psycopg.OperationalError, KafkaError) as error:
            # Transient I/O while following: start over from the stored offsets (a new
            # projector replays its state, so nothing is lost or written twice). Bounded.
            if not follow or attempt == FOLLOW_RETRIES_MAX or stop.is_set():
                raise
            click.echo(f"retry {attempt}/{FOLLOW_RETRIES_MAX} in {attempt * RETRY_DELAY_S:.0f} "
                       f"s after {type(error).__name__}: {error}", err=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), attempt * RETRY_DELAY_S)
            projector = make_projector()
    raise AssertionError("unreachable")


@click.command("project")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="genesis.json or its directory (the chain whose logs are projected).")
@click.option("--topic-prefix", default=lambda: os.environ.get("CAPLEDGER_TOPIC_PREFIX", ""),
              help="Prefix of every topic name (as the nodes were started with).")
@click.option("--dsn", default=None,
              help="PostgreSQL DSN of the projection database (default CAPLEDGER_PG_DSN). "
                   "One database per chain.")
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
def cli(genesis_path: Path, topic_prefix: str, dsn: str | None, follow: bool, rebuild: bool,
        check_heartbeats: bool, consumer: str, batch_blocks: int, quiet: bool) -> None:
    """Project the committed chain and its rejections into PostgreSQL.

    Reads ledger.blocks.v1 (first certified record per height, quorum certificate
    checked against genesis) and ledger.rejected.v1 from the offsets stored in
    projection_offset, writing rows and offsets in one transaction per batch.
    """
    from streams.genesis_cli import load_genesis

    try:
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(EXIT_USAGE)
    settings = config.load()
    dsn = dsn or settings.pg_dsn

    def make_projector() -> Projector:
        return Projector(genesis, bootstrap=settings.kafka_bootstrap, dsn=dsn,
                         topic_prefix=topic_prefix, consumer=consumer,
                         batch_blocks_max=batch_blocks)

    try:
        stats = asyncio.run(_run(make_projector, follow=follow, rebuild=rebuild, quiet=quiet))
    except ProjectionConflict as error:
        click.echo(f"CONFLICT ({error.code}): {error.message}", err=True)
        sys.exit(EXIT_CONFLICT)
    except ProjectionError as error:
        click.echo(f"error ({error.code}): {error.message}", err=True)
        sys.exit(EXIT_ERROR)
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(_summary(stats))
    if not check_heartbeats:
        sys.exit(EXIT_OK)
    try:
        checks = asyncio.run(_heartbeat_checks(settings.kafka_bootstrap, dsn, topic_prefix,
                                               stats.height))
    except ValidationError as error:
        click.echo(f"error: heartbeats unreadable: {error.message}", err=True)
        sys.exit(EXIT_ERROR)
    for check in checks:
        click.echo(f"heartbeat {check.institution:<14} height {check.height:<8} "
                   f"{check.verdict} {check.detail}".rstrip())
    sys.exit(EXIT_CONFLICT if any(c.verdict == DIFFERS for c in checks) else EXIT_OK)

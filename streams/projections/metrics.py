"""The following projector's Prometheus metrics and readiness (``capledger project
--follow --metrics-port N``).

Owns: ``ProjectorMetrics`` (one ``CollectorRegistry``: projected height, cursor offsets,
lag of the cursor behind the blocks and rejections logs, batches, quarantined records,
database connectivity, outages), ``projector_readiness`` (the rule behind ``/readyz``)
and ``serve_projector_probes``, which runs the probe port and refreshes the lag gauges
from the broker once a second while the projector runs. Names and meaning:
docs/decisions/0102.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from streams.common.probes import ProbeServer, Readiness
from streams.kafka.logio import EndOffsets
from streams.kafka.topics import BLOCKS
from streams.projections.projector import ProjectionStats

logger = logging.getLogger("capledger.projector")

LAG_INTERVAL_S = 1.0
LAG_TIMEOUT_S = 5.0
DATABASE_TIMEOUT_S = 3
# Ready = the database answered with the last batch and the cursor is at most this
# many blocks-log records behind the log's end.
READY_LAG_RECORDS_MAX = 50


@dataclass(frozen=True, slots=True)
class ProjectorTopics:
    blocks: str
    rejected: str


class ProjectorMetrics:
    """The series of one projector process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.height = Gauge("capledger_projector_height", "Projected height", registry=r)
        self.offset = Gauge("capledger_projector_offset",
                            "Next offset to project, as stored in projection_offset",
                            ["log"], registry=r)
        self.lag = Gauge("capledger_projector_lag_records",
                         "Records between the stored cursor and the log's end", ["log"],
                         registry=r)
        self.batches = Counter("capledger_projector_batches",
                               "PostgreSQL transactions committed", registry=r)
        self.quarantined = Gauge("capledger_projector_quarantined_records",
                                 "Records this run put in projection_quarantine", registry=r)
        self.waiting = Gauge("capledger_projector_waiting_for_height",
                             "A height absent while later ones are in the log (0: none)",
                             registry=r)
        self.database_up = Gauge("capledger_projector_database_up",
                                 "1 when the database answered the last check (each "
                                 "second) or committed the last batch", registry=r)
        self.outages = Counter("capledger_projector_outages",
                               "Restarts after a database or broker error", registry=r)
        self.startup = Gauge("capledger_projector_startup_seconds",
                             "Wall seconds the last start took to stand its state", registry=r)
        self.startup_records = Gauge("capledger_projector_startup_block_records",
                                     "Blocks-log records read by the last start (1 when it "
                                     "resumed from the stored state, decision 0093)",
                                     registry=r)
        self.waited = Gauge("capledger_projector_waited_seconds",
                            "Seconds this run's projection loop waited on the write in flight "
                            "(write), on reads (read) and on the votes log's end (end_offset); "
                            "decision 0095", ["on"], registry=r)
        self.cpu = Gauge("capledger_projector_cpu_seconds",
                         "Thread CPU seconds this run spent following blocks (follow: decode, "
                         "certificate, ledger, rows) and writing batches on the writer thread "
                         "(write, client side); decision 0096", ["part"], registry=r)
        self.database_up.set(0)
        self.blocks_lag: int | None = None
        self.connected = False
        self.blocks_offset = 0
        self.rejected_offset = 0

    def on_stats(self, stats: ProjectionStats, *, batches_before: int) -> None:
        self.height.set(stats.height)
        self.blocks_offset, self.rejected_offset = stats.blocks_offset, stats.rejected_offset
        self.offset.labels("blocks").set(stats.blocks_offset)
        self.offset.labels("rejected").set(stats.rejected_offset)
        if stats.batches > batches_before:
            self.batches.inc(stats.batches - batches_before)
        self.quarantined.set(stats.quarantined)
        if batches_before == 0:  # the first batch after a start
            self.startup.set(stats.startup_s)
            self.startup_records.set(stats.startup_block_records)
        self.waiting.set(stats.waiting_for_height or 0)
        self.waited.labels("write").set(stats.write_wait_s)
        self.waited.labels("read").set(stats.read_wait_s)
        self.waited.labels("end_offset").set(stats.end_offset_wait_s)
        self.cpu.labels("follow").set(stats.follow_cpu_s)
        self.cpu.labels("write").set(stats.write_cpu_s)
        self.connected = True
        self.database_up.set(1)

    def on_database_check(self, answered: bool) -> None:
        self.connected = answered
        self.database_up.set(1 if answered else 0)

    def on_outage(self) -> None:
        self.connected = False
        self.database_up.set(0)
        self.outages.inc()

    def on_ends(self, ends: dict[str, int], topics: ProjectorTopics) -> None:
        self.blocks_lag = max(0, ends[topics.blocks] - self.blocks_offset)
        self.lag.labels("blocks").set(self.blocks_lag)
        self.lag.labels("rejected").set(max(0, ends[topics.rejected] - self.rejected_offset))

    def readiness(self) -> Readiness:
        return projector_readiness(connected=self.connected, blocks_lag=self.blocks_lag)


def projector_readiness(*, connected: bool, blocks_lag: int | None) -> Readiness:
    """Pure rule behind ``/readyz``."""
    if not connected:
        return Readiness(False, "database-unavailable")
    if blocks_lag is None:
        return Readiness(False, "lag-unknown")
    if blocks_lag > READY_LAG_RECORDS_MAX:
        return Readiness(False, "behind")
    return Readiness(True)


class _DatabaseCheck:
    """``SELECT 1`` on one kept connection (made again after a failure)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[object] | None = None

    async def answers(self) -> bool:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=DATABASE_TIMEOUT_S)
            await asyncio.wait_for(self.conn.execute("SELECT 1"), DATABASE_TIMEOUT_S)
            return True
        except (psycopg.Error, OSError, TimeoutError):
            await self.close()
            return False

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def _refresh_lags(metrics: ProjectorMetrics, bootstrap: str,
                        topics: ProjectorTopics, dsn: str) -> None:
    ends: EndOffsets | None = None
    database = _DatabaseCheck(dsn)
    try:
        while True:
            metrics.on_database_check(await database.answers())
            try:
                if ends is None:
                    ends = EndOffsets(bootstrap, [topics.blocks, topics.rejected],
                                      client_id="capledger-projector-metrics")
                    await ends.start()
                metrics.on_ends(await asyncio.wait_for(ends.ends(), LAG_TIMEOUT_S), topics)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the broker is away: the lag stays as it was
                logger.warning("projector lag not read: %s: %s", type(error).__name__, error)
            await asyncio.sleep(LAG_INTERVAL_S)
    finally:
        await database.close()
        if ends is not None:
            with contextlib.suppress(Exception):
                await ends.stop()


@contextlib.asynccontextmanager
async def serve_projector_probes(metrics: ProjectorMetrics, *, bootstrap: str, dsn: str,
                                 topics: ProjectorTopics, host: str,
                                 port: int) -> AsyncIterator[ProbeServer]:
    """The probe port and the lag refresher, for the life of the ``async with``."""
    server = ProbeServer(metrics.registry, metrics.readiness, host=host, port=port)
    await server.start()
    task = asyncio.create_task(_refresh_lags(metrics, bootstrap, topics, dsn))
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


@dataclass(frozen=True, slots=True)
class ProjectionLag:
    """Where a chain's projection stands against its blocks log (``capledger status``).
    ``problem`` set: the rest is unknown (the database unreachable, no projection)."""

    height: int = -1
    blocks_offset: int = 0
    blocks_end: int = 0
    problem: str = ""

    @property
    def lag_records(self) -> int:
        return max(0, self.blocks_end - self.blocks_offset)

    def to_json(self, height_max: int) -> dict[str, object]:
        if self.problem:
            return {"available": False, "problem": self.problem}
        return {"available": True, "height": self.height,
                "behind_blocks": max(0, height_max - self.height),
                "blocks_offset": self.blocks_offset, "blocks_end": self.blocks_end,
                "lag_records": self.lag_records}

    def line(self, height_max: int) -> str:
        if self.problem:
            return f"projection: unavailable ({self.problem})"
        return (f"projection: height {self.height} ({max(0, height_max - self.height)} blocks "
                f"behind the highest node); cursor {self.blocks_offset} of "
                f"{self.blocks_end} in the blocks log ({self.lag_records} records behind)")


async def projection_lag(*, bootstrap: str, dsn: str, topic_prefix: str,
                         consumer: str) -> ProjectionLag:
    """The projected height and stored cursor of ``consumer`` in ``dsn`` against the end
    of ``<prefix>ledger.blocks.v1``. Never raises for an unreachable database or broker:
    the answer says what is missing."""
    topic = topic_prefix + BLOCKS.name
    try:
        async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=DATABASE_TIMEOUT_S) as conn:
            cursor = await conn.execute(
                'SELECT "offset" FROM projection_offset WHERE consumer = %s AND topic = %s '
                "AND partition = 0", (consumer, topic))
            row = await cursor.fetchone()
            if row is None:
                return ProjectionLag(problem=f"no projection of {topic} by {consumer!r} in "
                                             "this database")
            cursor = await conn.execute("SELECT coalesce(max(height), -1) FROM block")
            height_row = await cursor.fetchone()
    except (psycopg.Error, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return ProjectionLag(problem=f"database: {type(error).__name__}: {message}"[:200])
    ends = EndOffsets(bootstrap, [topic], client_id="capledger-status-projection")
    try:
        await ends.start()
        end = (await asyncio.wait_for(ends.ends(), LAG_TIMEOUT_S))[topic]
    except Exception as error:
        return ProjectionLag(problem=f"broker: {type(error).__name__}: {error}"[:200])
    finally:
        with contextlib.suppress(Exception):
            await ends.stop()
    return ProjectionLag(int(height_row[0]) if height_row else -1, int(row[0]), end)

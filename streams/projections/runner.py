"""Running the projector: once, following with restarts, and the heartbeat audit.

Owns: :func:`run_projection` (the projector with progress callbacks and, with follow,
restarts after transient PostgreSQL/Kafka errors — the database refusing connections,
refusing writes (read-only, disk full), going away, the broker away — for as long as
they last, with a delay growing to RETRY_DELAY_MAX_S: a projector waits for its
database or broker, it does not exit (docs/decisions/0100, 0102); each restart
resumes from the offsets stored with the rows, so nothing is lost or written twice) and
:func:`compare_heartbeats` (the replayed state hash at each node's reported height
against that node's heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka.errors import KafkaError

from ledger.hashing import display_hex
from ledger.membership import Genesis
from streams.kafka.resilience import (
    Connectivity,
    is_transient,
    quiet_repeated_client_logs,
)
from streams.kafka.topics import BLOCKS, REJECTED
from streams.projections.metrics import ProjectorMetrics, ProjectorTopics, serve_projector_probes
from streams.projections.projector import (
    ProjectionError,
    ProjectionStats,
    Projector,
)

PROGRESS_INTERVAL_S = 1.0


RETRY_DELAY_S = 2.0  # times the attempt number (since the last committed batch)...
RETRY_DELAY_MAX_S = 10.0  # ...at most
# ProjectionError codes that are an outage, not a fault of the data or the set-up.
TRANSIENT_CODES = frozenset({"projection-database", "projection-broker"})


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
                            projected_height: int,
                            genesis: Genesis | None = None) -> list[HeartbeatCheck]:
    """``genesis``: compare only heartbeats signed by the member they name."""
    from streams.client.status import latest_heartbeats

    latest = await latest_heartbeats(bootstrap, topic_prefix=topic_prefix, genesis=genesis)
    heights = sorted({beat.height for beat in latest.values()})
    projected = await _projected_hashes(dsn, heights)
    return compare_heartbeats(latest, projected, projected_height=projected_height)


async def run_projection(
    make_projector: Callable[[], Projector], *, follow: bool, rebuild: bool,
    on_progress: Callable[[ProjectionStats], None] | None = None,
    on_retry: Callable[[str], None] | None = None,
    metrics: ProjectorMetrics | None = None,
    stop: asyncio.Event | None = None,
) -> ProjectionStats:
    """Project until caught up (or, with ``follow``, until SIGINT/SIGTERM or ``stop``).

    ``on_progress`` is called at most every PROGRESS_INTERVAL_S with the running
    figures; ``on_retry`` with a one-line message before each restart after a
    transient error (PostgreSQL or Kafka unreachable, or a connection lost mid-batch:
    the batch's transaction never committed, and a new projector resumes from the
    stored offsets, so nothing is lost or written twice). ``metrics`` is told
    of every committed batch and outage.
    """
    quiet_repeated_client_logs()
    projector = make_projector()
    if rebuild:
        await projector.reset()
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    last = [0.0]
    batches = [0]  # of the current projector (a restart starts its stats again)

    def on_batch(stats: ProjectionStats) -> None:
        if metrics is not None:
            metrics.on_stats(stats, batches_before=batches[0])
        batches[0] = stats.batches
        now = time.monotonic()
        if on_progress is not None and now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            on_progress(stats)

    connectivity = Connectivity("projector")
    attempt = 0
    while True:
        try:
            stats = await projector.run(follow=follow, stop=stop, on_batch=on_batch)
            connectivity.succeeded()
            return stats
        except Exception as error:
            # Transient I/O while following: start over from the stored offsets (a new
            # projector replays its state, so nothing is lost or written twice).
            if not follow or stop.is_set() or not _transient(error):
                raise
            connectivity.failed("projection", error)
            if metrics is not None:
                metrics.on_outage()
            attempt = 1 if batches[0] else attempt + 1  # a batch since: start again
            batches[0] = 0
            delay_s = min(attempt * RETRY_DELAY_S, RETRY_DELAY_MAX_S)
            if on_retry is not None:
                on_retry(f"WAITING: retry {attempt} in {delay_s:.0f} s after "
                         f"{type(error).__name__}: {str(error).strip()[:300]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)
            if stop.is_set():
                return projector.stats
            projector = make_projector()


def _transient(error: BaseException) -> bool:
    """An outage worth waiting out (database or broker away, writes refused), not a
    fault of the data or the set-up."""
    if isinstance(error, ProjectionError):
        return error.code in TRANSIENT_CODES
    return isinstance(error, psycopg.OperationalError | psycopg.errors.ReadOnlySqlTransaction
                      | KafkaError) or is_transient(error)


@dataclass(frozen=True, slots=True)
class ProbeOptions:
    """Where a following projector serves its metrics and probes."""

    bootstrap: str
    dsn: str
    topic_prefix: str
    host: str
    port: int


async def run_projection_serving(
    make_projector: Callable[[], Projector], *, follow: bool, rebuild: bool,
    on_progress: Callable[[ProjectionStats], None] | None = None,
    on_retry: Callable[[str], None] | None = None,
    probes: ProbeOptions | None = None,
) -> ProjectionStats:
    """``run_projection``, with the metrics port open meanwhile when ``probes`` is given."""
    if probes is None:
        return await run_projection(make_projector, follow=follow, rebuild=rebuild,
                                    on_progress=on_progress, on_retry=on_retry)
    metrics = ProjectorMetrics()
    topics = ProjectorTopics(probes.topic_prefix + BLOCKS.name,
                             probes.topic_prefix + REJECTED.name)
    async with serve_projector_probes(metrics, bootstrap=probes.bootstrap, dsn=probes.dsn,
                                      topics=topics,
                                      host=probes.host, port=probes.port):
        return await run_projection(make_projector, follow=follow, rebuild=rebuild,
                                    on_progress=on_progress, on_retry=on_retry,
                                    metrics=metrics)

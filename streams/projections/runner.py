"""Running the projector: once, following with bounded restarts, and the heartbeat audit.

Owns: :func:`run_projection` (the projector with progress callbacks and, with follow,
restarts after transient PostgreSQL/Kafka errors: at most FOLLOW_RETRIES_MAX, with a
growing delay) and :func:`compare_heartbeats` (the replayed state hash at each node's
reported height against that node's heartbeat).
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
from streams.projections.projector import (
    ProjectionError,
    ProjectionStats,
    Projector,
)

PROGRESS_INTERVAL_S = 1.0


# --follow restarts after transient I/O errors (PostgreSQL or Kafka unreachable); it
# gives up after this many attempts in a row that committed nothing.
FOLLOW_RETRIES_MAX = 30


RETRY_DELAY_S = 2.0  # times the attempt number
RETRY_DELAY_MAX_S = 10.0  # ... at most: an outage of ~5 minutes is waited out


# ProjectionError codes that mean "the database cannot be reached", not "the data is wrong"
TRANSIENT_CODES = frozenset({"projection-database"})


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
    stop: asyncio.Event | None = None,
) -> ProjectionStats:
    """Project until caught up (or, with ``follow``, until SIGINT/SIGTERM or ``stop``).

    ``on_progress`` is called at most every PROGRESS_INTERVAL_S with the running
    figures; ``on_retry`` with a one-line message before each restart after a
    transient error (PostgreSQL or Kafka unreachable, or a connection lost mid-batch:
    the batch's transaction never committed, and a new projector resumes from the
    stored offsets, so nothing is lost or written twice).
    """
    projector = make_projector()
    if rebuild:
        await projector.reset()
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    last = [0.0]

    def on_batch(stats: ProjectionStats) -> None:
        now = time.monotonic()
        if on_progress is not None and now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            on_progress(stats)

    failures = 0  # attempts in a row that committed nothing
    while True:
        try:
            return await projector.run(follow=follow, stop=stop, on_batch=on_batch)
        except (psycopg.OperationalError, KafkaError, ProjectionError) as error:
            if isinstance(error, ProjectionError) and error.code not in TRANSIENT_CODES:
                raise
            failures = 1 if projector.stats.batches else failures + 1
            if not follow or failures >= FOLLOW_RETRIES_MAX or stop.is_set():
                raise
            delay_s = min(failures * RETRY_DELAY_S, RETRY_DELAY_MAX_S)
            if on_retry is not None:
                on_retry(f"retry {failures}/{FOLLOW_RETRIES_MAX} in {delay_s:.0f} s after "
                         f"{type(error).__name__}: {error}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)
            if stop.is_set():
                return projector.stats
            projector = make_projector()

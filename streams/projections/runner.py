"""Running the projector: once, following with bounded restarts, and the heartbeat audit.

Owns: :func:`run_projection` (the projector with progress callbacks and, with follow,
restarts after transient PostgreSQL/Kafka errors, waiting with bounded exponential
backoff for as long as they last: an absent broker or database never ends a follower,
docs/decisions/0100; without follow, FOLLOW_RETRIES_MAX attempts) and
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
    Backoff,
    Connectivity,
    is_transient,
    quiet_repeated_client_logs,
)
from streams.projections.projector import (
    ProjectionStats,
    Projector,
)

PROGRESS_INTERVAL_S = 1.0


FOLLOW_RETRIES_MAX = 5  # kept for callers; --follow now retries without a count


RETRY_DELAY_S = 2.0  # kept for callers; the delays are FOLLOW_BACKOFF's
FOLLOW_BACKOFF = Backoff(initial_ms=500, max_ms=10_000, factor=2)


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
) -> ProjectionStats:
    """Project until caught up (or, with ``follow``, until SIGINT/SIGTERM).

    ``on_progress`` is called at most every PROGRESS_INTERVAL_S with the running
    figures; ``on_retry`` with a one-line message before each restart after a
    transient error.
    """
    quiet_repeated_client_logs()
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
            # projector replays its state, so nothing is lost or written twice). A
            # follower waits as long as the broker or database is away (backoff bounded).
            transient = isinstance(error, psycopg.OperationalError | KafkaError) or (
                is_transient(error))
            attempt += 1
            if not transient or stop.is_set() or (not follow and attempt >= FOLLOW_RETRIES_MAX):
                raise
            delay_ms = FOLLOW_BACKOFF.delay_ms(attempt)
            connectivity.failed("projection", error)
            if on_retry is not None:
                on_retry(f"broker or database unreachable: retry {attempt} in "
                         f"{delay_ms / 1000:.1f} s after {type(error).__name__}: {error}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_ms / 1000)
            if stop.is_set():
                raise
            projector = make_projector()

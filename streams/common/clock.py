"""The shell's one wall clock: the time written into records and compared across machines.

Owns: ``now_ms``, milliseconds since the Unix epoch, the unit of every ``*_at`` field
of the Avro records (``submitted_at``, ``proposed_at``, ``reported_at``, ...), of block
times and of heartbeat ages. Every module of ``streams/`` that needs the time of day
takes it from here (the pure core never reads a clock: time is passed in), so there is
one place to substitute it. Deadlines and durations inside one process use
``time.monotonic()``/``time.perf_counter()`` directly: they never leave the process and
must not jump when the wall clock is set.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return int(time.time() * 1000)

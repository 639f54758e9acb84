"""The shell's one wall clock: the time written into records and compared across machines.

Owns: ``now_ms``, milliseconds since the Unix epoch, the unit of every ``*_at`` field
of the Avro records (``submitted_at``, ``proposed_at``, ``reported_at``, ...), of block
times and of heartbeat ages. Every module of ``streams/`` that needs the time of day
takes it from here (the pure core never reads a clock: time is passed in), so there is
one place to substitute it. Deadlines and durations inside one process use
``time.monotonic()``/``time.perf_counter()`` directly: they never leave the process and
must not jump when the wall clock is set.

The clock takes a fixed offset, ``CAPLEDGER_CLOCK_OFFSET_MS`` (read by
``streams.common.config.clock_offset_ms`` on the first call): what a machine whose clock
is off looks like to everyone else. The clock-skew test runs real nodes with it
(docs/decisions/0102).
"""

from __future__ import annotations

import time

from streams.common import config

_offset_ms: int | None = None


def offset_ms() -> int:
    """The offset this process's clock runs with (read once from the environment)."""
    global _offset_ms
    if _offset_ms is None:
        _offset_ms = config.clock_offset_ms()
    return _offset_ms


def set_offset_ms(offset: int | None) -> None:
    """Set the offset (None: read the environment again on the next call)."""
    global _offset_ms
    _offset_ms = offset


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch, plus the configured offset."""
    return int(time.time() * 1000) + (offset_ms() if _offset_ms is None else _offset_ms)

"""The audit's read-ahead (decision 0123): a reader task filling a bounded buffer.

Held to: batches come out whole and in log order; the task stops reading once the
buffer holds its byte bound (and goes on as the consumer takes batches); a batch
larger than the bound still passes; an error of the reader reaches the consumer after
the batches read before it; ``stop`` ends a task that is waiting for room and closes
the reader's iterator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from streams.kafka.logio import LogRecord
from streams.projections.audit import ReadAhead

pytestmark = pytest.mark.unit

WAIT_S = 5.0


def _batch(first: int, count: int, size: int) -> list[LogRecord]:
    return [LogRecord(offset, None, b"x" * size, 0) for offset in range(first, first + count)]


class Source:
    """An async generator of batches that counts what it has handed out."""

    def __init__(self, batches: list[list[LogRecord]], error: Exception | None = None) -> None:
        self.batches = batches
        self.error = error
        self.given = 0
        self.closed = False

    async def read(self) -> AsyncIterator[list[LogRecord]]:
        try:
            for batch in self.batches:
                self.given += 1
                yield batch
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def _until(condition: object) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0)
    await asyncio.wait_for(poll(), WAIT_S)


async def test_batches_in_order_then_none() -> None:
    source = Source([_batch(i * 3, 3, 10) for i in range(5)])
    ahead = ReadAhead(source.read(), bytes_max=1_000)
    ahead.start()
    offsets = []
    while (batch := await ahead.next()) is not None:
        offsets.extend(record.offset for record in batch)
    assert offsets == list(range(15))
    assert await ahead.next() is None
    await ahead.stop()
    assert source.closed


async def test_reading_stops_at_the_bound_and_resumes() -> None:
    source = Source([_batch(i, 1, 100) for i in range(10)])
    ahead = ReadAhead(source.read(), bytes_max=300)
    ahead.start()
    await _until(lambda: ahead.bytes_held >= 300)
    for _ in range(20):  # the task has every chance to read more: it must not
        await asyncio.sleep(0)
    assert ahead.bytes_held == 300 and source.given == 4  # 3 held, the 4th waits for room
    first = await ahead.next()
    assert first is not None and first[0].offset == 0
    await _until(lambda: ahead.bytes_held == 300 and source.given == 5)
    rest = []
    while (batch := await ahead.next()) is not None:
        rest.append(batch[0].offset)
    assert rest == list(range(1, 10)) and ahead.bytes_held == 0
    await ahead.stop()


async def test_a_batch_larger_than_the_bound_passes_alone() -> None:
    source = Source([_batch(0, 2, 500), _batch(2, 1, 10)])
    ahead = ReadAhead(source.read(), bytes_max=100)
    ahead.start()
    first = await ahead.next()
    assert first is not None and [r.offset for r in first] == [0, 1]
    second = await ahead.next()
    assert second is not None and second[0].offset == 2
    assert await ahead.next() is None
    await ahead.stop()


async def test_an_error_comes_after_the_batches_read_before_it() -> None:
    source = Source([_batch(0, 1, 10), _batch(1, 1, 10)], error=RuntimeError("broker gone"))
    ahead = ReadAhead(source.read(), bytes_max=1_000)
    ahead.start()
    assert (await ahead.next() or [None])[0].offset == 0  # type: ignore[union-attr]
    assert (await ahead.next() or [None])[0].offset == 1  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="broker gone"):
        await ahead.next()
    await ahead.stop()


async def test_stop_ends_a_task_waiting_for_room() -> None:
    source = Source([_batch(i, 1, 100) for i in range(10)])
    ahead = ReadAhead(source.read(), bytes_max=100)
    ahead.start()
    await _until(lambda: source.given == 2)  # one held, the second waits for room
    await asyncio.wait_for(ahead.stop(), WAIT_S)
    assert source.closed and source.given == 2

"""The tx reader's fetch batching against the real broker (decision 0111): every
record is read once, in order, with batching switched on while records flow and off
again when the log goes quiet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from streams.kafka.logio import FetchBatching, LogReader, LogWriter

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 30.0
BATCHING = FetchBatching(min_bytes=64 * 1024, max_wait_ms=20, records_min=2)


async def _read(reader: LogReader, count: int) -> tuple[list[int], bool]:
    """Offsets of the first ``count`` records; whether batching was on at some read."""
    offsets: list[int] = []
    was_batched = False
    deadline = time.monotonic() + READ_TIMEOUT_S
    while len(offsets) < count and time.monotonic() < deadline:
        offsets.extend(record.offset for record in await reader.read(timeout_ms=250))
        was_batched = was_batched or reader._batched
    return offsets, was_batched


async def test_a_batched_reader_reads_every_record_in_order_and_idles_unbatched(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory("batching")
    writer = LogWriter(kafka_bootstrap, client_id="batching-writer")
    reader = LogReader(kafka_bootstrap, topic, client_id="batching-reader",
                       batching=BATCHING)
    await writer.start()
    await reader.start(0)
    try:
        sent: list[int] = []
        for burst in range(20):  # records keep flowing, as a tx log under load
            sent += await writer.send_many(
                topic, [(None, b"%d-%d" % (burst, i) * 30) for i in range(25)])
            await asyncio.sleep(0.01)
        offsets, was_batched = await _read(reader, len(sent))
        assert offsets == sent
        assert was_batched
        assert await reader.read(timeout_ms=100) == []  # the log is quiet now
        fetcher = reader._consumer._fetcher
        assert not reader._batched
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (1, 500)
        late = await writer.send_many(topic, [(None, b"late")])
        assert (await _read(reader, 1))[0] == late  # and a lone record still arrives
    finally:
        await reader.stop()
        await writer.stop()

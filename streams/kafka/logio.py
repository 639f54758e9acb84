"""Reading and writing the ordered ledger logs with plain aiokafka (and librdkafka).

Owns: ``LogReader`` — one partition of one topic, manually assigned (no consumer
group, no rebalances), positioned by explicit ``seek`` at an offset the caller
derives from its own durable state, read in batches; ``RdkafkaLogReader`` — the same
reader through librdkafka (``confluent_kafka``): records fetched and unpacked in C
on librdkafka's threads, for a high-rate log (the node's tx log, decision 0117);
``LogWriter`` — one idempotent ``acks=all`` producer shared by a node's writers. Why
not faust agents on these hot paths: docs/decisions/0030-node-pipeline.md.

"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.kafka.topics import consumer_settings, producer_settings, rdkafka_consumer_settings

logger = logging.getLogger("capledger.kafka")

READ_BATCH_MAX = 5_000
# aiokafka's defaults: the broker answers a fetch once one byte is there, else after 0.5 s.
FETCH_MIN_BYTES_DEFAULT = 1
FETCH_WAIT_MS_DEFAULT = 500
# Empty reads in a row after which ``read_to_end`` stops short of the end offset.
END_STALL_READS_MAX = 5
END_OFFSET_TIMEOUT_S = 10.0
PARTITION_EOF = -191  # confluent_kafka.KafkaError._PARTITION_EOF (not an error: the end)


@dataclass(frozen=True, slots=True)
class FetchBatching:
    """While records flow (a read returned at least ``records_min``), the broker holds
    each fetch until ``min_bytes`` are there or ``max_wait_ms`` passed: fewer, fuller
    fetches (each costs ~0.6 ms of CPU in the client, TLS included, whatever it
    carries). After a read with fewer records the reader asks as before (the broker
    answers as soon as one record is there), so an idle or slow log costs no more.
    """

    min_bytes: int
    max_wait_ms: int
    records_min: int


@dataclass(frozen=True, slots=True)
class LogRecord:
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


class LogReader:
    """Partition 0 of one topic, read from an explicit offset in batches."""

    def __init__(self, bootstrap: str, topic: str, *, client_id: str,
                 principal: str | None = None, batching: FetchBatching | None = None) -> None:
        """``batching``: let the broker gather records before answering a fetch (a
        high-rate log read where a few ms matter less than the CPU of each fetch);
        by default it answers as soon as one record is there."""
        self.topic = topic
        self._partition = TopicPartition(topic, 0)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **consumer_settings(group_id=None, client_id=client_id, principal=principal),
        )
        self._batching = batching
        self._batched = False
        self.position = 0

    async def start(self, offset: int) -> None:
        await self._consumer.start()
        self._consumer.assign([self._partition])
        self.seek(offset)

    def seek(self, offset: int) -> None:
        assert offset >= 0
        self._consumer.seek(self._partition, offset)
        self.position = offset

    async def stop(self) -> None:
        await self._consumer.stop()

    async def read(self, *, timeout_ms: int, max_records: int = READ_BATCH_MAX) -> list[LogRecord]:
        """The next records (possibly none after ``timeout_ms``), in log order."""
        batches = await self._consumer.getmany(
            self._partition, timeout_ms=timeout_ms, max_records=max_records
        )
        records = [
            LogRecord(message.offset, message.key, message.value or b"", message.timestamp)
            for message in batches.get(self._partition, [])
        ]
        if records:
            self.position = records[-1].offset + 1
        if self._batching is not None:
            self._batch_fetches(len(records) >= self._batching.records_min)
        # The consumer's own position also moves past offsets that hold no record for
        # us (transaction commit/abort markers, compacted records): without it a
        # reader whose log ends in a marker would never reach the end offset.
        fetched = await self._consumer.position(self._partition)
        self.position = max(self.position, int(fetched))
        return records

    def _batch_fetches(self, on: bool) -> None:
        """Switch the fetcher between batched and immediate fetches. aiokafka reads
        these two settings when it builds each fetch request and offers no setter;
        ``tests/unit/test_logio_batching.py`` fails if a new version renames them."""
        fetcher = self._consumer._fetcher
        if on == self._batched or fetcher is None:
            return
        batching = self._batching
        assert batching is not None
        fetcher._fetch_min_bytes = batching.min_bytes if on else FETCH_MIN_BYTES_DEFAULT
        fetcher._fetch_max_wait_ms = batching.max_wait_ms if on else FETCH_WAIT_MS_DEFAULT
        self._batched = on

    async def read_to_end(
        self, *, timeout_ms: int = 1_000, max_records: int = READ_BATCH_MAX
    ) -> AsyncIterator[list[LogRecord]]:
        """Batches from the current position up to the log's end as of this call.

        Bounded: a log that yields nothing for ``END_STALL_READS_MAX`` reads in a row
        while short of its end (a marker the consumer does not step over, a
        truncated log) ends the iteration rather than spin forever; the caller sees
        ``position`` short of the end."""
        async for records in _read_to_end(self, timeout_ms, max_records):
            yield records

    async def seek_to_time(self, time_ms: int) -> None:
        """Position at the first record whose timestamp is at or after ``time_ms`` (the
        end of the log when there is none)."""
        found = await self._consumer.offsets_for_times({self._partition: max(0, time_ms)})
        entry = found.get(self._partition)
        self.seek(int(entry.offset) if entry is not None else await self.end_offset())

    async def end_offset(self) -> int:
        ends = await self._consumer.end_offsets([self._partition])
        return int(ends[self._partition])

    async def exists(self) -> bool:
        """Whether the broker lists the topic to this principal (a missing topic, or one
        it may not read, is not listed): reading either would wait, not fail."""
        return self.topic in await self._consumer.topics()


class RdkafkaReadError(KafkaError):  # type: ignore[misc]
    """A librdkafka reader's error for its partition, or a fatal one of its client:
    the brokers' (``streams.kafka.resilience.is_transient``), so its owner waits,
    reopens the reader at ``position`` and goes on, as after an aiokafka error."""


class RdkafkaLogReader:
    """``LogReader``'s reading interface through librdkafka: partition 0 of one topic,
    assigned at an explicit offset, no consumer group, nothing committed.

    librdkafka fetches ahead on its own threads (at most ``RDKAFKA_PREFETCH_KIB_MAX``
    of ``streams.kafka.topics``) and unpacks records in C, where aiokafka's fetches and
    their wake-ups run in Python on the event loop. Each ``read`` is one hop to this
    reader's own thread, which alone touches the client (librdkafka's consumer is not
    to be closed while another thread polls it). A ``read`` cancelled before it returns
    drops what its thread took: reopen a new reader at ``position`` (as the node does)
    rather than read on. Opt-in for the node's tx log (decision 0117).
    ``batching``: after a read of at least ``records_min`` records, the next read, once
    it has a record, gathers for up to ``max_wait_ms`` more (``min_bytes`` unused: the
    broker's fetches are librdkafka's own affair)."""

    def __init__(self, bootstrap: str, topic: str, *, client_id: str,
                 principal: str | None = None, batching: FetchBatching | None = None) -> None:
        self.topic = topic
        self._config = {
            **rdkafka_consumer_settings(bootstrap, client_id=client_id, principal=principal),
            "error_cb": self._on_error,
            "logger": logging.getLogger("capledger.rdkafka"),
        }
        self._consumer: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"rdkafka-{client_id}")
        self._batching = batching
        self._batched = False
        self._fatal: str | None = None
        self.errors_seen: set[str] = set()  # the client's (retried) errors' names
        self.position = 0

    def _on_error(self, error: Any) -> None:  # on librdkafka's thread, inside poll
        if error.fatal():
            self._fatal = str(error)
        self.errors_seen.add(error.name())
        logger.debug("%s reader: %s", self.topic, error)

    async def _call(self, work: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def start(self, offset: int) -> None:
        assert offset >= 0
        await self._call(self._open, offset)
        self.position = offset

    def _open(self, offset: int) -> None:
        import confluent_kafka

        self._consumer = confluent_kafka.Consumer(self._config)
        self._consumer.assign([confluent_kafka.TopicPartition(self.topic, 0, offset)])

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._call(self._consumer.close)
            self._consumer = None
        self._thread.shutdown(wait=False)

    async def read(self, *, timeout_ms: int, max_records: int = READ_BATCH_MAX) -> list[LogRecord]:
        """The next records (possibly none after ``timeout_ms``), in log order."""
        gather_ms = self._batching.max_wait_ms if self._batched and self._batching else 0
        records, fetched = await self._call(self._take, max_records, timeout_ms, gather_ms)
        if records:
            self.position = records[-1].offset + 1
        if self._batching is not None:
            self._batched = len(records) >= self._batching.records_min
        # librdkafka's position also moves past transaction markers (decision 0050 §3).
        self.position = max(self.position, fetched)
        return list(records)

    def _take(self, max_records: int, timeout_ms: int,
              gather_ms: int) -> tuple[list[LogRecord], int]:
        """On the reader's thread: what is queued, else the first record within
        ``timeout_ms``, then up to ``gather_ms`` more; and the consumer's position."""
        import confluent_kafka

        consumer = self._consumer
        messages = consumer.consume(max_records, 0)
        if not messages:
            first = consumer.poll(timeout_ms / 1000)
            messages = [] if first is None else [first]
        if messages and gather_ms > 0 and len(messages) < max_records:
            messages += consumer.consume(max_records - len(messages), gather_ms / 1000)
        if self._fatal is not None:
            raise RdkafkaReadError(f"{self.topic}: {self._fatal}")
        records: list[LogRecord] = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(LogRecord(message.offset(), message.key(),
                                         message.value() or b"", message.timestamp()[1]))
            elif message.topic() == self.topic and error.code() != PARTITION_EOF:
                raise RdkafkaReadError(f"{self.topic}: {error}")
            elif message.topic() != self.topic:  # the client's, retried by librdkafka
                self.errors_seen.add(error.name())
                logger.debug("%s reader: %s", self.topic, error)
        found = consumer.position([confluent_kafka.TopicPartition(self.topic, 0)])
        return records, max(0, int(found[0].offset))

    async def read_to_end(
        self, *, timeout_ms: int = 1_000, max_records: int = READ_BATCH_MAX
    ) -> AsyncIterator[list[LogRecord]]:
        """As ``LogReader.read_to_end`` (bounded by ``END_STALL_READS_MAX``)."""
        async for records in _read_to_end(self, timeout_ms, max_records):
            yield records

    async def end_offset(self) -> int:
        import confluent_kafka

        partition = confluent_kafka.TopicPartition(self.topic, 0)
        low_high = await self._call(self._consumer.get_watermark_offsets, partition,
                                    END_OFFSET_TIMEOUT_S)
        if low_high is None:
            raise RdkafkaReadError(f"{self.topic}: no end offset within "
                                   f"{END_OFFSET_TIMEOUT_S} s")
        return int(low_high[1])


class _Reader(Protocol):
    position: int

    async def end_offset(self) -> int: ...

    async def read(self, *, timeout_ms: int, max_records: int) -> list[LogRecord]: ...


async def _read_to_end(reader: _Reader, timeout_ms: int, max_records: int
                       ) -> AsyncIterator[list[LogRecord]]:
    """Both readers' ``read_to_end``: batches up to the end as of the call, ending after
    ``END_STALL_READS_MAX`` empty reads in a row short of it."""
    end = await reader.end_offset()
    empty_reads = 0
    while reader.position < end and empty_reads < END_STALL_READS_MAX:
        records = await reader.read(timeout_ms=timeout_ms, max_records=max_records)
        empty_reads = 0 if records else empty_reads + 1
        if records:
            yield records


class EndOffsets:
    """End offsets of partition 0 of some topics, asked of the broker at once: a
    consumer with no assignment, so no long-polling fetch of its own delays the
    question (a ``LogReader``'s ``end_offset`` can wait up to the fetch wait)."""

    def __init__(self, bootstrap: str, topics: Sequence[str], *, client_id: str) -> None:
        self._partitions = [TopicPartition(topic, 0) for topic in topics]
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **consumer_settings(group_id=None, client_id=client_id),
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def ends(self) -> dict[str, int]:
        """One request per topic, in the order given (a caller may rely on it)."""
        found: dict[str, int] = {}
        for partition in self._partitions:
            ends = await self._consumer.end_offsets([partition])
            found[partition.topic] = int(ends[partition])
        return found


class LogWriter:
    """The node's producer: idempotent, acks=all, compressed."""

    def __init__(self, bootstrap: str, *, client_id: str, principal: str | None = None,
                 **overrides: Any) -> None:
        """``principal``: connect as another principal than this process's (tools
        and tests acting for several parties); ``overrides``: producer settings to
        change (tests)."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **{**producer_settings(client_id=client_id, principal=principal), **overrides},
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        """Send and wait for the broker's ack; the record's offset."""
        metadata = await self._producer.send_and_wait(topic, value, key=key, partition=0)
        return int(metadata.offset)

    async def send_many(
        self, topic: str, items: Sequence[tuple[bytes | None, bytes]]
    ) -> list[int]:
        """Send a batch concurrently (one round trip per producer batch); offsets in order."""
        futures = [
            await self._producer.send(topic, value, key=key, partition=0) for key, value in items
        ]
        results = await asyncio.gather(*futures)
        return [int(result.offset) for result in results]


async def read_all(bootstrap: str, topic: str, *, client_id: str) -> list[LogRecord]:
    """Every record of partition 0 of ``topic`` from offset 0 to its end as of now."""
    reader = LogReader(bootstrap, topic, client_id=client_id)
    await reader.start(0)
    try:
        return [record async for batch in reader.read_to_end() for record in batch]
    finally:
        await reader.stop()

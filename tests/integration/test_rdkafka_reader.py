"""The librdkafka tx reader (``RdkafkaLogReader``, decision 0117) against the real,
secure broker: it reads what ``LogReader`` reads — every record once, in order, from
the offset it is given, gathering while records flow and answering a lone record at
once — steps over transaction markers like it, and is refused a topic its principal
may not read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka import AIOKafkaProducer

from streams.kafka.acls import external_system_name
from streams.kafka.logio import (
    FetchBatching,
    LogReader,
    LogWriter,
    RdkafkaLogReader,
)
from streams.kafka.topics import (
    VOTES,
    delete_topics,
    ensure_topics,
    producer_settings,
)

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 30.0
READ_DENIED_S = 5.0
EXTERNAL = external_system_name("koscom")
BATCHING = FetchBatching(min_bytes=64 * 1024, max_wait_ms=20, records_min=2)


async def _read(reader: RdkafkaLogReader | LogReader,
                count: int) -> tuple[list[tuple[int, bytes]], bool]:
    """(offset, value) of the next ``count`` records; whether a read gathered."""
    found: list[tuple[int, bytes]] = []
    gathered = False
    deadline = time.monotonic() + READ_TIMEOUT_S
    while len(found) < count and time.monotonic() < deadline:
        found.extend((r.offset, r.value) for r in await reader.read(timeout_ms=250))
        gathered = gathered or reader._batched
    return found, gathered


async def test_the_librdkafka_reader_reads_what_the_aiokafka_reader_reads(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory("rdkafka")
    writer = LogWriter(kafka_bootstrap, client_id="rdkafka-writer")
    await writer.start()
    sent = await writer.send_many(topic, [(b"k", b"early-%d" % i) for i in range(10)])
    reader = RdkafkaLogReader(kafka_bootstrap, topic, client_id="rdkafka-reader",
                              batching=BATCHING)
    reference = LogReader(kafka_bootstrap, topic, client_id="rdkafka-reference")
    await reader.start(sent[3])  # from an offset of the caller's choosing
    await reference.start(sent[3])
    try:
        for burst in range(20):  # records keep flowing, as a tx log under load
            sent += await writer.send_many(
                topic, [(None, b"%d-%d" % (burst, i) * 30) for i in range(25)])
            await asyncio.sleep(0.01)
        expected = len(sent) - 3
        found, gathered = await _read(reader, expected)
        assert found == (await _read(reference, expected))[0]
        assert [offset for offset, _ in found] == sent[3:]
        assert gathered
        assert reader.position == reference.position == sent[-1] + 1
        assert await reader.read(timeout_ms=100) == []  # the log is quiet now
        assert not reader._batched
        late = await writer.send_many(topic, [(None, b"late")])
        started = time.monotonic()
        assert (await _read(reader, 1))[0] == [(late[0], b"late")]
        assert time.monotonic() - started < 5.0  # a lone record is not held back
        assert await reader.end_offset() == late[0] + 1
    finally:
        await reader.stop()
        await reference.stop()
        await writer.stop()


async def _transactional(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """One transactional producer (an ``async for`` of one, so ``finally`` stops it)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap,
                                **producer_settings(client_id="rdkafka-tx"),
                                transactional_id=f"rdkafka-tx-{time.time_ns()}")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def test_the_librdkafka_reader_reaches_a_log_that_ends_in_a_marker(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory("rdkafka-gaps")
    async for producer in _transactional(kafka_bootstrap):
        for values, abort in (([b"a", b"b"], False), ([b"c"], True)):
            await producer.begin_transaction()
            for value in values:
                await producer.send_and_wait(topic, value, partition=0)
            if abort:
                await producer.abort_transaction()
            else:
                await producer.commit_transaction()
    reader = RdkafkaLogReader(kafka_bootstrap, topic, client_id="rdkafka-gaps-reader")
    await reader.start(0)
    try:
        end = await reader.end_offset()
        batches = [batch async for batch in reader.read_to_end(timeout_ms=200)]
    finally:
        await reader.stop()
    # a, b, commit marker, c (read uncommitted), abort marker
    assert [r.offset for batch in batches for r in batch] == [0, 1, 3]
    assert end == 5 and reader.position == end, (end, reader.position)


@pytest.fixture
async def chain(kafka_bootstrap: str, unique_id: str) -> AsyncIterator[str]:
    """A fresh chain's topics with their ACLs (``ensure_topics``), deleted after."""
    prefix = f"rdk.{unique_id}."
    await ensure_topics(kafka_bootstrap, prefix=prefix)
    yield prefix
    with contextlib.suppress(Exception):
        await delete_topics(kafka_bootstrap, prefix=prefix)


async def test_the_librdkafka_reader_keeps_the_acls(kafka_bootstrap: str, chain: str) -> None:
    """The same principal and ACLs as the aiokafka reader: a member reads the votes,
    an external system may not: its reader gets nothing (as aiokafka's) and the
    broker's metadata marks the topic unauthorized for it."""
    member = LogWriter(kafka_bootstrap, client_id="rdkafka-acl-member", principal="koscom")
    await member.start()
    try:
        await member.send(chain + VOTES.name, b"a signed vote")
    finally:
        await member.stop()
    allowed = RdkafkaLogReader(kafka_bootstrap, chain + VOTES.name,
                               client_id="rdkafka-acl-member-read", principal="koscom")
    await allowed.start(0)
    try:
        assert [value for _, value in (await _read(allowed, 1))[0]] == [b"a signed vote"]
    finally:
        await allowed.stop()
    denied = RdkafkaLogReader(kafka_bootstrap, chain + VOTES.name,
                              client_id="rdkafka-acl-ext-read", principal=EXTERNAL)
    await denied.start(0)
    try:
        deadline = time.monotonic() + READ_DENIED_S
        while time.monotonic() < deadline:  # as aiokafka's reader: nothing, and no crash
            assert await denied.read(timeout_ms=250) == []
        # the broker's metadata answer marks the topic unauthorized for this principal
        metadata = denied._consumer.list_topics(chain + VOTES.name, timeout=READ_DENIED_S)
        error = metadata.topics[chain + VOTES.name].error
        assert error is not None and error.name() == "TOPIC_AUTHORIZATION_FAILED", error
    finally:
        await denied.stop()

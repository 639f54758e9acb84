"""streams.kafka.topics against the real broker: explicit creation, idempotence, declared configs.

Each test uses its own topic-name prefix (from the ``unique_id`` fixture) and deletes
its topics afterwards, so tests never see each other's topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.kafka import codec
from streams.kafka.topics import (
    BLOCKS,
    MESSAGE_BYTES_MAX,
    PROPOSALS,
    STATUS,
    TOPICS,
    TX,
    TopicError,
    admin_client,
    consumer_settings,
    describe_topic_configs,
    ensure_topics,
    producer_settings,
)

pytestmark = pytest.mark.integration

WAIT_TIMEOUT_S = 60.0
BLOCK_BYTES = 3 * 1024 * 1024  # a block bigger than the 2 MB default, under the limit


@pytest.fixture
async def prefix(kafka_bootstrap: str, unique_id: str) -> AsyncIterator[str]:
    value = f"test.{unique_id}."
    yield value
    admin = admin_client(kafka_bootstrap)
    await admin.start()
    try:
        mine = [name for name in await admin.list_topics() if name.startswith(value)]
        if mine:
            with contextlib.suppress(Exception):
                await admin.delete_topics(mine)
    finally:
        await admin.close()


async def test_ensure_topics_creates_then_is_idempotent(kafka_bootstrap: str, prefix: str) -> None:
    first = await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1)
    names = [spec.full_name(prefix) for spec in TOPICS]
    assert sorted(first) == sorted(names)
    assert all(state.created for state in first.values())

    second = await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1)
    assert sorted(second) == sorted(names)
    assert not any(state.created for state in second.values())

    # What the broker itself reports, read independently of ensure_topics.
    described = await describe_topic_configs(kafka_bootstrap, names)
    for spec in TOPICS:
        name = spec.full_name(prefix)
        assert second[name].partitions == spec.partitions == 1
        assert second[name].replication_factor == 1
        for key, value in spec.broker_configs(1).items():
            assert described[name][key] == value, (name, key)
        assert "min.insync.replicas" not in spec.broker_configs(1)
    for spec in (TX, PROPOSALS, BLOCKS):
        name = spec.full_name(prefix)
        assert described[name]["retention.ms"] == "-1"
        assert described[name]["retention.bytes"] == "-1"
    for spec in (PROPOSALS, BLOCKS):
        assert int(described[spec.full_name(prefix)]["max.message.bytes"]) >= 8 * 1024 * 1024
    assert described[STATUS.full_name(prefix)]["cleanup.policy"] == "compact"


async def test_concurrent_ensure_from_several_nodes(kafka_bootstrap: str, prefix: str) -> None:
    """Five nodes starting at once: every call succeeds, each topic is created once."""
    results = await asyncio.gather(*[
        ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1) for _ in range(5)
    ])
    for spec in TOPICS:
        name = spec.full_name(prefix)
        assert sum(result[name].created for result in results) == 1
        assert all(result[name].partitions == 1 for result in results)


async def test_drifted_config_is_reported_and_can_be_fixed(
    kafka_bootstrap: str, prefix: str
) -> None:
    await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1, specs=[TX])
    name = TX.full_name(prefix)
    admin = admin_client(kafka_bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, name,
            configs={**TX.broker_configs(1), "retention.ms": "60000"})])
    finally:
        await admin.close()

    with pytest.raises(TopicError) as caught:
        await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1, specs=[TX])
    assert caught.value.code == "topic-config"
    assert name in caught.value.message and "retention.ms" in caught.value.message

    fixed = await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1,
                                specs=[TX], fix_configs=True)
    assert fixed[name].configs["retention.ms"] == "-1"
    assert (await describe_topic_configs(kafka_bootstrap, [name]))[name]["retention.ms"] == "-1"


async def test_replication_factor_above_the_cluster_is_refused(
    kafka_bootstrap: str, prefix: str
) -> None:
    with pytest.raises(TopicError) as caught:
        await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=3, specs=[TX])
    assert caught.value.code == "topic-create"


async def test_existing_topic_with_other_replication_is_a_layout_error(
    kafka_bootstrap: str, prefix: str
) -> None:
    await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1, specs=[TX])
    with pytest.raises(TopicError) as caught:
        await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=3, specs=[TX])
    assert caught.value.code == "topic-layout"


async def test_big_block_through_declared_settings(kafka_bootstrap: str, prefix: str) -> None:
    """A 3 MB BlockProposed goes through with producer/consumer settings (acks=all,
    idempotence, compression) and the topic's max.message.bytes."""
    await ensure_topics(kafka_bootstrap, prefix=prefix, replication_factor=1, specs=[PROPOSALS])
    name = PROPOSALS.full_name(prefix)
    block = os.urandom(BLOCK_BYTES // 2) + bytes(BLOCK_BYTES // 2)  # half incompressible
    record = {"height": 1, "round": 0, "proposer": "koscom", "block_hash": bytes(32),
              "prev_hash": bytes(32), "tx_count": 0, "block": block,
              "proposed_at": int(time.time() * 1000)}
    value = codec.encode("BlockProposed", record)
    assert len(value) < MESSAGE_BYTES_MAX

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, **producer_settings())
    await producer.start()
    try:
        sent = await producer.send_and_wait(name, value, key=b"1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap,
                                **consumer_settings(group_id=None))
    await consumer.start()
    try:
        partition = TopicPartition(name, 0)
        consumer.assign([partition])
        consumer.seek(partition, sent.offset)
        message = await asyncio.wait_for(consumer.getone(), WAIT_TIMEOUT_S)
    finally:
        await consumer.stop()
    assert message.value == value
    assert codec.decode(message.value, expected="BlockProposed").record["block"] == block

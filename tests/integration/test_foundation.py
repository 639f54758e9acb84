"""Foundation integration tests: Avro through the real broker into a faust agent,
PostgreSQL through the alembic schema, migrations reversible, dev stack idempotent."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.common import config
from streams.kafka import codec
from streams.kafka.topics import faust_credentials, security_settings
from streams.tools.devstack import DevStackError, kafka, postgres

pytestmark = pytest.mark.integration

WAIT_TIMEOUT_S = 60.0
BIG_PAYLOAD_BYTES = 3 * 1024 * 1024  # bigger than a 2 MB block
PRODUCER_REQUEST_BYTES_MAX = 10 * 1024 * 1024


def _ping(ping_id: str, payload: bytes = b"ping") -> dict[str, Any]:
    return {"ping_id": ping_id, "sender": "koscom", "sent_at_ms": int(time.time() * 1000),
            "payload": payload, "note": "foundation test"}


async def test_avro_through_broker_into_faust_agent(
        kafka_bootstrap: str, topic_factory: Callable[..., str], unique_id: str,
        tmp_path: Path) -> None:
    import faust

    topic_name = topic_factory("pings")
    app = faust.App(f"test-{unique_id}", broker=f"kafka://{kafka_bootstrap}",
                    store="memory://", web_enabled=False, topic_disable_leader=True,
                    consumer_auto_offset_reset="earliest", broker_commit_every=1,
                    datadir=str(tmp_path / "faust"), **faust_credentials())
    seen: list[codec.Decoded] = []
    arrived = asyncio.Event()
    # raw bytes in, explicit decode in the agent (docs/decisions/0002-avro-framing.md)
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, value_serializer="raw",
                      key_serializer="raw")

    @app.agent(topic)
    async def record_pings(stream: Any) -> None:
        async for value in stream:
            seen.append(codec.decode(value, expected="StackPinged"))
            arrived.set()

    record = _ping(unique_id)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                **security_settings())
    await producer.start()
    try:
        await producer.send_and_wait(topic_name, codec.encode("StackPinged", record),
                                     key=b"koscom")
    finally:
        await producer.stop()

    await app.start()
    try:
        await asyncio.wait_for(arrived.wait(), WAIT_TIMEOUT_S)
    finally:
        await app.stop()
    assert [d.name for d in seen] == ["StackPinged"]
    assert seen[0].record == record


async def test_block_sized_message_round_trip(
        kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    """The broker's message.max.bytes admits a 3 MB event (blocks are ~2 MB)."""
    topic_name = topic_factory("big")
    payload = hashlib.sha256(b"seed").digest() * (BIG_PAYLOAD_BYTES // 32)
    data = codec.encode("StackPinged", _ping("big", payload))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                max_request_size=PRODUCER_REQUEST_BYTES_MAX,
                                **security_settings())
    await producer.start()
    try:
        await producer.send_and_wait(topic_name, data)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_bytes=PRODUCER_REQUEST_BYTES_MAX,
                                max_partition_fetch_bytes=PRODUCER_REQUEST_BYTES_MAX,
                                **security_settings())
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), WAIT_TIMEOUT_S)
    finally:
        await consumer.stop()
    assert message.value == data
    assert codec.decode(message.value).record["payload"] == payload


def _hex(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def test_postgres_round_trip_through_alembic_schema(pg_dsn: str) -> None:
    raw = bytes.fromhex("0100000000ffffffff")
    block_hash, txid, txid2 = _hex("block-1"), _hex("tx-1"), _hex("tx-2")
    time_at = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "INSERT INTO block (height, hash, prev_hash, merkle_root, proposer, round, "
            "time_at, tx_count, size_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (1, block_hash, "0" * 64, txid, "koscom", 0, time_at, 2, 250))
        for position, (tx, body) in enumerate(((txid, raw), (txid2, raw + b"\x00"))):
            conn.execute("INSERT INTO tx (txid, height, position, size_bytes, raw) "
                         "VALUES (%s, 1, %s, %s, %s)", (tx, position, len(body), body))
        conn.execute(
            "INSERT INTO tx_output (txid, index, value, script_pubkey, address, asset_id, "
            "quantity, spent_by_txid) VALUES (%s, 0, 600, %s, %s, %s, %s, %s)",
            (txid, b"\x76\xa9", "1Addr", "AAsset", 100, txid2))
        conn.execute("INSERT INTO projection_offset (consumer, topic, partition, \"offset\") "
                     "VALUES ('projector', 'ledger.blocks.v1', 0, 41)")
        row = conn.execute(
            "SELECT b.hash, b.time_at, t.raw, o.quantity, o.spent_by_txid FROM block b "
            "JOIN tx t ON t.height = b.height JOIN tx_output o ON o.txid = t.txid "
            "WHERE b.height = 1").fetchone()
        assert row == (block_hash, time_at, raw, 100, txid2)
        # constraints are real: a bad hash and a duplicate tracking row are refused
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute("INSERT INTO block (height, hash, prev_hash, merkle_root, proposer, "
                         "round, time_at, tx_count, size_bytes) VALUES "
                         "(2, 'nothex', %s, %s, 'koscom', 0, now(), 0, 80)",
                         ("0" * 64, "0" * 64))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO projection_offset (consumer, topic, partition, "
                         "\"offset\") VALUES ('projector', 'ledger.blocks.v1', 0, 42)")


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables "
                            "WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_alembic_upgrade_downgrade_upgrade(pg_dsn: str) -> None:
    base_tables = {"projection_offset", "block", "tx", "tx_output"}
    assert base_tables <= _tables(pg_dsn)
    postgres.migrate(pg_dsn, "base", downgrade=True)
    assert _tables(pg_dsn) & base_tables == set()
    postgres.migrate(pg_dsn)
    assert base_tables <= _tables(pg_dsn)


def test_dev_up_is_idempotent(stack_settings: config.Settings) -> None:
    first = kafka.start(stack_settings)
    second = kafka.start(stack_settings)
    assert first.running and second.running
    assert first.pid == second.pid
    assert postgres.start(stack_settings).running


def test_port_taken_is_a_clear_error(stack_settings: config.Settings, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = config.load({
            "CAPLEDGER_STATE_DIR": str(tmp_path / "state"),
            "CAPLEDGER_CACHE_DIR": str(stack_settings.cache_dir),
            "CAPLEDGER_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        })
        with pytest.raises(DevStackError, match=f"127.0.0.1:{port} is taken"):
            kafka.start(settings)


async def test_kafka_status_from_inside_an_event_loop(stack_settings: config.Settings) -> None:
    """Async callers (faust apps, async tests) can ask the devstack whether Kafka is up."""
    state = kafka.status(stack_settings)
    assert state.running and state.address == stack_settings.kafka_bootstrap

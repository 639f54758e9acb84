"""``capledger demo``: the smoke round trip of the local stack (placeholder demo).

Owns: nothing lasting. Brings the stack up, encodes a StackPinged event, produces it
to the smoke topic, consumes it back, decodes it, writes a tracking row to
PostgreSQL and reads it back, printing each step. The real ledger demo replaces
this module (keep the ``cli`` name so streams/cli.py registers it).
Imports: click, rich, aiokafka, psycopg; streams.codec, streams.config, streams.devstack.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import click
import psycopg
from rich.console import Console

from streams import codec, config
from streams.devstack import DevStackError, kafka, postgres

SMOKE_TOPIC = "dev.smoke.v1"
CONSUMER_NAME = "capledger-demo"
WAIT_TIMEOUT_S = 30.0

console = Console()


async def _ensure_topic(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if SMOKE_TOPIC not in await admin.list_topics():
            await admin.create_topics([NewTopic(SMOKE_TOPIC, 1, 1)])
            console.print(f"  created topic {SMOKE_TOPIC} (1 partition)")
    finally:
        await admin.close()


async def _produce_and_consume(bootstrap: str, data: bytes) -> tuple[int, bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(SMOKE_TOPIC, data, key=b"demo")
    finally:
        await producer.stop()
    console.print(f"3. produced {len(data)} bytes to {SMOKE_TOPIC} "
                  f"partition {meta.partition} offset {meta.offset}")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(SMOKE_TOPIC, meta.partition)
        consumer.assign([partition])
        consumer.seek(partition, meta.offset)
        message = await asyncio.wait_for(consumer.getone(), WAIT_TIMEOUT_S)
    finally:
        await consumer.stop()
    assert message.value is not None
    return message.offset, message.value


def run_demo(settings: config.Settings) -> None:
    console.rule("capital-ledger smoke round trip")
    k = kafka.start(settings, Console(stderr=True))
    p = postgres.start(settings)
    console.print(f"1. stack up: Kafka {k.version} at {k.address} (pid {k.pid}); "
                  f"PostgreSQL {p.version.split()[0]} at {p.address}, {p.detail}")
    record = {"ping_id": uuid.uuid4().hex, "sender": "koscom",
              "sent_at_ms": int(time.time() * 1000), "payload": b"hello, ledger",
              "note": "make demo"}
    data = codec.encode("StackPinged", record)
    console.print(f"2. encoded StackPinged as Avro single-object: {len(data)} bytes, "
                  f"marker {data[:2].hex()}, fingerprint {data[2:10].hex()}")
    asyncio.run(_ensure_topic(settings.kafka_bootstrap))
    offset, value = asyncio.run(_produce_and_consume(settings.kafka_bootstrap, data))
    decoded = codec.decode(value, expected="StackPinged")
    assert decoded.record == record, "the broker returned another record"
    console.print(f"4. consumed offset {offset} and decoded {decoded.name}: "
                  f"ping_id={decoded.record['ping_id']} sender={decoded.record['sender']}")
    with psycopg.connect(settings.pg_dsn) as conn:
        conn.execute(
            'INSERT INTO projection_offset (consumer, topic, partition, "offset") '
            "VALUES (%s, %s, 0, %s) ON CONFLICT (consumer, topic, partition) "
            'DO UPDATE SET "offset" = EXCLUDED."offset", updated_at = now()',
            (CONSUMER_NAME, SMOKE_TOPIC, offset))
        row = conn.execute(
            'SELECT "offset", updated_at FROM projection_offset '
            "WHERE consumer = %s AND topic = %s AND partition = 0",
            (CONSUMER_NAME, SMOKE_TOPIC)).fetchone()
    assert row is not None and row[0] == offset
    console.print(f"5. wrote and read back PostgreSQL tracking row projection_offset "
                  f"({CONSUMER_NAME}, {SMOKE_TOPIC}, 0) = {row[0]} at {row[1]:%H:%M:%S}")
    console.print("[bold green]smoke round trip OK[/]  (stop the stack: capledger dev down)")


@click.command(name="demo")
def cli() -> None:
    """Start the local stack and run the smoke round trip, printing each step."""
    try:
        run_demo(config.load())
    except DevStackError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise SystemExit(1) from None

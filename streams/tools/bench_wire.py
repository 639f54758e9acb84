"""What the connection itself costs: TxSubmitted records produced and read back.

Owns: :func:`bench_wire` — one topic under a fresh prefix (created by
``ensure_topics``, deleted after), ``records`` transaction records of ~``tx_bytes``
each produced with the ledger's producer settings (acks=all, idempotent, zstd) and
read back from offset 0 with ``LogReader``, timed; this process's CPU time per record
is the client-side cost of TLS + SCRAM (or not, on a plaintext broker). No nodes run,
so the figure is not drowned by signature verification.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from streams.common import config
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogWriter
from streams.kafka.records import tx_submitted_record
from streams.kafka.topics import TX, admin_client, ensure_topics

BATCH_RECORDS = 500
READ_TIMEOUT_MS = 1_000


async def _produce_and_read(bootstrap: str, topic: str, values: list[bytes]) -> dict[str, float]:
    writer = LogWriter(bootstrap, client_id="capledger-bench-wire")
    await writer.start()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(values), BATCH_RECORDS):
            await writer.send_many(topic, [(None, value)
                                           for value in values[start:start + BATCH_RECORDS]])
        produce_s, produce_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await writer.stop()
    reader = LogReader(bootstrap, topic, client_id="capledger-bench-wire-read")
    await reader.start(0)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        got = 0
        while got < len(values):
            got += len(await reader.read(timeout_ms=READ_TIMEOUT_MS))
        read_s, read_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await reader.stop()
    count = len(values)
    return {"produce_per_s": count / produce_s, "produce_cpu_us": produce_cpu_s / count * 1e6,
            "read_per_s": count / read_s, "read_cpu_us": read_cpu_s / count * 1e6}


async def bench_wire(bootstrap: str, *, records: int, tx_bytes: int) -> dict[str, Any]:
    prefix = f"bench-wire-{uuid.uuid4().hex[:8]}."
    topic = prefix + TX.name
    await ensure_topics(bootstrap, prefix=prefix, specs=[TX])
    values = [codec.encode("TxSubmitted", tx_submitted_record(
        os.urandom(tx_bytes // 2) + bytes(tx_bytes - tx_bytes // 2), submitter="koscom",
        idempotency_key=f"wire-{i}", now_ms=int(time.time() * 1000))) for i in range(records)]
    try:
        figures = await _produce_and_read(bootstrap, topic, values)
    finally:
        admin = admin_client(bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    return {"security": config.load().kafka_security, "records": records,
            "tx_bytes": tx_bytes, **figures}


def run_wire(bootstrap: str, *, records: int, tx_bytes: int) -> dict[str, Any]:
    return asyncio.run(bench_wire(bootstrap, records=records, tx_bytes=tx_bytes))

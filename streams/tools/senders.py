"""The load generator's producers: open-loop sends of pre-encoded records.

Owns: ``open_sender`` and the two senders behind it — ``RdSender`` (librdkafka through
``confluent_kafka``: the records are handed to librdkafka's own threads, which batch,
compress, encrypt and retry them in C, so the generator costs little CPU per record)
and ``AioSender`` (aiokafka, the ledger's own client; the fallback when confluent-kafka
is not installed). Both use the shared settings of ``streams.kafka.topics`` (acks=all,
idempotent, the same TLS + SCRAM identity).

Both send record *i* at ``start + i / rate`` (woken every ``SEND_TICK_S``, enqueueing
what is due), never wait for a commit, and count failed deliveries at the end. Each
reports the CPU its process spent while sending, per record (``cpu_us_per_record``;
the process also runs the bench's block reader, so this is an upper bound).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from streams.kafka.topics import producer_settings, rdkafka_producer_settings

SEND_TICK_S = 0.01
PRODUCERS = ("librdkafka", "aiokafka")
FLUSH_TIMEOUT_S = 60.0
QUEUE_FULL_WAIT_S = 0.005


@dataclass(frozen=True, slots=True)
class SendReport:
    started_wall_s: float
    lag_max_s: float
    failed: int
    cpu_us_per_record: float


class Sender(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send_open_loop(self, topic: str, items: Sequence[tuple[bytes, bytes]],
                             rate: float, start_wall_s: float) -> SendReport: ...

    async def stop(self) -> None: ...


def librdkafka_available() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


def open_sender(kind: str, bootstrap: str, *, client_id: str) -> Sender:
    """A sender of ``kind`` (``PRODUCERS``); librdkafka falls back to aiokafka when
    confluent-kafka is not installed."""
    assert kind in PRODUCERS, kind
    if kind == "librdkafka" and librdkafka_available():
        return RdSender(bootstrap, client_id=client_id)
    return AioSender(bootstrap, client_id=client_id)


async def _open_loop(enqueue: Any, items: Sequence[tuple[bytes, bytes]], rate: float,
                     start_wall_s: float) -> tuple[float, float]:
    """Call ``await enqueue(batch)`` with the items due, on schedule; (start, lag max)."""
    count, sent, lag_max_s = len(items), 0, 0.0
    await asyncio.sleep(max(0.0, start_wall_s - time.time()))
    start = time.perf_counter()
    started_wall_s = time.time()
    while sent < count:
        elapsed = time.perf_counter() - start
        due = min(count, math.floor(elapsed * rate) + 1)
        if due > sent:
            lag_max_s = max(lag_max_s, elapsed - sent / rate)
            await enqueue(items[sent:due])
            sent = due
        if sent < count:
            wait_s = sent / rate - (time.perf_counter() - start)
            await asyncio.sleep(min(SEND_TICK_S, max(0.0, wait_s)))
    return started_wall_s, lag_max_s


class RdSender:
    """librdkafka's producer; delivery reports are served on every tick."""

    name = "librdkafka"

    def __init__(self, bootstrap: str, *, client_id: str) -> None:
        import confluent_kafka

        self._producer = confluent_kafka.Producer(
            rdkafka_producer_settings(bootstrap, client_id=client_id))
        self._failed = 0

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed += 1

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._producer.list_topics(timeout=30))

    async def send_open_loop(self, topic: str, items: Sequence[tuple[bytes, bytes]],
                             rate: float, start_wall_s: float) -> SendReport:
        producer = self._producer

        async def enqueue(batch: Sequence[tuple[bytes, bytes]]) -> None:
            for key, value in batch:
                while True:
                    try:
                        producer.produce(topic, value, key, partition=0,
                                         on_delivery=self._delivered)
                        break
                    except BufferError:  # librdkafka's queue is full: let it drain
                        producer.poll(0)
                        await asyncio.sleep(QUEUE_FULL_WAIT_S)
            producer.poll(0)

        cpu = time.process_time()
        started_wall_s, lag_max_s = await _open_loop(enqueue, items, rate, start_wall_s)
        left = await asyncio.get_running_loop().run_in_executor(
            None, producer.flush, FLUSH_TIMEOUT_S)
        cpu_us = (time.process_time() - cpu) / max(1, len(items)) * 1e6
        return SendReport(started_wall_s, lag_max_s, self._failed + left, cpu_us)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self._producer.flush, FLUSH_TIMEOUT_S)


class AioSender:
    """aiokafka's producer (one future per record, gathered at the end)."""

    name = "aiokafka"

    def __init__(self, bootstrap: str, *, client_id: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap,
                                          **producer_settings(client_id=client_id))

    async def start(self) -> None:
        await self._producer.start()

    async def send_open_loop(self, topic: str, items: Sequence[tuple[bytes, bytes]],
                             rate: float, start_wall_s: float) -> SendReport:
        futures: list[asyncio.Future[Any]] = []

        async def enqueue(batch: Sequence[tuple[bytes, bytes]]) -> None:
            for key, value in batch:
                futures.append(await self._producer.send(topic, value, key=key, partition=0))

        cpu = time.process_time()
        started_wall_s, lag_max_s = await _open_loop(enqueue, items, rate, start_wall_s)
        results = await asyncio.gather(*futures, return_exceptions=True)
        cpu_us = (time.process_time() - cpu) / max(1, len(items)) * 1e6
        failed = sum(1 for result in results if isinstance(result, BaseException))
        return SendReport(started_wall_s, lag_max_s, failed, cpu_us)

    async def stop(self) -> None:
        await self._producer.stop()

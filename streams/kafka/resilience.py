"""Waiting out a broker or network that is away: bounded backoff, retry, connectivity.

Owns: ``Backoff`` (bounded exponential delays), ``Connectivity`` (what a process
knows of its link to the brokers: connected or unreachable, since when, the last
error, how many outages and how long the last one lasted; logged once per change),
``retry_until_done`` (run an operation until it succeeds, waiting between attempts)
and ``ResilientWriter`` (a ``LogWriter`` that never gives up on a record it was asked
to publish: it waits, rebuilds its producer and sends the same bytes again).

Why a node or the projector waits instead of exiting: the brokers and the network
are somebody else's fault; the ledger's promise is that it halts safely and resumes
by itself (docs/decisions/0100-broker-cluster-and-network-faults.md). A record is
re-sent as the same bytes, so a retry after an ambiguous failure can at worst write
an identical copy, which every reader already tolerates (decision 0021); it never
writes a different record (a vote is signed once, by the signing guard's rules,
before the first attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from streams.common.clock import now_ms
from streams.kafka.logio import LogWriter
from streams.kafka.topics import TopicError

logger = logging.getLogger("capledger.connectivity")

T = TypeVar("T")

BACKOFF_INITIAL_MS = 200
BACKOFF_MAX_MS = 5_000
BACKOFF_FACTOR = 2
# While unreachable, the log repeats the state at most this often.
UNREACHABLE_LOG_EVERY_MS = 10_000
# Stopping a producer whose broker is away must not hang the retry loop.
PRODUCER_STOP_TIMEOUT_S = 5.0
# TopicError codes that mean "the brokers did not answer in time", not a wrong layout.
TRANSIENT_TOPIC_CODES = frozenset({"topic-timeout"})

CONNECTED = "connected"
UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential delays from ``initial_ms``, multiplied by ``factor``, at most ``max_ms``."""

    initial_ms: int = BACKOFF_INITIAL_MS
    max_ms: int = BACKOFF_MAX_MS
    factor: int = BACKOFF_FACTOR

    def delay_ms(self, attempt: int) -> int:
        """The wait after failed attempt ``attempt`` (1 = the first failure)."""
        assert attempt >= 1
        delay = self.initial_ms
        for _ in range(attempt - 1):
            delay *= self.factor
            if delay >= self.max_ms:
                return self.max_ms
        return min(delay, self.max_ms)


def is_transient(error: BaseException) -> bool:
    """An error of the brokers or the network (worth waiting out), not of our input."""
    if isinstance(error, TopicError):
        return error.code in TRANSIENT_TOPIC_CODES
    return isinstance(error, KafkaError | OSError | TimeoutError)


class Connectivity:
    """A process's link to the brokers as its own operations saw it.

    ``failed`` and ``succeeded`` are called by whoever talks to the brokers; the
    change to unreachable and back is logged once (with a reminder every
    ``UNREACHABLE_LOG_EVERY_MS``), with the outage's length when it ends."""

    def __init__(self, who: str, *, clock: Callable[[], int] = now_ms) -> None:
        self.who = who
        self._clock = clock
        self.state = CONNECTED
        self.since_ms = clock()
        self.last_error = ""
        self.outages = 0
        self.last_outage_ms = 0
        self._logged_ms = 0

    @property
    def reachable(self) -> bool:
        return self.state == CONNECTED

    def unreachable_for_ms(self) -> int:
        return 0 if self.reachable else max(0, self._clock() - self.since_ms)

    def failed(self, what: str, error: BaseException | str) -> None:
        now = self._clock()
        self.last_error = f"{what}: {error if isinstance(error, str) else _describe(error)}"
        if self.reachable:
            self.state, self.since_ms, self._logged_ms = UNREACHABLE, now, now
            self.outages += 1
            logger.warning("%s: broker unreachable (%s); waiting and retrying", self.who,
                           self.last_error)
        elif now - self._logged_ms >= UNREACHABLE_LOG_EVERY_MS:
            self._logged_ms = now
            logger.warning("%s: broker unreachable for %d ms (%s); still retrying", self.who,
                           now - self.since_ms, self.last_error)

    def succeeded(self) -> None:
        if self.reachable:
            return
        now = self._clock()
        self.last_outage_ms = now - self.since_ms
        self.state, self.since_ms = CONNECTED, now
        logger.warning("%s: broker reachable again after %d ms", self.who, self.last_outage_ms)

    def as_dict(self) -> dict[str, Any]:
        """For status files and metrics: plain JSON values."""
        return {"state": self.state, "since_ms": self.since_ms,
                "unreachable_for_ms": self.unreachable_for_ms(), "outages": self.outages,
                "last_outage_ms": self.last_outage_ms, "last_error": self.last_error}


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def retry_until_done(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    connectivity: Connectivity,
    backoff: Backoff = Backoff(),
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """``operation()``'s result, trying again after each transient failure (waiting
    ``backoff``'s delays, calling ``before_retry`` first, e.g. to rebuild a client).
    Other errors propagate at once. Never gives up: the caller decides what may wait
    forever (a node's consensus records do; it has nothing better to do)."""
    attempt = 0
    while True:
        try:
            result = await operation()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            attempt += 1
            connectivity.failed(what, error)
            await asyncio.sleep(backoff.delay_ms(attempt) / 1000)
            if before_retry is not None:
                with contextlib.suppress(Exception):
                    await before_retry()
            continue
        connectivity.succeeded()
        return result


class ResilientWriter:
    """A ``LogWriter`` that publishes every record it is given, however long the
    brokers are away: a failed send waits (``Backoff``), replaces the producer (a new
    producer id, so no half-known idempotence state carries over) and sends the same
    bytes again. One producer at a time; a lock keeps concurrent senders from
    rebuilding it twice."""

    def __init__(self, make_writer: Callable[[], LogWriter], *, connectivity: Connectivity,
                 backoff: Backoff = Backoff()) -> None:
        self._make_writer = make_writer
        self._writer: LogWriter | None = None
        self._started = False
        self._lock = asyncio.Lock()
        self.connectivity = connectivity
        self.backoff = backoff

    async def start(self) -> None:
        await retry_until_done(self._ensure_started, what="producer start",
                               connectivity=self.connectivity, backoff=self.backoff,
                               before_retry=self._discard)

    async def stop(self) -> None:
        await self._discard()

    async def _ensure_started(self) -> LogWriter:
        async with self._lock:
            if self._writer is None:
                self._writer = self._make_writer()
                self._started = False
            if not self._started:
                writer = self._writer
                try:
                    await writer.start()
                except BaseException:  # a half-started producer is not reused
                    self._writer = None
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.stop(), PRODUCER_STOP_TIMEOUT_S)
                    raise
                self._started = True
            return self._writer

    async def _discard(self) -> None:
        async with self._lock:
            writer, self._writer, self._started = self._writer, None, False
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.stop(), PRODUCER_STOP_TIMEOUT_S)

    async def _with_writer(self, what: str,
                           operation: Callable[[LogWriter], Awaitable[T]]) -> T:
        async def attempt() -> T:
            return await operation(await self._ensure_started())

        return await retry_until_done(attempt, what=what, connectivity=self.connectivity,
                                      backoff=self.backoff, before_retry=self._discard)

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        """Send until the brokers acknowledge; the record's offset."""
        return await self._with_writer(f"send to {topic}",
                                       lambda writer: writer.send(topic, value, key=key))

    async def send_many(self, topic: str,
                        items: Sequence[tuple[bytes | None, bytes]]) -> list[int]:
        """Send a batch until every record is acknowledged (a retry sends the whole
        batch again: identical copies at worst)."""
        return await self._with_writer(f"send to {topic}",
                                       lambda writer: writer.send_many(topic, items))

    async def send_once(self, topic: str, value: bytes, *, key: bytes | None,
                        timeout_ms: int) -> bool:
        """One attempt bounded by ``timeout_ms`` (a heartbeat: the next one replaces
        it); whether it was acknowledged. Feeds the connectivity state either way."""
        try:
            writer = await asyncio.wait_for(self._ensure_started(), timeout_ms / 1000)
            await asyncio.wait_for(writer.send(topic, value, key=key), timeout_ms / 1000)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            self.connectivity.failed(f"send to {topic}", error)
            return False
        self.connectivity.succeeded()
        return True


class RepeatedLogFilter(logging.Filter):
    """Lets one record per message template through every ``interval_ms``.

    aiokafka logs every failed connection and metadata refresh at ERROR — tens of
    lines a second per client while the brokers are away (about 300 a second per node
    measured here), which fills disks and costs CPU exactly when an operator reads the
    log. The first of each kind still shows; ``Connectivity`` says the rest."""

    def __init__(self, interval_ms: int = UNREACHABLE_LOG_EVERY_MS, *,
                 clock: Callable[[], int] = now_ms, templates_max: int = 256) -> None:
        super().__init__()
        self.interval_ms = interval_ms
        self._clock = clock
        self._templates_max = templates_max
        self._last_ms: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = self._clock()
        last = self._last_ms.get(key)
        if last is not None and now - last < self.interval_ms:
            return False
        if len(self._last_ms) >= self._templates_max:
            self._last_ms.clear()  # bounded: forget, at worst log a few lines again
        self._last_ms[key] = now
        return True


def quiet_repeated_client_logs(prefix: str = "aiokafka") -> None:
    """Install one ``RepeatedLogFilter`` on the Kafka client's loggers (a logger's
    filters do not apply to its children's records, so on each module logger the
    client has created; call after importing the client)."""
    shared = RepeatedLogFilter()
    names = [name for name in logging.Logger.manager.loggerDict
             if name == prefix or name.startswith(prefix + ".")]
    for name in [prefix, *names]:
        target = logging.getLogger(name)
        if not any(isinstance(f, RepeatedLogFilter) for f in target.filters):
            target.addFilter(shared)

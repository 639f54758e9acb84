"""How far a projection is behind the chain's logs: its cursor and its lag.

Owns :func:`projection_lag` — for one consumer of ``projection_offset`` (the projector's
tracking rows, committed with its rows) the stored offset of ``ledger.blocks.v1`` and
``ledger.rejected.v1``, each topic's end offset, the records between them, the projected
height and when the cursor last moved. A building block for ``capledger status`` and a
metrics endpoint (decision 0092); it writes nothing.

Touches: reads projection_offset and the block table of one database; asks the broker
for two end offsets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from streams.kafka.logio import LogReader
from streams.kafka.topics import BLOCKS, REJECTED
from streams.projections.projector import CONSUMER_DEFAULT


@dataclass(frozen=True, slots=True)
class TopicLag:
    topic: str
    stored_offset: int  # the next record the projection will read (0: none yet)
    end_offset: int  # the log's end as the broker reported it
    updated_at: dt.datetime | None  # when the projector last committed this cursor

    @property
    def records_behind(self) -> int:
        return max(0, self.end_offset - self.stored_offset)


@dataclass(frozen=True, slots=True)
class ProjectionLag:
    consumer: str
    height: int | None  # the projected head (None: nothing projected)
    topics: tuple[TopicLag, ...]

    @property
    def records_behind(self) -> int:
        return sum(topic.records_behind for topic in self.topics)


async def projection_lag(dsn: str, bootstrap: str, *, topic_prefix: str = "",
                         consumer: str = CONSUMER_DEFAULT) -> ProjectionLag:
    """The projection's cursor against the logs' ends (see the module docstring).
    Records behind count every record, copies of a height included: 0 means caught up."""
    names = [topic_prefix + BLOCKS.name, topic_prefix + REJECTED.name]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            'SELECT topic, "offset", updated_at FROM projection_offset '
            "WHERE consumer = %s AND partition = 0 AND topic = ANY(%s)", (consumer, names))
        stored: dict[str, tuple[int, Any]] = {
            str(topic): (int(offset), updated) for topic, offset, updated
            in await cursor.fetchall()}
        head = await (await conn.execute("SELECT max(height) FROM block")).fetchone()
    readers = [LogReader(bootstrap, name, client_id=f"capledger-{consumer}-lag")
               for name in names]
    try:
        # an assigned reader learns the partition's leader first (a topic just created
        # is not yet in a bare consumer's metadata)
        await asyncio.gather(*(reader.start(0) for reader in readers))
        ends = dict(zip(names, await asyncio.gather(*(reader.end_offset()
                                                       for reader in readers)), strict=True))
    finally:
        await asyncio.gather(*(reader.stop() for reader in readers), return_exceptions=True)
    topics = tuple(TopicLag(name, stored.get(name, (0, None))[0], ends[name],
                            stored.get(name, (0, None))[1]) for name in names)
    height = None if head is None or head[0] is None else int(head[0])
    return ProjectionLag(consumer, height, topics)

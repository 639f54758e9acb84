"""Offset gaps and control records in the ledger logs, with real transactional writes.

A transactional producer leaves a commit or abort marker at an offset no consumer is
ever handed, so offsets are not contiguous. ``LogReader.read_to_end`` must still
reach the end when a marker is the last thing in a log, and the nodes' tx-log pool
must accept a gap between two records. The ledger readers read uncommitted
(``streams.kafka.topics.consumer_settings``), so a record written in an aborted
transaction still counts as submitted (docs/decisions/0050-no-record-stops-the-ledger.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from ledger.membership import INSTITUTION_IDS
from ledger.tx import Transaction
from streams.common.clock import now_ms
from streams.kafka import codec
from streams.kafka.logio import LogReader, read_all
from streams.kafka.records import signed_tx_submitted_record
from streams.kafka.topics import TX, producer_settings
from tests.integration.cluster_fixtures import ChainRun, running_chain

pytestmark = pytest.mark.integration

READ_TO_END_TIMEOUT_S = 30.0
COMMIT_TIMEOUT_S = 90.0


@contextlib.asynccontextmanager
async def _transactional(bootstrap: str, name: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap,
                                **producer_settings(client_id=f"gap-test-{name}"),
                                transactional_id=f"gap-test-{name}-{time.time_ns()}")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _write_in_transaction(producer: AIOKafkaProducer, topic: str, values: list[bytes],
                                *, abort: bool) -> None:
    await producer.begin_transaction()
    for value in values:
        await producer.send_and_wait(topic, value, partition=0)
    if abort:
        await producer.abort_transaction()
    else:
        await producer.commit_transaction()


async def test_read_to_end_reaches_a_log_that_ends_in_a_transaction_marker(
    kafka_bootstrap: str, topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory("gaps")
    async with _transactional(kafka_bootstrap, "marker") as producer:
        await _write_in_transaction(producer, topic, [b"a", b"b"], abort=False)
        await _write_in_transaction(producer, topic, [b"c"], abort=True)  # last: abort marker
    reader = LogReader(kafka_bootstrap, topic, client_id="gap-test-reader")
    await reader.start(0)
    try:
        end = await reader.end_offset()
        records = await asyncio.wait_for(read_all(kafka_bootstrap, topic, client_id="gap-r"),
                                         READ_TO_END_TIMEOUT_S)
        batches = [batch async for batch in reader.read_to_end(timeout_ms=200)]
    finally:
        await reader.stop()
    offsets = [record.offset for record in records]
    # a, b, commit marker, c (read uncommitted), abort marker
    assert offsets == [0, 1, 3] and end == 5, (offsets, end)
    assert [r.offset for batch in batches for r in batch] == offsets
    assert reader.position == end


def _envelopes(run: ChainRun, txs: list[Transaction], tag: str) -> list[bytes]:
    now = now_ms()
    key = run.key("securities-b")
    return [codec.encode("TxSubmitted", signed_tx_submitted_record(
        tx.serialize(), key=key, genesis_hash=run.genesis.hash_le, submitter="securities-b",
        idempotency_key=f"{tag}-{i}", now_ms=now))
        for i, tx in enumerate(txs)]


@pytest.mark.cluster
async def test_the_chain_goes_on_over_transactional_writes_to_the_tx_log(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str,
) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        topic = run.topic(TX.name)
        committed_batch = run.next_batch(1, lanes=[0, 1])
        aborted_batch = run.next_batch(1, lanes=[2, 3])
        async with _transactional(kafka_bootstrap, "chain") as producer:
            await _write_in_transaction(producer, topic, _envelopes(run, committed_batch, "c"),
                                        abort=False)
            await _write_in_transaction(producer, topic, _envelopes(run, aborted_batch, "a"),
                                        abort=True)
        run.submitted.extend(tx.txid for tx in committed_batch + aborted_batch)
        # Read uncommitted: the aborted writes count as submitted too, on every node.
        await run.wait_committed([tx.txid for tx in committed_batch + aborted_batch],
                                 timeout_s=COMMIT_TIMEOUT_S)
        after = run.next_batch(2)  # ordinary writes after the markers
        await run.submit(after)
        await run.wait_committed([tx.txid for tx in after], timeout_s=COMMIT_TIMEOUT_S)
        # A node restarted now starts its tx reader at a block end next to the markers.
        run.cluster.stop("koscom")
        run.cluster.start("koscom")
        more = run.next_batch(1)
        await run.submit(more)
        await run.wait_committed([tx.txid for tx in more], timeout_s=COMMIT_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)
        run.assert_exactly_once()
        assert all(code is None for code in run.cluster.exit_codes().values()), (
            run.cluster.exit_codes())

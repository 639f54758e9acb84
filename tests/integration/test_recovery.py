"""Committed blocks always reach the blocks log: a node whose chain copy holds blocks
the blocks log lacks (fsynced, then the process died before publishing) republishes
them on start-up, against five real node processes.

The fault is made by pointing the same chain copies at fresh topics (a new prefix): to
each node the new blocks log is one that lost every publish, which is the general case
of the one lost publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from ledger.block import QuorumCertificate, make_block, proposer_for, sign_vote
from ledger.membership import INSTITUTION_IDS
from streams.kafka import codec
from streams.kafka.logio import LogWriter, read_all
from streams.kafka.records import committed_record
from streams.kafka.topics import BLOCKS, REJECTED, ensure_topics
from streams.node.ledger_node import REPUBLISH_HEIGHTS_MAX
from streams.node.pending_rejections import PendingRejections, pending_path, write_pending
from streams.projections.projector import Projector
from streams.tools.cluster import LocalCluster
from tests.integration.cluster_fixtures import _delete_topics, running_chain

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

COMMIT_TIMEOUT_S = 90.0
REPUBLISH_TIMEOUT_S = 90.0
POLL_S = 0.5
T = TypeVar("T")


async def _heights(bootstrap: str, topic: str) -> dict[int, set[bytes]]:
    found: dict[int, set[bytes]] = {}
    for record in await read_all(bootstrap, topic, client_id="recovery-test"):
        decoded = codec.decode(record.value, expected="BlockCommitted").record
        found.setdefault(int(decoded["height"]), set()).add(bytes(decoded["block_hash"]))
    return found


@contextlib.asynccontextmanager
async def _restarted_on_fresh_topics(tmp_path: Path, unique_id: str, bootstrap: str
                                     ) -> AsyncIterator[tuple[LocalCluster, str]]:
    """The stopped chain's nodes started again from their directories on fresh topics
    (to each node, logs that lost every publish); stopped and the topics deleted after."""
    prefix = f"{unique_id}-lost."
    await ensure_topics(bootstrap, prefix=prefix)
    cluster = LocalCluster(tmp_path / "chain", state_dir=tmp_path / "state", topic_prefix=prefix)
    try:
        cluster.start()
        yield cluster, prefix
    finally:
        cluster.stop()
        with contextlib.suppress(Exception):
            await _delete_topics(bootstrap, prefix)


async def _polled(read: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """``read()`` until ``done`` says yes or ``REPUBLISH_TIMEOUT_S`` pass; the last read."""
    deadline = time.monotonic() + REPUBLISH_TIMEOUT_S
    while True:
        found = await read()
        if done(found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(POLL_S)


async def test_a_node_republishes_committed_blocks_missing_from_the_blocks_log(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str,
) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        for _ in range(3):
            batch = run.next_batch(1)
            await run.submit(batch)
            await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        head = await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)
        assert 0 < head <= REPUBLISH_HEIGHTS_MAX
        expected = {h: {run.blocks.block_at(h).hash} for h in range(1, head + 1)}
        run.cluster.stop()
    async with _restarted_on_fresh_topics(tmp_path, unique_id, kafka_bootstrap) as (cluster,
                                                                                   prefix):
        found = await _polled(lambda: _heights(kafka_bootstrap, prefix + BLOCKS.name),
                              lambda heights: heights == expected)
        assert found == expected, (sorted(found), head)
        assert all(code is None for code in cluster.exit_codes().values())



LAG_HEIGHTS = 40
CATCH_UP_TIMEOUT_S = 30.0


async def test_a_paused_node_catches_up_while_running(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str,
) -> None:
    """Issue 8: a node SIGSTOPped while the others commit 40 heights (more than the 16
    proposals the machine buffers) is back in agreement within seconds of SIGCONT,
    without a restart: it takes the bodies of decided heights from the blocks log."""
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        await run.submit(run.next_batch(1))
        await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
        paused = "surveillance"
        run.cluster.pause(paused)
        start_height = run.blocks.head_height
        lane = 0
        while run.blocks.head_height < start_height + LAG_HEIGHTS:
            batch = run.next_batch(1, lanes=[lane % run.lanes.count])
            lane += 1
            await run.submit(batch)
            await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        behind = run.status.latest[paused].height
        assert run.blocks.head_height - behind >= LAG_HEIGHTS, (behind, run.blocks.head_height)
        run.cluster.resume(paused)
        resumed_at = time.monotonic()
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=CATCH_UP_TIMEOUT_S)
        print(f"caught up {run.blocks.head_height - behind} heights in "
              f"{time.monotonic() - resumed_at:.1f} s")
        batch = run.next_batch(1)  # and it takes part again
        await run.submit(batch)
        await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=CATCH_UP_TIMEOUT_S)
        run.assert_exactly_once()
        assert all(code is None for code in run.cluster.exit_codes().values())


async def test_a_restarted_node_takes_the_decided_block_not_a_certified_losing_one(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str, pg_dsn: str,
) -> None:
    """A certified block that did not win (what a late quorum of acks after a timeout
    quorum produces; here the test signs the acks with the members' keys) is published
    on the blocks log before the decided block of its height. A node restarted behind
    that height must commit the decided block: the votes log decides, not the first
    certified record (the old heal took the losing one and diverged). The projector,
    which reads the votes log too, projects the decided block and quarantines the
    losing record. The client (an external system's principal, which may not read the
    votes log) takes the block a quorum of members signed committed records for, not
    the losing record (signed by one real member) it read first (decision 0051)."""
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        first = run.next_batch(1)
        await run.submit(first)
        await run.wait_committed([tx.txid for tx in first], timeout_s=COMMIT_TIMEOUT_S)
        head = await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)
        victim = "koscom"
        run.cluster.stop(victim)
        parent = run.blocks.block_at(head)
        height = head + 1
        proposer = proposer_for(run.genesis, height, 0)
        start = parent.header.tx_offset_end
        losing = make_block(run.key(proposer), height=height, prev_hash=parent.hash,
                            time_ms=int(time.time() * 1000), proposer=proposer, round_=0,
                            txs=[], tx_offset_start=start, tx_offset_end=start + 1)
        acks = tuple(sign_vote(run.key(member), run.genesis.hash_le, voter=member,
                               height=height, round_=0, kind="ack", block_hash=losing.hash)
                     for member in run.genesis.member_ids[:run.genesis.params.quorum])
        qc = QuorumCertificate(height, 0, losing.hash, acks)
        writer = LogWriter(kafka_bootstrap, client_id="losing-block")
        await writer.start()
        try:
            payload = codec.encode("BlockCommitted", committed_record(
                losing, qc, vote_offsets=[-1] * len(acks), proposal_offset=-1,
                committer="securities-b", now_ms=int(time.time() * 1000),
                key=run.key("securities-b"), genesis_hash=run.genesis.hash_le))
            await writer.send(run.topic(BLOCKS.name), payload, key=str(height).encode())
        finally:
            await writer.stop()
        batch = run.next_batch(1)  # the height's real block: decided by the votes log
        await run.submit(batch)
        await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        assert run.blocks.heights[height] >= {losing.hash}
        run.cluster.start(victim)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)
        assert run.status.latest[victim].head_hash == run.status.latest["otc-operator"].head_hash
        assert all(code is None for code in run.cluster.exit_codes().values())
        (decided,) = run.blocks.heights[height] - {losing.hash}
        await run.client.wait([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        assert run.client.block_hash(height) == decided
        assert run.client.outcome(batch[0].txid).height == height
        stats = await Projector(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                topic_prefix=run.prefix).run()
        assert stats.quarantined_codes.get("block-not-decided", 0) >= 1, stats
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT hash FROM block WHERE height = %s", (height,)).fetchone()
        assert row == (decided[::-1].hex(),)


@pytest.mark.slow
async def test_a_node_republishes_rejections_left_unacknowledged_at_its_crash(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str,
) -> None:
    """Decision 0129, with real node processes and Kafka: a node that died after its chain
    copy took the head block and before its rejection records were acknowledged finds
    them in ``rejections-pending.bin`` (written here as the node writes it, from the
    records it did publish) and publishes the same bytes on start-up; as in the test
    above, fresh topics stand for a log that lost the publish."""
    victim = "koscom"
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        batch = run.next_batch(1, lanes=[0])
        await run.submit(batch)
        await run.submit(batch)  # the second copy is rejected
        await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        head = await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)
        head_hash = run.blocks.block_at(head).hash

        async def victims_records() -> list[bytes]:
            found = []
            for record in await read_all(kafka_bootstrap, run.topic(REJECTED.name),
                                         client_id="recovery-test"):
                decoded = codec.decode(record.value, expected="TxRejected").record
                if decoded["institution"] == victim and decoded["block_hash"] == head_hash:
                    found.append(record.value)
            return found

        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        while not (published := await victims_records()) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        assert published, "the duplicate was not rejected in the head block"
        run.cluster.stop()
        write_pending(pending_path(run.node_dir(victim)),
                      PendingRejections(head, head_hash, tuple(published)))
    async with _restarted_on_fresh_topics(tmp_path, unique_id, kafka_bootstrap) as (cluster,
                                                                                   prefix):

        async def republished() -> list[bytes]:
            return [r.value for r in await read_all(
                kafka_bootstrap, prefix + REJECTED.name, client_id="recovery-test")]

        found = await _polled(republished, bool)
        assert found == published
        assert not pending_path(run.node_dir(victim)).exists()
        assert all(code is None for code in cluster.exit_codes().values())

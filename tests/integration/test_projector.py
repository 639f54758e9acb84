"""The PostgreSQL projection against real Kafka and PostgreSQL.

- A synthetic log (blocks certified with a test genesis's keys, written by several
  "committers" with a forged copy among them, plus rejection records): projected with
  a restart in the middle and a crash between rows and offsets, it equals the same log
  rebuilt from scratch; a second run adds nothing; the throughput is measured.
- A real five-node chain (payments, an Open Assets issuance and transfer, a double
  spend): row counts equal the chain, balances by address via SQL equal the ledger's,
  the projector's state hash equals the nodes' heartbeats, surveillance queries work,
  and ``capledger project --rebuild --check-heartbeats`` agrees.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.assets import AssetDefinition
from ledger.block import Block, QuorumCertificate
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.selection import Rejection
from ledger.state import (
    LedgerRules,
    UtxoEntry,
    apply_block,
    genesis_allocation_tx,
    state_from_genesis,
)
from ledger.tx import OutPoint, Transaction
from ledger.wallet import KeyStore, Wallet
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.kafka import codec
from streams.kafka.logio import LogWriter
from streams.kafka.records import committed_record, rejected_record, vote_record
from streams.kafka.topics import BLOCKS, REJECTED, VOTES, delete_topics, ensure_topics
from streams.projections.projector import ProjectionError, Projector
from streams.tools.loadgen import (
    LANE_VALUE,
    Lanes,
    certified_blocks,
    interleave,
    lane_chains,
    sign_p2pkh_payment,
    sink_script,
)
from tests.integration.cluster_fixtures import running_chain, wait_until

TIME_MS = 1_764_000_000_000
COMMITTERS = ("koscom", "surveillance", "otc-operator")
PERF_BLOCKS = int(os.environ.get("CAPLEDGER_PERF_BLOCKS", "40"))  # docs/benchmarks.md
PERF_TXS_PER_BLOCK = 250
PERF_CPU_S_PER_1000_TX_MAX = 0.3  # the projector process; ~0.05-0.09 measured (benchmarks.md)
# "0": the writes on the projection's own event loop, as before decision 0095 (to compare)
WRITES_ON_THREAD = os.environ.get("CAPLEDGER_PERF_WRITES_ON_THREAD", "1") != "0"
PROFILE_OUT = os.environ.get("CAPLEDGER_PROFILE_OUT")  # cProfile of Projector.run
SUBPROCESS_TIMEOUT_S = 120.0

SNAPSHOT_QUERIES = {
    "block": "SELECT height, hash, prev_hash, merkle_root, proposer, round, time_at, tx_count, "
             "size_bytes, state_hash, tx_offset_start, tx_offset_end, voters, source_offset "
             "FROM block ORDER BY height",
    "tx": "SELECT txid, height, position, size_bytes, raw, issued_asset_id, issued_quantity "
          "FROM tx ORDER BY height, position",
    "tx_output": 'SELECT txid, "index", value, script_pubkey, address, asset_id, quantity, '
                 'spent_by_txid FROM tx_output ORDER BY txid, "index"',
    "tx_rejection": "SELECT log_offset, txid, stage, code, message, institution, submitter, "
                    "idempotency_key, block_hash, source_topic, source_partition, "
                    "source_offset, rejected_at FROM tx_rejection ORDER BY log_offset",
    "projection_offset": 'SELECT consumer, topic, partition, "offset" FROM projection_offset '
                         "ORDER BY consumer, topic",
}

# Surveillance examples (docs/decisions/0032-postgresql-projection.md).
TRANSFERRED_PER_ADDRESS = """
SELECT o.address, coalesce(o.asset_id, 'native') AS asset,
       sum(CASE WHEN o.asset_id IS NULL THEN o.value ELSE o.quantity END) AS received,
       count(DISTINCT o.txid) AS txs
FROM tx_output o
WHERE o.address IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM tx_output i
                  WHERE i.spent_by_txid = o.txid AND i.address = o.address)
GROUP BY o.address, asset ORDER BY received DESC
"""
REJECTED_BY_CODE = """
SELECT code, count(DISTINCT (source_topic, source_partition, source_offset)) AS submissions,
       count(*) AS records, array_agg(DISTINCT institution ORDER BY institution) AS seen_by
FROM tx_rejection GROUP BY code ORDER BY code
"""
BALANCES = "SELECT address, coalesce(asset_id, ''), amount FROM address_balance"


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a local process (the PostgreSQL backend: the test
    database server runs on this machine), 0.0 when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(query).fetchall() for name, query in SNAPSHOT_QUERIES.items()}


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def sql_balances(dsn: str) -> dict[tuple[str, str], int]:
    totals: dict[tuple[str, str], int] = {}
    for address, asset, amount in query(dsn, BALANCES):
        totals[(address, asset)] = totals.get((address, asset), 0) + int(amount)
    return {key: amount for key, amount in totals.items() if amount}


def ledger_balances(genesis: Genesis, blocks: list[Block]) -> tuple[dict[tuple[str, str], int],
                                                                    bytes]:
    """Balances by (address, asset or '' for native) from the ledger core itself."""
    from ledger.address import script_to_address

    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    rules = LedgerRules.from_genesis(genesis)
    for block in blocks:
        state = apply_block(state, block, rules, verify_scripts=False)
    totals: dict[tuple[str, str], int] = {}
    for _, entry in state.items():
        address = script_to_address(entry.script_pubkey)
        if address is None:
            continue
        totals[(address, "")] = totals.get((address, ""), 0) + entry.value
        if entry.asset_id is not None:
            key = (address, entry.asset_id)
            totals[key] = totals.get(key, 0) + entry.quantity
    return {key: amount for key, amount in totals.items() if amount}, state.state_hash


@contextlib.asynccontextmanager
async def chain_topics(bootstrap: str, prefix: str) -> AsyncIterator[None]:
    await ensure_topics(bootstrap, prefix=prefix)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, prefix=prefix)


def synthetic_genesis(seed: str, lanes: Lanes) -> tuple[Genesis, dict[str, PrivateKey]]:
    genesis, keys = build_genesis(chain_id=f"proj-{seed[-8:]}", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS, entropy=seeded_entropy(seed))
    return dataclasses.replace(genesis, allocations=lanes.allocations()), keys


def committed_payload(block: Block, qc: QuorumCertificate, committer: str) -> bytes:
    return codec.encode("BlockCommitted", committed_record(
        block, qc, vote_offsets=[0] * len(qc.votes), proposal_offset=0, committer=committer,
        now_ms=TIME_MS))


async def publish_votes(writer: LogWriter, prefix: str,
                        chain: list[tuple[Block, QuorumCertificate]]) -> None:
    """The acks of each certificate on the votes log: what decides each height for the
    projector (the first quorum in log order), as the nodes' votes would."""
    await writer.send_many(prefix + VOTES.name, [
        (None, codec.encode("VoteCast", vote_record(vote, now_ms=TIME_MS)))
        for _, qc in chain for vote in qc.votes])


def rejection_payload(offset: int, institution: str, prefix: str) -> bytes:
    txid = hashlib.sha256(f"rejected/{offset}".encode()).digest().hex()
    rejection = Rejection(offset, txid, "securities-a", f"key-{offset}", "double-spend",
                          f"tx {txid} input 0 was already spent")
    return codec.encode("TxRejected", rejected_record(
        rejection, stage="commit", institution=institution,
        source_topic=prefix + "ledger.tx.v1", block_hash=None, now_ms=TIME_MS))


# --------------------------------------------------------------------------- synthetic


async def test_synthetic_log_incremental_with_restart_and_crash_equals_rebuild(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, 6)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 8)))
    all_blocks = certified_blocks(genesis, keys,
                                  [txs[i:i + 4] for i in range(0, len(txs), 4)],
                                  time_ms=TIME_MS)
    # ``later`` arrives while following; ``last`` while a second writer interferes
    full_chain, last = all_blocks[:-1], all_blocks[-1]
    chain, later = full_chain[:-2], full_chain[-2:]
    # Each height published by three committers; the second copy of height 3 comes first
    # in a forged form (a vote's signature swapped): refused, counted, never projected.
    items: list[bytes] = []
    for height, (block, qc) in enumerate(chain, start=1):
        if height == 3:
            forged_votes = (dataclasses.replace(qc.votes[0], signature=qc.votes[1].signature),
                            *qc.votes[1:])
            items.append(committed_payload(block, QuorumCertificate(
                qc.height, qc.round, qc.block_hash, forged_votes), "securities-b"))
        items.extend(committed_payload(block, qc, committer) for committer in COMMITTERS)
    rejections = [rejection_payload(i // 3, COMMITTERS[i % 3], prefix) for i in range(12)]

    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer")
        await writer.start()
        try:
            await publish_votes(writer, prefix, all_blocks)
            await writer.send_many(prefix + BLOCKS.name, [(None, item) for item in items])
            await writer.send_many(prefix + REJECTED.name, [(None, r) for r in rejections])
        finally:
            await writer.stop()

        def projector(batch_blocks_max: int = 3) -> Projector:
            return Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                             topic_prefix=prefix, batch_blocks_max=batch_blocks_max)

        # 1. the first half, in small transactions
        first = await projector().run(blocks_offset_max=len(items) // 2)
        assert first.blocks_offset == len(items) // 2
        assert 0 < first.height < len(chain) and first.batches >= 2
        half = snapshot(pg_dsn)
        assert len(half["block"]) == first.height + 1  # with genesis at height 0

        # 2. a crash between rows and tracking rows: nothing of that transaction stays
        async def crash(self: Projector, conn: Any) -> None:
            raise RuntimeError("power cut before the tracking rows")

        monkeypatch.setattr(Projector, "_write_offsets", crash)
        with pytest.raises(RuntimeError):
            await projector().run()
        assert snapshot(pg_dsn) == half
        monkeypatch.undo()

        # 3. restart: the state stored with the rows is resumed (the log is not re-read
        # from offset 0: only the head's record, to anchor it), then the rest
        second = await projector().run()
        assert (second.resumed_from_height, second.replayed_blocks) == (first.height, 0)
        assert second.height == len(chain)
        # the restart's follower saw the log after the stored offset only (the forged
        # copy came before it): one record per new height, the rest identical copies
        rest = len(items) - first.blocks_offset
        assert second.blocks_records_read == rest + 1  # + the head's record
        assert (second.copies.invalid, second.copies.duplicates) == (
            0, rest - (len(chain) - first.height))
        incremental = snapshot(pg_dsn)
        assert len(incremental["block"]) == len(chain) + 1
        assert len(incremental["tx"]) == sum(len(block.txs) for block, _ in chain) + 1
        assert len(incremental["tx_rejection"]) == len(rejections)
        assert incremental["projection_offset"] == sorted([
            ("projector", prefix + BLOCKS.name, 0, len(items)),
            ("projector", prefix + REJECTED.name, 0, len(rejections)),
        ])
        _, state_hash = ledger_balances(genesis, [block for block, _ in chain])
        assert second.state_hash == display_hex(state_hash)

        # 4. a second run adds nothing, and reads one block record (the head's) and
        # no vote to start
        again = await projector().run()
        assert (again.blocks, again.txs, again.rejections, again.batches) == (0, 0, 0, 0)
        assert again.resumed_from_height == len(chain)
        assert (again.blocks_records_read, again.votes_records_read) == (1, 0)
        assert snapshot(pg_dsn) == incremental

        # 4b. an unspent row altered in PostgreSQL: the stored state no longer hashes to
        # the head's state hash, so the projector replays the log from 0 instead
        query(pg_dsn, 'UPDATE tx_output SET value = value + 1 WHERE (txid, "index") = '
                      '(SELECT txid, "index" FROM tx_output WHERE spent_by_txid IS NULL '
                      'ORDER BY txid, "index" LIMIT 1) RETURNING 1')
        refused = await projector().run()
        assert refused.resumed_from_height is None and refused.replayed_blocks == len(chain)
        assert (refused.resume_refused or "").startswith("resume-state-hash"), refused
        query(pg_dsn, 'UPDATE tx_output SET value = value - 1 WHERE (txid, "index") = '
                      '(SELECT txid, "index" FROM tx_output WHERE spent_by_txid IS NULL '
                      'ORDER BY txid, "index" LIMIT 1) RETURNING 1')
        assert snapshot(pg_dsn) == incremental

        # 4c. a membership epoch after genesis (a governance change): the stored row
        # carries no schedule, so the log is replayed (as node snapshots, 0101)
        query(pg_dsn, "INSERT INTO membership SELECT start_height + 1000, sequence + 1, "
                      "change_id, 'remove', member_id, carried_height, txid, members, "
                      "signers, quorum, block_interval_ms, block_bytes_max, block_txs_max, "
                      "proposer_timeout_ms FROM membership RETURNING 1")
        governed = await projector().run()
        assert governed.resumed_from_height is None and governed.replayed_blocks == len(chain)
        assert (governed.resume_refused or "").startswith("resume-governance"), governed
        query(pg_dsn, "DELETE FROM membership WHERE sequence = 1 RETURNING 1")
        assert snapshot(pg_dsn) == incremental

        # 5. rebuilt from offset 0 in one go: identical tables
        rebuilder = projector(batch_blocks_max=50)
        await rebuilder.reset()
        assert query(pg_dsn, "SELECT count(*) FROM block") == [(0,)]
        rebuilt = await rebuilder.run()
        assert (rebuilt.height, rebuilt.state_hash) == (second.height, second.state_hash)
        assert rebuilt.resumed_from_height is None  # --rebuild replays from offset 0
        assert rebuilt.blocks_records_read == len(items)
        assert snapshot(pg_dsn) == incremental

        # 6. a database holding another chain is refused, not mixed
        other = Projector(synthetic_genesis(unique_id + "x", lanes)[0],
                          bootstrap=kafka_bootstrap, dsn=pg_dsn, topic_prefix=prefix,
                          consumer="other")
        with pytest.raises(ProjectionError) as caught:
            await other.run()
        assert caught.value.code in {"projection-inconsistent", "projection-conflict"}

        # 7. following: blocks published later are projected as they arrive
        stop = asyncio.Event()
        follower = asyncio.create_task(projector().run(follow=True, stop=stop))
        try:
            writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer-2")
            await writer.start()
            try:
                for block, qc in later:
                    await writer.send_many(prefix + BLOCKS.name, [
                        (None, committed_payload(block, qc, c)) for c in COMMITTERS])
            finally:
                await writer.stop()
            await wait_until(
                lambda: query(pg_dsn, "SELECT max(height) FROM block") == [(len(full_chain),)],
                timeout_s=30, what="the later blocks projected while following")
        finally:
            stop.set()
            followed = await asyncio.wait_for(follower, 30)
        assert followed.height == len(full_chain) and followed.blocks == len(later)
        assert query(pg_dsn, "SELECT count(*) FROM tx") == [
            (sum(len(block.txs) for block, _ in full_chain) + 1,)]
        _, state_hash = ledger_balances(genesis, [block for block, _ in full_chain])
        assert followed.state_hash == display_hex(state_hash)
        final = snapshot(pg_dsn)
        rebuilder = projector()
        await rebuilder.reset()
        await rebuilder.run()
        assert snapshot(pg_dsn) == final

        # 8. another writer moves the tracking row under a running projector: its next
        # transaction is refused and rolled back, nothing is written twice
        running = projector()
        task = asyncio.create_task(running.run(follow=True))
        try:
            await wait_until(lambda: running.stats.resumed_from_height == len(full_chain),
                             timeout_s=30, what="the running projector resumed its state")
            query(pg_dsn, 'UPDATE projection_offset SET "offset" = "offset" + 1 '
                          "WHERE topic = %s RETURNING 1", (prefix + REJECTED.name,))
            tampered = snapshot(pg_dsn)
            writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer-3")
            await writer.start()
            try:
                await writer.send(prefix + BLOCKS.name, committed_payload(*last, "koscom"))
            finally:
                await writer.stop()
            with pytest.raises(ProjectionError) as refused:
                await asyncio.wait_for(task, 30)
            assert refused.value.code == "projection-concurrent"
            assert snapshot(pg_dsn) == tampered
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_projection_throughput(kafka_bootstrap: str, unique_id: str, pg_dsn: str) -> None:
    """Projection speed: blocks of 1-in-2-out P2PKH payments, each height published by
    three committers, written to PostgreSQL with COPY; prints wall tx/s and the CPU
    seconds per 1,000 tx of the projector and of its PostgreSQL backend."""
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, PERF_TXS_PER_BLOCK)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, PERF_BLOCKS)))
    chain = certified_blocks(
        genesis, keys,
        [txs[i:i + PERF_TXS_PER_BLOCK] for i in range(0, len(txs), PERF_TXS_PER_BLOCK)],
        time_ms=TIME_MS)
    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer")
        await writer.start()
        try:
            await publish_votes(writer, prefix, chain)
            for block, qc in chain:
                # keyed by height as the nodes key them (the projector reads the height
                # from the key; an unkeyed record is decoded once more for it)
                await writer.send_many(prefix + BLOCKS.name, [
                    (str(block.height).encode(), committed_payload(block, qc, committer))
                    for committer in COMMITTERS])
        finally:
            await writer.stop()
        projector = Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                              topic_prefix=prefix)
        projector.writes_on_thread = WRITES_ON_THREAD
        profile = cProfile.Profile() if PROFILE_OUT else None
        server_cpu: list[float] = []  # the PostgreSQL backend's CPU seconds after each commit
        commits: list[tuple[float, float, int]] = []  # (monotonic, process CPU, txs) each

        def on_batch(stats: Any) -> None:
            server_cpu.append(process_cpu_s(stats.database_backend_pid))
            commits.append((time.monotonic(), time.process_time(), stats.txs))

        started, cpu_started = time.monotonic(), time.process_time()
        if profile is not None:
            profile.enable()
        stats = await projector.run(on_batch=on_batch)
        if profile is not None:
            profile.disable()
            profile.dump_stats(PROFILE_OUT)
        elapsed, cpu_s = time.monotonic() - started, time.process_time() - cpu_started
        # start-up with nothing new: from the stored state, then by a replay of the log
        resumed, resumed_cpu_s = await timed_start(projector_for(genesis, kafka_bootstrap,
                                                                 pg_dsn, prefix))
        query(pg_dsn, "DELETE FROM projection_state RETURNING 1")
        replayed, replayed_cpu_s = await timed_start(projector_for(genesis, kafka_bootstrap,
                                                                   pg_dsn, prefix))
    rate = len(txs) / elapsed
    per_k = 1000 / len(txs)
    print(f"projected {len(txs)} txs in {len(chain)} blocks ({3 * len(chain)} records) in "
          f"{elapsed:.2f} s: {rate:.0f} tx/s, {stats.batches} transactions; CPU s per 1,000 "
          f"tx: projector {cpu_s * per_k:.3f}, its PostgreSQL backend "
          f"{server_cpu[-1] * per_k:.3f} (load average {os.getloadavg()[0]:.1f}); "
          f"start-up {stats.startup_s:.2f} s; waited on writes {stats.write_wait_s:.2f} s, "
          f"on reads {stats.read_wait_s:.2f} s, on end offsets {stats.end_offset_wait_s:.2f} s")
    print_steady_rate(commits, server_cpu, started, elapsed, stats)
    (unspent,) = query(pg_dsn, "SELECT count(*) FROM tx_output WHERE spent_by_txid IS NULL")[0]
    print(f"restart with nothing new ({unspent} unspent outputs): resumed in "
          f"{resumed.startup_s:.3f} s "
          f"({resumed_cpu_s:.3f} CPU s, {resumed.blocks_records_read} block records); "
          f"replayed in {replayed.startup_s:.3f} s ({replayed_cpu_s:.3f} CPU s, "
          f"{replayed.blocks_records_read} block records)")
    assert resumed.resumed_from_height == len(chain) and resumed.blocks_records_read == 1
    # the votes were all in the log before the run: their end is asked at the start only
    # (asked per height, each question waited behind a long-polling fetch; 0095)
    assert stats.votes_end_asks <= 2, stats.votes_end_asks
    assert replayed.replayed_blocks == len(chain)
    assert stats.txs == len(txs) and stats.height == len(chain)
    assert query(pg_dsn, "SELECT count(*) FROM tx_output WHERE spent_by_txid IS NOT NULL") == [
        (len(txs),)]
    # CPU, not wall time: on a shared machine the wall clock measures the others
    assert cpu_s * per_k <= PERF_CPU_S_PER_1000_TX_MAX, f"{cpu_s * per_k:.3f} CPU s per 1,000 tx"


def print_steady_rate(commits: list[tuple[float, float, int]], server_cpu: list[float],
                      started: float, elapsed: float, stats: Any) -> None:
    """The rate between the first and the last commit (start-up, the first batch's
    follow and the stop excluded) and where the projector's CPU went (0096)."""
    if len(commits) < 2:
        return
    (t0, cpu0, txs0), (t1, cpu1, txs1) = commits[0], commits[-1]
    steady_txs = txs1 - txs0
    per_k = 1000 / max(steady_txs, 1)
    print(f"first commit at {t0 - started:.2f} s ({txs0} txs), last at {t1 - started:.2f} s, "
          f"run returned at {elapsed:.2f} s; steady {steady_txs / (t1 - t0):.0f} tx/s "
          f"({steady_txs} txs), CPU s per 1,000 tx in it: projector {(cpu1 - cpu0) * per_k:.3f}, "
          f"backend {(server_cpu[-1] - server_cpu[0]) * per_k:.3f}")
    follow_s, write_s = getattr(stats, "follow_cpu_s", 0.0), getattr(stats, "write_cpu_s", 0.0)
    loop_s = getattr(stats, "loop_cpu_s", 0.0)
    per_tx = 1e6 / max(stats.txs, 1)
    print(f"thread CPU per tx: projection loop {loop_s * per_tx:.1f} µs (following "
          f"{follow_s * per_tx:.1f}), writer thread {write_s * per_tx:.1f} µs")


def projector_for(genesis: Genesis, bootstrap: str, dsn: str, prefix: str) -> Projector:
    return Projector(genesis, bootstrap=bootstrap, dsn=dsn, topic_prefix=prefix)


async def timed_start(projector: Projector) -> tuple[Any, float]:
    """A run with nothing new to project, and its CPU seconds."""
    cpu_started = time.process_time()
    stats = await projector.run()
    assert stats.blocks == 0
    return stats, time.process_time() - cpu_started


# --------------------------------------------------------------------------- real nodes


def _asset_flow(genesis: Genesis, lanes: Lanes, lane: int, issuer: PrivateKey,
                seed: str) -> tuple[list[Transaction], str, dict[str, bytes]]:
    """Lane ``lane`` funds the issuer; it issues a bond to Alice, who pays Bob part."""
    alice = PrivateKey(hashlib.sha256(f"{seed}/alice".encode()).digest())
    bob = PrivateKey(hashlib.sha256(f"{seed}/bob".encode()).digest())
    alice_spk, bob_spk = (p2pkh_script(k.public_key.hash160) for k in (alice, bob))
    issuer_spk = p2pkh_script(issuer.public_key.hash160)
    allocation = genesis_allocation_tx(genesis.hash_le, genesis.allocations)
    funding = sign_p2pkh_payment(lanes.keys()[lane], OutPoint(allocation.hash_le, lane),
                                 LANE_VALUE, issuer_spk, 5_000)
    issuer_store = KeyStore().with_key(issuer)
    bond = AssetDefinition("KR6000001234", "Bond A", "bond", "securities-a", "KRW",
                           maturity="2030-01-31", coupon_bp=350)
    issuance = (Wallet.from_utxos(issuer_store, [(OutPoint(funding.hash_le, 1),
                                                  UtxoEntry(5_000, issuer_spk, None, 0, 1))])
                .issue(1_000, alice_spk, issuer_script=issuer_spk, definition=bond)
                .add_signatures(issuer_store).finalize())
    bond_id = asset_id(issuer_spk)
    alice_store = KeyStore().with_key(alice)
    transfer = (Wallet.from_utxos(alice_store, [(OutPoint(issuance.hash_le, 0),
                                                 UtxoEntry(0, alice_spk, bond_id, 1_000, 2))])
                .pay(bond_id, 400, bob_spk).add_signatures(alice_store).finalize())
    return [funding, issuance, transfer], bond_id, {"alice": alice_spk, "bob": bob_spk}


async def test_projection_of_a_real_chain(kafka_bootstrap: str, unique_id: str, pg_dsn: str,
                                          tmp_path: Path) -> None:
    from ledger.address import script_to_address

    lane_count = 5
    asset_lane = lane_count  # one lane more than the payment lanes: it funds the issuer
    async with running_chain(tmp_path, unique_id, kafka_bootstrap,
                             lane_count=lane_count + 1) as run:
        issuer = run.key("securities-a")
        asset_txs, bond_id, holders = _asset_flow(run.genesis, run.lanes, asset_lane, issuer,
                                                  unique_id)
        first = run.next_batch(3, lanes=range(lane_count)) + asset_txs
        await run.submit(first)
        await run.wait_committed([tx.txid for tx in first], timeout_s=60)
        allocation = genesis_allocation_tx(run.genesis.hash_le, run.genesis.allocations)
        double_spend = sign_p2pkh_payment(run.lanes.keys()[0], OutPoint(allocation.hash_le, 0),
                                          LANE_VALUE, sink_script(run.lanes.seed), 2)
        second = run.next_batch(2, lanes=range(lane_count))
        await run.submit([double_spend, *second])
        await run.wait_committed([tx.txid for tx in second], timeout_s=60)
        outcome = (await run.client.wait([double_spend.txid], timeout_s=30))[double_spend.txid]
        assert not outcome.committed
        head = await run.wait_agreement(INSTITUTION_IDS, timeout_s=30)
        beats = dict(run.status.latest)
        run.cluster.stop()  # the rest only reads the logs: free the CPU

        blocks = [run.blocks.block_at(h) for h in range(1, head + 1)]
        projector = Projector(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                              topic_prefix=run.prefix)
        stats = await projector.run()
        assert (stats.height, stats.head_hash) == (head, blocks[-1].hash_hex)
        # every node published its copies: all certified, the later ones identical
        assert stats.copies.invalid == 0 and stats.copies.duplicates >= head

        # row counts equal the chain (genesis allocation at height 0)
        chain_txs = [tx for block in blocks for tx in block.txs]
        assert query(pg_dsn, "SELECT count(*) FROM block") == [(head + 1,)]
        assert query(pg_dsn, "SELECT count(*) FROM tx") == [(len(chain_txs) + 1,)]
        assert query(pg_dsn, "SELECT count(*) FROM tx_output") == [
            (sum(len(tx.outputs) for tx in chain_txs) + len(run.genesis.allocations),)]
        assert query(pg_dsn, "SELECT height, hash FROM block WHERE height > 0 ORDER BY height") \
            == [(b.height, b.hash_hex) for b in blocks]
        assert query(pg_dsn, "SELECT count(*) FROM tx_output WHERE spent_by_txid IS NOT NULL") \
            == [(sum(len(tx.inputs) for tx in chain_txs),)]

        # balances by address via SQL equal the ledger's
        expected, state_hash = ledger_balances(run.genesis, blocks)
        assert sql_balances(pg_dsn) == expected
        bob, alice = (str(script_to_address(holders[name])) for name in ("bob", "alice"))
        assert (expected[(bob, bond_id)], expected[(alice, bond_id)]) == (400, 600)
        assert query(pg_dsn, "SELECT issued_asset_id, issued_quantity FROM tx "
                             "WHERE issued_asset_id IS NOT NULL") == [(bond_id, 1_000)]

        # the projector's state hash is the nodes' (heartbeats at the head)
        assert stats.state_hash == display_hex(state_hash)
        for institution, beat in beats.items():
            assert beat.height == head, institution
            assert display_hex(beat.state_hash) == stats.state_hash, institution

        # surveillance queries
        transferred = {(address, asset): (int(received), txs)
                       for address, asset, received, txs in query(pg_dsn,
                                                                  TRANSFERRED_PER_ADDRESS)}
        assert transferred[(bob, bond_id)] == (400, 1)
        by_code = {code: (submissions, records, seen_by)
                   for code, submissions, records, seen_by in query(pg_dsn, REJECTED_BY_CODE)}
        assert outcome.code in by_code, by_code
        assert set(by_code[outcome.code][2]) <= set(INSTITUTION_IDS)
        assert query(pg_dsn, "SELECT DISTINCT code FROM tx_rejection WHERE txid = %s",
                     (double_spend.txid,)) == [(outcome.code,)]

        # a second --once adds nothing
        before = snapshot(pg_dsn)
        again = await Projector(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                topic_prefix=run.prefix).run()
        assert (again.blocks, again.rejections) == (0, 0)
        assert snapshot(pg_dsn) == before

        # the CLI's audit replay: rebuilt tables identical, heartbeats agree; run as the
        # projector's own role (rows only, no DDL: revision 0007)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streams", "project", "--genesis", str(run.chain_dir),
            "--topic-prefix", run.prefix, "--dsn", pg_dsn, "--rebuild", "--check-heartbeats",
            "--quiet", "--as-projector-role", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
        text = out.decode()
        assert process.returncode == 0, text + err.decode()
        assert f"height {head}\n" in text and f"state hash {stats.state_hash}" in text
        assert text.count(" agrees") == len(INSTITUTION_IDS), text
        assert snapshot(pg_dsn) == before


async def test_the_projector_quarantines_what_it_cannot_project_and_goes_on(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str,
) -> None:
    """A certified losing block 1 (not what the votes log decided), a rejection record
    with a NUL byte, a gap (height 3 before height 2) and block times no timestamp
    holds: the projection goes on, the two records it cannot project are in
    projection_quarantine with their codes, the gap is projected once filled, and a
    restart or a rebuild agrees."""
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, 4)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 3)))
    far_future_ms = 2**64 - 100  # u64 in the header; no datetime holds it
    chain = certified_blocks(genesis, keys, [txs[i:i + 3] for i in range(0, 12, 3)],
                             time_ms=far_future_ms)
    fork = certified_blocks(genesis, keys, [txs[:2]], time_ms=TIME_MS)[0]
    (b1, q1), (b2, q2), (b3, q3), (b4, q4) = chain
    blocks_log = [committed_payload(b1, q1, "koscom"), committed_payload(*fork, "koscom"),
                  committed_payload(b3, q3, "koscom"), committed_payload(b2, q2, "koscom"),
                  committed_payload(b4, q4, "koscom")]
    good_rejection = rejection_payload(1, "koscom", prefix)
    nul = codec.decode(rejection_payload(2, "koscom", prefix), expected="TxRejected").record
    nul_rejection = codec.encode("TxRejected", {**nul, "submitter": "securities\x00a"})
    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer")
        await writer.start()
        try:
            await publish_votes(writer, prefix, chain)  # the fork is certified, not decided
            await writer.send_many(prefix + BLOCKS.name, [(None, p) for p in blocks_log])
            await writer.send_many(prefix + REJECTED.name,
                                   [(None, good_rejection), (None, nul_rejection)])
        finally:
            await writer.stop()

        def projector() -> Projector:
            return Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                             topic_prefix=prefix, batch_blocks_max=2)

        stats = await projector().run()
        assert stats.height == 4 and stats.quarantined == 2, stats
        assert stats.copies.times_clamped == 4 and stats.copies.ahead == 1
        assert query(pg_dsn, "SELECT topic, \"offset\", reason_code FROM projection_quarantine "
                             "ORDER BY topic, \"offset\"") == sorted([
            (prefix + BLOCKS.name, 1, "block-not-decided"),
            (prefix + REJECTED.name, 1, "record-text"),
        ])
        assert query(pg_dsn, "SELECT count(*) FROM tx_rejection") == [(1,)]
        assert query(pg_dsn, "SELECT max(time_at) FROM block")[0][0].year == 9999
        projected = snapshot(pg_dsn)
        again = await projector().run()  # the restart replays the same records
        assert (again.blocks, again.quarantined, again.height) == (0, 0, 4)
        rebuilder = projector()
        await rebuilder.reset()
        rebuilt = await rebuilder.run()
        assert rebuilt.quarantined == 2 and snapshot(pg_dsn) == projected

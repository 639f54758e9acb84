"""The projector's exactly-once under failure, against real Kafka and PostgreSQL.

- ``capledger project --follow`` (a real process) killed with SIGKILL while a batch is
  being written, then restarted: the tables hold no duplicate and no gap, and equal a
  rebuild from offset 0.
- PostgreSQL unavailable while blocks keep arriving (the test database made to refuse
  connections and its sessions terminated; the shared server keeps running): the
  following projector retries, then catches up with counts equal to the chain and
  tables equal to a rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ledger.block import Block, QuorumCertificate
from ledger.hashing import display_hex
from ledger.membership import Genesis
from streams.common.genesis_files import genesis_json
from streams.kafka.logio import LogWriter
from streams.kafka.topics import BLOCKS
from streams.projections.metrics import projection_lag
from streams.projections.projector import CONSUMER_DEFAULT, Projector
from streams.projections.runner import run_projection
from streams.tools.loadgen import Lanes, certified_blocks, interleave, lane_chains
from tests.integration.cluster_fixtures import wait_until
from tests.integration.test_projector import (
    COMMITTERS,
    TIME_MS,
    chain_topics,
    committed_payload,
    ledger_balances,
    publish_votes,
    query,
    snapshot,
    synthetic_genesis,
)

pytestmark = pytest.mark.integration

LANES = 40  # transactions per block
KILL_BLOCKS = 60
OUTAGE_BLOCKS = 40
WAIT_S = 120.0
SUBPROCESS_TIMEOUT_S = 120.0
KILL_POLL_S = 0.002


def make_chain(seed: str, blocks: int) -> tuple[Genesis, list[tuple[Block, QuorumCertificate]]]:
    lanes = Lanes(seed, LANES)
    genesis, keys = synthetic_genesis(seed, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, blocks)))
    return genesis, certified_blocks(genesis, keys,
                                     [txs[i:i + LANES] for i in range(0, len(txs), LANES)],
                                     time_ms=TIME_MS)


async def publish(bootstrap: str, prefix: str, client_id: str,
                  chain: list[tuple[Block, QuorumCertificate]], *, votes: bool) -> None:
    writer = LogWriter(bootstrap, client_id=client_id)
    await writer.start()
    try:
        if votes:
            await publish_votes(writer, prefix, chain)
        for block, qc in chain:
            await writer.send_many(prefix + BLOCKS.name, [
                (None, committed_payload(block, qc, committer)) for committer in COMMITTERS])
    finally:
        await writer.stop()


def assert_equals_chain(dsn: str, genesis: Genesis,
                        chain: list[tuple[Block, QuorumCertificate]]) -> None:
    """Counts equal the chain (no gap), one row per key (no duplicate: the rows'
    heights and positions are exactly the chain's), spends complete."""
    blocks = [block for block, _ in chain]
    txs = [tx for block in blocks for tx in block.txs]
    assert query(dsn, "SELECT height, hash FROM block WHERE height > 0 ORDER BY height") == [
        (block.height, block.hash_hex) for block in blocks]
    assert query(dsn, "SELECT count(*), count(DISTINCT (height, position)) FROM tx") == [
        (len(txs) + 1, len(txs) + 1)]
    assert query(dsn, "SELECT txid FROM tx WHERE height > 0 ORDER BY height, position") == [
        (tx.txid,) for tx in txs]
    assert query(dsn, "SELECT count(*) FROM tx_output") == [
        (sum(len(tx.outputs) for tx in txs) + len(genesis.allocations),)]
    assert query(dsn, "SELECT count(*) FROM tx_output WHERE spent_by_txid IS NOT NULL") == [
        (sum(len(tx.inputs) for tx in txs),)]
    # no orphan: every output and every spend names a projected transaction
    assert query(dsn, "SELECT count(*) FROM tx_output o LEFT JOIN tx t ON t.txid = o.txid "
                      "WHERE t.txid IS NULL") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM tx_output o LEFT JOIN tx t "
                      "ON t.txid = o.spent_by_txid "
                      "WHERE o.spent_by_txid IS NOT NULL AND t.txid IS NULL") == [(0,)]
    _, state_hash = ledger_balances(genesis, blocks)
    assert query(dsn, "SELECT state_hash FROM block ORDER BY height DESC LIMIT 1") == [
        (display_hex(state_hash),)]


async def assert_equals_rebuild(dsn: str, make: Projector) -> None:
    before = snapshot(dsn)
    await make.reset()
    await make.run()
    assert snapshot(dsn) == before


async def wait_writing(dsn: str, blocks_min: int, timeout_s: float) -> None:
    """Until the block table holds more than ``blocks_min`` rows and another session of
    the test database is inside a transaction (the projector writing its next batch)."""
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM block), (SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() AND xact_start IS NOT NULL)",
                (database,)).fetchone()
            if row is not None and row[0] > blocks_min and row[1] > 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch being written within {timeout_s} s")
            await asyncio.sleep(KILL_POLL_S)


@pytest.mark.cluster
async def test_projector_killed_mid_batch_restarts_without_duplicate_or_gap(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, tmp_path: Path
) -> None:
    prefix = f"{unique_id}."
    genesis, chain = make_chain(unique_id, KILL_BLOCKS)
    genesis_file = tmp_path / "genesis.json"
    genesis_file.write_text(genesis_json(genesis))
    command = [sys.executable, "-m", "streams", "project", "--genesis", str(genesis_file),
               "--topic-prefix", prefix, "--dsn", pg_dsn, "--batch-blocks", "2", "--quiet"]
    async with chain_topics(kafka_bootstrap, prefix):
        await publish(kafka_bootstrap, prefix, f"{unique_id}-writer", chain, votes=True)
        process = await asyncio.create_subprocess_exec(
            *command, "--follow", stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            # killed once a few batches are in and a transaction of the next is open
            await wait_writing(pg_dsn, 6, WAIT_S)
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), SUBPROCESS_TIMEOUT_S)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == -signal.SIGKILL
        # what the killed process committed is whole: the stored offset's rows, no more
        (height,) = query(pg_dsn, "SELECT max(height) FROM block")[0]
        assert 0 < height < len(chain), height
        assert_equals_chain(pg_dsn, genesis, chain[:height])

        restarted = await asyncio.create_subprocess_exec(
            *command, "--once", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(restarted.communicate(), SUBPROCESS_TIMEOUT_S)
        assert restarted.returncode == 0, out.decode() + err.decode()
        # started from the state committed with the rows, not from the log's offset 0
        assert f"start: resumed from the stored state at height {height} " in out.decode(), (
            out.decode())
        assert_equals_chain(pg_dsn, genesis, chain)
        await assert_equals_rebuild(pg_dsn, Projector(
            genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn, topic_prefix=prefix,
            batch_blocks_max=50))


@contextlib.contextmanager
def database_refusing_connections(dsn: str, admin_dsn: str):  # type: ignore[no-untyped-def]
    """The database refuses new connections and its sessions are terminated (the
    server itself, shared with other tests, keeps running); allowed again on exit."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false")
                     .format(sql.Identifier(name)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    try:
        yield
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true")
                         .format(sql.Identifier(name)))


@pytest.mark.cluster
async def test_postgresql_unavailable_under_load_then_catches_up(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, stack_settings: Any
) -> None:
    prefix = f"{unique_id}."
    genesis, chain = make_chain(unique_id, 2 * OUTAGE_BLOCKS)
    first, rest = chain[:OUTAGE_BLOCKS], chain[OUTAGE_BLOCKS:]
    admin_dsn = str(stack_settings.pg_dsn)  # the server's own database, not the test's
    retries: list[str] = []
    stop = asyncio.Event()

    def make() -> Projector:
        return Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn, topic_prefix=prefix,
                         batch_blocks_max=5, batch_interval_ms=100)

    def max_height() -> int:
        with contextlib.suppress(psycopg.OperationalError):
            return int(query(pg_dsn, "SELECT coalesce(max(height), 0) FROM block")[0][0])
        return -1

    async with chain_topics(kafka_bootstrap, prefix):
        await publish(kafka_bootstrap, prefix, f"{unique_id}-writer", first, votes=True)
        before = await projection_lag(bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                      topic_prefix=prefix, consumer=CONSUMER_DEFAULT)
        assert "no projection" in before.problem, before
        running = asyncio.create_task(run_projection(make, follow=True, rebuild=False,
                                                     on_retry=retries.append, stop=stop))
        try:
            await wait_until(lambda: max_height() == len(first), timeout_s=WAIT_S,
                             what="the first blocks projected")
            with database_refusing_connections(pg_dsn, admin_dsn):
                # blocks keep arriving while the database is away
                await publish(kafka_bootstrap, prefix, f"{unique_id}-writer-2", rest,
                              votes=True)
                await wait_until(lambda: len(retries) >= 2, timeout_s=WAIT_S,
                                 what="the projector retrying while PostgreSQL is away")
                assert not running.done()
            await wait_until(lambda: max_height() == len(chain), timeout_s=WAIT_S,
                             what="the projection caught up after the outage")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), WAIT_S)
        lag = await projection_lag(bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                   topic_prefix=prefix, consumer=CONSUMER_DEFAULT)
        assert (lag.height, lag.lag_records, lag.problem) == (len(chain), 0, ""), lag
        assert lag.blocks_offset == 3 * len(chain)  # three copies of each height
    # the lost sessions and the refused connections were both waited out
    assert any("AdminShutdown" in line for line in retries), retries
    assert any("not currently accepting connections" in line for line in retries), retries
    assert_equals_chain(pg_dsn, genesis, chain)


def _foreign_keys(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT conname FROM pg_constraint WHERE contype = 'f' "
                      "AND conrelid::regclass::text IN ('block', 'tx', 'tx_output')")
    return {str(name) for (name,) in rows}


def test_migration_0011_upgrade_downgrade_upgrade(pg_dsn: str) -> None:
    """Revision 0011 drops the three per-row foreign keys; its downgrade restores them."""
    from streams.tools.devstack import postgres

    assert _foreign_keys(pg_dsn) == set()
    postgres.migrate(pg_dsn, "0009", downgrade=True)
    assert _foreign_keys(pg_dsn) == {"tx_height_fkey", "tx_output_txid_fkey",
                                     "tx_output_spent_by_txid_fkey"}
    postgres.migrate(pg_dsn)
    assert _foreign_keys(pg_dsn) == set()

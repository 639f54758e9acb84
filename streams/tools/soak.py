"""The capacity soak (issue 9, the seed's capacity test): five real node processes on
the shared broker, the load generator of ``streams.tools.bench`` open-loop at a fixed
rate for many minutes, then per-minute figures and the disk cost of history.

Owns: ``run_soak`` -> ``SoakReport``: per minute of load the committed count and the
commit latency percentiles (from each transaction's scheduled send time, as the bench
measures), each node's RSS per minute (max of the samples), lost transactions, and
bytes per committed transaction of one node's chain copy, of the broker's partition
directories for this chain's topics, of its state snapshots and — with a database — of
the PostgreSQL projection (projected once after the load; a second, idle run of the
projector measures what it re-reads on start). ``days_of_history`` turns those into
days this disk holds at the soak's rate. Command: ``capledger bench soak --minutes 30``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from ledger.membership import INSTITUTION_IDS
from streams.client.ledger_client import LedgerClient
from streams.common import config
from streams.kafka.topics import TX, ensure_topics, replication_factor_from_env
from streams.node.snapshots import snapshot_dir
from streams.projections.projector import PROJECTED_TABLES, Projector
from streams.tools import bench
from streams.tools.cluster import LocalCluster
from streams.tools.devstack.kafka import broker_nodes
from streams.tools.senders import open_sender

MINUTE_S = 60.0
DAY_S = 86_400.0
CHAIN_COPY_NODE = INSTITUTION_IDS[0]
DRAIN_TIMEOUT_S = 120.0
SOAK_SNAPSHOT_EVERY = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class SoakOptions:
    bootstrap: str
    minutes: float
    rate: float = 1_000.0
    lanes: int = bench.LANES_DEFAULT
    dsn: str | None = None  # an empty, migrated database for the projection (None: skip)
    work_dir: Path | None = None
    keep: bool = False
    batch: int = 1  # transactions per tx-log record (TxBatchSubmitted when > 1, decision 0112)


@dataclasses.dataclass(frozen=True, slots=True)
class SoakReport:
    rate: float
    minutes: float
    submitted: int
    committed: int
    rejected: int
    undecided: int  # no outcome when the drain ended (still in the tx log, not lost)
    per_minute: list[dict[str, Any]]
    disk: dict[str, Any]
    projection: dict[str, Any]
    nodes_cpu_us_per_tx: float


def run_soak(options: SoakOptions, progress: Callable[[str], None]) -> SoakReport:
    assert 0 < options.minutes * MINUTE_S <= bench.DURATION_S_MAX * 24
    return asyncio.run(_run_soak(options, progress))


async def _run_soak(options: SoakOptions, progress: Callable[[str], None]) -> SoakReport:
    tag = f"s{uuid.uuid4().hex[:8]}"
    base = options.work_dir or Path(tempfile.mkdtemp(prefix=f"capledger-soak-{tag}-"))
    base.mkdir(parents=True, exist_ok=True)
    prefix = f"bench.{tag}."
    step = bench.StepOptions(bootstrap=options.bootstrap, duration_s=options.minutes * MINUTE_S,
                             lanes=options.lanes, drain_timeout_s=DRAIN_TIMEOUT_S,
                             batch=options.batch)
    load = bench._prepare_load(options.rate, step, base, tag, progress)
    cluster = LocalCluster(base / "chain", state_dir=base / "state", topic_prefix=prefix,
                           log_level="warning")
    client = LedgerClient(options.bootstrap, load.genesis, submitter=bench.SUBMITTER,
                          signing_key=load.submit_key, topic_prefix=prefix)
    producer = open_sender("librdkafka", options.bootstrap, client_id=f"capledger-soak-{tag}")
    try:
        await ensure_topics(options.bootstrap, prefix=prefix)
        with _snapshot_every(SOAK_SNAPSHOT_EVERY):
            cluster.start()
        await cluster.wait_ready(options.bootstrap, timeout_s=bench.READY_TIMEOUT_S)
        await client.start(watch_from_start=True)
        await producer.start()
        sampler = bench.ProcessSampler({n: p.pid for n, p in cluster.nodes.items()
                                        if p.pid is not None})
        cpu_window = bench._CpuWindow.open(sampler)
        progress(f"soak: {options.rate:g} tx/s for {options.minutes:g} min on five nodes"
                 + (f", {options.batch} transactions per record" if options.batch > 1 else ""))
        window = await bench._send_and_drain(producer, client, prefix + TX.name, load,
                                             options.rate, tag, DRAIN_TIMEOUT_S, progress)
        cpu_s, _others = cpu_window.close()
        cluster.stop()
        return await _report(options, load, client, sampler, window, cpu_s, base, prefix,
                             progress)
    finally:
        await client.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        cluster.stop()
        if not options.keep:
            with contextlib.suppress(Exception):
                await bench.delete_topics(options.bootstrap, prefix)
            if options.work_dir is None:
                shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _snapshot_every(heights: int) -> Iterator[None]:
    """The node processes started inside take ``--snapshot-every`` from the environment."""
    before = os.environ.get("CAPLEDGER_SNAPSHOT_EVERY")
    os.environ["CAPLEDGER_SNAPSHOT_EVERY"] = str(heights)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CAPLEDGER_SNAPSHOT_EVERY"]
        else:
            os.environ["CAPLEDGER_SNAPSHOT_EVERY"] = before


async def _report(options: SoakOptions, load: Any, client: LedgerClient,
                  sampler: bench.ProcessSampler, window: Any, cpu_s: dict[str, float],
                  base: Path, prefix: str, progress: Callable[[str], None]) -> SoakReport:
    committed = rejected = 0
    minutes: dict[int, list[float]] = {}
    started_ms = window.started_wall_s * 1000
    for index, txid in enumerate(load.txids):
        outcome = client.outcome(txid)
        if outcome is None:
            continue
        if not outcome.committed:
            rejected += 1
            continue
        committed += 1
        scheduled_ms = started_ms + index * 1000 / options.rate
        minute = int(index / options.rate // MINUTE_S)
        minutes.setdefault(minute, []).append(max(0.0, outcome.decided_at_ms - scheduled_ms))
    per_minute = [_minute_row(minute, sorted(latencies), sampler, window.started_wall_s)
                  for minute, latencies in sorted(minutes.items())]
    disk = _disk_figures(base, prefix, committed, len(load.txids))
    projection = await _projection_figures(options, load.genesis, prefix, committed, progress)
    return SoakReport(
        rate=options.rate, minutes=options.minutes, submitted=len(load.txids),
        committed=committed, rejected=rejected,
        undecided=len(load.txids) - committed - rejected,
        per_minute=per_minute, disk=disk, projection=projection,
        nodes_cpu_us_per_tx=round(sum(cpu_s.values()) / max(1, committed) * 1e6 / 5, 1))


def _minute_row(minute: int, latencies: list[float], sampler: bench.ProcessSampler,
                started_wall_s: float) -> dict[str, Any]:
    start = started_wall_s + minute * MINUTE_S
    rss = {name: max(sampler.rss_between(name, start, start + MINUTE_S), default=0)
           for name in sampler.rss}
    return {
        "minute": minute + 1,
        "committed": len(latencies),
        "p50_ms": round(bench.percentile(latencies, 0.50), 1),
        "p95_ms": round(bench.percentile(latencies, 0.95), 1),
        "p99_ms": round(bench.percentile(latencies, 0.99), 1),
        "max_ms": round(latencies[-1], 1) if latencies else 0.0,
        "rss_mb": {name: round(value / bench.MIB, 1) for name, value in rss.items()},
    }


def _tree_bytes(path: Path, suffix: str = "") -> int:
    """Bytes of the files under ``path`` (ending in ``suffix``). Kafka preallocates its
    sparse index files (10 MiB each): the broker is counted by its ``.log`` segments."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


def _disk_figures(base: Path, prefix: str, committed: int, submitted: int) -> dict[str, Any]:
    """Bytes per committed tx; the tx log's per submitted tx (it holds every one)."""
    node_dir = next((base / "state" / "nodes").glob(f"*/{CHAIN_COPY_NODE}"))
    chain_copy = (node_dir / "chain.dat").stat().st_size
    snapshots = _tree_bytes(snapshot_dir(node_dir))
    topics: dict[str, int] = {}
    # Every local broker's data directory (devstack's layout): their sum holds every replica.
    for kafka_data in (node.directory / "data" for node in broker_nodes(config.load())):
        for partition in kafka_data.glob(f"{prefix}*"):
            topic = partition.name[len(prefix):].rsplit("-", 1)[0]
            topics[topic] = topics.get(topic, 0) + _tree_bytes(partition, ".log")
    per_tx = max(1, committed)
    by_topic = {t: b / (max(1, submitted) if t == TX.name else per_tx)
                for t, b in sorted(topics.items())}
    # Bytes of one copy of the logs: the brokers' sum over the copies each partition
    # has (every local broker holds one when the factor equals the broker count).
    copies = min(config.load().kafka_brokers, replication_factor_from_env())
    topics = {topic: size // copies for topic, size in topics.items()}
    broker = sum(topics.values())
    usage = shutil.disk_usage(base)
    return {
        "chain_copy_bytes": chain_copy,
        "chain_copy_bytes_per_tx": round(chain_copy / per_tx, 1),
        "snapshots_bytes": snapshots,
        "broker_bytes": broker,
        "broker_bytes_per_tx": round(sum(by_topic.values()), 1),
        "broker_bytes_per_tx_by_topic": {t: round(b, 1) for t, b in by_topic.items()},
        "disk_free_bytes": usage.free,
        "disk_total_bytes": usage.total,
    }


async def _projection_figures(options: SoakOptions, genesis: Any, prefix: str,
                              committed: int, progress: Callable[[str], None]) -> dict[str, Any]:
    if options.dsn is None:
        return {}
    before = await _projection_bytes(options.dsn)
    figures: dict[str, Any] = {}
    for run in ("first", "restart"):
        projector = Projector(genesis, bootstrap=options.bootstrap, dsn=options.dsn,
                              topic_prefix=prefix, consumer=f"soak-{prefix}")
        wall, cpu = time.perf_counter(), time.process_time()
        stats = await projector.run(follow=False)
        figures[f"{run}_run_s"] = round(time.perf_counter() - wall, 2)
        figures[f"{run}_run_cpu_s"] = round(time.process_time() - cpu, 2)
        figures[f"{run}_replayed_blocks"] = stats.replayed_blocks
        figures[f"{run}_startup_s"] = round(stats.startup_s, 3)
        figures[f"{run}_startup_block_records"] = stats.startup_block_records
        progress(f"projection {run} run: {figures[f'{run}_run_s']} s")
    grown = await _projection_bytes(options.dsn) - before
    figures["bytes"] = grown
    figures["bytes_per_tx"] = round(grown / max(1, committed), 1)
    return figures


async def _projection_bytes(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.relname = ANY(%s)", (list(PROJECTED_TABLES),))
        row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0


def days_of_history(report: SoakReport, *, nodes_on_disk: int = 5,
                    replication_factor: int = 1) -> dict[str, float]:
    """Days of history the soak's disk holds at the soak's rate: every node's chain copy
    and snapshots on this disk, the broker's bytes times the replication factor, and
    the projection (snapshots are bounded by the UTXO set, not by history). Bytes per
    day per part, and the days."""
    disk = report.disk
    parts = {
        "chain_copies": disk["chain_copy_bytes_per_tx"] * nodes_on_disk,
        "broker": disk["broker_bytes_per_tx"] * replication_factor,
        "projection": report.projection.get("bytes_per_tx", 0.0),
    }
    per_day = {name: value * report.rate * DAY_S for name, value in parts.items()}
    total = sum(per_day.values())
    return {**{f"{k}_gb_per_day": round(v / 1e9, 1) for k, v in per_day.items()},
            "gb_per_day": round(total / 1e9, 1),
            "days_on_free_disk": round(disk["disk_free_bytes"] / total, 2) if total else 0.0,
            "days_on_whole_disk": round(disk["disk_total_bytes"] / total, 2) if total else 0.0}

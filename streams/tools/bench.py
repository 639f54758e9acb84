"""Cluster benchmark: open-loop load against five real node processes, and memory.

Owns:
- ``run_step(rate, ...)`` -> ``StepResult``: one rate step. A new chain (genesis with
  load-generator allocations), five ``capledger node`` OS processes
  (``streams.tools.cluster.LocalCluster``) on a unique topic prefix and a temporary state
  directory, every transaction signed and encoded (Avro) *before* the clock starts, then
  sent at a fixed arrival rate scheduled by absolute time (a batch every
  ``streams.tools.senders.SEND_TICK_S``, through librdkafka or aiokafka; it never
  waits for commits, so slow commits are not hidden), then a bounded drain. Latency
  runs from each transaction's *scheduled* send time to the arrival, at the client,
  of the first ``BlockCommitted`` record
  that contains it (so a sender that falls behind its schedule counts against the
  system, not for it). CPU (psutil ``cpu_times``) and RSS (sampled every
  ``SAMPLE_INTERVAL_S``) of every node process are recorded.
- ``run_sweep(rates, ...)``: steps in increasing rate until one saturates (committed
  tx/s below ``SATURATION_TPS_FRACTION`` of the target, or p99 above a bound).
- ``verify_rate_per_core()``: the bare secp256k1 verification rate of this machine,
  measured in the same run (``streams.tools.bench_core``) before any cluster starts.
- ``measure_utxo_memory(count)``: RSS of a fresh process holding a ``LedgerState`` of
  ``count`` realistic P2PKH unspent outputs (plus the spent-outpoint journal at its cap).
- ``plot_sweep(results, path)``: a PNG of throughput and latency against the target
  rate (needs the optional ``bench`` extra: matplotlib).

Touches: a temporary directory per step (removed unless ``keep``), topics under a
unique prefix (deleted unless ``keep``), the node processes it starts (always stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from ledger.envelope import sign_batch, sign_envelope
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.records import tx_submitted_record
from streams.kafka.topics import TX, admin_client, delete_acls_of, ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.senders import Sender, open_sender

DURATION_S_DEFAULT = 15.0
LATENCY_WINDOW_S = 5.0  # the step's latency tail is also reported per window of this
LANES_DEFAULT = 200
DRAIN_TIMEOUT_S_DEFAULT = 30.0
P99_BOUND_MS_DEFAULT = 2_000.0
SATURATION_TPS_FRACTION = 0.9
ENCODE_LEAD_S = 0.5  # the schedule starts this long after encoding begins, plus
ENCODE_S_PER_TX = 20e-6  # ... this per record (an Avro encode takes ~10 us)
SAMPLE_INTERVAL_S = 0.5  # CPU/RSS sampling period of the node processes
READY_TIMEOUT_S = 120.0  # five node processes starting on two cores take a while
VERIFY_SECONDS = 0.5  # per workload of streams.tools.bench_core (six workloads)
RATE_MAX = 100_000
DURATION_S_MAX = 3_600.0
UTXO_COUNT_DEFAULT = 1_000_000
MIB = 1024 * 1024
PROFILE_DIR_ENV = "CAPLEDGER_PROFILE_DIR"  # read by streams.cli.node
SUBMITTER = "securities-a"

# The fields of one step's JSON object, exactly (issue 4, "Performance").
RECORD_FIELDS = (
    "rate_target", "duration_s", "submitted", "committed", "lost", "committed_tps",
    "latency_ms", "block_interval_ms_median", "block_bytes_median",
    "verify_per_s_per_core", "rss_mb_max", "nodes",
)


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
    """One rate step: ``record()`` is the JSON object of the issue; ``extras`` holds
    what else was measured (rejections, sender lag, broker and load-generator CPU,
    RSS time series) for the raw results file."""

    rate_target: float
    duration_s: float
    submitted: int
    committed: int
    rejected: int
    lost: int
    committed_tps: float
    latency_ms: dict[str, float]
    block_interval_ms_median: float
    block_bytes_median: float
    verify_per_s_per_core: float
    rss_mb_max: float
    nodes: dict[str, dict[str, Any]]
    extras: dict[str, Any]

    def record(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {name: values[name] for name in RECORD_FIELDS}

    def saturated(self, p99_bound_ms: float) -> bool:
        return (self.committed_tps < SATURATION_TPS_FRACTION * self.rate_target
                or self.latency_ms["p99"] > p99_bound_ms)


# ---------------------------------------------------------------- measurements


def verify_rate_per_core(seconds: float = VERIFY_SECONDS) -> dict[str, float]:
    """Bare secp256k1 verification (and full P2PKH validation) per second on one core."""
    from streams.tools.bench_core import bare_verify_cpu_us, bench_validation, varied_verify_cpu_us

    figures = bench_validation(seconds)
    figures["coincurve_verify_cpu_us"] = bare_verify_cpu_us()
    figures["coincurve_verify_varied_cpu_us"] = varied_verify_cpu_us()
    return figures


def add_cpu_per_tx(result: StepResult, verify_cpu_us: float | None,
                   varied_cpu_us: float | None = None) -> None:
    """Each node's CPU µs per committed transaction (median over the nodes) and its
    ratio to the bare verification's CPU measured in the same run (and to the varied
    one's, ``bench_core.varied_verify_cpu_us``), into the extras."""
    if result.committed <= 0 or not result.nodes:
        return
    per_tx = statistics.median(node["cpu_s"] for node in result.nodes.values()) \
        / result.committed * 1e6
    result.extras["node_cpu_us_per_tx"] = round(per_tx, 1)
    if verify_cpu_us:
        result.extras["verify_cpu_us"] = round(verify_cpu_us, 2)
        result.extras["node_cpu_per_tx_over_verify"] = round(per_tx / verify_cpu_us, 2)
    if varied_cpu_us:
        result.extras["verify_varied_cpu_us"] = round(varied_cpu_us, 2)
        result.extras["node_cpu_per_tx_over_varied_verify"] = round(per_tx / varied_cpu_us, 2)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    assert 0.0 <= fraction <= 1.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[rank - 1])


class ProcessSampler:
    """Samples RSS of some processes every ``SAMPLE_INTERVAL_S`` in a thread, and
    snapshots their CPU time (user + system seconds) on demand."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.rss: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for name, process in self.processes.items():
                with contextlib.suppress(psutil.Error):
                    self.rss[name].append((now, process.memory_info().rss))
            self._stop.wait(SAMPLE_INTERVAL_S)

    def cpu_seconds(self) -> dict[str, float]:
        seconds = {}
        for name, process in self.processes.items():
            try:
                times = process.cpu_times()
                seconds[name] = times.user + times.system
            except psutil.Error:
                seconds[name] = math.nan
        return seconds

    def rss_between(self, name: str, start: float, end: float) -> list[int]:
        return [rss for at, rss in self.rss[name] if start <= at <= end]


def _kafka_pid() -> int | None:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if "kafka.Kafka" in cmdline:
            return int(process.pid)
    return None


# ---------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True, slots=True)
class StepOptions:
    bootstrap: str
    duration_s: float = DURATION_S_DEFAULT
    lanes: int = LANES_DEFAULT
    drain_timeout_s: float = DRAIN_TIMEOUT_S_DEFAULT
    keep: bool = False
    work_dir: Path | None = None  # default: a new temporary directory per step
    profile_node: str | None = None  # run this node under cProfile
    profile_dir: Path | None = None  # its stats go to <dir>/<id>.prof (default: step dir)
    log_level: str = "warning"
    producer: str = "librdkafka"  # the load generator's client (streams.tools.senders)
    mix: str = "p2pkh"  # which lanes pay from 2-of-3 multisig (streams.tools.loadgen.MIXES)
    batch: int = 1  # transactions per tx-log record (TxBatchSubmitted when > 1, decision 0112)


def run_step(
    rate: float,
    options: StepOptions,
    *,
    verify_per_s: float,
    progress: Callable[[str], None] = lambda _message: None,
) -> StepResult:
    """One rate step against a fresh five-node cluster; always stops what it starts."""
    assert 0 < rate <= RATE_MAX and 0 < options.duration_s <= DURATION_S_MAX
    assert options.lanes >= 1
    return asyncio.run(_run_step(rate, options, verify_per_s, progress))


@dataclasses.dataclass(frozen=True, slots=True)
class _Load:
    """One step's transactions, signed and serialized before the clock starts."""

    genesis: Genesis
    lanes: int
    raws: list[bytes]
    txids: list[str]
    signatures: list[bytes]  # the submitter's envelope signature per record
    submit_key: PrivateKey
    batch: int = 1  # transactions per record


@dataclasses.dataclass(frozen=True, slots=True)
class _Window:
    """Wall-clock times of the measured window and what the sender saw."""

    started_wall_s: float  # the first send
    load_end_wall_s: float  # the last send
    end_wall_s: float  # every outcome in, or the drain timed out
    send_lag_max_s: float
    failed: int  # transactions in records the producer could not deliver
    sender_cpu_us_per_record: float = 0.0  # the bench process while sending
    sender_cpu_us_per_tx: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _CpuWindow:
    """CPU seconds (user + system) of the nodes, the load generator and the broker,
    snapshotted when the window opens."""

    sampler: ProcessSampler
    others: dict[str, psutil.Process]
    nodes_before: dict[str, float]
    others_before: dict[str, float]

    @classmethod
    def open(cls, sampler: ProcessSampler) -> _CpuWindow:
        others = {"loadgen": psutil.Process()}
        kafka_pid = _kafka_pid()
        if kafka_pid is not None:
            others["kafka"] = psutil.Process(kafka_pid)
        sampler.start()
        return cls(sampler, others, sampler.cpu_seconds(),
                   {n: sum(p.cpu_times()[:2]) for n, p in others.items()})

    def close(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds spent since ``open``: (per node, per other process)."""
        nodes_after = self.sampler.cpu_seconds()
        others_after = {n: sum(p.cpu_times()[:2]) for n, p in self.others.items()}
        self.sampler.stop()
        return ({n: nodes_after[n] - self.nodes_before[n] for n in self.nodes_before},
                {n: others_after[n] - self.others_before[n] for n in self.others_before})


async def _run_step(
    rate: float, options: StepOptions, verify_per_s: float, progress: Callable[[str], None]
) -> StepResult:
    tag = f"b{uuid.uuid4().hex[:8]}"
    base = options.work_dir or Path(tempfile.mkdtemp(prefix=f"capledger-bench-{tag}-"))
    base.mkdir(parents=True, exist_ok=True)
    prefix = f"bench.{tag}."
    load = _prepare_load(rate, options, base, tag, progress)
    cluster = LocalCluster(base / "chain", state_dir=base / "state", topic_prefix=prefix,
                           log_level=options.log_level)
    client = LedgerClient(options.bootstrap, load.genesis, submitter=SUBMITTER,
                          signing_key=load.submit_key, topic_prefix=prefix)
    producer = open_sender(options.producer, options.bootstrap,
                           client_id=f"capledger-bench-{tag}")
    sampler: ProcessSampler | None = None
    try:
        await ensure_topics(options.bootstrap, prefix=prefix)
        _start_nodes(cluster, options, base)
        await cluster.wait_ready(options.bootstrap, timeout_s=READY_TIMEOUT_S)
        await client.start(watch_from_start=True)
        await producer.start()
        pids = {name: node.pid for name, node in cluster.nodes.items() if node.pid is not None}
        sampler = ProcessSampler(pids)
        cpu_window = _CpuWindow.open(sampler)
        progress(f"rate {rate:g}/s: cluster ready; sending for {options.duration_s:g} s")
        window = await _send_and_drain(producer, client, prefix + TX.name, load, rate, tag,
                                       options.drain_timeout_s, progress)
        cpu_s, others_cpu_s = cpu_window.close()
        return _result(
            rate=rate, options=options, client=client, txids=load.txids, window=window,
            verify_per_s=verify_per_s, sampler=sampler, cpu_s=cpu_s,
            others_cpu_s=others_cpu_s, extras={
                "send_lag_ms_max": round(window.send_lag_max_s * 1000, 1),
                "producer": producer.name,
                "mix": options.mix,
                "sender_cpu_us_per_record": round(window.sender_cpu_us_per_record, 1),
                "sender_cpu_us_per_tx": round(window.sender_cpu_us_per_tx, 2),
                "batch": options.batch,
                "lanes": load.lanes,
                "topic_prefix": prefix,
                "work_dir": str(base),
                "block_interval_ms_param": load.genesis.params.block_interval_ms,
                "block_bytes_max_param": load.genesis.params.block_bytes_max,
            },
        )
    finally:
        if sampler is not None:
            sampler.stop()
        await client.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        cluster.stop()
        if not options.keep:
            with contextlib.suppress(Exception):
                await delete_topics(options.bootstrap, prefix)
            if options.work_dir is None and options.profile_node is None:
                shutil.rmtree(base, ignore_errors=True)


def _prepare_load(
    rate: float, options: StepOptions, base: Path, tag: str, progress: Callable[[str], None]
) -> _Load:
    """A new chain with load-generator allocations, and every transaction of the step
    signed and serialized (before the clock starts)."""
    from streams.tools.loadgen import (
        OAP_ISSUER,
        Lanes,
        interleave,
        lane_chains,
        oap_issuer_value,
        oap_workload,
    )

    count = max(1, round(rate * options.duration_s))
    lanes = Lanes(tag, min(options.lanes, count), mix=options.mix)
    genesis = create_chain(base / "chain", chain_id=f"bench-{tag}", lanes=lanes,
                           issuer_value=oap_issuer_value(lanes) if lanes.mix == "oap" else 0)
    started_signing = time.perf_counter()
    if lanes.mix == "oap":
        issuer = load_institution_key(base / "chain", OAP_ISSUER)
        txs = oap_workload(lanes, genesis, issuer, count)
    else:
        per_lane = math.ceil(count / lanes.count)
        txs = list(interleave(lane_chains(lanes, genesis.hash_le, per_lane)))[:count]
    raws = [tx.serialize() for tx in txs]
    txids = [tx.txid for tx in txs]
    del txs
    # Envelopes are signed ahead too (the signature does not cover submitted_at).
    submit_key = load_institution_key(base / "chain", SUBMITTER)
    batch = options.batch
    if batch == 1:
        signatures = [sign_envelope(submit_key, genesis.hash_le, SUBMITTER, f"{tag}-{index}",
                                    raw) for index, raw in enumerate(raws)]
    else:
        signatures = [sign_batch(submit_key, genesis.hash_le, SUBMITTER, [
            (f"{tag}-{index}", raws[index])
            for index in range(first, min(count, first + batch))])
            for first in range(0, count, batch)]
    progress(f"rate {rate:g}/s: {count} txs over {lanes.count} lanes signed in "
             f"{time.perf_counter() - started_signing:.1f} s ({len(signatures)} records)")
    return _Load(genesis, lanes.count, raws, txids, signatures, submit_key, batch)


def _start_nodes(cluster: LocalCluster, options: StepOptions, base: Path) -> None:
    """Start the five nodes; the profiled one (if any) under cProfile."""
    profiled = options.profile_node
    cluster.start(*(i for i in INSTITUTION_IDS if i != profiled))
    if profiled is not None:
        # streams.cli.node's hook: cProfile the whole worker, stats written at exit
        # to $CAPLEDGER_PROFILE_DIR/<institution>.prof (the environment is inherited).
        os.environ[PROFILE_DIR_ENV] = str(options.profile_dir or base)
        try:
            cluster.start(profiled)
        finally:
            del os.environ[PROFILE_DIR_ENV]


async def _send_and_drain(
    producer: Sender, client: LedgerClient, topic: str, load: _Load, rate: float,
    tag: str, drain_timeout_s: float, progress: Callable[[str], None],
) -> _Window:
    """Send the load open-loop at ``rate``, then wait (bounded) for every outcome."""
    # The records are encoded before the clock starts too: each carries its
    # scheduled send time as ``submitted_at``, from a start a little ahead.
    count, batch = len(load.raws), load.batch
    start_wall_s = time.time() + ENCODE_LEAD_S + count * ENCODE_S_PER_TX
    items = _encode_records(load, rate, tag, start_wall_s)
    # A batch goes out when its last transaction is due: records at rate / batch a
    # second, the first (batch - 1) / rate after the first transaction's slot, which
    # stays the origin of every latency (the wait for a batch to fill counts).
    report = await producer.send_open_loop(topic, items, rate / batch,
                                           start_wall_s + (batch - 1) / rate)
    started_wall_s, send_lag_max_s, failed = report.started_wall_s, report.lag_max_s, \
        report.failed
    started_wall_s -= (batch - 1) / rate
    failed_txs = min(count, failed * batch)  # at most: the records are not named
    load_end_wall_s = time.time()
    progress(f"rate {rate:g}/s: sent {count} in {len(items)} records (sender lag max "
             f"{send_lag_max_s * 1000:.0f} ms, {failed} records not delivered); draining")
    with contextlib.suppress(TimeoutError):
        await client.wait(load.txids, timeout_s=drain_timeout_s)
    return _Window(started_wall_s, load_end_wall_s, time.time(), send_lag_max_s, failed_txs,
                   report.cpu_us_per_record, report.cpu_us_per_record * len(items) / count)


def _encode_records(load: _Load, rate: float, tag: str,
                    start_wall_s: float) -> list[tuple[bytes, bytes]]:
    """(Kafka key, record) per tx-log record — a TxSubmitted per transaction, or a
    TxBatchSubmitted per ``load.batch`` — ``submitted_at`` = the slot of its last one."""
    items = []
    batch, count = load.batch, len(load.raws)
    for number, signature in enumerate(load.signatures):
        first = number * batch
        indexes = range(first, min(count, first + batch))
        keys = [f"{tag}-{index}" for index in indexes]
        scheduled_ms = int((start_wall_s + indexes[-1] / rate) * 1000)
        if batch == 1:
            record = codec.encode("TxSubmitted", tx_submitted_record(
                load.raws[first], submitter=SUBMITTER, idempotency_key=keys[0],
                now_ms=scheduled_ms, signature=signature))
        else:
            record = codec.encode("TxBatchSubmitted", {
                "submitter": SUBMITTER, "txs": load.raws[first:first + batch],
                "idempotency_keys": keys, "submitted_at": scheduled_ms,
                "signature": signature})
        items.append((f"{SUBMITTER}/{keys[0]}".encode(), record))
    return items


def _result(
    *, rate: float, options: StepOptions, client: LedgerClient, txids: list[str],
    window: _Window, verify_per_s: float, sampler: ProcessSampler,
    cpu_s: dict[str, float], others_cpu_s: dict[str, float], extras: dict[str, Any],
) -> StepResult:
    started_ms = window.started_wall_s * 1000
    wall_s = window.end_wall_s - window.started_wall_s
    outcomes = _outcomes(client, txids, rate, started_ms)
    latencies = outcomes.latencies_ms
    submitted = len(txids) - window.failed
    window_s = max(options.duration_s, (outcomes.last_commit_ms - started_ms) / 1000)
    by_height, intervals = _blocks_since(client, started_ms)
    nodes = _node_figures(sampler, cpu_s, window, wall_s)
    rss_max = max((n["rss_mb_max"] or 0.0) for n in nodes.values()) if nodes else 0.0
    extras = dict(extras)
    extras.update({
        "rejected_codes": outcomes.codes,
        "latency_p99_by_window_ms": outcomes.p99_by_window_ms,
        "latency_window_s": LATENCY_WINDOW_S,
        "undelivered": window.failed,
        "heights": len(by_height),
        "block_txs_median": statistics.median(t for t, _s, _a in by_height.values())
        if by_height else 0,
        "load_s": round(window.load_end_wall_s - window.started_wall_s, 3),
        "measured_wall_s": round(wall_s, 3),
        "others_cpu_cores": {n: round(v / wall_s, 3) for n, v in others_cpu_s.items()},
        **_generator_figures(client, others_cpu_s.get("loadgen"), outcomes.committed),
        "nodes_cpu_cores_total": round(sum(cpu_s.values()) / wall_s, 3),
        "rss_series_mb": {
            name: [(round(at - window.started_wall_s, 1), round(rss / MIB, 1))
                   for at, rss in sampler.rss[name]]
            for name in sampler.rss
        },
    })
    return StepResult(
        rate_target=rate,
        duration_s=options.duration_s,
        submitted=submitted,
        committed=outcomes.committed,
        rejected=outcomes.rejected,
        lost=submitted - outcomes.committed - outcomes.rejected,
        committed_tps=round(outcomes.committed / window_s, 1),
        latency_ms={
            "p50": round(percentile(latencies, 0.50), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "max": round(latencies[-1], 1) if latencies else 0.0,
        },
        block_interval_ms_median=float(statistics.median(intervals)) if intervals else 0.0,
        block_bytes_median=float(statistics.median(s for _t, s, _a in by_height.values()))
        if by_height else 0.0,
        verify_per_s_per_core=round(verify_per_s, 0),
        rss_mb_max=rss_max,
        nodes=nodes,
        extras=extras,
    )


def _generator_figures(client: LedgerClient, loadgen_cpu_s: float | None,
                       committed: int) -> dict[str, Any]:
    """The load generator's CPU per committed transaction, and its outcome watcher's
    share of it (reading the members' committed records; decision 0128)."""
    per_tx = max(1, committed)
    figures: dict[str, Any] = {
        "watcher_cpu_us_per_tx": round(client.watch_cpu_s / per_tx * 1e6, 2),
        "block_copies_reused": client.block_copies_reused,
    }
    if loadgen_cpu_s is not None:
        figures["loadgen_cpu_us_per_tx"] = round(loadgen_cpu_s / per_tx * 1e6, 2)
    return figures


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcomes:
    latencies_ms: list[float]  # sorted, committed transactions only
    committed: int
    rejected: int
    last_commit_ms: float
    codes: dict[str, int]  # rejections per code
    # p99 of the transactions scheduled in each LATENCY_WINDOW_S of the load, in order:
    # whether a step's tail is its start, a burst, or everywhere
    p99_by_window_ms: list[float] = dataclasses.field(default_factory=list)


def _outcomes(
    client: LedgerClient, txids: list[str], rate: float, started_ms: float
) -> _Outcomes:
    """What became of each transaction; latency from its scheduled send time."""
    latencies: list[float] = []
    windows: dict[int, list[float]] = {}
    committed = rejected = 0
    last_commit_ms = started_ms
    codes: dict[str, int] = {}
    window_txs = max(1, round(LATENCY_WINDOW_S * rate))
    for index, txid in enumerate(txids):
        outcome = client.outcome(txid)
        if outcome is None:
            continue
        if outcome.committed:
            committed += 1
            scheduled_ms = started_ms + index * 1000 / rate
            latencies.append(max(0.0, outcome.decided_at_ms - scheduled_ms))
            windows.setdefault(index // window_txs, []).append(latencies[-1])
            last_commit_ms = max(last_commit_ms, outcome.decided_at_ms)
        else:
            rejected += 1
            codes[str(outcome.code)] = codes.get(str(outcome.code), 0) + 1
    latencies.sort()
    by_window = [round(percentile(sorted(windows[w]), 0.99), 1) for w in sorted(windows)]
    return _Outcomes(latencies, committed, rejected, last_commit_ms, codes, by_window)


def _blocks_since(
    client: LedgerClient, started_ms: float
) -> tuple[dict[int, tuple[int, int, int]], list[int]]:
    """Blocks committed in the window by height ((txs, bytes, at ms)), and the
    intervals between consecutive heights."""
    blocks = sorted(b for b in client.committed_blocks if b[3] >= started_ms)
    by_height = {height: (txs, size, at) for height, txs, size, at in blocks}
    intervals = [at - by_height[h - 1][2] for h, (_t, _s, at) in by_height.items()
                 if h - 1 in by_height]
    return by_height, intervals


def _node_figures(
    sampler: ProcessSampler, cpu_s: dict[str, float], window: _Window, wall_s: float
) -> dict[str, dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for name, process in sampler.processes.items():
        rss = sampler.rss_between(name, window.started_wall_s, window.end_wall_s)
        nodes[name] = {
            "pid": process.pid,
            "cpu_s": round(cpu_s[name], 2),
            "cpu_cores": round(cpu_s[name] / wall_s, 3),
            "rss_mb_start": round(rss[0] / MIB, 1) if rss else None,
            "rss_mb_end": round(rss[-1] / MIB, 1) if rss else None,
            "rss_mb_max": round(max(rss) / MIB, 1) if rss else None,
        }
    return nodes


async def delete_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic of one benchmark chain (its prefix, and faust's own topics
    for apps named after it)."""
    assert prefix, "refusing to delete topics without a prefix"
    admin = admin_client(bootstrap)
    await admin.start()
    try:
        names = [name for name in await admin.list_topics()
                 if name.startswith(prefix) or name.startswith(f"capledger-{prefix}")]
        if names:
            await admin.delete_topics(names)
            await delete_acls_of(admin, names)
        return names
    finally:
        await admin.close()


# ---------------------------------------------------------------- the sweep


def run_sweep(
    rates: Sequence[float],
    options: StepOptions,
    *,
    p99_bound_ms: float = P99_BOUND_MS_DEFAULT,
    stop_at_saturation: bool = True,
    verify: dict[str, float] | None = None,
    on_step: Callable[[StepResult], None] = lambda _result: None,
    progress: Callable[[str], None] = lambda _message: None,
) -> list[StepResult]:
    """Rate steps in the order given; stops after the first saturated one."""
    if verify is None:
        progress("measuring the bare secp256k1 verification rate (no cluster running)")
        verify = verify_rate_per_core()
    results = []
    for rate in rates:
        result = run_step(rate, options, verify_per_s=verify["coincurve_verify_per_s"],
                          progress=progress)
        add_cpu_per_tx(result, verify.get("coincurve_verify_cpu_us"),
                       verify.get("coincurve_verify_varied_cpu_us"))
        progress(f"rate {rate:g}/s: node CPU {result.extras.get('node_cpu_us_per_tx')} µs "
                 f"per committed tx (median node), "
                 f"{result.extras.get('node_cpu_per_tx_over_verify')}x the bare verify")
        results.append(result)
        on_step(result)
        if stop_at_saturation and result.saturated(p99_bound_ms):
            progress(f"rate {rate:g}/s saturated: {result.committed_tps:g} tx/s committed, "
                     f"p99 {result.latency_ms['p99']:g} ms")
            break
    return results


# ---------------------------------------------------------------- memory


def measure_utxo_memory(count: int = UTXO_COUNT_DEFAULT) -> dict[str, Any]:
    """RSS of a fresh process holding ``count`` unspent P2PKH outputs (see
    ``_utxo_memory_child``); a subprocess, so nothing else of this one is counted."""
    assert 1 <= count <= 50_000_000
    code = f"from streams.tools.bench import _utxo_memory_child; _utxo_memory_child({count})"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True,
                               text=True, check=True, timeout=900)
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _utxo_memory_child(count: int) -> None:
    """Build the state in this (fresh) process and print its memory figures as JSON.

    Imports what a node imports first (faust, aiokafka, the node module), so the
    baseline is a node's and the difference is the state. The outputs are the genesis
    allocations of a chain, each a distinct 25-byte P2PKH script, exactly the
    ``UtxoEntry`` records blocks create. Then the spent-outpoint journal is filled to
    its cap (``SPENT_HISTORY_KEYS_MAX`` 36-byte keys), as a node that has run long
    enough holds it.
    """
    import gc
    import hashlib
    import resource

    import streams.node.app  # noqa: F401  - a node's import baseline (faust, aiokafka)
    from ledger.script import p2pkh_script
    from ledger.state import SPENT_HISTORY_KEYS_MAX, state_from_genesis

    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    started = time.perf_counter()
    allocations = [
        (p2pkh_script(hashlib.sha256(index.to_bytes(8, "little")).digest()[:20]),
         1_000 + index % 977)
        for index in range(count)
    ]
    state = state_from_genesis(hashlib.sha256(b"bench-memory").digest(), allocations)
    del allocations
    gc.collect()
    built_s = time.perf_counter() - started
    with_state = process.memory_info().rss
    journal = {hashlib.sha256(index.to_bytes(8, "big")).digest() + b"\0\0\0\0": index
               for index in range(SPENT_HISTORY_KEYS_MAX)}
    gc.collect()
    with_journal = process.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert len(state) == count and len(journal) == SPENT_HISTORY_KEYS_MAX
    print(json.dumps({
        "utxo_count": count,
        "build_s": round(built_s, 1),
        "rss_mb_baseline": round(baseline / MIB, 1),
        "rss_mb_with_state": round(with_state / MIB, 1),
        "rss_mb_with_state_and_journal": round(with_journal / MIB, 1),
        "rss_mb_peak": round(peak / MIB, 1),
        "bytes_per_utxo": round((with_state - baseline) / count, 1),
        "journal_keys": SPENT_HISTORY_KEYS_MAX,
        "journal_mb": round((with_journal - with_state) / MIB, 1),
    }))


# ---------------------------------------------------------------- presentation


def summary_line(result: StepResult) -> str:
    latency = result.latency_ms
    return (
        f"{result.rate_target:>7g}/s  committed {result.committed:>6d}/{result.submitted:<6d} "
        f"lost {result.lost:<3d} {result.committed_tps:>8.1f} tx/s  "
        f"latency p50 {latency['p50']:>6.0f} p95 {latency['p95']:>6.0f} "
        f"p99 {latency['p99']:>6.0f} max {latency['max']:>6.0f} ms  "
        f"block {result.block_interval_ms_median:>5.0f} ms {result.block_bytes_median:>8.0f} B  "
        f"nodes cpu {result.extras['nodes_cpu_cores_total']:.2f} cores  "
        f"rss max {result.rss_mb_max:.0f} MB"
    )


def plot_sweep(results: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    """Committed tx/s and latency percentiles against the target rate (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate_target"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    left.plot(rates, [r["committed_tps"] for r in results], "o-", label="committed tx/s")
    left.plot(rates, rates, ":", color="grey", label="target (ideal)")
    left.axhline(1000, color="red", linewidth=0.8, linestyle="--", label="seed bar 1,000")
    left.set(xscale="log", yscale="log", xlabel="target rate (tx/s)",
             ylabel="committed tx/s", title="throughput")
    left.legend(fontsize=8)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-"), ("max", "x:")):
        right.plot(rates, [r["latency_ms"][key] for r in results], style, label=key)
    right.axhline(1000, color="red", linewidth=0.8, linestyle="--", label="1 s bar")
    right.set(xscale="log", yscale="log", xlabel="target rate (tx/s)",
              ylabel="submit-to-commit latency (ms)", title="latency")
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def growth_summary(result: StepResult, *, early_s: float = 5.0) -> dict[str, Any]:
    """Per node: RSS a few seconds into the load (caches warm) vs at the end of the run."""
    nodes = {}
    series = result.extras["rss_series_mb"]
    for name, samples in series.items():
        during = [(at, mb) for at, mb in samples if at >= 0]
        if not during:
            continue
        early = next(((at, mb) for at, mb in during if at >= early_s), during[0])
        nodes[name] = {
            "early_at_s": early[0], "rss_mb_early": early[1],
            "end_at_s": during[-1][0], "rss_mb_end": during[-1][1],
            "rss_mb_max": max(mb for _at, mb in during),
        }
    return {"record": result.record(), "heights": result.extras["heights"], "nodes": nodes}


def machine_description() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was."""
    import platform

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": round(psutil.virtual_memory().total / MIB),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def markdown_table(steps: Sequence[dict[str, Any]]) -> str:
    """The steps (records, optionally with ``extras``) as a markdown table for the docs."""
    lines = [
        "| target tx/s | submitted | committed | lost | committed tx/s | p50 ms | p95 ms "
        "| p99 ms | max ms | block interval ms (median) | block bytes (median) "
        "| nodes CPU (cores, sum of 5) | peak RSS MB (largest node) |",
        "|" + "---:|" * 13,
    ]
    for step in steps:
        latency = step["latency_ms"]
        cpu = step.get("extras", {}).get("nodes_cpu_cores_total")
        if cpu is None:
            cpu = sum(node["cpu_cores"] for node in step["nodes"].values())
        lines.append(
            f"| {step['rate_target']:,.0f} | {step['submitted']:,} | {step['committed']:,} "
            f"| {step['lost']} | {step['committed_tps']:,.1f} | {latency['p50']:,.0f} "
            f"| {latency['p95']:,.0f} | {latency['p99']:,.0f} | {latency['max']:,.0f} "
            f"| {step['block_interval_ms_median']:,.0f} | {step['block_bytes_median']:,.0f} "
            f"| {cpu:.2f} | {step['rss_mb_max']:.0f} |"
        )
    return "\n".join(lines)

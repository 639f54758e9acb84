"""A node's own CPU per committed transaction, without Kafka: ``capledger bench node``.

Owns: ``bench_node`` — five real ``LedgerNode`` objects in one process share in-memory
logs (their writer appends to lists; records reach them through ``LedgerNode._handle``,
the entry point of the Kafka readers; their clock is a simulated one that advances
``TICK_MS`` per round, so the block interval and the round timers behave as in a
cluster). Payments arrive at ``rate`` per simulated second, as the cluster bench sends
them (signed 1-input/2-output lane payments, P2PKH or 2-of-3 multisig, or Open
Assets transfers after one issuance, in signed envelopes, one per payment or one per
``batch`` payments). Every round each node reads what is new on the tx, proposals and votes
logs (the tx log in chunks of ``INTAKE_CHUNK``, as the node's loop does) and gets a
clock tick.

The figure is each node's CPU time (the process's, which while one node runs is that
node's and its verify threads') inside its handlers (intake, proposals,
validation, votes, commits with their chain-copy fsync) per committed transaction, and
its ratio to a bare signature verification measured in the same run. CPU time: it
transfers between a loaded and a quiet machine far better than any rate.
What it leaves out, by construction: the Kafka clients (fetch, decompression, TLS,
produce) and faust's heartbeat, which the cluster bench's per-process CPU includes.
``--profile`` prints the cProfile statistics of the whole run (all five nodes: read the
shares).
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ledger import consensus
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.script import p2pkh_script
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import signed_tx_batch_record, signed_tx_submitted_record
from streams.kafka.topics import PROPOSALS, TX, VOTES
from streams.node import ledger_node
from streams.node.ledger_node import INTAKE_CHUNK, LedgerNode, NodeSettings, Pool
from streams.tools.bench_core import bare_verify_cpu_us, varied_verify_cpu_us
from streams.tools.loadgen import (
    OAP_ISSUER,
    Lanes,
    interleave,
    lane_chains,
    oap_issuer_value,
    oap_workload,
)

TICK_MS = 20
ROUNDS_MAX = 200_000
LANES_MAX = 200
SUBMITTER = "securities-a"


class _MemoryLogs:
    """The shared logs; a node's writer appends here (``LogWriter``'s interface)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[LogRecord]] = {}
        self.now_ms = 0

    def append(self, topic: str, value: bytes, key: bytes | None) -> int:
        log = self.logs.setdefault(topic, [])
        log.append(LogRecord(len(log), key, value, self.now_ms))
        return len(log) - 1

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        return self.append(topic, value, key)

    async def send_many(self, topic: str, items: list[tuple[bytes | None, bytes]]) -> list[int]:
        return [self.append(topic, value, key) for key, value in items]


def _workload(count: int, mix: str, batch: int = 1
              ) -> tuple[Genesis, dict[str, Any], list[bytes]]:
    """The chain and the tx-log records: one signed envelope per payment, or one per
    ``batch`` payments (TxBatchSubmitted, decision 0112)."""
    genesis, keys = build_genesis(chain_id="bench-node", time_ms=1_000_000,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("bench-node"),
                                  block_interval_ms=200, proposer_timeout_ms=2_000)
    lanes = Lanes("bench-node", min(LANES_MAX, count), mix=mix)
    if mix == "oap":
        issuer = keys[OAP_ISSUER]
        genesis = dataclasses.replace(genesis, allocations=(
            (p2pkh_script(issuer.public_key.hash160), oap_issuer_value(lanes)),))
        txs = oap_workload(lanes, genesis, issuer, count)
    else:
        genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
        txs = list(interleave(lane_chains(lanes, genesis.hash_le, -(-count // lanes.count))))
    raws = [tx.serialize() for tx in txs[:count]]
    return genesis, keys, tx_log_values(raws, keys[SUBMITTER], genesis.hash_le, batch=batch,
                                        tag="n")


def tx_log_values(raws: list[bytes], key: Any, genesis_hash: bytes, *, batch: int,
                  tag: str, now_ms: int = 1) -> list[bytes]:
    """Encoded tx-log records for ``raws`` from SUBMITTER, idempotency keys
    ``<tag><index>``: one TxSubmitted each (``batch`` 1) or one TxBatchSubmitted per
    ``batch`` consecutive transactions."""
    if batch == 1:
        return [codec.encode("TxSubmitted", signed_tx_submitted_record(
            raw, key=key, genesis_hash=genesis_hash, submitter=SUBMITTER,
            idempotency_key=f"{tag}{i}", now_ms=now_ms)) for i, raw in enumerate(raws)]
    return [codec.encode("TxBatchSubmitted", signed_tx_batch_record(
        raws[first:first + batch], key=key, genesis_hash=genesis_hash, submitter=SUBMITTER,
        idempotency_keys=[f"{tag}{i}" for i in range(first, min(len(raws), first + batch))],
        now_ms=now_ms)) for first in range(0, len(raws), batch)]


def _start(genesis: Genesis, keys: dict[str, Any], base: Path, logs: _MemoryLogs,
           workers: int) -> dict[str, LedgerNode]:
    nodes = {}
    for me in INSTITUTION_IDS:
        settings = NodeSettings(me, genesis, keys[me], "memory:0", base,
                                verify_workers=workers)
        node = LedgerNode(settings)
        settings.node_dir.mkdir(parents=True, exist_ok=True)
        node.quarantine.load(logs.now_ms)
        node.load_chain_copy()
        node._writer = logs  # type: ignore[assignment]
        node.machine = consensus.initial_state(
            consensus.ConsensusConfig(genesis, me, node.genesis_hash), now_ms=logs.now_ms)
        node.pool = Pool(base_offset=0)
        node.started.set()
        nodes[me] = node
    return nodes


async def _round(node: LedgerNode, logs: _MemoryLogs, cursors: dict[str, int]) -> None:
    """As ``LedgerNode.run``: the tx log's new records fetched into ``tx_inbox`` (the
    reader's part), the consensus logs handled first, then intake in chunks while the
    pool has room."""
    tx_log = logs.logs.get(TX.name, [])
    node.tx_inbox.extend(tx_log[cursors[TX.name]:])
    cursors[TX.name] = len(tx_log)
    for name in (PROPOSALS.name, VOTES.name):
        log = logs.logs.get(name, [])
        while cursors[name] < len(log):
            records = log[cursors[name]:]
            cursors[name] += len(records)
            await node._handle(name, records)
            await node._feed(consensus.Tick(logs.now_ms))
    while node.tx_inbox and not node.pool.is_full:
        count = min(INTAKE_CHUNK, len(node.tx_inbox))
        await node._handle(TX.name, [node.tx_inbox.popleft() for _ in range(count)])
        await node._feed(consensus.Tick(logs.now_ms))


async def _drive(nodes: dict[str, LedgerNode], logs: _MemoryLogs, values: list[bytes],
                 rate: float) -> tuple[dict[str, float], int]:
    """Append ``values`` (tx-log records) at ``rate`` records per simulated second and
    run the nodes round by round until every record is decided."""
    cursors = {me: dict.fromkeys((PROPOSALS.name, VOTES.name, TX.name), 0) for me in nodes}
    cpu = dict.fromkeys(nodes, 0.0)
    start_ms, sent = logs.now_ms, 0
    for rounds in range(ROUNDS_MAX):
        due = min(len(values), int((logs.now_ms - start_ms) * rate / 1000) + 1)
        for value in values[sent:due]:
            logs.append(TX.name, value, None)
        sent = due
        for me, node in nodes.items():
            started = time.process_time()  # nodes run one at a time; + their threads
            await _round(node, logs, cursors[me])
            await node._feed(consensus.Tick(logs.now_ms))
            cpu[me] += time.process_time() - started
        if sent == len(values) and all(n.committed_end >= sent for n in nodes.values()):
            return cpu, rounds
        logs.now_ms += TICK_MS
    raise AssertionError(f"not every transaction committed in {ROUNDS_MAX} rounds")


def bench_node(count: int = 5_000, *, rate: float = 1_000.0, workers: int = 1,
               mix: str = "p2pkh", batch: int = 1, profile: bool = False) -> dict[str, Any]:
    """Run ``count`` payments at ``rate`` (simulated) through five in-memory nodes, in
    records of ``batch`` transactions (a batch is sent when its last one is due)."""
    genesis, keys, values = _workload(count, mix, batch)
    logs = _MemoryLogs()
    logs.now_ms = genesis.time_ms + 1_000
    real_now_ms = ledger_node.__dict__["now_ms"]
    setattr(ledger_node, "now_ms", lambda: logs.now_ms)  # noqa: B010 (the node's clock)
    profiler = cProfile.Profile() if profile else None
    try:
        with tempfile.TemporaryDirectory(prefix="capledger-bench-node-") as base:
            nodes = _start(genesis, keys, Path(base), logs, workers)
            if profiler is not None:
                profiler.enable()
            cpu, rounds = asyncio.run(_drive(nodes, logs, values, rate / batch))
            if profiler is not None:
                profiler.disable()
            heights = {n.height for n in nodes.values()}
            bodies_used = {where: sum(n.bodies_used[where] for n in nodes.values())
                           for where in ("proposal", "commit")}
            select_ms = [n.cut_sizer.ms_per_tx for n in nodes.values()
                         if n.cut_sizer.ms_per_tx is not None]
            for node in nodes.values():
                node.verifier.close()
                assert node.chain is not None
                node.chain.close()
    finally:
        setattr(ledger_node, "now_ms", real_now_ms)  # noqa: B010
    verify_us = bare_verify_cpu_us()
    varied_us = varied_verify_cpu_us()
    per_tx = {me: seconds / count * 1e6 for me, seconds in cpu.items()}
    median = statistics.median(per_tx.values())
    result: dict[str, Any] = {
        "txs": count, "rate": rate, "workers": workers, "mix": mix, "batch": batch,
        "heights": max(heights),
        # blocks (summed over the five nodes) whose txs came from their bodies (0129)
        "bodies_used": bodies_used,
        "simulated_s": round(rounds * TICK_MS / 1000, 2),
        "node_cpu_us_per_tx": {me: round(v, 1) for me, v in per_tx.items()},
        "node_cpu_us_per_tx_median": round(median, 1),
        "verify_cpu_us": round(verify_us, 2),
        "ratio_to_verify": round(median / verify_us, 2),
        "verify_varied_cpu_us": round(varied_us, 2),
        "ratio_to_varied_verify": round(median / varied_us, 2),
        # CPU ms per range record of a selection (what the adaptive cut divides by)
        "select_cpu_ms_per_tx": round(statistics.median(select_ms), 4) if select_ms else None,
    }
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        result["profile"] = out.getvalue()
    return result

"""``capledger demo``: five institutions' nodes commit blocks by majority vote, live.

Owns: :func:`run_demo` — a fresh chain under the state directory (genesis for the
five institutions with load-generator lanes), the five node processes
(``streams.tools.cluster.LocalCluster``), a few rounds of pre-signed payments (and one
double spend, to show a rejection) sent through ``streams.client.ledger_client.LedgerClient``,
each committed block shown as it arrives (height, round, proposer, transactions,
size, the voters of its quorum certificate, the acks seen on the votes log and how
many nodes published it), then the five nodes' heartbeats side by side, then the
nodes stopped — always, also on an error or Ctrl-C. Callable from tests with a
small transaction count and a temporary state directory; it returns what it saw.

Touches: ``<state_dir>/demo/`` (its chain, node state and logs) and topics named
``demo<id>.*`` on the broker; node processes it starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ledger.block import check_certified_block
from ledger.errors import ValidationError
from ledger.hashing import display_hex
from ledger.membership import Genesis
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint, Transaction
from streams.client.ledger_client import LedgerClient
from streams.client.status import StatusReport, StatusWatcher, classify, report_table
from streams.common import config
from streams.common.clock import now_ms as clock_now_ms
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.logio import LogReader
from streams.kafka.records import committed_from_record, millis
from streams.kafka.topics import BLOCKS, VOTES, ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.loadgen import (
    LANE_VALUE,
    Lanes,
    interleave,
    lane_chains,
    sign_p2pkh_payment,
    sink_script,
)

TX_COUNT_DEFAULT = 300
ROUNDS_DEFAULT = 3
LANES_MAX = 50
NODES_UP_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 15.0
READ_TIMEOUT_MS = 100
DEMO_DIRNAME = "demo"
CONSOLE_WIDTH = 150  # when not on a terminal (make demo | tee, CI logs)


@dataclass(frozen=True, slots=True)
class BlockRow:
    """One committed block as the demo saw it on ledger.blocks.v1 (and the votes log)."""

    height: int
    round: int
    proposer: str
    tx_count: int
    block_bytes: int
    qc_voters: tuple[str, ...]
    block_hash: str
    committed_at_ms: int


@dataclass
class DemoResult:
    topic_prefix: str
    chain_dir: Path
    submitted: int = 0
    committed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    blocks: list[BlockRow] = field(default_factory=list)
    publishers: dict[int, int] = field(default_factory=dict)  # height -> nodes that published
    acks: dict[int, int] = field(default_factory=dict)  # height -> acks on the votes log
    status: StatusReport | None = None
    nodes_up_s: float = 0.0
    elapsed_s: float = 0.0
    node_exit_codes: dict[str, int | None] = field(default_factory=dict)


class _ChainWatcher:
    """Reads ledger.blocks.v1 and ledger.votes.v1 from the start; prints blocks as they come."""

    def __init__(self, bootstrap: str, prefix: str, genesis: Genesis, result: DemoResult,
                 console: Console) -> None:
        self._genesis = genesis
        self._result = result
        self._console = console
        self._seen: dict[int, str] = {}
        self._blocks = LogReader(bootstrap, prefix + BLOCKS.name, client_id="capledger-demo")
        self._votes = LogReader(bootstrap, prefix + VOTES.name, client_id="capledger-demo")
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._blocks.start(0)
        await self._votes.start(0)
        self._tasks = [asyncio.create_task(self._read_blocks()),
                       asyncio.create_task(self._read_votes())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for reader in (self._blocks, self._votes):
            with contextlib.suppress(Exception):
                await reader.stop()

    async def _read_votes(self) -> None:
        while True:
            for record in await self._votes.read(timeout_ms=READ_TIMEOUT_MS):
                try:
                    vote = codec.decode(record.value, expected="VoteCast").record
                except ValidationError:
                    continue
                if vote["kind"] == "ack":
                    height = int(vote["height"])
                    self._result.acks[height] = self._result.acks.get(height, 0) + 1

    async def _read_blocks(self) -> None:
        while True:
            for record in await self._blocks.read(timeout_ms=READ_TIMEOUT_MS):
                try:
                    self._on_block(record.value)
                except ValidationError as error:
                    self._console.print(f"[red]  refused a committed-block record: "
                                        f"{error.code}: {error.message}[/]")

    def _on_block(self, value: bytes) -> None:
        record = codec.decode(value, expected="BlockCommitted").record
        height = int(record["height"])
        publishers = self._result.publishers
        publishers[height] = publishers.get(height, 0) + 1
        block_hash = display_hex(bytes(record["block_hash"]))
        if height in self._seen:
            if self._seen[height] != block_hash:
                raise ValidationError(f"two blocks committed at height {height}", code="fork")
            return
        committed = committed_from_record(
            record, block_bytes_max=self._genesis.params.block_bytes_max)
        check_certified_block(committed.block, committed.qc, self._genesis,
                              genesis_hash=self._genesis.hash_le)
        header = committed.block.header
        row = BlockRow(height, header.round, header.proposer, len(committed.block.txs),
                       len(record["block"]), tuple(vote.voter for vote in committed.qc.votes),
                       block_hash, millis(record["committed_at"]))
        self._seen[height] = block_hash
        self._result.blocks.append(row)
        view_change = f" [yellow](round {row.round}: view change)[/]" if row.round else ""
        self._console.print(
            f"  block [bold]{row.height:>3}[/] {row.block_hash[:12]}  proposer "
            f"[cyan]{row.proposer:<12}[/] txs {row.tx_count:>4}  {row.block_bytes:>7} bytes  "
            f"QC {', '.join(row.qc_voters)}{view_change}")


def _double_spend(lanes: Lanes, genesis: Genesis) -> Transaction:
    """Lane 0's genesis output spent a second time, to another amount: must be refused."""
    allocation = genesis_allocation_tx(genesis.hash_le, lanes.allocations())
    return sign_p2pkh_payment(lanes.keys()[0], OutPoint(allocation.hash_le, 0), LANE_VALUE,
                              sink_script(lanes.seed), 2)


async def _settled_status(bootstrap: str, prefix: str, genesis: Genesis,
                          height: int) -> StatusReport:
    """The nodes' status once all report ``height`` (or whatever they say after a bound)."""
    members = [member.id for member in genesis.members]
    watcher = StatusWatcher(bootstrap, topic_prefix=prefix)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    try:
        await watcher.start()
        await watcher.catch_up()
        while True:
            report = classify(watcher.latest, now_ms=clock_now_ms(), members=members,
                              chain_id=genesis.chain_id)
            settled = all(view.heartbeat is not None and view.heartbeat.height >= height
                          for view in report.nodes)
            if settled or time.monotonic() > deadline:
                return report
            await watcher.poll()
    finally:
        await watcher.stop()


async def _run(bootstrap: str, genesis: Genesis, lanes: Lanes, cluster: LocalCluster,
               result: DemoResult, *, tx_count: int, rounds: int, console: Console) -> None:
    prefix = result.topic_prefix
    started = time.monotonic()
    await ensure_topics(bootstrap, prefix=prefix)
    cluster.start()
    console.print(f"2. started 5 node processes (pids "
                  f"{', '.join(str(node.pid) for node in cluster.nodes.values())}), "
                  f"waiting for their heartbeats")
    await cluster.wait_ready(
        bootstrap,
        timeout_s=NODES_UP_TIMEOUT_S,
        on_progress=lambda seen: console.print(
            f"  nodes reporting: {len(seen)}/{len(genesis.members)} ({', '.join(sorted(seen))})"
        ),
    )
    result.nodes_up_s = time.monotonic() - started
    console.print(f"   all five up in {result.nodes_up_s:.1f} s")

    per_lane = math.ceil(tx_count / lanes.count)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, per_lane)))[:tx_count]
    batch_size = math.ceil(len(txs) / rounds)
    batches = [txs[i:i + batch_size] for i in range(0, len(txs), batch_size)]

    client = LedgerClient(bootstrap, genesis, submitter="securities-a", topic_prefix=prefix,
                          signing_key=load_institution_key(result.chain_dir, "securities-a"))
    watcher = _ChainWatcher(bootstrap, prefix, genesis, result, console)
    await client.start()
    await watcher.start()
    try:
        console.print(f"3. {len(txs)} signed P2PKH payments from {lanes.count} lanes in "
                      f"{len(batches)} rounds (submitter securities-a); blocks as they commit:")
        for number, batch in enumerate(batches, start=1):
            extra = [_double_spend(lanes, genesis)] if number == 1 else []
            sent_at = time.monotonic()
            await client.submit_many(batch + extra)
            result.submitted += len(batch) + len(extra)
            outcomes = await client.wait([tx.txid for tx in batch + extra],
                                         timeout_s=ROUND_TIMEOUT_S)
            committed = sum(outcome.committed for outcome in outcomes.values())
            rejected = Counter(str(outcome.code) for outcome in outcomes.values()
                               if not outcome.committed)
            result.committed += committed
            for code, count in rejected.items():
                result.rejected[code] = result.rejected.get(code, 0) + count
            note = "".join(f", {count} rejected ({code})" for code, count in rejected.items())
            console.print(f"   round {number}: {len(batch) + len(extra)} sent, {committed} "
                          f"committed{note} in {time.monotonic() - sent_at:.2f} s")
        # The client may have read the last block before the printer did: let it catch up.
        target = max((height for height, *_ in client.committed_blocks), default=0)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        members = len(genesis.members)
        while ((max((row.height for row in result.blocks), default=0) < target
                or result.publishers.get(target, 0) < members)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
    finally:
        await watcher.stop()
        await client.stop()
    result.blocks.sort(key=lambda row: row.height)
    result.status = await _settled_status(bootstrap, prefix, genesis,
                                          result.blocks[-1].height if result.blocks else 0)


def _blocks_table(result: DemoResult) -> Table:
    table = Table(title="committed blocks (ledger.blocks.v1, QCs checked against genesis)",
                  header_style="bold")
    for column in ("height", "round", "proposer", "txs", "bytes", "QC voters", "acks seen",
                   "published by"):
        table.add_column(column, justify="right" if column in
                         ("height", "round", "txs", "bytes", "acks seen", "published by")
                         else "left")
    for row in result.blocks:
        table.add_row(str(row.height), str(row.round), row.proposer, str(row.tx_count),
                      str(row.block_bytes), ", ".join(row.qc_voters),
                      str(result.acks.get(row.height, 0)),
                      f"{result.publishers.get(row.height, 0)} nodes")
    return table


def run_demo(
    settings: config.Settings,
    *,
    tx_count: int = TX_COUNT_DEFAULT,
    rounds: int = ROUNDS_DEFAULT,
    state_dir: Path | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo against the broker of ``settings``; the node processes always stop.

    ``state_dir`` (default ``<settings.state_dir>/demo``) is emptied and then holds the
    chain (genesis, keys), the nodes' chain copies and their logs.
    """
    assert tx_count >= 1 and rounds >= 1
    console = console or Console(width=None if sys.stdout.isatty() else CONSOLE_WIDTH)
    base = state_dir or settings.state_dir / DEMO_DIRNAME
    shutil.rmtree(base, ignore_errors=True)
    run_id = uuid.uuid4().hex[:8]
    prefix = f"demo{run_id}."
    lanes = Lanes(f"demo-{run_id}", min(LANES_MAX, tx_count))
    started = time.monotonic()
    console.rule("capital-ledger demo: five institutions, blocks by 3-of-5 vote over Kafka")
    genesis = create_chain(base / "chain", chain_id=f"demo-{run_id}", lanes=lanes)
    console.print(f"1. genesis {genesis.chain_id}: members "
                  f"{', '.join(member.id for member in genesis.members)}, quorum "
                  f"{genesis.params.quorum}, {lanes.count} funded lanes; topics {prefix}*; "
                  f"files under {base}")
    cluster = LocalCluster(base / "chain", state_dir=base / "state", topic_prefix=prefix)
    result = DemoResult(prefix, base / "chain")
    try:
        asyncio.run(_run(settings.kafka_bootstrap, genesis, lanes, cluster, result,
                         tx_count=tx_count, rounds=rounds, console=console))
    finally:
        cluster.stop()
        result.node_exit_codes = cluster.exit_codes()
    result.elapsed_s = time.monotonic() - started
    console.print(_blocks_table(result))
    assert result.status is not None
    console.print(report_table(result.status, title="the five nodes (ledger.status.v1)"))
    rejected = ", ".join(f"{count} {code}" for code, count in result.rejected.items()) or "none"
    console.print(f"4. {result.committed} of {result.submitted} committed in "
                  f"{len(result.blocks)} blocks, rejected: {rejected}; nodes stopped; "
                  f"{result.elapsed_s:.1f} s in all")
    console.print(f"   the chain's logs stay on the broker: capledger status --topic-prefix "
                  f"{prefix} --genesis {base / 'chain'}")
    return result



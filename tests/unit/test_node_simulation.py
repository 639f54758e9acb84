"""The real ``LedgerNode`` under a seeded, deterministic simulation (no Kafka).

Five real ``LedgerNode`` objects (their own chain copy files, evidence and quarantine
in ``tmp_path``) share in-memory logs: their writer is replaced by ``MemoryWriter`` and
records are delivered through the node's own ``_handle`` (the entry point the Kafka
readers use), its clock is the simulation's. The seeded scheduler delivers random
batches of each log to random nodes, advances the clock, re-delivers records
(duplicates), pauses nodes for longer than any buffer, crashes and restarts them (a
fresh ``LedgerNode`` on the same directory, positioned as ``start()`` positions it),
and writes poison records (fields at their type limits, garbage) on every log.
A lagging node gets the bodies of decided heights from the blocks log, as the real
node's catch-up does.

Invariants: no node ever raises out of ``_handle``; no two different blocks at one
height in the blocks log; at the end every submitted payment is committed exactly once
and all nodes report the same head and state hash.

Reproduce one seed: ``CAPLEDGER_NODE_SIM_SEED=<n> pytest tests/unit/test_node_simulation.py``;
more seeds: ``CAPLEDGER_NODE_SIM_SEEDS=500``.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import pytest

from ledger import consensus
from ledger.membership import INSTITUTION_IDS, ChainParams
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import signed_tx_submitted_record, tx_submitted_record
from streams.kafka.topics import BLOCKS, PROPOSALS, TX, VOTES
from streams.node import ledger_node
from streams.node.ledger_node import LedgerNode, NodeSettings, Pool
from streams.tools.loadgen import Lanes, lane_chains
from tests.unit.test_block import KEYS, make_genesis

pytestmark = pytest.mark.unit

SEEDS = int(os.environ.get("CAPLEDGER_NODE_SIM_SEEDS", "60"))
ONE_SEED = os.environ.get("CAPLEDGER_NODE_SIM_SEED")
STEPS = 400
DRAIN_STEPS_MAX = 4_000
LANES = Lanes("node-simulation", 3)
PER_LANE = 3
GENESIS = dataclasses.replace(
    make_genesis(), allocations=LANES.allocations(),
    params=ChainParams(quorum=3, block_interval_ms=200, proposer_timeout_ms=1_000),
)
PAYMENTS = [tx for chain in lane_chains(LANES, GENESIS.hash_le, PER_LANE) for tx in chain]
START_MS = GENESIS.time_ms + 1_000
READ_LOGS = (TX.name, PROPOSALS.name, VOTES.name)


class MemoryWriter:
    """``LogWriter``'s interface over the simulation's in-memory logs."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        return self.sim.append(topic, value, key)

    async def send_many(self, topic: str, items: list[tuple[bytes | None, bytes]]) -> list[int]:
        return [self.sim.append(topic, value, key) for key, value in items]


@dataclasses.dataclass
class SimNode:
    node: LedgerNode
    cursors: dict[str, int]
    paused_until_step: int = 0


class Simulation:
    def __init__(self, seed: int, base: Path) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.base = base
        self.now_ms = START_MS
        self.logs: dict[str, list[LogRecord]] = {name: [] for name in (*READ_LOGS, BLOCKS.name)}
        self.nodes: dict[str, SimNode] = {}
        self.submitted = 0

    def append(self, topic: str, value: bytes, key: bytes | None) -> int:
        log = self.logs.setdefault(topic, [])
        log.append(LogRecord(len(log), key, value, self.now_ms))
        return len(log) - 1

    def start_node(self, me: str) -> None:
        """What ``LedgerNode.start`` does, without Kafka."""
        settings = NodeSettings(me, GENESIS, KEYS[me], "sim:0", self.base)
        node = LedgerNode(settings)
        settings.node_dir.mkdir(parents=True, exist_ok=True)
        node.quarantine.load(self.now_ms)
        node.load_chain_copy()
        node._writer = MemoryWriter(self)  # type: ignore[assignment]
        node.machine = consensus.initial_state(
            consensus.ConsensusConfig(GENESIS, me, node.genesis_hash), now_ms=self.now_ms,
            committed_height=node.state.height, head_hash=node.state.head_hash)
        node.pool = Pool(base_offset=node.committed_end)
        head = node.head
        cursors = {
            PROPOSALS.name: 0 if head is None else max(0, head.proposal_offset + 1),
            VOTES.name: 0 if head is None else head.last_vote_offset + 1,
            TX.name: node.committed_end,
        }
        node.started.set()
        self.nodes[me] = SimNode(node, cursors)

    async def deliver(self, sim_node: SimNode, name: str, count: int) -> None:
        start = sim_node.cursors[name]
        records = self.logs[name][start:start + count]
        if records:
            sim_node.cursors[name] = start + len(records)
            await sim_node.node._handle(name, records)

    async def catch_up(self, sim_node: SimNode) -> None:
        """The real node's catch-up, fed from the in-memory blocks log."""
        node = sim_node.node
        if node._body_missing():
            wanted = {d.height for d in node.machine.decided}
            bodies = [r for r in self.logs[BLOCKS.name]
                      if ledger_node._key_height(r.key) in wanted]
            if bodies:
                await node._handle(BLOCKS.name, bodies)

    def poison(self) -> None:
        now = self.now_ms
        vote = {"voter": self.rng.choice(INSTITUTION_IDS), "height": self.rng.choice(
            [1, 2**63 - 1, -1]), "round": self.rng.choice([0, -1, 2**31 - 1]),
            "kind": "nack", "block_hash": b"\x11" * 32,
            "reason_code": self.rng.choice(["x", "거부", "a\x00"]),
            "signature": b"\x30" * 70, "voted_at": now}
        self.append(VOTES.name, codec.encode("VoteCast", vote), None)
        self.append(PROPOSALS.name, self.rng.randbytes(self.rng.randrange(0, 50)), None)
        self.append(TX.name, codec.encode("TxSubmitted", tx_submitted_record(
            self.rng.randbytes(20), submitter="x\x00", idempotency_key="k", now_ms=now)), None)

    def submit(self) -> None:
        if self.submitted < len(PAYMENTS):
            tx = PAYMENTS[self.submitted]
            self.append(TX.name, codec.encode("TxSubmitted", signed_tx_submitted_record(
                tx.serialize(), key=KEYS["securities-a"], genesis_hash=GENESIS.hash_le,
                submitter="securities-a", idempotency_key=str(self.submitted),
                now_ms=self.now_ms)), None)
            self.submitted += 1

    async def step(self, step: int, *, faults: bool) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            self.submit()
        elif faults and roll < 0.06:
            self.poison()
        elif faults and roll < 0.08:
            victim = rng.choice(INSTITUTION_IDS)
            self.nodes[victim].node.chain.close()  # type: ignore[union-attr]
            self.start_node(victim)  # crash and restart: a fresh node on the same files
        elif faults and roll < 0.09:
            self.nodes[rng.choice(INSTITUTION_IDS)].paused_until_step = step + rng.randrange(
                20, 200)
        elif roll < 0.25:
            self.now_ms += rng.randrange(0, 400)
        else:
            sim_node = self.nodes[rng.choice(INSTITUTION_IDS)]
            if not faults or sim_node.paused_until_step <= step:
                await self.act(sim_node, duplicates=faults)

    async def act(self, sim_node: SimNode, *, duplicates: bool) -> None:
        rng = self.rng
        name = rng.choice(READ_LOGS)
        if duplicates and rng.random() < 0.05 and name != TX.name:
            sim_node.cursors[name] = max(0, sim_node.cursors[name] - rng.randrange(1, 4))
        await self.deliver(sim_node, name, rng.randrange(1, 6))
        await self.catch_up(sim_node)
        await sim_node.node._feed(consensus.Tick(self.now_ms))

    def blocks_by_height(self) -> dict[int, set[bytes]]:
        heights: dict[int, set[bytes]] = {}
        for record in self.logs[BLOCKS.name]:
            decoded = codec.decode(record.value, expected="BlockCommitted").record
            heights.setdefault(int(decoded["height"]), set()).add(bytes(decoded["block_hash"]))
        return heights

    def committed_txids(self) -> list[bytes]:
        from streams.kafka.records import committed_from_record

        seen: dict[int, Any] = {}
        for record in self.logs[BLOCKS.name]:
            committed = committed_from_record(
                codec.decode(record.value, expected="BlockCommitted").record,
                block_bytes_max=GENESIS.params.block_bytes_max)
            seen.setdefault(committed.block.height, committed.block)
        return [tx.hash_le for height in sorted(seen) for tx in seen[height].txs]

    def agreed(self) -> bool:
        states = {(s.node.state.height, s.node.state.head_hash, s.node.state.state_hash)
                  for s in self.nodes.values()}
        return len(states) == 1 and len(self.committed_txids()) == len(PAYMENTS)


async def _run(seed: int, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Simulation(seed, base)
    monkeypatch.setattr(ledger_node, "now_ms", lambda: sim.now_ms)
    for me in INSTITUTION_IDS:
        sim.start_node(me)
    replay = f"replay: CAPLEDGER_NODE_SIM_SEED={seed} pytest {__file__}"
    for step in range(STEPS):
        await sim.step(step, faults=True)
        forks = {h: len(b) for h, b in sim.blocks_by_height().items() if len(b) > 1}
        assert not forks, f"seed {seed} step {step}: forks {forks} ({replay})"
    while sim.submitted < len(PAYMENTS):
        sim.submit()
    for step in range(DRAIN_STEPS_MAX):  # no more faults: everyone must converge
        if sim.agreed():
            break
        await sim.step(STEPS + step, faults=False)
    assert sim.agreed(), (
        f"seed {seed}: no agreement after draining: "
        f"{ {m: s.node.state.height for m, s in sim.nodes.items()} }, "
        f"{len(sim.committed_txids())}/{len(PAYMENTS)} committed ({replay})")
    txids = sim.committed_txids()
    assert sorted(txids) == sorted(tx.hash_le for tx in PAYMENTS), f"seed {seed} ({replay})"
    raised = [e for s in sim.nodes.values() if s.node.evidence_path.exists()
              for e in s.node.evidence_path.read_text().splitlines()
              if "record-handling-failed" in e]
    assert not raised, f"seed {seed}: handling a record raised: {raised[:2]} ({replay})"
    for sim_node in sim.nodes.values():
        sim_node.node.chain.close()  # type: ignore[union-attr]


SEED_LIST = [int(ONE_SEED)] if ONE_SEED else list(range(SEEDS))


@pytest.mark.parametrize("seed", SEED_LIST)
async def test_real_nodes_under_a_seeded_simulation(seed: int, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await _run(seed, tmp_path, monkeypatch)

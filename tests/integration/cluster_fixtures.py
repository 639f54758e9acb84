"""Helpers of the failure tests: one short-lived five-node chain per test, and
readers that check what the logs say.

Owns: ``running_chain`` (an async context manager: chain files in the test's
``tmp_path``, topics under a unique prefix, five real ``capledger node`` processes
through ``streams.tools.cluster.LocalCluster``, a ``LedgerClient``; everything stopped and the
topics deleted on the way out, node log tails printed when the test fails);
``ChainRun`` (what a test drives: the cluster, the client, pre-signed lane payments);
``BlocksLog`` (every ``ledger.blocks.v1`` record, certificates checked, forks noted);
``StatusBoard`` (the latest ``ledger.status.v1`` heartbeat of each institution);
``read_log`` (decode a whole topic once) and chain-copy file helpers (the record
format of ``streams.node.chainstore``).

Imports: ``ledger``, ``streams``, aiokafka (admin, for topic clean-up).
Touches: the test's ``tmp_path``, topics named ``<prefix>ledger.*`` and the node
processes it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.block import Block, check_certified_block
from ledger.governance import schedule_after_block, schedule_from_genesis
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.tx import Transaction
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.acls import external_system_name
from streams.kafka.logio import LogReader, LogRecord, read_all
from streams.kafka.records import committed_from_record
from streams.kafka.topics import BLOCKS, STATUS, ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.loadgen import LANE_VALUE, PAYMENT_VALUE, Lanes, lane_chains

POLL_INTERVAL_S = 0.05
READ_TIMEOUT_MS = 100
NODES_UP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40
TOPIC_DELETE_TIMEOUT_MS = 30_000
PER_LANE_TXS = 40
FOLLOWER_RETRY_S = 0.5
CHAIN_RECORD_HEADER = struct.Struct("<II")  # streams.node.chainstore: [u32 length][u32 crc32]


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took. TimeoutError names ``what``."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s} s")
        await asyncio.sleep(POLL_INTERVAL_S)
    return time.monotonic() - started


# ------------------------------------------------------------------------- log readers


class LogFollower:
    """Reads one log from offset 0 in a background task until stopped; subclasses
    handle each record in ``on_record``."""

    def __init__(self, bootstrap: str, topic: str, client_id: str) -> None:
        self.reader = LogReader(bootstrap, topic, client_id=client_id)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reader.start(0)
        self._task = asyncio.create_task(self._run(), name=self.reader.topic)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # aiokafka's fetcher, closed while it backs off from a timed-out fetch (brokers
        # under fault), can raise CancelledError out of stop(): tear-down goes on.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.reader.stop()

    async def _run(self) -> None:
        while True:
            try:
                records = await self.reader.read(timeout_ms=READ_TIMEOUT_MS)
            except Exception:  # brokers away (the broker fault tests): wait, read on
                await asyncio.sleep(FOLLOWER_RETRY_S)
                continue
            for record in records:
                self.on_record(record)

    def on_record(self, record: LogRecord) -> None:
        raise NotImplementedError


class BlocksLog(LogFollower):
    """Every committed-block record (each node publishes its own copy), checked.

    ``blocks``: block hash -> block, one entry per distinct block; ``heights``: height
    -> the distinct block hashes committed there (more than one is a fork).
    """

    def __init__(self, bootstrap: str, topic: str, genesis: Genesis) -> None:
        super().__init__(bootstrap, topic, "failure-test-blocks")
        self.genesis = genesis
        # Membership by height, amended by the governance txs of the blocks read.
        self.schedule = schedule_from_genesis(genesis)
        self.blocks: dict[bytes, Block] = {}
        self.heights: dict[int, set[bytes]] = {}
        self.committers: dict[bytes, set[str]] = {}
        self.qc_voters: dict[bytes, tuple[str, ...]] = {}  # block hash -> first QC's voters
        self.records = 0
        self.bad_records: list[str] = []

    def on_record(self, record: LogRecord) -> None:
        self.records += 1
        try:
            decoded = codec.decode(record.value, expected="BlockCommitted").record
            committed = committed_from_record(
                decoded, block_bytes_max=self.genesis.params.block_bytes_max
            )
            check_certified_block(committed.block, committed.qc,
                                  self.schedule.at(committed.block.height),
                                  genesis_hash=self.genesis.hash_le)
        except Exception as error:  # noted; the tests assert there are none
            self.bad_records.append(f"offset {record.offset}: {error}")
            return
        block = committed.block
        if block.height not in self.heights:
            self.schedule, _ = schedule_after_block(self.schedule, block.height, block.txs)
        self.blocks.setdefault(block.hash, block)
        self.heights.setdefault(block.height, set()).add(block.hash)
        self.committers.setdefault(block.hash, set()).add(committed.committer)
        self.qc_voters.setdefault(block.hash, committed.qc.voters)

    @property
    def head_height(self) -> int:
        return max(self.heights, default=0)

    def block_at(self, height: int) -> Block:
        hashes = self.heights[height]
        assert len(hashes) == 1, f"height {height} has {len(hashes)} different blocks"
        return self.blocks[next(iter(hashes))]

    def txid_blocks(self) -> dict[str, list[bytes]]:
        """txid -> hashes of the distinct committed blocks that contain it."""
        found: dict[str, list[bytes]] = {}
        for block_hash, block in self.blocks.items():
            for tx in block.txs:
                found.setdefault(tx.txid, []).append(block_hash)
        return found

    def committed_txids(self) -> set[str]:
        return {tx.txid for block in self.blocks.values() for tx in block.txs}

    def forks(self) -> dict[int, int]:
        return {height: len(h) for height, h in self.heights.items() if len(h) > 1}


@dataclass(slots=True)
class Heartbeat:
    institution: str
    height: int
    head_hash: bytes
    state_hash: bytes
    round: int
    pending_txs: int
    received_at: float  # time.monotonic() of the test process


class StatusBoard(LogFollower):
    """The latest heartbeat of each institution on ``ledger.status.v1``."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(bootstrap, topic, "failure-test-status")
        self.latest: dict[str, Heartbeat] = {}

    def on_record(self, record: LogRecord) -> None:
        try:
            value = codec.decode(record.value, expected="NodeStatusReported").record
        except Exception:  # a bad heartbeat is not what these tests are about
            return
        self.latest[str(value["institution"])] = Heartbeat(
            str(value["institution"]), int(value["height"]), bytes(value["head_hash"]),
            bytes(value["state_hash"]), int(value["round"] or 0),
            int(value["pending_txs"] or 0), time.monotonic(),
        )

    def fresh(self, institutions: Iterable[str], since: float) -> dict[str, Heartbeat]:
        """Heartbeats of ``institutions`` received after ``since`` (monotonic)."""
        return {
            name: beat for name in institutions
            if (beat := self.latest.get(name)) is not None and beat.received_at > since
        }

    def agreement(self, institutions: Iterable[str], height: int, since: float) -> str | None:
        """None when every institution reported, after ``since``, ``height`` with one
        head hash and one state hash; otherwise what is still missing."""
        names = list(institutions)
        beats = self.fresh(names, since)
        if len(beats) < len(names):
            return f"no fresh heartbeat from {sorted(set(names) - beats.keys())}"
        behind = {n: b.height for n, b in beats.items() if b.height != height}
        if behind:
            return f"heights {behind}, want {height}"
        if len({(b.head_hash, b.state_hash) for b in beats.values()}) != 1:
            return "head or state hashes differ: " + ", ".join(
                f"{n}={display_hex(b.head_hash)[:12]}/{b.state_hash.hex()[:12]}"
                for n, b in beats.items()
            )
        return None


async def read_log(bootstrap: str, topic: str, expected: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` up to its current end, decoded as ``expected``."""
    records = await read_all(bootstrap, topic, client_id="failure-test-read")
    return [codec.decode(record.value, expected=expected).record for record in records]


# ------------------------------------------------------------------------- the chain


@dataclass
class ChainRun:
    """One test's chain: what the test drives and what it reads back."""

    bootstrap: str
    prefix: str
    chain_dir: Path
    state_dir: Path
    genesis: Genesis
    lanes: Lanes
    cluster: LocalCluster
    client: LedgerClient
    blocks: BlocksLog
    status: StatusBoard
    lane_txs: list[list[Transaction]]
    lane_cursor: list[int] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return self.prefix + name

    def node_dir(self, institution: str) -> Path:
        return self.state_dir / "nodes" / self.genesis.chain_id / institution

    def key(self, institution: str) -> PrivateKey:
        return load_institution_key(self.chain_dir, institution, genesis=self.genesis)

    def next_batch(self, per_lane: int, lanes: Iterable[int] | None = None) -> list[Transaction]:
        """The next ``per_lane`` payments of each lane, interleaved (no conflicts)."""
        chosen = list(range(self.lanes.count)) if lanes is None else list(lanes)
        batch: list[Transaction] = []
        for _ in range(per_lane):
            for lane in chosen:
                position = self.lane_cursor[lane]
                assert position < len(self.lane_txs[lane]), f"lane {lane} used up"
                batch.append(self.lane_txs[lane][position])
                self.lane_cursor[lane] = position + 1
        return batch

    def lane_unspent(self, lane: int) -> tuple[Transaction, int]:
        """The lane's next payment (not yet taken) and the value of the output it spends."""
        position = self.lane_cursor[lane]
        return self.lane_txs[lane][position], LANE_VALUE - position * PAYMENT_VALUE

    async def submit(self, txs: list[Transaction]) -> list[int]:
        offsets = await self.client.submit_many(txs)
        self.submitted.extend(tx.txid for tx in txs)
        return offsets

    async def wait_committed(self, txids: Iterable[str], *, timeout_s: float) -> float:
        wanted = set(txids)
        return await wait_until(lambda: wanted <= self.blocks.committed_txids(),
                                timeout_s=timeout_s,
                                what=f"{len(wanted)} txs committed")

    async def wait_agreement(self, institutions: Iterable[str], *, timeout_s: float) -> int:
        """Wait until every named node reports the blocks log's head height with the same
        head and state hash (fresh heartbeats); the height."""
        names = list(institutions)
        since = time.monotonic()
        problem: list[str | None] = [None]

        def agreed() -> bool:
            problem[0] = self.status.agreement(names, self.blocks.head_height, since)
            return problem[0] is None

        try:
            await wait_until(agreed, timeout_s=timeout_s, what="nodes agree")
        except TimeoutError as error:
            raise TimeoutError(f"{error}: {problem[0]}") from None
        return self.blocks.head_height

    def assert_exactly_once(self, txids: Iterable[str] | None = None) -> None:
        """Each submitted tx is in exactly one committed block; no other tx committed;
        heights 1..head each hold one block; every committed record checked."""
        wanted = list(self.submitted if txids is None else txids)
        assert not self.blocks.bad_records, self.blocks.bad_records[:3]
        assert not self.blocks.forks(), f"forks: {self.blocks.forks()}"
        head = self.blocks.head_height
        assert sorted(self.blocks.heights) == list(range(1, head + 1)), "heights not contiguous"
        where = self.blocks.txid_blocks()
        missing = [t for t in wanted if t not in where]
        assert not missing, f"{len(missing)} submitted txs never committed: {missing[:3]}"
        twice = {t: len(h) for t, h in where.items() if len(h) != 1}
        assert not twice, f"txs in more than one block: {list(twice.items())[:3]}"
        total = sum(len(block.txs) for block in self.blocks.blocks.values())
        assert total == len(wanted) == len(set(wanted)), (
            f"{total} txs committed, {len(wanted)} submitted"
        )

    def evidence(self, institution: str) -> list[dict[str, Any]]:
        path = self.node_dir(institution) / "evidence.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def dump_logs(self) -> None:
        for institution in self.cluster.nodes:
            print(f"----- {institution} (exit {self.cluster.exit_codes()[institution]})")
            print(self.cluster.log_tail(institution, LOG_TAIL_LINES))


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    """The chain's topics and their ACLs (decision 0131)."""
    from streams.kafka.topics import delete_topics

    await delete_topics(bootstrap, prefix=prefix, timeout_ms=TOPIC_DELETE_TIMEOUT_MS)


@contextlib.asynccontextmanager
async def running_chain(
    tmp_path: Path,
    unique_id: str,
    bootstrap: str,
    *,
    lane_count: int = 10,
    proposer_timeout_ms: int = 1_000,
    block_interval_ms: int = 200,
    issuer_value: int = 0,
    per_lane_txs: int = PER_LANE_TXS,
    node_env: dict[str, dict[str, str]] | None = None,
    back_offices: tuple[str, ...] = (),
) -> AsyncIterator[ChainRun]:
    """Five node processes on a fresh chain, all heard from (a heartbeat each);
    ``issuer_value`` funds each member issuer's identity script (the market's issuance);
    ``node_env``: extra environment per institution (metrics port, clock offset)."""
    prefix = f"{unique_id}."
    chain_dir = tmp_path / "chain"
    state_dir = tmp_path / "state"
    lanes = Lanes(unique_id, lane_count)
    genesis = create_chain(chain_dir, chain_id=f"fail-{unique_id[-12:]}", lanes=lanes,
                           block_interval_ms=block_interval_ms,
                           proposer_timeout_ms=proposer_timeout_ms, issuer_value=issuer_value,
                           back_offices=back_offices)
    await ensure_topics(bootstrap, prefix=prefix)
    cluster = LocalCluster(chain_dir, state_dir=state_dir, topic_prefix=prefix,
                           node_env=node_env)
    # The client connects as securities-a's back office, an external system: its ACLs
    # (write the tx log, read blocks and rejections) are all a submitter needs.
    client = LedgerClient(bootstrap, genesis, submitter="securities-a", topic_prefix=prefix,
                          principal=external_system_name("securities-a"),
                          signing_key=load_institution_key(chain_dir, "securities-a"))
    run = ChainRun(
        bootstrap, prefix, chain_dir, state_dir, genesis, lanes, cluster, client,
        BlocksLog(bootstrap, prefix + BLOCKS.name, genesis),
        StatusBoard(bootstrap, prefix + STATUS.name),
        lane_chains(lanes, genesis.hash_le, per_lane_txs),
        [0] * lane_count,
    )
    try:
        cluster.start()
        await client.start(watch_from_start=True)
        await run.blocks.start()
        await run.status.start()
        await wait_until(lambda: set(INSTITUTION_IDS) <= run.status.latest.keys(),
                         timeout_s=NODES_UP_TIMEOUT_S, what="a heartbeat from every node")
        yield run
    except BaseException:
        run.dump_logs()
        raise
    finally:
        cluster.stop()
        await run.blocks.stop()
        await run.status.stop()
        await client.stop()
        with contextlib.suppress(Exception):
            await _delete_topics(bootstrap, prefix)


# ------------------------------------------------------------------------- chain copy


def chain_records(path: Path) -> list[bytes]:
    """The payloads of a chain copy (``streams.node.chainstore`` record format)."""
    data = path.read_bytes()
    payloads, offset = [], 0
    while offset < len(data):
        length, crc = CHAIN_RECORD_HEADER.unpack_from(data, offset)
        start = offset + CHAIN_RECORD_HEADER.size
        payload = data[start : start + length]
        assert zlib.crc32(payload) == crc, f"{path}: record at byte {offset} already damaged"
        payloads.append(payload)
        offset += CHAIN_RECORD_HEADER.size + length
    return payloads


def write_chain_records(path: Path, payloads: Iterable[bytes]) -> None:
    """Rewrite a chain copy with correct lengths and CRCs (so only the block checks,
    hash links, Merkle roots and certificates, can find what was changed)."""
    path.write_bytes(b"".join(
        CHAIN_RECORD_HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads
    ))

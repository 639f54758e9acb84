"""One institution's ledger node: intake, proposer, validator, committer, view change.

Owns: ``LedgerNode`` — the imperative shell around ``ledger.consensus.step``. It reads
the three ordered logs (``ledger.tx.v1``, ``ledger.proposals.v1``, ``ledger.votes.v1``)
with plain aiokafka readers positioned from its own chain copy, turns records into
consensus events, and carries out the actions the machine returns: build and publish
a proposal, validate one and vote, publish timeout votes, commit (fsync the chain
copy, apply to the state, publish the committed record and the rejections), record
evidence. No ledger rule lives here: selection, validation and decisions are pure
functions of ``ledger/`` (docs/decisions/0030-node-pipeline.md).

No record stops it (docs/decisions/0050-no-record-stops-the-ledger.md): records are
range-checked at decode (``streams.kafka.records``), each record is handled in
isolation and quarantined if its handling raises (``streams.node.quarantine``), a
record that kills the process is quarantined after two start-ups (consensus records
marked one by one, tx-log fetches as a range then record by record: decision 0124), the
process exits only for its own broken invariants (``NodeHalted``); brokers or a network
that are away are waited out with bounded backoff, each record it decided to publish
sent until acknowledged (``streams.kafka.resilience``, decision 0100); on start-up it
republishes committed blocks missing from the blocks log, and when behind it takes
decided bodies from the blocks log while running.

The faust-streaming worker that hosts a node (heartbeats, the peer-status agent,
lifecycle) is ``streams.node.app``.

Touches: its own directory ``<state_dir>/nodes/<chain_id>/<institution>/`` (chain copy,
evidence, quarantine).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import functools
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from ledger import consensus
from ledger.block import (
    Block,
    BlockHeader,
    QuorumCertificate,
    check_block_context_free,
    check_block_links,
    check_certified_block,
    make_block,
    proposer_for,
    sign_vote,
)
from ledger.block_time import check_block_time, proposal_time_ms
from ledger.errors import ValidationError
from ledger.governance import change_from_tx, is_governance_tx, schedule_from_genesis
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.selection import BlockSelection, Candidate, Rejection, select_block_txs
from ledger.serialization import ByteReader
from ledger.snapshot import Snapshot, SnapshotError, encode_snapshot
from ledger.state import (
    BlockDelta,
    LedgerRules,
    LedgerState,
    apply_delta,
    state_from_genesis,
    validate_block,
)
from ledger.tx import Transaction
from streams.common.clock import now_ms
from streams.common.collector import BlockFreezer
from streams.kafka import codec
from streams.kafka.logio import (
    EndOffsets,
    FetchBatching,
    LogReader,
    LogRecord,
    LogWriter,
    RdkafkaLogReader,
)
from streams.kafka.records import (
    NODE_CONDITION_DISK_FULL,
    Committed,
    block_from_proposal,
    committed_from_record,
    committed_record,
    membership_changed_record,
    proposal_record,
    rejected_record,
    status_record,
    vote_from_record,
    vote_record,
)
from streams.kafka.resilience import (
    Backoff,
    Connectivity,
    ResilientWriter,
    is_transient,
    retry_until_done,
)
from streams.kafka.topics import (
    BLOCKS,
    GOVERNANCE,
    PROPOSALS,
    REJECTED,
    STATUS,
    TX,
    VOTES,
    ensure_topics,
)
from streams.node import signing_guard
from streams.node.chainstore import ChainStore, Damage
from streams.node.cut import BlockCutSizer
from streams.node.intake import Verifier, intake_records
from streams.node.metrics import NodeMetrics
from streams.node.pending_rejections import (
    PendingRejections,
    clear_pending,
    pending_path,
    read_pending,
    write_pending,
)
from streams.node.quarantine import Position, Quarantine
from streams.node.snapshots import (
    SNAPSHOT_EVERY_HEIGHTS_DEFAULT,
    load_newest,
    snapshot_dir,
    write_snapshot,
)

logger = logging.getLogger("capledger.node")

VERSION = "0.1.0"
# The loop sleeps until a log record arrives or the machine's next deadline
# (ledger.consensus.wake_at_ms), at most IDLE_WAIT_MS and at least TICK_MS_MIN.
IDLE_WAIT_MS = 500
TICK_MS_MIN = 5
READ_TIMEOUT_MS = 250  # a long poll: records are returned as soon as they arrive
# While tx-log records flow (2+ a read), the broker gathers them for up to 20 ms per
# fetch: a fetch costs ~0.6 ms of CPU whatever it carries (decision 0111).
TX_FETCH_BATCHING = FetchBatching(min_bytes=64 * 1024, max_wait_ms=20, records_min=2)
# Tx-log records read but not yet through intake; intake takes them in chunks so
# consensus messages are served between chunks.
TX_INBOX_MAX = 20_000
# Proposal and vote batches read but not yet fed to the machine (each batch is one
# fetch, bounded by the consumer's fetch sizes); the decider drains them first.
CONSENSUS_INBOX_BATCHES_MAX = 8
INTAKE_CHUNK = 500
# Undecided tx-log records a node holds in memory. When reached, the node stops
# reading the tx log (Kafka keeps the rest) until commits make room again.
POOL_TXS_MAX = 100_000
# Full collection of cyclic garbage every this many commits; the state is frozen out of
# the collector's view between them (streams/common/collector.py, decision 0119).
COLLECT_EVERY_HEIGHTS = 1_000
POOL_BYTES_MAX = 256 * 1024 * 1024
EVIDENCE_DETAIL_CHARS_MAX = 2_000
EVIDENCE_FILE_BYTES_MAX = 64 * 1024 * 1024  # then rotated once (evidence.jsonl.1)
# On start-up the node republishes those of its chain copy's last heights the blocks
# log does not hold (a commit fsynced, then the process died before publishing).
REPUBLISH_HEIGHTS_MAX = 32
# Catching up while running: when the votes log has decided a height whose block body
# this node does not hold (it dropped proposals beyond the machine's buffer while it
# was paused or slow) for CATCH_UP_AFTER_MS, the node reads the blocks log from
# CATCH_UP_MARGIN_MS before its head block's time and feeds the certified bodies of
# decided heights to the machine, CATCH_UP_READ_RECORDS_MAX records per read.
CATCH_UP_AFTER_MS = 1_000
CATCH_UP_MARGIN_MS = 60_000
CATCH_UP_READ_RECORDS_MAX = 20
# A write to the node's directory refused for lack of space (a full filesystem, a
# quota, a file-size limit): the node waits and retries every DISK_RETRY_MS instead of
# exiting, appending nothing meanwhile (docs/decisions/0102).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_RETRY_MS = 500
# Broker or network away (docs/decisions/0100): a heartbeat waits at most this long
# for its acknowledgement (then the node counts the broker unreachable and the next
# heartbeat tries again); the tx-log lag it reports is asked with the same bound.
HEARTBEAT_ACK_TIMEOUT_MS = 5_000


@dataclass(frozen=True, slots=True)
class NodeSettings:
    institution: str
    genesis: Genesis
    key: PrivateKey
    bootstrap: str
    state_dir: Path
    topic_prefix: str = ""
    # A state snapshot every this many heights (0: never); see streams/node/snapshots.py
    snapshot_every_heights: int = SNAPSHOT_EVERY_HEIGHTS_DEFAULT
    verify_workers: int = 1  # threads checking signatures at intake (streams.node.intake)
    verify_processes: bool = False  # the verify workers are processes (decision 0122)
    # The tx log's client: "aiokafka" (LogReader) or "librdkafka" (RdkafkaLogReader,
    # opt-in: cheaper alone, not yet in the loaded cluster; decision 0117)
    tx_reader: str = "aiokafka"

    @property
    def node_dir(self) -> Path:
        return self.state_dir / "nodes" / self.genesis.chain_id / self.institution

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


@dataclass(slots=True)
class _Validated:
    delta: BlockDelta
    rejections: tuple[Rejection, ...]


@dataclass(slots=True)
class Pool:
    """Undecided tx-log records from ``base_offset`` on, in log order.

    Offsets need not be contiguous: a transactional write leaves a control marker
    (commit/abort) at an offset no reader ever sees, and compaction could remove
    records. ``end_offset`` is the offset after the last record read; ``slice`` and
    ``drop_before`` work by offset, not by position.
    ``verified``: txids whose scripts intake verified (see ledger.state.check_tx);
    ``pending_outputs``: outputs of pooled txs, so a child's scripts can be verified
    before its parent commits; ``shared_txids``: txs pooled again while a copy was
    pooled (duplicate records), whose outputs a drop must put back (decision 0127).
    """

    base_offset: int
    candidates: list[Candidate] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    seen_ms: list[int] = field(default_factory=list)
    bytes_total: int = 0
    verified: set[bytes] = field(default_factory=set)
    pending_outputs: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    end_offset: int = -1
    # txids added while a copy of the same tx was pooled (their outputs are shared)
    shared_txids: set[bytes] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.end_offset = max(self.end_offset, self.base_offset)

    def slice(self, start: int, end: int) -> list[Candidate]:
        assert self.base_offset <= start <= end <= self.end_offset
        return self.candidates[bisect.bisect_left(self.offsets, start)
                               : bisect.bisect_left(self.offsets, end)]

    def drop_before(self, offset: int) -> None:
        count = bisect.bisect_left(self.offsets, offset)
        if self.shared_txids:
            self._drop_with_copies(count)
        else:
            # No pooled tx has a second copy in the pool: each dropped tx's outputs
            # leave the map, nothing to put back (decision 0127).
            pop, discard, dropped_bytes = self.pending_outputs.pop, self.verified.discard, 0
            for candidate in itertools.islice(self.candidates, count):
                tx = candidate.tx
                if tx is not None:
                    dropped_bytes += tx.size_bytes
                    discard(tx.hash_le)
                    for key in tx.output_keys:
                        pop(key, None)
            self.bytes_total -= dropped_bytes
        del self.candidates[:count]
        del self.offsets[:count]
        del self.seen_ms[:count]
        self.base_offset = max(self.base_offset, offset)
        self.end_offset = max(self.end_offset, self.base_offset)

    def _drop_with_copies(self, count: int) -> None:
        """``drop_before``'s first ``count`` candidates out when some tx is pooled twice:
        only a later copy of a dropped tx (a duplicate record) shares its outputs; put
        those back, instead of rebuilding the map from the whole pool."""
        dropped: set[bytes] = set()
        for candidate in self.candidates[:count]:
            tx = candidate.tx
            if tx is not None:
                self.bytes_total -= tx.size_bytes
                self.verified.discard(tx.hash_le)
                dropped.add(tx.hash_le)
                self._remove_outputs(tx)
        copies: collections.Counter[bytes] = collections.Counter()
        for candidate in self.candidates[count:]:
            if candidate.tx is not None:
                copies[candidate.tx.hash_le] += 1
                if candidate.tx.hash_le in dropped:
                    self._add_outputs(candidate.tx)
        self.shared_txids = {txid for txid in self.shared_txids if copies[txid] > 1}

    def _remove_outputs(self, tx: Transaction) -> None:
        pop = self.pending_outputs.pop
        for key in tx.output_keys:  # txid + u32 index, made once per tx (decision 0116)
            pop(key, None)

    def _add_outputs(self, tx: Transaction) -> None:
        pending = self.pending_outputs
        for key, output in zip(tx.output_keys, tx.outputs, strict=True):
            pending[key] = (output.script_pubkey, output.value)

    def add(self, candidate: Candidate, seen_ms: int, *, same_record: bool = False) -> None:
        """Append the next record read; offsets only grow (gaps allowed). With
        ``same_record``, the next transaction of the batch record just added (the same
        offset; decision 0112)."""
        continues_record = (same_record and bool(self.candidates)
                            and candidate.offset == self.end_offset - 1)
        if not continues_record and candidate.offset < self.end_offset:
            raise ValueError(f"tx log offset {candidate.offset} read after {self.end_offset - 1}")
        self.candidates.append(candidate)
        self.offsets.append(candidate.offset)
        self.seen_ms.append(seen_ms)
        self.end_offset = candidate.offset + 1
        tx = candidate.tx
        if tx is not None:
            self.bytes_total += tx.size_bytes
            keys = tx.output_keys
            if keys and keys[0] in self.pending_outputs:
                self.shared_txids.add(tx.hash_le)  # a second copy: its outputs are shared
            self._add_outputs(tx)

    def seen_at(self, offset: int) -> int | None:
        """When intake took the first pooled record at or after tx-log ``offset``."""
        index = bisect.bisect_left(self.offsets, offset)
        return self.seen_ms[index] if index < len(self.offsets) else None

    @property
    def is_full(self) -> bool:
        return len(self.candidates) >= POOL_TXS_MAX or self.bytes_total >= POOL_BYTES_MAX


class NodeHalted(Exception):
    """The node found its own state inconsistent with a certified block: stop loudly."""


class LedgerNode:
    """The node's state and its reaction to each log record. One asyncio task drives it."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.genesis = settings.genesis
        self.genesis_hash = self.genesis.hash_le
        self.me = settings.institution
        self.rules = LedgerRules.from_genesis(self.genesis)
        # Membership and parameters by height: the state carries the schedule, and
        # applying a block with a governance transaction amends it (decision 0061).
        self.state: LedgerState = state_from_genesis(
            self.genesis_hash, self.genesis.allocations,
            schedule=schedule_from_genesis(self.genesis, self.genesis_hash),
        )
        self.head: Committed | None = None
        self.machine = consensus.initial_state(
            consensus.ConsensusConfig(self.genesis, self.me, self.genesis_hash), now_ms=now_ms(),
            schedule=self.state.schedule,
        )
        self.pool = Pool(base_offset=0)
        self.freezer = BlockFreezer(COLLECT_EVERY_HEIGHTS)
        self.proposal_offsets: dict[bytes, int] = {}
        self.vote_offsets: dict[tuple[str, int, int, str, bytes], int] = {}
        self.validated: dict[bytes, _Validated] = {}
        self.deferred_validation: Block | None = None
        # Proposals and votes are handled before any waiting tx-log record, so a vote
        # never queues behind seconds of intake work (head-of-line blocking).
        self.consensus_inbox: collections.deque[tuple[str, list[LogRecord]]] = (
            collections.deque()
        )
        self.tx_inbox: collections.deque[LogRecord] = collections.deque()
        self.wakeup = asyncio.Event()
        self.tx_room = asyncio.Event()
        self.tx_room.set()
        self.consensus_room = asyncio.Event()
        self.consensus_room.set()
        # What this node's own operations saw of the brokers (docs/decisions/0100).
        self.connectivity = Connectivity(self.me)
        self.backoff = Backoff()
        self._writer: ResilientWriter | None = None  # made in start(): needs the running loop
        self.readers: dict[str, LogReader | RdkafkaLogReader] = {}
        self.chain: ChainStore | None = None
        self.evidence_path = settings.node_dir / "evidence.jsonl"
        self._pending_path = pending_path(settings.node_dir)
        self.quarantine = Quarantine(settings.node_dir)
        self.verifier = Verifier(settings.verify_workers, processes=settings.verify_processes)
        self.cut_sizer = BlockCutSizer.for_timeout(self.genesis.params.proposer_timeout_ms)
        # height -> (block hash, committed record) of the chain copy's last heights not
        # yet seen in the blocks log (start-up only; emptied once republished).
        self.unpublished: dict[int, tuple[bytes, bytes, int]] = {}
        self.stopping = False
        self.started = asyncio.Event()
        self._body_missing_since_ms: int | None = None
        self._catch_up: asyncio.Task[None] | None = None
        self.metrics = NodeMetrics(self.me)
        self.disk_full = False
        self._end_offsets: EndOffsets | None = None  # made by log_lags (metrics only)
        self.snapshot_height = 0  # of the last snapshot loaded or written
        self._guard: signing_guard.SigningGuard | None = None  # looked up at the first vote
        # A consensus record decoded ahead to read its tx range (``_take_fetched_for``),
        # kept for its handler: (topic, offset, the decoded record).
        self._decoded_ahead: tuple[str, int, dict[str, Any]] | None = None
        # Blocks whose transactions were parsed from their bodies because the pool had
        # not read their range ("proposal") or checked by ``validate_block`` at commit
        # ("commit"); decision 0129 (also on /metrics).
        self.bodies_used: dict[str, int] = {"proposal": 0, "commit": 0}

    # ---------------------------------------------------------------- start-up

    @property
    def writer(self) -> ResilientWriter:
        assert self._writer is not None, "node not started"
        return self._writer

    @property
    def committed_end(self) -> int:
        """The tx-log offset the next block starts at."""
        return 0 if self.head is None else self.head.block.header.tx_offset_end

    @property
    def height(self) -> int:
        return self.state.height

    def view(self, height: int) -> Genesis:
        """The membership in force at ``height`` as this node's committed blocks say."""
        schedule = self.state.schedule
        assert schedule is not None
        return schedule.at(height)

    @property
    def block_bytes_max(self) -> int:
        """Decode bound for blocks: the largest block any known membership allows."""
        schedule = self.state.schedule
        assert schedule is not None
        return max(epoch.view.params.block_bytes_max for epoch in schedule.epochs)

    def check_own_key(self) -> None:
        """Warn (evidence) when this node's key is not its key in any membership the
        chain copy knows: its votes would be refused (e.g. a rotated key started
        before the chain copy reached the rotation)."""
        schedule = self.state.schedule
        assert schedule is not None
        mine = self.settings.key.public_key.compressed()
        known = [epoch.view.member(self.me) for epoch in schedule.epochs]
        if not any(m is not None and m.public_key.compressed() == mine for m in known):
            self._record_evidence("own-key-not-in-membership", self.me,
                                  "this node's key is not its key in any membership known "
                                  f"at height {self.height}; its votes will be refused")

    @property
    def parent_time_ms(self) -> int:
        """The time of the head block (genesis time at height 0)."""
        return self.genesis.time_ms if self.head is None else self.head.block.header.time_ms

    def _verify_record(self, payload: bytes) -> Committed:
        record = codec.decode(payload, expected="BlockCommitted").record
        committed = committed_from_record(record, block_bytes_max=self.block_bytes_max)
        block = committed.block
        view = self.view(block.height)
        check_certified_block(block, committed.qc, view, genesis_hash=self.genesis_hash)
        check_block_context_free(block, view)
        check_block_links(block, prev_hash=self.state.head_hash, height=self.state.height + 1)
        if block.header.tx_offset_start != self.committed_end:
            raise ValidationError(
                f"block {block.height} starts at tx offset {block.header.tx_offset_start}, "
                f"the chain at {self.committed_end}",
                code="block-tx-range",
            )
        return committed

    def _apply_committed(self, committed: Committed, *, verify_scripts: bool) -> None:
        """Apply a certified block to the state (a failure here is a divergence)."""
        delta = validate_block(
            self.state, committed.block, self.rules, verify_scripts=verify_scripts
        )
        self.state = apply_delta(self.state, delta)
        self.head = committed
        self.freezer.block_done()

    def load_chain_copy(self) -> Damage | None:
        """Resume from the newest verified snapshot, if any, then verify the rest of this
        institution's own copy and apply it to the state."""
        self.chain = ChainStore(self.settings.node_dir / "chain.dat")
        start = self._load_snapshot()

        def verify(index: int, payload: bytes) -> None:
            committed = self._verify_record(payload)
            self._apply_committed(committed, verify_scripts=False)
            self._remember_own(committed.block, payload)

        payloads, damage = self.chain.load(verify, start=start)
        if damage is not None:
            logger.warning(
                "%s: chain copy damaged at record %d (%s); cut off, evidence kept in %s; "
                "catching up from the logs",
                self.me, damage.record_index, damage.reason, damage.evidence_path,
            )
            self._record_evidence(
                "chain-copy-damaged", self.me,
                f"record {damage.record_index} at byte {damage.offset}: {damage.reason}",
            )
        logger.info("%s: chain copy verified: %d blocks after height %d, head %s", self.me,
                    len(payloads), self.snapshot_height, display_hex(self.state.head_hash)[:16])
        return damage

    def _load_snapshot(self) -> int:
        """Take the state of the newest usable snapshot; the chain-copy byte offset to
        read on from (0: no snapshot, replay the whole copy). Refusals become evidence."""
        assert self.chain is not None
        snapshot, refusals = load_newest(snapshot_dir(self.settings.node_dir), self.genesis,
                                         self._check_snapshot_anchor,
                                         signer_keys=(self.settings.key.public_key,))
        for refusal in refusals:
            logger.warning("%s: snapshot %s refused (%s: %s)", self.me, refusal.path.name,
                           refusal.code, refusal.message)
            self._record_evidence("snapshot-refused", self.me,
                                  f"{refusal.path.name}: {refusal.code}: {refusal.message}")
        if snapshot is None:
            return 0
        self.state = snapshot.state  # its schedule too (decision 0103)
        if snapshot.head_record:
            self.head = self._decode_committed(snapshot.head_record)
            self._remember_own(self.head.block, snapshot.head_record)
            self.chain.last_payload = snapshot.head_record
        self.snapshot_height = snapshot.state.height
        logger.info("%s: resumed from the snapshot of height %d (state hash %s)", self.me,
                    self.snapshot_height, display_hex(snapshot.state_hash)[:16])
        return snapshot.chain_copy_end

    def _decode_committed(self, payload: bytes) -> Committed:
        record = codec.decode(payload, expected="BlockCommitted").record
        return committed_from_record(record, block_bytes_max=self.block_bytes_max)

    def _check_snapshot_anchor(self, snapshot: Snapshot) -> None:
        """The snapshot is this node's own and its head is the chain copy's record that
        ends at ``chain_copy_end``, certified by a quorum (``snapshot-foreign`` /
        ``snapshot-anchor``)."""
        assert self.chain is not None
        state = snapshot.state
        if snapshot.institution != self.me:
            raise SnapshotError(f"written by {snapshot.institution}, not by {self.me}",
                                code="snapshot-foreign")
        if state.height == 0:
            if snapshot.chain_copy_end != 0 or state.head_hash != self.genesis_hash:
                raise SnapshotError("height 0 not at the genesis", code="snapshot-anchor")
            return
        on_disk = self.chain.read_record_before(snapshot.chain_copy_end,
                                                len(snapshot.head_record))
        if on_disk != snapshot.head_record:
            raise SnapshotError(f"the chain copy does not hold the head record of height "
                                f"{state.height} before byte {snapshot.chain_copy_end}",
                                code="snapshot-anchor")
        try:
            committed = self._decode_committed(snapshot.head_record)
            block = committed.block
            assert state.schedule is not None  # decode_snapshot always sets it
            check_certified_block(block, committed.qc, state.schedule.at(block.height),
                                  genesis_hash=self.genesis_hash)
        except ValidationError as error:
            raise SnapshotError(f"head record: {error.code}: {error.message}",
                                code="snapshot-anchor") from None
        if (block.hash, block.height) != (state.head_hash, state.height):
            raise SnapshotError("head record is not the state's head block",
                                code="snapshot-anchor")

    @property
    def next_snapshot_height(self) -> int:
        """The first height above the last snapshot at which this node writes its next:
        a multiple of ``snapshot_every_heights`` shifted by this member's share of it
        (member i of n: i * every // n). The members' snapshots — seconds of CPU each
        once the state holds millions of outputs — then fall at different heights: a
        quorum never waits on several snapshot writers at once (the 30-minute soak saw
        p99 reach 5–14 s whenever all five wrote at the same height)."""
        every = self.settings.snapshot_every_heights
        ids = self.genesis.member_ids
        shift = ids.index(self.me) * every // len(ids) if self.me in ids else 0
        return self.snapshot_height + (shift - self.snapshot_height - 1) % every + 1

    @property
    def snapshot_due(self) -> bool:
        every = self.settings.snapshot_every_heights
        return (every > 0 and self.started.is_set()
                and self.state.height >= self.next_snapshot_height)

    async def write_snapshot(self) -> Path | None:
        """Snapshot the state now (a copy on the loop, encoding and writing in a thread,
        so consensus goes on meanwhile); the file, or None at height 0."""
        assert self.chain is not None
        payload = self.chain.last_payload
        if payload is None or self.head is None or self.head.block.hash != self.state.head_hash:
            return None
        state = self.state.copy()
        end = self.chain.end_offset

        def build() -> Path:
            data = encode_snapshot(state, genesis_hash=self.genesis_hash, institution=self.me,
                                   key=self.settings.key, chain_copy_end=end,
                                   head_record=payload)
            return write_snapshot(snapshot_dir(self.settings.node_dir), state.height, data)

        path = await asyncio.to_thread(build)
        self.snapshot_height = state.height
        logger.info("%s: snapshot of height %d written (%d bytes)", self.me, state.height,
                    path.stat().st_size)
        return path

    def _remember_own(self, block: Block, payload: bytes) -> None:
        """The most recent blocks of the chain copy, for ``republish_unpublished``."""
        self.unpublished[block.height] = (block.hash, payload, block.header.time_ms)
        while len(self.unpublished) > REPUBLISH_HEIGHTS_MAX:
            del self.unpublished[min(self.unpublished)]

    def _note_published(self, decoded: dict[str, Any]) -> None:
        own = self.unpublished.get(decoded["height"])
        if own is not None and own[0] == decoded["block_hash"]:
            del self.unpublished[decoded["height"]]

    async def republish_unpublished(self) -> int:
        """Publish the blocks of the chain copy the blocks log does not hold: a node
        that fsynced a commit and died before publishing it would otherwise leave a
        hole every reader of the log waits on. Heights in order; the count."""
        heights = sorted(self.unpublished)
        for height in heights:
            await self.writer.send(self.settings.topic(BLOCKS.name),
                                   self.unpublished[height][1], key=str(height).encode())
        if heights:
            logger.warning("%s: republished %d committed blocks missing from the blocks log "
                        "(heights %d..%d)", self.me, len(heights), heights[0], heights[-1])
        self.unpublished.clear()
        return len(heights)

    async def republish_rejections(self) -> int:
        """Publish the rejection records a node that died after committing a block and
        before their acknowledgement left on disk (decision 0129): the same bytes again,
        only when the file names the chain copy's head block (a file of a height not
        committed here is the commit's own leftover: the height is decided again). The
        number of records sent."""
        path = self._pending_path
        try:
            pending = read_pending(path)
        except ValidationError as error:
            logger.error("%s: %s; removed", self.me, error)
            self._record_evidence(error.code, self.me, str(error))
            clear_pending(path)
            return 0
        if pending is None:
            return 0
        head = self.head
        if head is None or pending.height != head.block.height or \
                pending.block_hash != head.block.hash:
            logger.warning("%s: pending rejections of height %d not committed here "
                           "(head %d): removed", self.me, pending.height, self.height)
            clear_pending(path)
            return 0
        await self.writer.send_many(self.settings.topic(REJECTED.name),
                                    [(self.me.encode(), v) for v in pending.payloads])
        clear_pending(path)
        logger.warning("%s: republished %d rejection records of height %d left unacknowledged "
                       "by the last run", self.me, len(pending.payloads), pending.height)
        return len(pending.payloads)

    async def scan_blocks_log(self) -> None:
        """Note which of the chain copy's last heights the blocks log holds (for
        ``republish_unpublished``), reading it from shortly before the oldest of them.

        The node no longer heals its copy from this log: a certified record is not proof
        that its block won (a late quorum of acks after a timeout quorum certifies a
        losing block; decision 0020). A node behind its peers replays the votes log from
        its head instead, and takes the bodies of the heights the votes log decided from
        the proposals log or, when those are gone, from this log (``_catch_up``), so
        every block it commits is the decided one (docs/decisions/0050)."""
        if not self.unpublished:
            return
        oldest_ms = min(time_ms for _, _, time_ms in self.unpublished.values())
        reader = LogReader(self.settings.bootstrap, self.settings.topic(BLOCKS.name),
                           client_id=f"capledger-{self.me}-scan")
        await reader.start(0)
        try:
            await reader.seek_to_time(oldest_ms - CATCH_UP_MARGIN_MS)
            async for batch in reader.read_to_end(max_records=200):
                for record in batch:
                    try:
                        decoded = codec.decode(record.value, expected="BlockCommitted").record
                    except ValidationError:
                        continue
                    self._note_published(decoded)
        finally:
            await reader.stop()

    async def start(self) -> None:
        settings = self.settings
        settings.node_dir.mkdir(parents=True, exist_ok=True)
        for crashed in self.quarantine.load(now_ms()):
            self._record_evidence("record-crashed-node", "unknown",
                                  f"{crashed.topic} offset {crashed.offset}: quarantined")
        await self._until_done("topic check", lambda: ensure_topics(
            settings.bootstrap, prefix=settings.topic_prefix))
        self.load_chain_copy()
        await self._until_done("blocks log scan", self.scan_blocks_log)
        self._writer = ResilientWriter(
            lambda: LogWriter(settings.bootstrap, client_id=f"capledger-{self.me}"),
            connectivity=self.connectivity, backoff=self.backoff)
        await self._writer.start()
        await self.republish_unpublished()
        await self.republish_rejections()
        self.machine = consensus.initial_state(
            consensus.ConsensusConfig(self.genesis, self.me, self.genesis_hash),
            now_ms=now_ms(),
            committed_height=self.state.height,
            head_hash=self.state.head_hash,
            schedule=self.state.schedule,
        )
        self.check_own_key()
        self.pool = Pool(base_offset=self.committed_end)
        positions = {
            PROPOSALS.name: 0 if self.head is None else self.head.proposal_offset + 1,
            VOTES.name: 0 if self.head is None else self.head.last_vote_offset + 1,
            TX.name: self.committed_end,
        }
        for name, position in positions.items():
            self.readers[name] = await self._until_done(
                f"{name} reader start", functools.partial(self._open_reader, name, position))
        await self._until_done("consensus log replay", self._catch_up_consensus_logs)
        logger.info("%s: started at height %d (tx offset %d)", self.me, self.height,
                 self.committed_end)
        self.started.set()

    async def _until_done(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """``operation()``, waited out while the brokers are away (never gives up)."""
        return await retry_until_done(operation, what=what, connectivity=self.connectivity,
                                      backoff=self.backoff)

    async def _open_reader(self, name: str, position: int) -> LogReader | RdkafkaLogReader:
        reader: LogReader | RdkafkaLogReader
        if name == TX.name and self.settings.tx_reader == "librdkafka":
            reader = RdkafkaLogReader(self.settings.bootstrap, self.settings.topic(name),
                                      client_id=f"capledger-{self.me}-{name}",
                                      batching=TX_FETCH_BATCHING)
        else:
            reader = LogReader(self.settings.bootstrap, self.settings.topic(name),
                               client_id=f"capledger-{self.me}-{name}",
                               batching=TX_FETCH_BATCHING if name == TX.name else None)
        try:
            await reader.start(position)
        except BaseException:
            with contextlib.suppress(Exception):
                await reader.stop()
            raise
        return reader

    async def _reopen_reader(self, name: str) -> None:
        """Replace a reader that failed, at the position it had reached."""
        old = self.readers[name]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), HEARTBEAT_ACK_TIMEOUT_MS / 1000)
        self.readers[name] = await self._until_done(
            f"{name} reader start", functools.partial(self._open_reader, name, old.position))

    async def _catch_up_consensus_logs(self) -> None:
        """Feed proposals and votes already in the log before reading any tx, so a
        restarted node learns what it already proposed and voted before it acts."""
        for name in (PROPOSALS.name, VOTES.name):
            async for records in self.readers[name].read_to_end():
                await self._handle(name, records)

    async def stop(self) -> None:
        self.stopping = True
        for reader in self.readers.values():
            with contextlib.suppress(Exception):
                await reader.stop()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer.stop()
        if self._end_offsets is not None:
            with contextlib.suppress(Exception):
                await self._end_offsets.stop()
        if self.chain is not None:
            self.chain.close()
        self.quarantine.close()
        self.verifier.close()

    # ---------------------------------------------------------------- main loop

    async def _read_forever(self, name: str) -> None:
        failures = 0
        while not self.stopping:
            await (self.tx_room if name == TX.name else self.consensus_room).wait()
            if name == VOTES.name and self.machine.decided_full:
                # Back-pressure: decided heights wait for their bodies (blocks log).
                await asyncio.sleep(READ_TIMEOUT_MS / 1000)
                continue
            try:
                records = await self.readers[name].read(timeout_ms=READ_TIMEOUT_MS)
            except Exception as error:  # the broker or network: wait, reopen, go on
                if not is_transient(error):
                    raise
                failures += 1
                self.connectivity.failed(f"read {name}", error)
                await asyncio.sleep(self.backoff.delay_ms(failures) / 1000)
                await self._reopen_reader(name)
                continue
            failures = 0
            if not records:
                continue
            if name == TX.name:
                self.tx_inbox.extend(records)
                self._update_tx_room()
            else:
                self.consensus_inbox.append((name, records))
                if len(self.consensus_inbox) >= CONSENSUS_INBOX_BATCHES_MAX:
                    self.consensus_room.clear()
            self.wakeup.set()

    def _update_tx_room(self) -> None:
        if len(self.tx_inbox) >= TX_INBOX_MAX or self.pool.is_full:
            self.tx_room.clear()
        else:
            self.tx_room.set()

    async def run(self) -> None:
        """Read the logs and drive the machine until cancelled."""
        if not self.started.is_set():
            await self.start()
        readers = [
            asyncio.create_task(self._read_forever(name), name=f"read-{name}")
            for name in (TX.name, PROPOSALS.name, VOTES.name)
        ]
        try:
            while not self.stopping:
                intake_possible = bool(self.tx_inbox) and not self.pool.is_full
                if not self.consensus_inbox and not intake_possible:
                    self.wakeup.clear()
                    wake_ms = consensus.wake_at_ms(self.machine)
                    wait_ms = IDLE_WAIT_MS if wake_ms is None else min(
                        IDLE_WAIT_MS, max(TICK_MS_MIN, wake_ms - now_ms())
                    )
                    await self._sleep_until_woken(wait_ms)
                while self.consensus_inbox:
                    name, records = self.consensus_inbox.popleft()
                    self.consensus_room.set()
                    await self._handle(name, records)
                if self.tx_inbox and not self.pool.is_full:
                    count = min(INTAKE_CHUNK, len(self.tx_inbox))
                    chunk = [self.tx_inbox.popleft() for _ in range(count)]
                    self._update_tx_room()
                    await self._handle(TX.name, chunk)
                for task in readers:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                self._maybe_catch_up()
                await self._feed(consensus.Tick(now_ms()))
                await asyncio.sleep(0)  # let the readers run between chunks
        finally:
            if self._catch_up is not None:
                readers.append(self._catch_up)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _sleep_until_woken(self, wait_ms: int) -> None:
        """Until a reader sets ``wakeup`` or ``wait_ms`` pass: a timer that sets the
        event, not ``asyncio.wait_for`` (which makes a task and a future each time the
        loop sleeps, a few times per block; decision 0120)."""
        timer = asyncio.get_running_loop().call_later(wait_ms / 1000, self.wakeup.set)
        try:
            await self.wakeup.wait()
        finally:
            timer.cancel()

    # ---------------------------------------------------------------- catching up

    def waiting_for_bodies(self) -> bool:
        """The votes log decided heights this node cannot commit yet (it is behind)."""
        return self._body_missing()

    def _body_missing(self) -> bool:
        """The votes log decided the next height but its block body is not here."""
        machine = self.machine
        if not machine.decided:
            return False
        decision = machine.decided[0]
        block = machine.proposal_at(decision.height, decision.round)
        return block is None or block.hash != decision.block_hash

    def _maybe_catch_up(self) -> None:
        if not self._body_missing():
            self._body_missing_since_ms = None
            return
        now = now_ms()
        if self._body_missing_since_ms is None:
            self._body_missing_since_ms = now
            return
        running = self._catch_up is not None and not self._catch_up.done()
        if running or now - self._body_missing_since_ms < CATCH_UP_AFTER_MS:
            return
        if self._catch_up is not None and self._catch_up.done() and not \
                self._catch_up.cancelled() and self._catch_up.exception() is not None:
            logger.warning("%s: catch-up from the blocks log failed: %s", self.me,
                        self._catch_up.exception())
        self._catch_up = asyncio.create_task(self._catch_up_from_blocks_log(),
                                             name="catch-up")

    async def _catch_up_from_blocks_log(self) -> None:
        """Feed the bodies of decided heights from ``ledger.blocks.v1`` (through the
        consensus inbox, so the decider handles them in order) until none is missing
        or the log has no more."""
        reader = LogReader(self.settings.bootstrap, self.settings.topic(BLOCKS.name),
                           client_id=f"capledger-{self.me}-catch-up")
        await reader.start(0)
        try:
            await reader.seek_to_time(self.parent_time_ms - CATCH_UP_MARGIN_MS)
            logger.warning("%s: behind at height %d with %d decided heights waiting for their "
                        "bodies: reading the blocks log from offset %d", self.me,
                        self.height, len(self.machine.decided), reader.position)
            while not self.stopping and self._body_missing():
                await self.consensus_room.wait()
                records = await reader.read(timeout_ms=READ_TIMEOUT_MS,
                                            max_records=CATCH_UP_READ_RECORDS_MAX)
                if not records and reader.position >= await reader.end_offset():
                    break  # nothing more now; the next check starts again
                wanted = {d.height for d in self.machine.decided}
                bodies = [r for r in records if _key_height(r.key) in wanted
                          or _key_height(r.key) is None]
                if bodies:
                    self.consensus_inbox.append((BLOCKS.name, bodies))
                    self.wakeup.set()
        finally:
            await reader.stop()

    async def _on_certified_record(self, record: LogRecord) -> None:
        try:
            decoded = self._decoded(BLOCKS.name, record, "BlockCommitted")
            committed = committed_from_record(decoded, block_bytes_max=self.block_bytes_max)
            if committed.signature:  # version-1 records (before 0051) carry none
                committed.check_signature(self.view(committed.block.height), self.genesis_hash)
        except ValidationError:
            return  # another copy may follow; the machine takes only the decided body
        if committed.proposal_offset >= 0:
            self.proposal_offsets.setdefault(committed.block.hash, committed.proposal_offset)
        await self._feed(consensus.CertifiedBlockReceived(committed.block, committed.qc))

    async def _handle(self, name: str, records: list[LogRecord]) -> None:
        """Handle one batch of one log, each record isolated from the others: an
        unexpected exception while handling a record is logged with its topic and
        offset, recorded as evidence, the record quarantined, and the node goes on.
        Only the node's own broken invariants (``NodeHalted``) and a broker error that
        escaped the writer's retries (``KafkaError``, not expected: the writer waits
        out the brokers, docs/decisions/0100) leave this method."""
        if name == TX.name:
            self._marked_intake(records)
            await self._isolated(name, None, self._after_intake)
            return
        handler = {PROPOSALS.name: self._on_proposal_record, VOTES.name: self._on_vote_record,
                   BLOCKS.name: self._on_certified_record}[name]
        for record in records:
            position = Position(name, record.offset)
            if position in self.quarantine:
                continue
            self.quarantine.mark_in_flight(position)
            if await self._take_fetched_for(name, record):
                self.quarantine.mark_in_flight(position)  # intake marked its own span
            await self._isolated(name, record, functools.partial(handler, record))
        self._decoded_ahead = None
        self.quarantine.clear_in_flight()

    async def _take_fetched_for(self, name: str, record: LogRecord) -> bool:
        """Before a proposal or certified block whose tx range ends beyond what the pool
        has read: intake the already fetched tx records of that range first, in chunks
        as ``run`` does and while the pool has room, so the block's transactions come
        from the pool, not from its bodies (decision 0129). Taken at most: what
        ``tx_inbox`` holds (TX_INBOX_MAX). Whether it took any."""
        inbox = self.tx_inbox
        if name == VOTES.name or not inbox or self.pool.is_full:
            return False
        range_end = self._range_end(name, record)
        if range_end is None or range_end <= self.pool.end_offset or \
                inbox[0].offset >= range_end:
            return False
        while inbox and inbox[0].offset < range_end and not self.pool.is_full:
            chunk: list[LogRecord] = []
            while inbox and len(chunk) < INTAKE_CHUNK and inbox[0].offset < range_end:
                chunk.append(inbox.popleft())
            self._update_tx_room()
            await self._handle(TX.name, chunk)
        self.metrics.on_fetched_taken_ahead()
        return True

    def _range_end(self, name: str, record: LogRecord) -> int | None:
        """The tx-log range end of a proposal or certified-block record, read from its
        block header alone; None when the record does not decode (its handler, run
        isolated, says why). The decoded record is kept for the handler."""
        expected = "BlockProposed" if name == PROPOSALS.name else "BlockCommitted"
        try:
            decoded = codec.decode(record.value, expected=expected).record
            self._decoded_ahead = (name, record.offset, decoded)
            header = BlockHeader.read(ByteReader(decoded["block"], "block header"))
        except Exception:  # hostile bytes: nothing taken ahead, the handler refuses them
            return None
        return header.tx_offset_end

    def _decoded(self, name: str, record: LogRecord, expected: str) -> dict[str, Any]:
        """The record decoded (once: ``_range_end`` may have done it)."""
        ahead = self._decoded_ahead
        if ahead is not None and ahead[0] == name and ahead[1] == record.offset:
            self._decoded_ahead = None
            return ahead[2]
        return codec.decode(record.value, expected=expected).record

    async def _after_intake(self) -> None:
        await self._feed(self._pool_event())
        await self._retry_deferred_validation()

    async def _isolated(self, name: str, record: LogRecord | None,
                        work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except (NodeHalted, KafkaError):
            raise
        except Exception as error:  # one record must never stop the node
            where = "" if record is None else f" offset {record.offset}"
            logger.exception("%s: handling %s%s failed; the node goes on", self.me, name, where)
            detail = f"{name}{where}: {type(error).__name__}: {error}"
            self._record_evidence("record-handling-failed", "unknown", detail)
            if record is not None:
                self.quarantine.add(Position(name, record.offset), detail, now_ms())

    # ---------------------------------------------------------------- intake

    def _marked_intake(self, records: list[LogRecord]) -> None:
        """``_intake`` under the crash marker (decision 0124): a fetched batch's offset
        range marked in one ``pwrite``; the records of the span found in flight at
        start-up one at a time, each marked alone, so the one that kills the process
        again is the one quarantined. The pool is the same either way (intake is exact
        record by record, decision 0110)."""
        if not records:
            return
        quarantine = self.quarantine
        alone = quarantine.alone
        end = records[-1].offset + 1
        if alone is None or alone.topic != TX.name or not (
                records[0].offset < alone.end and alone.start < end):
            quarantine.mark_span_in_flight(TX.name, records[0].offset, end)
            self._intake(records)
            quarantine.clear_in_flight()
            return
        batch: list[LogRecord] = []
        for record in records:
            if alone.start <= record.offset < alone.end:
                self._span_intake(batch)
                batch = []
                quarantine.mark_in_flight(Position(TX.name, record.offset))
                self._intake([record])
            else:
                batch.append(record)
        self._span_intake(batch)
        quarantine.clear_in_flight()
        quarantine.alone_passed(end)

    def _span_intake(self, records: list[LogRecord]) -> None:
        if records:
            self.quarantine.mark_span_in_flight(TX.name, records[0].offset,
                                                records[-1].offset + 1)
            self._intake(records)

    def _intake(self, records: list[LogRecord]) -> None:
        """Decode, parse and check (envelope, scripts) new tx-log records, a batch at a
        time, signatures on the verifier's threads (``streams.node.intake``). A record
        whose handling raises is quarantined and stays in the pool as a refused
        candidate, so the pool still covers every offset in log order."""
        seen = now_ms()
        pool = self.pool
        fresh: list[LogRecord] = []
        for record in records:
            if record.offset >= max(pool.end_offset, fresh[-1].offset + 1 if fresh else 0):
                fresh.append(record)  # else already pooled (a re-read after a seek)
        outcomes = intake_records(
            fresh, genesis=self.genesis, genesis_hash=self.genesis_hash, state=self.state,
            pending_outputs=pool.pending_outputs, verifier=self.verifier,
            quarantined=lambda offset: Position(TX.name, offset) in self.quarantine,
        )
        previous = -1
        for outcome in outcomes:
            same_record, previous = outcome.offset == previous, outcome.offset
            candidate = outcome.candidate
            if outcome.error is not None:
                self._quarantine_intake(outcome.offset, outcome.error)
            if candidate is None:
                candidate = Candidate(outcome.offset, None, error_code="record-quarantined",
                                      error_message=f"tx-log offset {outcome.offset} is "
                                                    "quarantined by this node")
            pool.add(candidate, seen, same_record=same_record)
            if outcome.scripts_verified and candidate.tx is not None:
                pool.verified.add(candidate.tx.hash_le)
        self._update_tx_room()

    def _quarantine_intake(self, offset: int, error: Exception) -> None:
        logger.error("%s: intake of tx-log offset %d failed", self.me, offset,
                     exc_info=error)
        detail = f"{TX.name} offset {offset}: {type(error).__name__}: {error}"
        self._record_evidence("record-handling-failed", "unknown", detail)
        self.quarantine.add(Position(TX.name, offset), detail, now_ms())

    def _pool_event(self) -> consensus.TxPoolChanged:
        pool = self.pool
        count = len(pool.candidates)
        return consensus.TxPoolChanged(count, pool.bytes_total,
                                       pool.seen_ms[0] if count else None)

    def _pooled_txs(self, header: BlockHeader) -> list[Transaction] | None:
        """The pool's parsed transactions of the part of a proposal's tx-log range it
        has read (None when none): what the block's transactions are looked up in."""
        pool = self.pool
        start = max(header.tx_offset_start, pool.base_offset)
        end = min(header.tx_offset_end, pool.end_offset)
        if start >= end:
            return None
        return [c.tx for c in pool.slice(start, end) if c.tx is not None]

    def _script_verified(self) -> Callable[[Transaction], bool]:
        verified = self.pool.verified
        return lambda tx: tx.hash_le in verified

    # ---------------------------------------------------------------- consensus I/O

    async def _on_proposal_record(self, record: LogRecord) -> None:
        try:
            decoded = self._decoded(PROPOSALS.name, record, "BlockProposed")
            block = block_from_proposal(decoded, block_bytes_max=self.block_bytes_max,
                                        known_txs=self._pooled_txs)
        except ValidationError as error:
            self._record_evidence(error.code, "unknown",
                                  f"proposal at offset {record.offset}: {error.message}")
            return
        if block.txs and block.header.tx_offset_end > self.pool.end_offset:
            self._count_bodies_used("proposal")
        self.proposal_offsets.setdefault(block.hash, record.offset)
        await self._feed(consensus.ProposalReceived(block))

    async def _on_vote_record(self, record: LogRecord) -> None:
        try:
            decoded = codec.decode(record.value, expected="VoteCast").record
            vote = vote_from_record(decoded)
        except ValidationError as error:
            self._record_evidence(error.code, "unknown",
                                  f"vote at offset {record.offset}: {error.message}")
            return
        key = (vote.voter, vote.height, vote.round, vote.kind, vote.block_hash)
        self.vote_offsets.setdefault(key, record.offset)
        await self._feed(consensus.VoteReceived(vote))

    async def _feed(self, event: consensus.Event) -> None:
        """Step the machine with one event and carry out its actions, in order.
        Follow-up events produced while acting are fed after, in order."""
        pending: list[consensus.Event] = [event]
        while pending:
            self.machine, actions = consensus.step(self.machine, pending.pop(0))
            for action in actions:
                follow_up = await self._act(action)
                if follow_up is not None:
                    pending.append(follow_up)

    async def _act(self, action: consensus.Action) -> consensus.Event | None:
        if isinstance(action, consensus.Propose):
            await self._propose(action)
        elif isinstance(action, consensus.ValidateProposal):
            return self._validate_or_defer(action.block)
        elif isinstance(action, consensus.CastVote):
            await self._cast_vote(action)
        elif isinstance(action, consensus.Commit):
            try:
                return await self._commit(action.block, action.qc)
            except (NodeHalted, KafkaError):
                raise
            except Exception as error:
                # The machine has counted the height as committed: a node whose chain
                # copy or state did not follow must stop and rebuild from its copy.
                raise NodeHalted(f"{self.me}: commit of height {action.block.height} "
                                 f"failed: {type(error).__name__}: {error}") from error
        elif isinstance(action, consensus.RecordEvidence):
            self._record_evidence(action.kind, action.member, action.detail)
        elif isinstance(action, consensus.EnterRound) and action.round > 0:
            self.metrics.on_view_change()
            logger.warning("%s: view change: height %d round %d (proposer %s)", self.me,
                        action.height, action.round,
                        proposer_for(self.view(action.height), action.height, action.round))
        return None

    async def _propose(self, action: consensus.Propose) -> None:
        if action.prev_hash != self.state.head_hash or action.height != self.height + 1:
            return  # the machine is ahead of the state (cannot happen when current)
        start = self.committed_end
        params = self.view(action.height).params  # the limits in force at this height
        began = time.thread_time()
        selection = select_block_txs(
            self.state,
            self.pool.slice(start, self.pool.end_offset),
            self.rules,
            range_end=self.pool.end_offset,
            block_bytes_max=params.block_bytes_max,
            block_txs_max=self.cut_sizer.txs_max(params.block_txs_max),
            script_verified=self._script_verified(),
        )
        self.cut_sizer.observe(len(selection.txs) + len(selection.rejections),
                               (time.thread_time() - began) * 1000)
        if selection.tx_offset_end == start:
            return  # nothing to decide: the round will time out if the pool stays empty
        block = make_block(
            self.settings.key,
            height=action.height,
            prev_hash=action.prev_hash,
            time_ms=proposal_time_ms(now_ms=now_ms(), parent_time_ms=self.parent_time_ms),
            proposer=self.me,
            round_=action.round,
            txs=selection.txs,
            tx_offset_start=start,
            tx_offset_end=selection.tx_offset_end,
        )
        # This node checked every tx while selecting: its own proposal needs no second pass.
        self.validated[block.hash] = _Validated(
            selection.delta_for(self.state, block.header), selection.rejections
        )
        await self.writer.send(
            self.settings.topic(PROPOSALS.name),
            codec.encode("BlockProposed", proposal_record(block, now_ms=now_ms())),
            key=str(block.height).encode(),
        )
        logger.info("%s: proposed height %d round %d: %d txs, %d rejected, %d bytes", self.me,
                 block.height, block.header.round, len(block.txs), len(selection.rejections),
                 block.size_bytes)

    def _validate_or_defer(self, block: Block) -> consensus.Event | None:
        own = self.validated.get(block.hash)
        if own is not None and own.delta.base_height == self.state.height:
            return consensus.ProposalValidated(block.height, block.header.round, block.hash,
                                               None)
        if block.header.tx_offset_end > self.pool.end_offset:
            self.deferred_validation = block  # wait until intake has read the range
            return None
        return self._validate(block)

    async def _retry_deferred_validation(self) -> None:
        block = self.deferred_validation
        if block is not None and block.header.tx_offset_end <= self.pool.end_offset:
            self.deferred_validation = None
            await self._feed(self._validate(block))

    def _select_for(self, block: Block) -> BlockSelection:
        header = block.header
        candidates = self.pool.slice(header.tx_offset_start, header.tx_offset_end)
        began = time.thread_time()
        selection = select_block_txs(
            self.state,
            candidates,
            self.rules,
            range_end=header.tx_offset_end,
            script_verified=self._script_verified(),
        )
        self.cut_sizer.observe(len(candidates), (time.thread_time() - began) * 1000)
        return selection

    def _validate(self, block: Block) -> consensus.ProposalValidated:
        header = block.header
        error_code: str | None = None
        try:
            if header.shard != 0 or header.tx_offset_start != self.committed_end:
                raise ValidationError(
                    f"block {block.height} covers tx offsets from {header.tx_offset_start}; "
                    f"the chain is at {self.committed_end}",
                    code="block-tx-range",
                )
            check_block_time(header.time_ms, parent_time_ms=self.parent_time_ms,
                             now_ms=now_ms())
            selection = self._select_for(block)
            expected = [tx.hash_le for tx in selection.txs]
            actual = [tx.hash_le for tx in block.txs]
            if expected != actual:
                # Say why when the block holds an invalid tx (double spend, bad
                # signature...); only a valid-but-wrong selection gets the generic code.
                validate_block(self.state, block, self.rules,
                               script_verified=self._script_verified())
                index = next(
                    (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                    min(len(expected), len(actual)),
                )
                raise ValidationError(
                    f"block {block.height} round {header.round}: its transactions differ from "
                    f"the valid ones of tx offsets [{header.tx_offset_start}, "
                    f"{header.tx_offset_end}) from position {index} on "
                    f"({len(actual)} in the block, {len(expected)} valid)",
                    code="block-tx-selection",
                )
            check_block_links(block, prev_hash=self.state.head_hash, height=self.height + 1)
            delta = selection.delta_for(self.state, block.header)
            self.validated[block.hash] = _Validated(delta, selection.rejections)
        except ValidationError as error:
            error_code = error.code
            self.metrics.on_nack(error.code)
            logger.warning("%s: nack height %d round %d from %s: %s", self.me, block.height,
                        header.round, header.proposer, error.message)
            self._record_evidence(f"nack-{error.code}", header.proposer, error.message)
        return consensus.ProposalValidated(block.height, header.round, block.hash, error_code)

    async def _cast_vote(self, action: consensus.CastVote) -> None:
        permitted = await self._until_written(
            f"signing state for height {action.height} round {action.round}",
            functools.partial(self._signing_guard().permit, action.height, action.round,
                              action.kind, action.block_hash, action.reason_code))
        if not permitted:
            return  # would contradict a vote this key signed before (logged by the guard)
        vote = sign_vote(
            self.settings.key,
            self.genesis_hash,
            voter=self.me,
            height=action.height,
            round_=action.round,
            kind=action.kind,
            block_hash=action.block_hash,
            reason_code=action.reason_code,
        )
        await self.writer.send(
            self.settings.topic(VOTES.name),
            codec.encode("VoteCast", vote_record(vote, now_ms=now_ms())),
            key=str(vote.height).encode(),
        )
        if action.kind == "timeout":
            logger.warning("%s: timeout vote at height %d round %d", self.me, action.height,
                        action.round)

    def _signing_guard(self) -> signing_guard.SigningGuard:
        """This process's guard of the node's directory, looked up once (decision 0120)."""
        if self._guard is None:
            self._guard = signing_guard.guard_for(self.settings.node_dir)
        return self._guard

    async def _commit(self, block: Block, qc: QuorumCertificate) -> consensus.Event:
        delta, rejections = self._delta_to_commit(block)
        vote_offsets = [
            self.vote_offsets.get((v.voter, v.height, v.round, v.kind, v.block_hash), -1)
            for v in qc.votes
        ]
        payload = codec.encode(
            "BlockCommitted",
            committed_record(
                block,
                qc,
                vote_offsets=vote_offsets,
                proposal_offset=self.proposal_offsets.get(block.hash, -1),
                committer=self.me,
                now_ms=now_ms(),
                key=self.settings.key,  # signed: readers without the votes log count it
                genesis_hash=self.genesis_hash,
            ),
        )
        chain = self.chain
        assert chain is not None
        oldest_seen_ms = self.pool.seen_at(block.header.tx_offset_start)
        rejected = self._rejection_items(rejections, block)
        if rejected:  # on disk before the commit, until acknowledged (decision 0129)
            await self._until_written(f"pending rejections: height {block.height}",
                                      functools.partial(
                                          write_pending, self._pending_path,
                                          PendingRejections(block.height, block.hash,
                                                            tuple(v for _, v in rejected))))
        try:
            # durable before anything depends on it; waits while the disk is full
            fsync_s = await self._until_written(f"chain copy: height {block.height}",
                                                functools.partial(_timed, chain.append, payload))
        except OSError as error:
            raise NodeHalted(f"{self.me}: chain copy not written: {error}") from error
        self.metrics.on_commit(
            height=block.height, txs=len(block.txs), fsync_s=fsync_s,
            latency_s=None if oldest_seen_ms is None else (now_ms() - oldest_seen_ms) / 1000,
            rejection_codes=[rejection.code for rejection in rejections])
        previous_sequence = 0 if self.state.schedule is None else self.state.schedule.sequence
        self.state = apply_delta(self.state, delta)
        self.head = Committed(block, qc, self.proposal_offsets.get(block.hash, -1),
                              tuple(vote_offsets), self.me, now_ms())
        self.pool.drop_before(block.header.tx_offset_end)
        self._update_tx_room()
        self._forget_up_to(block.height)
        await self.writer.send(self.settings.topic(BLOCKS.name), payload,
                               key=str(block.height).encode())
        if rejected:
            await self.writer.send_many(self.settings.topic(REJECTED.name), rejected)
            clear_pending(self._pending_path)
        if delta.schedule is not None and delta.schedule.sequence > previous_sequence:
            await self._announce_governance(block)
        self.freezer.block_done()
        logger.info("%s: committed height %d round %d (%s): %d txs, %d rejected, proposer %s",
                 self.me, block.height, block.header.round, block.hash_hex[:16],
                 len(block.txs), len(rejections), block.header.proposer)
        return self._pool_event()

    async def _announce_governance(self, block: Block) -> None:
        """The governance changes this block carries, on ``ledger.governance.v1`` for
        readers that do not follow the blocks (decision 0061). Only when the block's
        delta moved the schedule on: the hot path never walks the block for this."""
        for tx in block.txs:
            if not is_governance_tx(tx):
                continue
            signed = change_from_tx(tx)
            record = membership_changed_record(
                signed, chain_id=self.genesis.chain_id, carried_height=block.height,
                txid_le=tx.hash_le, writer=self.me, now_ms=now_ms())
            await self.writer.send(
                self.settings.topic(GOVERNANCE.name), codec.encode("MembershipChanged", record),
                key=f"{self.genesis.chain_id}/{signed.change.sequence}".encode())
            logger.warning("%s: governance change %d (%s %s) committed at height %d, in "
                           "force from height %d", self.me, signed.change.sequence,
                           signed.change.kind, signed.change.member_id, block.height,
                           signed.change.effective_height)

    def _delta_to_commit(self, block: Block) -> tuple[BlockDelta, tuple[Rejection, ...]]:
        """The certified block's state change and its range's rejections: from this
        node's own validation when it has one, else from one selection of the range
        (the same check as ``_validate``), else — range not read yet — ``validate_block``."""
        validated = self.validated.pop(block.hash, None)
        if validated is not None and validated.delta.base_height == self.state.height:
            return validated.delta, validated.rejections
        if block.header.tx_offset_start == self.committed_end and \
                block.header.tx_offset_end <= self.pool.end_offset:
            selection = self._select_for(block)
            if [tx.hash_le for tx in selection.txs] == [tx.hash_le for tx in block.txs]:
                return selection.delta_for(self.state, block.header), selection.rejections
        if block.txs:
            self._count_bodies_used("commit")
        try:
            delta = validate_block(self.state, block, self.rules,
                                   script_verified=self._script_verified())
        except ValidationError as error:
            raise NodeHalted(
                f"{self.me}: certified block {block.height} ({block.hash_hex}) does not "
                f"apply to this node's state: {error.message}"
            ) from error
        rejections: tuple[Rejection, ...] = ()
        if block.header.tx_offset_end <= self.pool.end_offset:
            rejections = self._select_for(block).rejections
        return delta, rejections

    def _count_bodies_used(self, where: str) -> None:
        self.bodies_used[where] += 1
        self.metrics.on_bodies_used(where)

    def _forget_up_to(self, height: int) -> None:
        self.validated = {
            h: v for h, v in self.validated.items() if v.delta.height > height
        }
        self.vote_offsets = {k: o for k, o in self.vote_offsets.items() if k[1] > height}
        keep = {b.hash for b in self.machine.proposals}
        self.proposal_offsets = {h: o for h, o in self.proposal_offsets.items() if h in keep}
        if self.deferred_validation is not None and self.deferred_validation.height <= height:
            self.deferred_validation = None

    def _rejection_items(self, rejections: tuple[Rejection, ...],
                         block: Block) -> list[tuple[bytes | None, bytes]]:
        """The block's ``TxRejected`` records, keyed by this member, encoded and signed."""
        return [
            (
                self.me.encode(),
                codec.encode(
                    "TxRejected",
                    rejected_record(
                        rejection,
                        stage="commit",
                        institution=self.me,
                        source_topic=self.settings.topic(TX.name),
                        block_hash=block.hash,
                        now_ms=now_ms(),
                        key=self.settings.key,
                        genesis_hash=self.genesis_hash,
                    ),
                ),
            )
            for rejection in rejections
        ]

    async def _until_written(self, what: str, write: Callable[[], Any]) -> Any:
        """``write()``'s result, retried every DISK_RETRY_MS while it fails for lack of
        space (the node appends nothing meanwhile; it says so in its log, on /readyz and
        in capledger_node_disk_full); any other OSError is raised."""
        while True:
            try:
                result = write()
            except OSError as error:
                if error.errno not in DISK_FULL_ERRNOS or self.stopping:
                    raise
                if not self.disk_full:
                    self.disk_full = True
                    self.metrics.on_disk_full(True)
                    logger.error("%s: DISK FULL: %s not written (%s); appending nothing "
                                 "until space returns, retrying every %d ms", self.me, what,
                                 error.strerror, DISK_RETRY_MS)
                await asyncio.sleep(DISK_RETRY_MS / 1000)
                continue
            if self.disk_full:
                self.disk_full = False
                self.metrics.on_disk_full(False)
                logger.warning("%s: disk space back: %s written; going on", self.me, what)
            return result

    def _record_evidence(self, kind: str, member: str, detail: str) -> None:
        logger.warning("%s: evidence %s against %s: %s", self.me, kind, member,
                    detail[:EVIDENCE_DETAIL_CHARS_MAX])
        try:
            self._write_evidence(kind, member, detail)
        except OSError as error:  # a full disk loses the file entry, never the node
            if error.errno not in DISK_FULL_ERRNOS:
                raise
            logger.error("%s: evidence %s not written to %s: %s", self.me, kind,
                         self.evidence_path, error.strerror)

    def _write_evidence(self, kind: str, member: str, detail: str) -> None:
        self.settings.node_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.evidence_path.stat().st_size >= EVIDENCE_FILE_BYTES_MAX:
                # A flood of bad records must not fill the disk: keep this file and the
                # one before it (``evidence.jsonl.1``), at most 2 x the bound.
                self.evidence_path.replace(self.evidence_path.with_name("evidence.jsonl.1"))
        with open(self.evidence_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"at_ms": now_ms(), "kind": kind, "member": member,
                                     "detail": detail[:EVIDENCE_DETAIL_CHARS_MAX]}) + "\n")

    # ---------------------------------------------------------------- status

    async def publish_status(self) -> None:
        if not self.started.is_set():
            return
        reader = self.readers.get(TX.name)
        lag = 0
        if reader is not None and self.connectivity.reachable:
            with contextlib.suppress(Exception):
                end = await asyncio.wait_for(reader.end_offset(),
                                             HEARTBEAT_ACK_TIMEOUT_MS / 1000)
                lag = max(0, end - reader.position)
        record = status_record(
            institution=self.me,
            chain_id=self.genesis.chain_id,
            height=self.state.height,
            head_hash=self.state.head_hash,
            state_hash=self.state.state_hash,
            consumer_lag=lag,
            version=VERSION,
            now_ms=now_ms(),
            round_=self.machine.vote_round,
            pending_txs=len(self.pool.candidates),
            key=self.settings.key,
            genesis_hash=self.genesis_hash,
            broker_outages=self.connectivity.outages,
            broker_last_outage_ms=self.connectivity.last_outage_ms,
            condition=NODE_CONDITION_DISK_FULL if self.disk_full else "",
        )
        # One bounded attempt: a heartbeat is replaced by the next one, and its
        # acknowledgement is how a node that only waits learns the brokers are away.
        await self.writer.send_once(self.settings.topic(STATUS.name),
                                    codec.encode("NodeStatusReported", record),
                                    key=self.me.encode(),
                                    timeout_ms=HEARTBEAT_ACK_TIMEOUT_MS)
        self.metrics.on_broker_contact()

    async def log_lags(self) -> dict[str, int]:
        """Records between each log reader's position and the log's end, asked of the
        broker by a consumer of its own (a reader's long poll would delay the answer)."""
        logs = {TX.name: "tx", PROPOSALS.name: "proposals", VOTES.name: "votes"}
        if self._end_offsets is None:
            ends = EndOffsets(self.settings.bootstrap,
                              [self.settings.topic(name) for name in logs],
                              client_id=f"capledger-{self.me}-metrics")
            await ends.start()
            self._end_offsets = ends
        found = await self._end_offsets.ends()
        self.metrics.on_broker_contact()
        return {short: max(0, found[self.settings.topic(name)] - self.readers[name].position)
                for name, short in logs.items() if name in self.readers}


def _timed(write: Callable[[bytes], None], payload: bytes) -> float:
    """Seconds ``write(payload)`` took."""
    started = time.perf_counter()
    write(payload)
    return time.perf_counter() - started


def _key_height(key: bytes | None) -> int | None:
    """The height a blocks-log record's key names (nodes key records by height)."""
    if key is None or not 0 < len(key) <= 20 or not key.isdigit():
        return None
    return int(key)

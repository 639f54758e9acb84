"""The consensus evidence projection: every vote of ``ledger.votes.v1`` with what the
consensus rules made of it, and every view change, for regulator SQL.

Owns: :func:`observe` (pure: one vote record through an observer consensus machine,
``ledger.consensus`` with ``me=None``; the row it adds, the view changes and decision
it causes) and :class:`EvidenceProjector` (the shell: reads the votes log from its cursor,
writes ``consensus_vote`` and ``consensus_view_change`` rows and the cursor in one
PostgreSQL transaction per batch).

Restart without replay: right after a decision the machine is at (height + 1, round 0)
with empty tallies, which is exactly ``initial_state(committed_height=height)``. The
observer is reset there after every decision (so it never waits for block bodies), and
a batch is committed only up to the last decision it holds: the cursor stores that
vote's next offset and the decided height and hash, from which the next run resumes.
Votes of a height not decided yet are written once it is. Evidence codes are those of
``ledger.consensus`` (``double-vote``, ``vote-forged``, ``vote-unknown-voter``,
``vote-ahead-of-log``, ``vote-after-timeout``, ``vote-malformed``).

Membership by height (decision 0062): each vote is judged by the membership in force
at its height, read from the projection's ``membership`` table (the projector writes
a change with the block that carries it). With blocks projected up to height p, the
membership is certain up to p + 16 (a change takes effect at least 16 heights above
its block); votes of later heights wait, unwritten, until the projector has moved on:
the evidence lags the projection rather than reporting a rotated member's new key as
forged.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from ledger.block import VOTE_TIMEOUT, proposer_for
from ledger.consensus import (
    ConsensusConfig,
    ConsensusState,
    EnterRound,
    RecordEvidence,
    VoteReceived,
    initial_state,
    step,
)
from ledger.errors import ValidationError
from ledger.governance import (
    ACTIVATION_DELAY_MIN_HEIGHTS,
    EpochRecord,
    GovernanceError,
    MembershipSchedule,
    schedule_from_epochs,
)
from ledger.hashing import display_hex
from ledger.membership import Genesis
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogRecord
from streams.kafka.records import millis, vote_from_record
from streams.kafka.topics import VOTES

logger = logging.getLogger(__name__)

CONSUMER_DEFAULT = "consensus-evidence"
READ_RECORDS_MAX = 2_000
READ_TIMEOUT_MS = 500
UNDECODABLE = "vote-undecodable"


@dataclass(frozen=True, slots=True)
class VoteRow:
    log_offset: int
    height: int | None
    round: int | None
    voter: str | None
    kind: str | None
    block_hash: str | None
    reason_code: str | None
    evidence: str | None
    voted_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class ViewChangeRow:
    height: int
    round: int
    skipped_proposer: str
    log_offset: int


@dataclass(frozen=True, slots=True)
class Observed:
    row: VoteRow
    view_changes: tuple[ViewChangeRow, ...]
    decided: tuple[int, bytes] | None  # (height, block hash) decided by this vote


def observer(genesis: Genesis, height: int = 0, head_hash: bytes | None = None,
             schedule: MembershipSchedule | None = None) -> ConsensusState:
    """An observer machine after ``height``; ``schedule``: the membership by height
    (default: genesis' alone)."""
    return initial_state(ConsensusConfig(genesis, None), now_ms=0, committed_height=height,
                         head_hash=head_hash, schedule=schedule)


def observe(machine: ConsensusState, record: LogRecord) -> tuple[ConsensusState, Observed]:
    """One vote record: the machine after it (reset after a decision, keeping its
    membership schedule) and what it adds. Each vote is judged by the membership in
    force at its height (decision 0062)."""
    try:
        decoded = codec.decode(record.value, expected="VoteCast").record
        vote = vote_from_record(decoded)
        voted_at = dt.datetime.fromtimestamp(millis(decoded["voted_at"]) / 1000, tz=dt.UTC)
    except (ValidationError, KeyError, TypeError, ValueError):
        return machine, Observed(VoteRow(record.offset, None, None, None, None, None, None,
                                         UNDECODABLE, None), (), None)
    before = machine.decided
    machine, actions = step(machine, VoteReceived(vote))
    evidence = next((a.kind for a in actions if isinstance(a, RecordEvidence)), None)
    changes = tuple(
        ViewChangeRow(a.height, a.round, proposer_for(machine.view(a.height), a.height,
                                                      a.round - 1), record.offset)
        for a in actions if isinstance(a, EnterRound) and a.round > 0)
    decided = None
    if len(machine.decided) > len(before):
        decision = machine.decided[-1]
        decided = (decision.height, decision.block_hash)
        machine = observer(machine.config.genesis, decision.height, decision.block_hash,
                           machine.schedule)
    row = VoteRow(record.offset, vote.height, vote.round, vote.voter, vote.kind,
                  None if vote.kind == VOTE_TIMEOUT else display_hex(vote.block_hash),
                  vote.reason_code or None, evidence, voted_at)
    return machine, Observed(row, changes, decided)


def membership_known_through(projected_height: int) -> int:
    """The highest height whose membership a projection at ``projected_height`` knows
    for certain: a change not projected yet is carried at a greater height and takes
    effect at least ``ACTIVATION_DELAY_MIN_HEIGHTS`` above it (decision 0061)."""
    return projected_height + ACTIVATION_DELAY_MIN_HEIGHTS


def epoch_record(row: Sequence[Any]) -> EpochRecord:
    """One ``membership`` row (start_height, members JSON, quorum, interval, bytes, txs,
    timeout) as an epoch; a malformed row is refused with ``governance-epochs``."""
    try:
        members = tuple((str(m["id"]), bytes.fromhex(str(m["public_key"])))
                        for m in row[1])
        params = (int(row[2]), int(row[3]), int(row[4]), int(row[5]), int(row[6]))
        return EpochRecord(int(row[0]), members, params)
    except (KeyError, TypeError, ValueError):
        raise GovernanceError(f"membership row at height {row[0]} does not decode",
                              code="governance-epochs") from None


@dataclass
class EvidenceStats:
    votes: int = 0
    view_changes: int = 0
    height: int = 0
    offset: int = 0
    waiting: bool = False  # stopped where the projection does not know the membership yet
    problem: str | None = None  # why, when the membership table is refused


class EvidenceProjector:
    """Projects the votes log into ``consensus_vote`` / ``consensus_view_change``."""

    def __init__(self, genesis: Genesis, *, bootstrap: str, dsn: str, topic_prefix: str = "",
                 consumer: str = CONSUMER_DEFAULT) -> None:
        self.genesis = genesis
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.topic = topic_prefix + VOTES.name
        self.consumer = consumer
        self.stats = EvidenceStats()
        self._buffer: list[LogRecord] = []  # records since the cursor, not yet decided
        self._reader: LogReader | None = None
        self._offset, self._height = 0, 0  # the cursor: next offset, decided height
        self._head: bytes | None = None  # and its block hash

    async def _cursor(self, conn: psycopg.AsyncConnection[Any]
                      ) -> tuple[int, int, bytes | None]:
        row = await (await conn.execute(
            "SELECT log_offset, height, block_hash FROM consensus_cursor WHERE consumer = %s",
            (self.consumer,))).fetchone()
        if row is None:
            return 0, 0, None
        return int(row[0]), int(row[1]), bytes.fromhex(str(row[2]))[::-1]

    async def run(self) -> EvidenceStats:
        """Project what the votes log holds now, up to its last decided height."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await self.start(conn)
            try:
                return await self.catch_up(conn)
            finally:
                await self.stop()

    async def start(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Open the reader at the stored cursor (for repeated ``catch_up`` calls)."""
        self._offset, self._height, self._head = await self._cursor(conn)
        self._buffer = []
        self._reader = LogReader(self.bootstrap, self.topic, client_id="capledger-evidence")
        await self._reader.start(self._offset)

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    async def membership(self, conn: psycopg.AsyncConnection[Any]
                         ) -> tuple[MembershipSchedule, int]:
        """The membership by height as the projection holds it (table ``membership``,
        written by the projector with the blocks) and the highest height it is certain
        for (decision 0062). The height is read first: the rows read after it hold
        every change carried up to it (the projector writes both in one transaction)."""
        projected = await (await conn.execute("SELECT max(height) FROM block")).fetchone()
        rows = await (await conn.execute(
            "SELECT start_height, members, quorum, block_interval_ms, block_bytes_max, "
            "block_txs_max, proposer_timeout_ms FROM membership ORDER BY start_height"
        )).fetchall()
        schedule = schedule_from_epochs(self.genesis, self.genesis.hash_le,
                                        [epoch_record(row) for row in rows])
        height = 0 if projected is None or projected[0] is None else int(projected[0])
        return schedule, membership_known_through(height)

    async def catch_up(self, conn: psycopg.AsyncConnection[Any]) -> EvidenceStats:
        """Read to the log's end as of now; write up to the last decided height whose
        next height's membership the projection knows (else stop there: the votes wait
        for the projector, ``stats.waiting`` says so)."""
        reader = self._reader
        assert reader is not None, "start() first"
        try:
            schedule, known = await self.membership(conn)
        except GovernanceError as error:  # a damaged table: judge nothing, stop here
            logger.error("consensus evidence: membership table refused: %s: %s",
                         error.code, error.message)
            self.stats.waiting, self.stats.problem = True, error.code
            return self.stats
        self.stats.problem = None
        self.stats.waiting = self._height + 1 > known
        end = await reader.end_offset()
        while reader.position < end and not self.stats.waiting:
            records = await reader.read(timeout_ms=READ_TIMEOUT_MS, max_records=READ_RECORDS_MAX)
            if not records:
                continue
            machine = observer(self.genesis, self._height, self._head, schedule)
            written = await self._batch(conn, machine, records, known)
            if written is not None:  # else: no decision yet, the records wait in the buffer
                self._offset, self._height, self._head = written
        self.stats.height, self.stats.offset = self._height, self._offset
        return self.stats

    async def _batch(self, conn: psycopg.AsyncConnection[Any], machine: ConsensusState,
                     records: list[LogRecord], known: int) -> tuple[int, int, bytes] | None:
        """Observe from the cursor through ``records``; commit up to the last decision.
        Without a decision nothing is written and the records are observed again, with
        the next ones, on the next call (the caller keeps reading). Observation stops
        at a decision after which the next height's membership is not known (``known``):
        the rest waits in the buffer."""
        self._buffer.extend(records)
        rows: list[Observed] = []
        last: tuple[int, int, bytes] | None = None
        cut = 0
        for index, record in enumerate(self._buffer):
            if machine.vote_height > known:
                self.stats.waiting = True
                break
            machine, observed = observe(machine, record)
            rows.append(observed)
            if observed.decided is not None:
                last = (record.offset + 1, *observed.decided)
                cut = index + 1
        if last is None:
            return None
        await self._write(conn, rows[:cut], last)
        self._buffer = self._buffer[cut:]
        return last

    async def _write(self, conn: psycopg.AsyncConnection[Any], rows: list[Observed],
                     cursor: tuple[int, int, bytes]) -> None:
        votes = [o.row for o in rows]
        changes = [c for o in rows for c in o.view_changes]
        async with conn.transaction():
            await conn.cursor().executemany(
                "INSERT INTO consensus_vote (log_offset, height, round, voter, kind, "
                "block_hash, reason_code, evidence, voted_at) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(v.log_offset, v.height, v.round, v.voter, v.kind, v.block_hash,
                  v.reason_code, v.evidence, v.voted_at) for v in votes])
            if changes:
                await conn.cursor().executemany(
                    "INSERT INTO consensus_view_change (height, round, skipped_proposer, "
                    "log_offset) VALUES (%s, %s, %s, %s)",
                    [(c.height, c.round, c.skipped_proposer, c.log_offset) for c in changes])
            await conn.execute(
                "INSERT INTO consensus_cursor (consumer, log_offset, height, block_hash) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (consumer) DO UPDATE SET "
                "log_offset = excluded.log_offset, height = excluded.height, "
                "block_hash = excluded.block_hash, updated_at = now()",
                (self.consumer, cursor[0], cursor[1], display_hex(cursor[2])))
        self.stats.votes += len(votes)
        self.stats.view_changes += len(changes)

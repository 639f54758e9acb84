"""The PostgreSQL projection of the committed chain, for surveillance SQL and legacy systems.

Owns:
- the pure row model: ``BlockRows`` (block, tx, tx_output rows and the spends a block
  makes) built by :func:`block_rows` from a block and the per-transaction effects the
  ledger state computed, :func:`genesis_rows` for height 0 (the genesis allocation
  transaction, so every spent output has a row), :func:`rejection_row` for one
  ``TxRejected`` record;
- ``Decisions``: which block each height decided, from ``ledger.votes.v1`` (an
  observer consensus machine: the first quorum in log order);
- ``ChainFollower``: the projector's own ledger state, advanced by each certified
  block in order (:func:`apply_certified`), taking for each height the record of the
  block the votes log decided (every node publishes each height: later copies are
  checked to be identical and counted; a certified block that was not decided is a
  losing block, refused with ``block-not-decided``);
- ``Projector``: the shell that reads ``<prefix>ledger.blocks.v1`` and
  ``<prefix>ledger.rejected.v1`` from the offsets stored in ``projection_offset``
  (and ``ledger.votes.v1`` from 0 for the decisions) and writes each batch of rows,
  the quarantined records AND both tracking rows in ONE PostgreSQL transaction, so a
  redelivery or a restart is harmless and a crash between rows and offsets cannot
  happen; a record it cannot project is quarantined, never a stop (decision 0050).
  Why a ledger state in the projector, and the rest of the design:
  docs/decisions/0032-postgresql-projection.md.

Touches: the projection tables of one PostgreSQL database (block, tx, tx_output,
tx_rejection, projection_quarantine and this consumer's projection_offset rows);
reads three topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import psycopg
from psycopg.types.string import BytesBinaryDumper

from ledger import consensus
from ledger.address import script_to_address
from ledger.block import (
    ZERO_HASH,
    Block,
    BlockHeader,
    check_block_context_free,
    check_block_links,
    check_certified_block,
    merkle_root,
)
from ledger.errors import ValidationError
from ledger.governance import (
    MembershipSchedule,
    SignedChange,
    change_from_tx,
    schedule_from_genesis,
)
from ledger.hashing import display_hex
from ledger.membership import Genesis
from ledger.script import is_unspendable
from ledger.serialization import ByteReader
from ledger.state import (
    BlockOverlay,
    LedgerRules,
    LedgerState,
    TxEffects,
    UtxoEntry,
    apply_delta,
    check_tx,
    delta_from_overlay,
    genesis_allocation_tx,
    state_from_genesis,
)
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogRecord
from streams.kafka.records import (
    Committed,
    committed_from_record,
    rejected_from_record,
    vote_from_record,
)
from streams.kafka.topics import BLOCKS, REJECTED, VOTES, admin_client

logger = logging.getLogger("capledger.projector")

CONSUMER_DEFAULT = "projector"
BATCH_BLOCKS_MAX = 50  # blocks per PostgreSQL transaction
BATCH_REJECTIONS_MAX = 5_000  # rejection records per PostgreSQL transaction
BATCH_INTERVAL_MS = 500  # a batch is written at the latest this long after it started
READ_TIMEOUT_MS = 100
READ_RECORDS_MAX = 500  # records per read of one topic
REPLAY_STALL_TIMEOUT_S = 30.0  # a restart's replay waits this long for missing records
GAP_REPORT_AFTER_S = 5.0  # a missing height is reported once it has been missing this long
ADMIN_TIMEOUT_MS = 5_000
ADDRESS_CACHE_ENTRIES = 100_000  # output script -> address, least recently used dropped
COPY_WINDOW_HEIGHTS = 100_000  # heights whose (hash, bytes digest) are kept for copy checks
GENESIS_PROPOSER = "genesis"
MESSAGE_CHARS_MAX = 2_000
PROJECTED_TABLES = ("tx_output", "tx", "block", "tx_rejection", "membership")
DECISIONS_KEPT_HEIGHTS = 100_000  # decided hashes kept below the projected height
# Young-generation threshold of Python's cyclic collector while projecting: the default
# (700 allocations) runs a collection every few transactions, and with the ledger state
# growing the older generations' scans cost a quarter to a third of the CPU (decision
# 0092).
GC_YOUNG_THRESHOLD = 20_000


class ProjectionError(ValidationError):
    """The log, the database or the chain cannot be projected as they stand."""

    code = "projection"


# Quarantine reasons that mean the members' copies disagree (``capledger project``
# exits with the conflict code after projecting everything else).
CONFLICT_CODES = frozenset({"fork", "block-link", "block-tx-range", "block-does-not-apply"})


class ProjectionConflict(ProjectionError):
    """Two different certified blocks at one height, or a certified block that does not
    extend the projected chain: the members' copies disagree. Never skipped."""

    code = "projection-conflict"


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class BlockRow:
    height: int
    hash: str
    prev_hash: str
    merkle_root: str
    proposer: str
    round: int
    time_at: dt.datetime
    tx_count: int
    size_bytes: int
    state_hash: str
    tx_offset_start: int
    tx_offset_end: int
    voters: tuple[str, ...]
    source_offset: int | None


# A NamedTuple, not a frozen dataclass: built in a fraction of the time (a frozen
# dataclass sets each field through object.__setattr__), and it goes to COPY's
# write_row as it is (decision 0093).
class TxRow(NamedTuple):
    txid: str
    height: int
    position: int
    size_bytes: int
    raw: bytes
    issued_asset_id: str | None
    issued_quantity: int | None


@dataclass(frozen=True, slots=True)
class OutputRow:  # not a NamedTuple: a field named ``index`` would shadow tuple.index
    txid: str
    index: int
    value: int
    script_pubkey: bytes
    address: str | None
    asset_id: str | None
    quantity: int | None


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Output (txid, index) is spent by ``spent_by_txid``."""

    txid: str
    index: int
    spent_by_txid: str


@dataclass(frozen=True, slots=True)
class MembershipRow:
    """One membership epoch (table ``membership``, revision 0010, decision 0061)."""

    start_height: int
    sequence: int
    change_id: str | None
    kind: str
    member_id: str | None
    carried_height: int | None
    txid: str | None
    members: str  # JSON
    signers: tuple[str, ...]
    params: tuple[int, int, int, int, int]  # quorum, interval, bytes, txs, timeout


@dataclass(frozen=True, slots=True)
class BlockRows:
    block: BlockRow
    txs: tuple[TxRow, ...]
    outputs: tuple[OutputRow, ...]
    spends: tuple[SpendRow, ...]
    memberships: tuple[MembershipRow, ...] = ()


def membership_row(view: Genesis, *, start_height: int, signed: SignedChange | None = None,
                   carried_height: int | None = None, txid: str | None = None) -> MembershipRow:
    p = view.params
    change = None if signed is None else signed.change
    members = json.dumps([{"id": m.id, "public_key": m.public_key.sec.hex()}
                          for m in view.members])
    return MembershipRow(
        start_height, 0 if change is None else change.sequence,
        None if change is None else change.change_id.hex(),
        "genesis" if change is None else change.kind,
        (change.member_id or None) if change is not None else None,
        carried_height, txid, members,
        () if signed is None else tuple(m for m, _ in signed.signatures),
        (p.quorum, p.block_interval_ms, p.block_bytes_max, p.block_txs_max,
         p.proposer_timeout_ms),
    )


def _membership_rows(block: Block, effects: Sequence[TxEffects]) -> tuple[MembershipRow, ...]:
    rows = []
    for tx, effect in zip(block.txs, effects, strict=True):
        if effect.schedule_after is None:
            continue
        epoch = effect.schedule_after.epochs[-1]
        rows.append(membership_row(epoch.view, start_height=epoch.start_height,
                                   signed=change_from_tx(tx), carried_height=block.height,
                                   txid=tx.txid))
    return tuple(rows)


@dataclass(frozen=True, slots=True)
class RejectionRow:
    log_offset: int
    txid: str | None
    stage: str
    code: str
    message: str
    institution: str
    submitter: str | None
    idempotency_key: str | None
    block_hash: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    rejected_at: dt.datetime


# The instants a timestamptz column and a Python datetime both hold. A certified
# block's u64 time_ms outside them is stored clamped (the block itself is projected:
# it is part of the chain) and counted in ``CopyCounts.times_clamped``.
TIME_MS_MIN = 0
TIME_MS_MAX = int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp() * 1000)


def is_time_in_range(time_ms: int) -> bool:
    return TIME_MS_MIN <= time_ms <= TIME_MS_MAX


def _time_at(time_ms: int) -> dt.datetime:
    clamped = min(max(time_ms, TIME_MS_MIN), TIME_MS_MAX)
    return dt.datetime.fromtimestamp(clamped / 1000, tz=dt.UTC)


@functools.lru_cache(maxsize=ADDRESS_CACHE_ENTRIES)
def output_address(script_pubkey: bytes, p2pkh_version: int, p2sh_version: int) -> str | None:
    """Base58Check is the costliest part of a row; payments reuse few scripts."""
    return script_to_address(script_pubkey, p2pkh_version=p2pkh_version,
                             p2sh_version=p2sh_version)


def _output_rows(
    tx: Transaction,
    created: Sequence[tuple[bytes, UtxoEntry]],
    *,
    p2pkh_version: int,
    p2sh_version: int,
    txid: str | None = None,
) -> list[OutputRow]:
    """``created``: the entries ``tx`` created, in output order (keys end with the
    little-endian output index)."""
    txid = tx.txid if txid is None else txid
    colors: dict[int, tuple[str, int]] = {
        int.from_bytes(key[32:36], "little"): (entry.asset_id, entry.quantity)
        for key, entry in created if entry.asset_id is not None}
    rows = []
    for index, output in enumerate(tx.outputs):
        script = output.script_pubkey
        address = output_address(script, p2pkh_version, p2sh_version)
        # OP_RETURN outputs never enter the UTXO set: no entry, never colored.
        color = colors.get(index) if colors else None
        if color is None:
            rows.append(OutputRow(txid, index, output.value, script, address, None, None))
        else:
            rows.append(OutputRow(txid, index, output.value, script, address, *color))
    return rows


def _block_row(block: Block, *, state_hash: bytes, voters: Sequence[str],
               source_offset: int | None) -> BlockRow:
    header = block.header
    return BlockRow(
        height=header.height,
        hash=block.hash_hex,
        prev_hash=display_hex(header.prev_hash),
        merkle_root=display_hex(header.merkle_root),
        proposer=header.proposer,
        round=header.round,
        time_at=_time_at(header.time_ms),
        tx_count=len(block.txs),
        size_bytes=block.size_bytes,
        state_hash=display_hex(state_hash),
        tx_offset_start=header.tx_offset_start,
        tx_offset_end=header.tx_offset_end,
        voters=tuple(voters),
        source_offset=source_offset,
    )


def block_rows(
    block: Block,
    effects: Sequence[TxEffects],
    *,
    state_hash: bytes,
    voters: Sequence[str],
    source_offset: int | None,
    p2pkh_version: int = 0x00,
    p2sh_version: int = 0x05,
) -> BlockRows:
    """The rows one certified block adds, from the effects the ledger state computed for
    each of its transactions (in block order). Pure."""
    assert len(effects) == len(block.txs)
    height = block.header.height
    tx_rows: list[TxRow] = []
    output_rows: list[OutputRow] = []
    spend_rows: list[SpendRow] = []
    for position, (tx, effect) in enumerate(zip(block.txs, effects, strict=True)):
        assert effect.tx.hash_le == tx.hash_le
        raw = tx.serialize()
        txid = tx.txid
        issued = effect.issued_asset_id
        tx_rows.append(
            TxRow(txid, height, position, len(raw), raw, issued,
                  effect.issued_quantity if issued is not None else None)
        )
        output_rows.extend(_output_rows(tx, effect.created, p2pkh_version=p2pkh_version,
                                        p2sh_version=p2sh_version, txid=txid))
        spend_rows.extend(
            SpendRow(key[31::-1].hex(), int.from_bytes(key[32:36], "little"), txid)
            for key, _ in effect.spent
        )
    block_row = _block_row(block, state_hash=state_hash, voters=voters,
                           source_offset=source_offset)
    return BlockRows(block_row, tuple(tx_rows), tuple(output_rows), tuple(spend_rows),
                     _membership_rows(block, effects))


# The projector's own rows (decision 0096): the values COPY takes, as plain tuples, with
# no row object per output or spend (a frozen dataclass costs ~1 µs to build, two or three
# per transaction). ``block_rows`` stays the row model the audit and the tests read;
# ``copy_rows`` gives the same values (``copy_rows_of(block_rows(...)) == copy_rows(...)``,
# tested).
OutputValues = tuple[str, int, int, bytes, str | None, str | None, int | None]
SpendPair = tuple[tuple[str, int], str]  # ((spent txid, index), spending txid)


class CopyRows(NamedTuple):
    block: BlockRow
    txs: tuple[TxRow, ...]
    outputs: tuple[OutputValues, ...]  # tx_output columns but spent_by_txid, in order
    spends: tuple[SpendPair, ...]
    memberships: tuple[MembershipRow, ...]


def copy_rows(
    block: Block,
    effects: Sequence[TxEffects],
    *,
    state_hash: bytes,
    voters: Sequence[str],
    source_offset: int | None,
    p2pkh_version: int = 0x00,
    p2sh_version: int = 0x05,
) -> CopyRows:
    """``block_rows``'s values as ``CopyRows``, built without row objects. Pure."""
    assert len(effects) == len(block.txs)
    height = block.header.height
    tx_rows: list[TxRow] = []
    outputs: list[OutputValues] = []
    spends: list[SpendPair] = []
    address = output_address
    for position, (tx, effect) in enumerate(zip(block.txs, effects, strict=True)):
        assert effect.tx.hash_le == tx.hash_le
        raw = tx.serialize()
        txid = tx.txid
        issued = effect.issued_asset_id
        tx_rows.append(TxRow(txid, height, position, len(raw), raw, issued,
                             effect.issued_quantity if issued is not None else None))
        # OP_RETURN outputs never enter the UTXO set: no entry, never colored.
        colors = {int.from_bytes(key[32:36], "little"): (entry.asset_id, entry.quantity)
                  for key, entry in effect.created if entry.asset_id is not None}
        for index, output in enumerate(tx.outputs):
            script = output.script_pubkey
            color = colors.get(index) if colors else None
            if color is None:
                outputs.append((txid, index, output.value, script,
                                address(script, p2pkh_version, p2sh_version), None, None))
            else:
                outputs.append((txid, index, output.value, script,
                                address(script, p2pkh_version, p2sh_version), *color))
        spends.extend(((key[31::-1].hex(), int.from_bytes(key[32:36], "little")), txid)
                      for key, _ in effect.spent)
    return CopyRows(
        _block_row(block, state_hash=state_hash, voters=voters, source_offset=source_offset),
        tuple(tx_rows), tuple(outputs), tuple(spends), _membership_rows(block, effects))


def copy_rows_of(rows: BlockRows) -> CopyRows:
    """The same rows as ``CopyRows`` (genesis: built once)."""
    return CopyRows(
        rows.block, rows.txs,
        tuple((o.txid, o.index, o.value, o.script_pubkey, o.address, o.asset_id, o.quantity)
              for o in rows.outputs),
        tuple(((s.txid, s.index), s.spent_by_txid) for s in rows.spends),
        rows.memberships)


def genesis_rows(genesis: Genesis, state: LedgerState) -> BlockRows:
    """Height 0: the genesis allocation transaction, which creates all native value.

    Not a block of the log: its "hash" is the genesis hash (block 1's previous hash),
    its proposer is ``genesis`` and its size is the canonical genesis record's."""
    assert state.height == 0
    genesis_hash = genesis.hash_le
    tx = genesis_allocation_tx(genesis_hash, genesis.allocations)
    raw = tx.serialize()
    params = genesis.params
    created = [(tx.hash_le + index.to_bytes(4, "little"),
                UtxoEntry(output.value, output.script_pubkey, None, 0, 0))
               for index, output in enumerate(tx.outputs)]
    block_row = BlockRow(
        height=0,
        hash=display_hex(genesis_hash),
        prev_hash=display_hex(ZERO_HASH),
        merkle_root=display_hex(merkle_root([tx.hash_le])),
        proposer=GENESIS_PROPOSER,
        round=0,
        time_at=_time_at(genesis.time_ms),
        tx_count=1,
        size_bytes=len(genesis.canonical_bytes()),
        state_hash=display_hex(state.state_hash),
        tx_offset_start=0,
        tx_offset_end=0,
        voters=(),
        source_offset=None,
    )
    return BlockRows(
        block_row,
        (TxRow(tx.txid, 0, 0, len(raw), raw, None, None),),
        tuple(_output_rows(tx, created, p2pkh_version=params.p2pkh_version,
                           p2sh_version=params.p2sh_version)),
        (),
        (membership_row(genesis, start_height=0),),
    )


def rejection_row(log_offset: int, record: Mapping[str, Any]) -> RejectionRow:
    """One ``TxRejected`` record (decoded) as a row; hashes in display order. Every
    field is checked first (``rejected_from_record``: hash lengths, no NUL in text,
    partition and offset ranges), so a row never fails a table constraint."""
    checked = rejected_from_record(record)
    return RejectionRow(
        log_offset=log_offset,
        txid=None if checked.txid is None else display_hex(checked.txid),
        stage=checked.stage,
        code=checked.code,
        message=checked.message[:MESSAGE_CHARS_MAX],
        institution=checked.institution,
        submitter=checked.submitter,
        idempotency_key=checked.idempotency_key,
        block_hash=None if checked.block_hash is None else display_hex(checked.block_hash),
        source_topic=checked.source_topic,
        source_partition=checked.source_partition,
        source_offset=checked.source_offset,
        rejected_at=_time_at(checked.rejected_at_ms),
    )


# --------------------------------------------------------------------------- the chain


def apply_certified(
    state: LedgerState, block: Block, rules: LedgerRules
) -> tuple[LedgerState, tuple[TxEffects, ...]]:
    """Apply a certified block (already linked and checked) and return each tx's effects.

    The same transition as ``ledger.state.validate_block`` + ``apply_delta`` (check_tx
    per transaction into one overlay, then the delta), kept open here because the rows
    need every transaction's own created outputs, including those spent later in the
    same block, which the block delta nets out. Scripts are not re-verified: the quorum
    certificate proves a majority verified them; hashes and the Merkle root tie the
    transactions to it. ``state`` becomes stale on success.
    """
    overlay = BlockOverlay()
    spent_from_base = []
    spent_all: list[bytes] = []
    effects: list[TxEffects] = []
    for position, tx in enumerate(block.txs):
        try:
            effect = check_tx(state, tx, rules, overlay=overlay, verify_scripts=False)
        except ValidationError as error:
            raise ProjectionConflict(
                f"certified block {block.height} ({block.hash_hex}) tx {position} ({tx.txid}) "
                f"does not apply to the projected state: {error.message} [{error.code}]",
                code="block-does-not-apply",
            ) from error
        spent_all.extend(key for key, _ in effect.spent)
        spent_from_base.extend(overlay.absorb(effect))
        effects.append(effect)
    delta = delta_from_overlay(
        state, block.header, overlay, spent_from_base, spent_all, tx_count=len(block.txs)
    )
    return apply_delta(state, delta), tuple(effects)


_R = TypeVar("_R", covariant=True)


class RowsBuilder(Protocol[_R]):
    """``block_rows``, ``copy_rows`` or ``_no_rows``: what a followed block becomes."""

    def __call__(self, block: Block, effects: Sequence[TxEffects], *, state_hash: bytes,
                 voters: Sequence[str], source_offset: int | None, p2pkh_version: int = ...,
                 p2sh_version: int = ...) -> _R: ...


def _no_rows(block: Block, effects: Sequence[TxEffects], *, state_hash: bytes,
             voters: Sequence[str], source_offset: int | None, p2pkh_version: int = 0x00,
             p2sh_version: int = 0x05) -> bool:
    return True


@dataclass
class CopyCounts:
    """What the follower saw besides the blocks it projected (all from the blocks log)."""

    duplicates: int = 0  # later identical copies of a projected height
    invalid: int = 0  # undecodable records or certificates that do not check
    ahead: int = 0  # records for a height above the next one (skipped; a copy follows)
    unchecked: int = 0  # copies of heights older than the copy window
    different_bytes: int = 0  # same header hash, other bytes (e.g. signature encoding)
    times_clamped: int = 0  # blocks whose time_ms no timestamp holds (stored clamped)


class Decisions:
    """Which block each height decided, as the votes log says: the first quorum of acks
    in log order (decision 0020), found by an observer consensus machine
    (``ledger.consensus`` with no member of its own). A quorum certificate alone is no
    proof: late acks after a timeout quorum certify a losing block."""

    def __init__(self, genesis: Genesis) -> None:
        self.config = consensus.ConsensusConfig(genesis, None, genesis.hash_le)
        self.machine = consensus.initial_state(self.config, now_ms=0)
        self.decided: dict[int, bytes] = {}
        # height -> the votes-log offset right after the vote that decided it: where a
        # machine resuming at that height is fed from (``consensus.initial_state``)
        self.resume_offsets: dict[int, int] = {0: 0}
        self._next_offset = 0  # after the last vote taken
        self.invalid_votes = 0

    def resume(self, *, height: int, head_hash: bytes, schedule: MembershipSchedule | None,
               votes_offset: int) -> None:
        """Start as a machine that committed ``height`` and is fed the votes log from
        ``votes_offset`` (right after the vote that decided ``height``)."""
        self.machine = consensus.initial_state(self.config, now_ms=0, committed_height=height,
                                               head_hash=head_hash, schedule=schedule)
        self.decided.clear()
        self.resume_offsets = {height: votes_offset}
        self._next_offset = votes_offset

    @property
    def height(self) -> int:
        """The highest height decided so far."""
        return self.machine.vote_height - 1

    def take(self, record: LogRecord) -> None:
        try:
            vote = vote_from_record(codec.decode(record.value, expected="VoteCast").record)
        except ValidationError:
            self.invalid_votes += 1
            self._next_offset = record.offset + 1
            return
        self._next_offset = record.offset + 1
        self._step(consensus.VoteReceived(vote))

    def sync(self, height: int, schedule: MembershipSchedule | None) -> None:
        """The chain the follower projected reached ``height``, with this membership
        schedule. This machine never sees block bodies, so it learns here which
        membership counts at the heights it decides next (decision 0061); votes it
        held for want of that are counted now."""
        machine = self.machine
        if schedule is None or height <= machine.committed_height:
            return
        self.machine = dataclasses.replace(
            machine, committed_height=min(height, machine.vote_height - 1), schedule=schedule)
        self._step(consensus.Tick(0))

    def _step(self, event: consensus.Event) -> None:
        self.machine, _ = consensus.step(self.machine, event)
        if self.machine.decided:
            for decision in self.machine.decided:
                self.decided[decision.height] = decision.block_hash
                self.resume_offsets[decision.height] = self._next_offset
            self.machine = dataclasses.replace(self.machine, decided=())

    def forget_below(self, height: int) -> None:
        # In place: the follower holds the same mapping (``ChainFollower.decided``).
        floor = height - DECISIONS_KEPT_HEIGHTS
        for table in (self.decided, self.resume_offsets):
            if len(table) > 2 * DECISIONS_KEPT_HEIGHTS:
                for old in [h for h in table if h < floor]:
                    del table[old]


class ChainFollower:
    """The projector's ledger state, advanced by the decided record of each height
    (``decided``: height -> block hash from the votes log; None: the first certified
    record per height, for callers without a votes log)."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.genesis_hash = genesis.hash_le
        self.params = genesis.params
        self.rules = LedgerRules.from_genesis(genesis)
        # The state carries the membership schedule (decision 0061): certificates of
        # each height are checked against the membership in force there.
        self.state: LedgerState = state_from_genesis(
            self.genesis_hash, genesis.allocations,
            schedule=schedule_from_genesis(genesis, self.genesis_hash))
        self.tx_offset_end = 0
        self.counts = CopyCounts()
        self.decided: Mapping[int, bytes] | None = None
        self.highest_ahead = 0  # the highest height seen in a record ahead of the chain
        self.lowest_ahead: int | None = None  # the lowest, since the projector last rewound
        # height -> (block hash, sha256 of the block bytes), the most recent heights only
        self._seen: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()

    def resume(self, state: LedgerState, *, tx_offset_end: int,
               heads: Sequence[tuple[int, bytes]]) -> None:
        """Continue from ``state`` (loaded and verified by the projector) instead of
        genesis; ``heads``: (height, block hash) of the latest projected heights, so
        later copies of them are still compared (by header hash: their bytes' digests
        are not stored)."""
        self.state = state
        self.tx_offset_end = tx_offset_end
        self._seen.clear()
        for height, block_hash in sorted(heads)[-COPY_WINDOW_HEIGHTS:]:
            self._seen[height] = (block_hash, b"")

    def view(self, height: int) -> Genesis:
        """The membership in force at ``height`` as the projected blocks say."""
        schedule = self.state.schedule
        assert schedule is not None
        return schedule.at(height)

    @property
    def height(self) -> int:
        return self.state.height

    def genesis_rows(self) -> BlockRows:
        return genesis_rows(self.genesis, self.state)

    def follow(self, record: LogRecord) -> BlockRows | None:
        """The rows of the block this record adds to the chain, or None for a copy of a
        projected height (checked), an unusable record (counted) or a height ahead."""
        return self._follow_with(record, block_rows)

    def follow_copy(self, record: LogRecord) -> CopyRows | None:
        """``follow`` with the rows as ``CopyRows`` (what the projector writes)."""
        return self._follow_with(record, copy_rows)

    def follow_only(self, record: LogRecord) -> bool:
        """``follow`` without building rows (a restart's replay, whose rows are stored):
        whether the record added a block."""
        return self._follow_with(record, _no_rows) is not None

    def _follow_with(self, record: LogRecord, build: RowsBuilder[_R]) -> _R | None:
        checked = self._checked(record)
        if checked is None:
            return None
        committed, raw_block = checked
        block = committed.block
        state, effects = apply_certified(self.state, block, self.rules)
        rows = build(
            block,
            effects,
            state_hash=state.state_hash,
            voters=committed.qc.voters,
            source_offset=record.offset,
            p2pkh_version=self.params.p2pkh_version,
            p2sh_version=self.params.p2sh_version,
        )
        # Only now, with the rows built, does the follower move: a record that fails
        # anywhere above leaves it where it was.
        if not is_time_in_range(block.header.time_ms):
            self.counts.times_clamped += 1
        self.state = state
        self.tx_offset_end = block.header.tx_offset_end
        self._remember(block.height, block.hash, hashlib.sha256(raw_block).digest())
        return rows

    def _checked(self, record: LogRecord) -> tuple[Committed, bytes] | None:
        """The certified, decided block of the next height this record carries, checked
        against the projected chain (and its bytes); None for anything else (counted)."""
        try:
            decoded = codec.decode(record.value, expected="BlockCommitted").record
            height = int(decoded["height"])
            raw_block = bytes(decoded["block"])
        except (ValidationError, KeyError, TypeError, ValueError) as error:
            self.counts.invalid += 1
            logger.warning("blocks log offset %d: undecodable record skipped: %s", record.offset,
                        error)
            return None
        if height <= self.state.height:
            self._check_copy(record.offset, height, decoded, raw_block)
            return None
        if height > self.state.height + 1:
            self.counts.ahead += 1
            self.highest_ahead = max(self.highest_ahead, height)
            self.lowest_ahead = height if self.lowest_ahead is None else min(
                self.lowest_ahead, height)
            logger.warning("blocks log offset %d: height %d ahead of the projected %d; skipped "
                        "(another member's copy follows in log order)", record.offset, height,
                        self.state.height)
            return None
        committed = self._certified(record.offset, decoded)
        if committed is None:
            return None
        block = committed.block
        self._check_decided(record.offset, block)
        try:
            check_block_context_free(block, self.view(height))
            check_block_links(block, prev_hash=self.state.head_hash, height=height)
        except ValidationError as error:
            raise ProjectionConflict(
                f"blocks log offset {record.offset}: certified block {height} "
                f"({block.hash_hex}) does not extend the projected chain: {error.message}",
                code="block-link",
            ) from error
        if block.header.tx_offset_start != self.tx_offset_end:
            raise ProjectionConflict(
                f"blocks log offset {record.offset}: block {height} starts at tx offset "
                f"{block.header.tx_offset_start}, the chain at {self.tx_offset_end}",
                code="block-tx-range",
            )
        return committed, raw_block

    def _certified(self, offset: int, decoded: Mapping[str, Any]) -> Committed | None:
        try:
            committed = committed_from_record(decoded,
                                              block_bytes_max=self.params.block_bytes_max)
            check_certified_block(committed.block, committed.qc,
                                  self.view(committed.block.height),
                                  genesis_hash=self.genesis_hash)
        except ValidationError as error:
            self.counts.invalid += 1
            logger.warning("blocks log offset %d: record for height %s refused (%s): %s", offset,
                        decoded.get("height"), error.code, error.message)
            return None
        return committed

    def _check_decided(self, offset: int, block: Block) -> None:
        if self.decided is None:
            return
        wanted = self.decided.get(block.height)
        if wanted != block.hash:
            raise ProjectionError(
                f"blocks log offset {offset}: certified block {block.height} "
                f"({block.hash_hex}) is not the block the votes log decided "
                f"({'none yet' if wanted is None else display_hex(wanted)})",
                code="block-not-decided",
            )

    def _remember(self, height: int, block_hash: bytes, bytes_digest: bytes) -> None:
        self._seen[height] = (block_hash, bytes_digest)
        while len(self._seen) > COPY_WINDOW_HEIGHTS:
            self._seen.popitem(last=False)

    def _check_copy(self, offset: int, height: int, decoded: Mapping[str, Any],
                    raw_block: bytes) -> None:
        if height == 0:
            self.counts.invalid += 1
            logger.warning("blocks log offset %d: a record for height 0 (genesis is not a block)",
                        offset)
            return
        seen = self._seen.get(height)
        if seen is None:
            self.counts.unchecked += 1
            return
        block_hash, bytes_digest = seen
        if hashlib.sha256(raw_block).digest() == bytes_digest:
            self.counts.duplicates += 1
            return
        try:
            header_hash = BlockHeader.read(ByteReader(raw_block, "block header")).hash
        except ValidationError:
            header_hash = b""
        if header_hash == block_hash and not bytes_digest:
            # A height projected before this run resumed: only its hash is known. The
            # header hash commits to the Merkle root, hence to every transaction.
            self.counts.duplicates += 1
            return
        if header_hash == block_hash:
            self.counts.different_bytes += 1
            logger.warning("blocks log offset %d: copy of block %d with the same header but other "
                        "bytes", offset, height)
            return
        committed = self._certified(offset, decoded)
        if committed is None:
            return  # a forged or broken copy: counted as invalid, the projection stands
        if self.decided is not None and self.decided.get(height) == block_hash:
            self._check_decided(offset, committed.block)  # a losing block: quarantined
        raise ProjectionConflict(
            f"FORK: blocks log offset {offset} carries a certified block {height} "
            f"({committed.block.hash_hex}, committer {committed.committer}) other than the "
            f"projected {display_hex(block_hash)}",
            code="fork",
        )


# --------------------------------------------------------------------------- resuming


class ResumeRefused(ProjectionError):
    """The stored state cannot be resumed from; the projector replays the log instead."""

    code = "resume-refused"


@dataclass(frozen=True, slots=True)
class ResumeRow:
    """The projector's row in ``projection_state`` (revision 0013), written with every
    batch: what it needs besides the projected rows to continue without the log."""

    height: int
    head_hash: str  # display hex
    state_hash: str  # display hex
    votes_offset: int  # right after the vote that decided ``height``
    tx_offset_end: int
    bindings: dict[str, str]  # asset id -> definition hash (hex)
    supply: dict[str, str]  # asset id -> issued quantity (decimal string: never a float)


def resume_row(state: LedgerState, *, votes_offset: int, tx_offset_end: int) -> ResumeRow:
    return ResumeRow(
        state.height, display_hex(state.head_hash), display_hex(state.state_hash),
        votes_offset, tx_offset_end,
        {asset: digest.hex() for asset, digest in sorted(state.bindings().items())},
        {asset: str(quantity) for asset, quantity in sorted(state.supplies().items())},
    )


def _hash_from_display(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ResumeRefused(f"{what} {text[:80]!r} is not a 32-byte hash in hex")
    return raw[::-1]


def state_from_rows(genesis: Genesis, row: ResumeRow,
                    unspent: Sequence[tuple[str, int, int, bytes, str | None, int | None, int]],
                    ) -> LedgerState:
    """The ledger state a resume row and the unspent ``tx_output`` rows (txid, index,
    value, script, asset id, quantity, height of the creating tx) describe, verified:
    the multiset accumulator is recomputed from them, and the state hash it gives must
    be the stored one, which the projector computed by applying every block. Pure.
    ``ResumeRefused`` when anything does not match."""
    utxos: dict[bytes, UtxoEntry] = {}
    for txid, index, value, script, asset, quantity, height in unspent:
        script = bytes(script)
        if is_unspendable(script):
            continue  # OP_RETURN outputs have rows but never enter the UTXO set
        key = _hash_from_display(txid, "txid") + int(index).to_bytes(4, "little")
        colored = asset is not None
        utxos[key] = UtxoEntry(int(value), script, asset if colored else None,
                               int(quantity or 0) if colored else 0, int(height))
    try:
        bindings = {asset: bytes.fromhex(digest) for asset, digest in row.bindings.items()}
        supply = {asset: int(quantity) for asset, quantity in row.supply.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ResumeRefused(f"stored bindings or supply unreadable: {error}") from None
    genesis_hash = genesis.hash_le
    native_total = sum(value for _, value in genesis.allocations)
    parts: dict[str, Any] = dict(
        height=row.height, head_hash=_hash_from_display(row.head_hash, "head hash"),
        utxos=utxos, bindings=bindings, supply=supply, native_total=native_total,
        script_index=None, spent_recent={}, spent_journal=deque(),
        schedule=schedule_from_genesis(genesis, genesis_hash))
    accumulator = LedgerState(accumulator=0, **parts).recompute_accumulator()
    state = LedgerState(accumulator=accumulator, **parts)
    if display_hex(state.state_hash) != row.state_hash:
        raise ResumeRefused(
            f"the unspent outputs in tx_output hash to state hash {display_hex(state.state_hash)} "
            f"at height {row.height}, the projection recorded {row.state_hash}: rows were "
            "altered or lost", code="resume-state-hash")
    return state


# --------------------------------------------------------------------------- the shell


@dataclass
class ProjectionStats:
    blocks: int = 0
    txs: int = 0
    outputs: int = 0
    rejections: int = 0
    invalid_rejections: int = 0
    batches: int = 0
    replayed_blocks: int = 0  # applied from the log without writing (restart)
    blocks_offset: int = 0
    rejected_offset: int = 0
    height: int = 0
    head_hash: str = ""
    state_hash: str = ""
    copies: CopyCounts = field(default_factory=CopyCounts)
    quarantined: int = 0  # records this run skipped into projection_quarantine
    quarantined_codes: dict[str, int] = field(default_factory=dict)  # reason code -> count
    waiting_for_height: int | None = None  # a gap: the next height, absent for a while
    elapsed_s: float = 0.0
    database_backend_pid: int | None = None  # the PostgreSQL server process writing (bench)
    resumed_from_height: int | None = None  # started from the stored state at this height
    resume_refused: str | None = None  # why it replayed the blocks log from 0 instead
    blocks_records_read: int = 0  # records read from the blocks log by this run
    votes_records_read: int = 0  # ... and from the votes log
    startup_s: float = 0.0  # from the start until the state stood (resumed or replayed)
    startup_block_records: int = 0  # blocks-log records read until then
    write_wait_s: float = 0.0  # the loop waited this long for the write in flight
    read_wait_s: float = 0.0  # ... and this long in reads of the blocks and votes logs
    end_offset_wait_s: float = 0.0  # ... and this long asking the votes log's end offset
    votes_end_asks: int = 0  # times it asked (once per read up to the last end seen)
    # Where the projector's own CPU goes (thread CPU seconds, decision 0096): following
    # records (decode, certificate, ledger, rows) and writing batches (client side).
    follow_cpu_s: float = 0.0
    write_cpu_s: float = 0.0
    loop_cpu_s: float = 0.0  # the projection loop's thread in all (following included)


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    """A record the projector skipped instead of stopping (table projection_quarantine)."""

    topic: str
    offset: int
    reason_code: str
    detail: str


@dataclass(frozen=True, slots=True)
class _Resume:
    """A stored state, verified against its rows, to start from (``Projector._resume``
    then checks its head against the certified record in the blocks log)."""

    state: LedgerState
    row: ResumeRow
    anchor_offset: int  # the blocks-log offset of the head block's record
    heads: tuple[tuple[int, bytes], ...]  # (height, hash) of the latest projected heights


# The unspent outputs with the height of the transaction that created them: the UTXO
# set of the projected head (OP_RETURN rows are dropped by ``state_from_rows``).
_UNSPENT_SQL = ('SELECT o.txid, o."index", o.value, o.script_pubkey, o.asset_id, o.quantity, '
                "t.height FROM tx_output o JOIN tx t ON t.txid = o.txid "
                "WHERE o.spent_by_txid IS NULL")
_RESUME_SQL = ("SELECT height, head_hash, state_hash, votes_offset, tx_offset_end, bindings, "
               "supply FROM projection_state WHERE consumer = %s")


@dataclass
class _Batch:
    rows: list[CopyRows] = field(default_factory=list)
    rejections: list[RejectionRow] = field(default_factory=list)
    quarantined: list[QuarantineRow] = field(default_factory=list)
    started: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.rows and not self.rejections and not self.quarantined


_BLOCK_COLUMNS = ("height", "hash", "prev_hash", "merkle_root", "proposer", "round", "time_at",
                  "tx_count", "size_bytes", "state_hash", "tx_offset_start", "tx_offset_end",
                  "voters", "source_offset")
_TX_COLUMNS = ("txid", "height", "position", "size_bytes", "raw", "issued_asset_id",
               "issued_quantity")
_OUTPUT_COLUMNS = ("txid", "index", "value", "script_pubkey", "address", "asset_id", "quantity",
                   "spent_by_txid")
_REJECTION_COLUMNS = ("log_offset", "txid", "stage", "code", "message", "institution",
                      "submitter", "idempotency_key", "block_hash", "source_topic",
                      "source_partition", "source_offset", "rejected_at")


def _record_height(record: LogRecord) -> int | None:
    """The height a blocks-log record names (key first: nodes key records by height)."""
    key = record.key
    if key is not None and 0 < len(key) <= 20 and key.isdigit():
        return int(key)
    try:
        return int(codec.decode(record.value, expected="BlockCommitted").record["height"])
    except (ValidationError, KeyError, TypeError, ValueError):
        return None


_gc_tuning: list[tuple[int, ...]] = []  # the thresholds to restore, one per user


@contextlib.contextmanager
def collector_tuned_for_bulk() -> Iterator[None]:
    """Collect cyclic garbage less often while projecting (``GC_YOUNG_THRESHOLD``). The
    thresholds in force before the first of overlapping users come back when the last
    one leaves (projectors in one process may overlap in any order)."""
    if not _gc_tuning:
        previous = gc.get_threshold()
        gc.set_threshold(max(previous[0], GC_YOUNG_THRESHOLD), *previous[1:])
        _gc_tuning.append(previous)
    else:
        _gc_tuning.append(_gc_tuning[0])
    try:
        yield
    finally:
        restore = _gc_tuning.pop()
        if not _gc_tuning:
            gc.set_threshold(*restore)


# PostgreSQL types of the columns written with binary COPY (revisions 0001, 0002): in
# binary format, neither side formats or parses text, nor hex for the bytea columns
# (measured: client 2.9 -> 1.8 µs, server 12.3 -> 9.8 µs per transaction; 0093).
_TX_TYPES = ("text", "int8", "int4", "int4", "bytea", "text", "int8")
_OUTPUT_TYPES = ("text", "int4", "int8", "bytea", "text", "text", "int8", "text")


_T = TypeVar("_T")


class WriterLoop:
    """An event loop on its own thread for the projector's writes (decision 0095). The
    projection loop follows the next blocks (CPU-bound, one block between yields) while
    the write in flight waits on PostgreSQL; on its own loop the write takes its next
    step as soon as the server answers, not at the follower's next yield. psycopg
    releases the GIL while it waits. One connection, used only on this loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the writer's loop; cancelling this cancels it there."""
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def stop(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Let what runs on this loop end (a cancelled write rolls back), close ``conn``
        there, then end the thread."""
        async def drain() -> None:
            current = asyncio.current_task()
            await asyncio.gather(*(task for task in asyncio.all_tasks() if task is not current),
                                 return_exceptions=True)
            if conn is not None:
                await conn.close()

        try:
            await self.call(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


def _copy_sql(table: str, columns: Sequence[str], *, binary: bool = False) -> str:
    quoted = ", ".join(f'"{name}"' for name in columns)
    return f"COPY {table} ({quoted}) FROM STDIN" + (" (FORMAT BINARY)" if binary else "")


class Projector:
    """Projects one chain's logs into one PostgreSQL database (see the module docstring)."""

    def __init__(
        self,
        genesis: Genesis,
        *,
        bootstrap: str,
        dsn: str,
        topic_prefix: str = "",
        consumer: str = CONSUMER_DEFAULT,
        batch_blocks_max: int = BATCH_BLOCKS_MAX,
        batch_interval_ms: int = BATCH_INTERVAL_MS,
    ) -> None:
        assert batch_blocks_max > 0 and batch_interval_ms > 0
        self.genesis = genesis
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.consumer = consumer
        self.blocks_topic = topic_prefix + BLOCKS.name
        self.rejected_topic = topic_prefix + REJECTED.name
        self.batch_blocks_max = batch_blocks_max
        self.batch_interval_ms = batch_interval_ms
        self.follower = ChainFollower(genesis)
        self.decisions = Decisions(genesis)
        self.follower.decided = self.decisions.decided
        self.votes_topic = topic_prefix + VOTES.name
        self._votes: LogReader | None = None
        self.stats = ProjectionStats()
        self._blocks_position = 0  # next offset to read, as stored in projection_offset
        self._rejected_position = 0
        self._genesis_pending: CopyRows | None = None  # height 0 rows, until written
        self._written = (-1, -1)  # offsets last committed to projection_offset
        self._queued = (-1, -1)  # offsets of the last batch handed to a write
        self._writing: asyncio.Task[None] | None = None  # the write in flight
        self._first_ahead_offset: int | None = None  # a record skipped as ahead of a gap
        self._ahead_seen = 0
        self._gap_since: tuple[int, float] | None = None  # (height waited for, since)
        self._blocks_unread: list[LogRecord] = []  # read, left for the next batch
        self._votes_end = 0  # the votes log's end offset as last asked
        self._writer: WriterLoop | None = None  # the thread the writes run on
        self.writes_on_thread = True  # False: on the projection's own loop (to compare)

    # ------------------------------------------------------------ the database

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            # Autocommit: reads stand alone, and every conn.transaction() is a real
            # BEGIN/COMMIT (never a savepoint inside an implicit transaction).
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as error:
            raise ProjectionError(f"cannot connect to PostgreSQL: {error}".strip(),
                                  code="projection-database") from None
        try:
            await conn.execute("SELECT log_offset FROM tx_rejection LIMIT 0")
            await conn.execute("SELECT state_hash FROM block LIMIT 0")
            await conn.execute("SELECT reason_code FROM projection_quarantine LIMIT 0")
            await conn.execute("SELECT votes_offset FROM projection_state LIMIT 0")
        except psycopg.errors.UndefinedTable as error:
            await conn.close()
            raise ProjectionError(
                f"the projection schema is missing or old ({error.diag.message_primary}); "
                "run `capledger dev up` or `alembic upgrade head` on this database",
                code="projection-schema",
            ) from None
        except psycopg.errors.UndefinedColumn as error:
            await conn.close()
            raise ProjectionError(
                f"the projection schema is old ({error.diag.message_primary}); run "
                "`alembic upgrade head` on this database",
                code="projection-schema",
            ) from None
        # bytea in binary COPY through psycopg's C dumper: the one ``set_types`` finds
        # by default for bytea is the DB-API ``Binary`` wrapper's, in Python (0095).
        conn.adapters.register_dumper(bytes, BytesBinaryDumper)
        return conn

    async def _check_topics(self) -> None:
        """Fail fast on a wrong broker or prefix (aiokafka would wait for the topic)."""
        admin = admin_client(self.bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS)
        try:
            await admin.start()
            topics = set(await admin.list_topics())
        except Exception as error:
            raise ProjectionError(f"cannot reach the Kafka broker at {self.bootstrap}: "
                                  f"{type(error).__name__}: {error}",
                                  code="projection-broker") from None
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        missing = sorted({self.blocks_topic, self.rejected_topic, self.votes_topic} - topics)
        if missing:
            raise ProjectionError(f"no topic {', '.join(missing)} on {self.bootstrap}: no node "
                                  "has run with this topic prefix", code="projection-topic")

    async def _stored_offset(self, conn: psycopg.AsyncConnection[Any], topic: str) -> int:
        cursor = await conn.execute(
            'SELECT "offset" FROM projection_offset WHERE consumer = %s AND topic = %s '
            "AND partition = 0",
            (self.consumer, topic),
        )
        row = await cursor.fetchone()
        return 0 if row is None else int(row[0])

    async def reset(self) -> None:
        """Drop every projected row and this consumer's tracking rows (the rebuild)."""
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute("TRUNCATE " + ", ".join(PROJECTED_TABLES))
                await conn.execute("DELETE FROM projection_offset WHERE consumer = %s",
                                   (self.consumer,))
                await conn.execute("DELETE FROM projection_quarantine WHERE consumer = %s",
                                   (self.consumer,))
                await conn.execute("DELETE FROM projection_state WHERE consumer = %s",
                                   (self.consumer,))
        finally:
            await conn.close()

    # ------------------------------------------------------------ running

    async def run(
        self,
        *,
        follow: bool = False,
        stop: asyncio.Event | None = None,
        on_batch: Callable[[ProjectionStats], None] | None = None,
        blocks_offset_max: int | None = None,
    ) -> ProjectionStats:
        """Project from the stored offsets. Without ``follow``, stop once both topics are
        read up to their end offsets as seen at the start (``--once``); with it, keep
        going until ``stop`` is set. ``blocks_offset_max`` stops the blocks log at that
        offset (a test's way to restart in the middle)."""
        with collector_tuned_for_bulk():
            return await self._run(follow=follow, stop=stop, on_batch=on_batch,
                                   blocks_offset_max=blocks_offset_max)

    async def _run(self, *, follow: bool, stop: asyncio.Event | None,
                   on_batch: Callable[[ProjectionStats], None] | None,
                   blocks_offset_max: int | None) -> ProjectionStats:
        started, loop_cpu_started = time.monotonic(), time.thread_time()
        await self._check_topics()
        conn = await self._connect()
        self.stats.database_backend_pid = conn.info.backend_pid
        blocks = LogReader(self.bootstrap, self.blocks_topic,
                           client_id=f"capledger-{self.consumer}-blocks")
        rejected = LogReader(self.bootstrap, self.rejected_topic,
                             client_id=f"capledger-{self.consumer}-rejected")
        self._votes = LogReader(self.bootstrap, self.votes_topic,
                                client_id=f"capledger-{self.consumer}-votes")
        try:
            self._blocks_position = await self._stored_offset(conn, self.blocks_topic)
            self._rejected_position = await self._stored_offset(conn, self.rejected_topic)
            resume = await self._load_resume(conn)
            # Each reader's first request opens its own TLS + SCRAM connection to the
            # partition leader: the three are started (and measured) together.
            await asyncio.gather(
                blocks.start(0 if resume is None else resume.anchor_offset),
                rejected.start(self._rejected_position),
                self._votes.start(0 if resume is None else resume.row.votes_offset))
            _, _, self._votes_end = await asyncio.gather(
                blocks.end_offset(), rejected.end_offset(), self._votes.end_offset())
            if resume is not None and not await self._resume(blocks, resume):
                blocks.seek(0)
                self._votes.seek(0)
                resume = None
            if resume is None:
                await self._replay(blocks, conn)
            self.stats.startup_s = time.monotonic() - started
            self.stats.startup_block_records = self.stats.blocks_records_read
            ends: tuple[int, int] | None = None
            if not follow:
                blocks_end, rejected_end = await asyncio.gather(blocks.end_offset(),
                                                                rejected.end_offset())
                if blocks_offset_max is not None:
                    blocks_end = min(blocks_end, blocks_offset_max)
                ends = (blocks_end, rejected_end)
            await self._project_on_writer(conn, blocks, rejected, ends=ends, stop=stop,
                                          on_batch=on_batch, started=started,
                                          blocks_offset_max=blocks_offset_max)
        finally:
            await self._settle_write(cancel=True)
            await asyncio.gather(blocks.stop(), rejected.stop(), self._votes.stop(),
                                 return_exceptions=True)
            await conn.close()
            self.stats.loop_cpu_s += time.thread_time() - loop_cpu_started
        return self._refresh_stats(started)

    async def _project_on_writer(self, conn_main: psycopg.AsyncConnection[Any],
                                 blocks: LogReader, rejected: LogReader,
                                 **loop_options: Any) -> None:
        """``_project`` with its writes on a ``WriterLoop`` thread and their own
        connection (whose server process ``stats.database_backend_pid`` names);
        without ``writes_on_thread``, on this loop and ``conn_main`` (measurements)."""
        if not self.writes_on_thread:
            await self._project(conn_main, blocks, rejected, **loop_options)
            return
        writer = WriterLoop(f"capledger-{self.consumer}-writer")
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await writer.call(self._connect())
            self.stats.database_backend_pid = conn.info.backend_pid
            self._writer = writer
            await self._project(conn, blocks, rejected, **loop_options)
        finally:
            await self._settle_write(cancel=True)
            self._writer = None
            await writer.stop(conn)

    async def _project(
        self,
        conn: psycopg.AsyncConnection[Any],
        blocks: LogReader,
        rejected: LogReader,
        *,
        ends: tuple[int, int] | None,
        stop: asyncio.Event | None,
        on_batch: Callable[[ProjectionStats], None] | None,
        started: float,
        blocks_offset_max: int | None,
    ) -> None:
        """The loop: read both logs into a batch, write it when full, due or idle.
        ``ends`` (without --follow): stop once both logs are read that far."""
        batch = _Batch(started=time.monotonic())
        while stop is None or not stop.is_set():
            if self._writing is not None and self._writing.done():
                await self._settle_write()  # a refused write stops the loop now
            blocks_done = ends is not None and self._blocks_next(blocks) >= ends[0]
            rejected_done = ends is not None and rejected.position >= ends[1]
            if blocks_done and rejected_done:
                break
            read_any = False
            if not blocks_done and len(batch.rows) < self.batch_blocks_max:
                read_any = await self._read_blocks(blocks, batch, blocks_offset_max)
            if not rejected_done and len(batch.rejections) < BATCH_REJECTIONS_MAX:
                read_any = await self._read_rejections(rejected, batch,
                                                       quick=read_any) or read_any
            self._check_gap()
            full = (len(batch.rows) >= self.batch_blocks_max
                    or len(batch.rejections) >= BATCH_REJECTIONS_MAX)
            if full or self._due(batch) or not read_any:
                if self._has_work(batch):
                    await self._start_write(conn, batch, on_batch, started)
                batch = _Batch(started=time.monotonic())
        if self._has_work(batch):
            await self._start_write(conn, batch, on_batch, started)
        await self._settle_write()

    async def _start_write(self, conn: psycopg.AsyncConnection[Any], batch: _Batch,
                           on_batch: Callable[[ProjectionStats], None] | None,
                           started: float) -> None:
        """Write ``batch`` in the background while the next one is read and followed
        (PostgreSQL works on another core meanwhile); at most one write in flight, so
        transactions commit in order. The batch's rows and offsets are fixed here."""
        waited = time.monotonic()
        await self._settle_write()
        self.stats.write_wait_s += time.monotonic() - waited
        rows = list(batch.rows)
        if self._genesis_pending is not None:
            rows.insert(0, self._genesis_pending)
            self._genesis_pending = None
        offsets = (self._blocks_position, self._rejected_position)
        self._queued = offsets
        state_row = self._resume_row()

        writer = self._writer

        async def write() -> None:
            if writer is None:
                await self._write(conn, batch, rows, offsets, state_row)
            else:
                await writer.call(self._write(conn, batch, rows, offsets, state_row))
            if on_batch is not None:
                on_batch(self._refresh_stats(started))

        self._writing = asyncio.create_task(write())

    async def _settle_write(self, *, cancel: bool = False) -> None:
        """Wait for the write in flight (its error, if any, raised here)."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        if cancel and not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
            return
        await writing

    async def _read_blocks(self, blocks: LogReader, batch: _Batch,
                           blocks_offset_max: int | None) -> bool:
        """One read of the blocks log into ``batch``; whether it returned records."""
        limit = READ_RECORDS_MAX
        if blocks_offset_max is not None:
            limit = max(1, min(limit, blocks_offset_max - blocks.position))
        records = self._blocks_unread
        if not records:
            waited = time.monotonic()
            records = await blocks.read(timeout_ms=READ_TIMEOUT_MS, max_records=limit)
            self.stats.read_wait_s += time.monotonic() - waited
            self.stats.blocks_records_read += len(records)
        self._blocks_unread = []
        for index, record in enumerate(records):
            if ((blocks_offset_max is not None and record.offset >= blocks_offset_max)
                    or len(batch.rows) >= self.batch_blocks_max
                    or (batch.rows and self._due(batch))):  # always progress
                # The rest goes to the next batch, kept here: a seek back would make the
                # consumer fetch, decrypt and decompress the same records again.
                self._blocks_unread = records[index:]
                break
            await self._decide_through(record)
            rows = self._follow(record, batch)
            if isinstance(rows, CopyRows):
                batch.rows.append(rows)
                await asyncio.sleep(0)  # let the write in flight take its next step
            rewind = self._note_ahead(record.offset)
            self._advance_blocks_position(record.offset + 1)
            if rewind is not None:
                blocks.seek(rewind)  # the records after this one are read again
                break
        return bool(records)

    def _blocks_next(self, blocks: LogReader) -> int:
        """The offset of the next blocks-log record to follow."""
        return self._blocks_unread[0].offset if self._blocks_unread else blocks.position

    def _note_ahead(self, offset: int) -> int | None:
        """After following the record at ``offset``: remember the first record skipped
        as ahead of a gap; once the gap is filled (the lowest height skipped is the
        next one or below), the offset to read again from (and forget it)."""
        follower = self.follower
        if follower.counts.ahead > self._ahead_seen:
            self._ahead_seen = follower.counts.ahead
            if self._first_ahead_offset is None:
                self._first_ahead_offset = offset
        lowest = follower.lowest_ahead
        if (self._first_ahead_offset is None or lowest is None
                or follower.height + 1 < lowest):
            return None
        rewind = self._first_ahead_offset
        self._first_ahead_offset = None
        follower.lowest_ahead = None
        return rewind

    def _advance_blocks_position(self, next_offset: int) -> None:
        """The stored position never passes a record skipped as ahead of a gap, so a
        restart reads it again once the gap is filled."""
        limit = next_offset if self._first_ahead_offset is None else self._first_ahead_offset
        self._blocks_position = max(self._blocks_position, min(next_offset, limit))

    async def _read_rejections(self, rejected: LogReader, batch: _Batch, *,
                               quick: bool) -> bool:
        records = await rejected.read(timeout_ms=0 if quick else READ_TIMEOUT_MS,
                                      max_records=READ_RECORDS_MAX)
        for record in records:
            self._take_rejection(record, batch)
            self._rejected_position = record.offset + 1
        return bool(records)

    async def _decide_through(self, record: LogRecord) -> None:
        """Read the votes log until the height of ``record`` is decided or the log's
        end (a committer publishes only after the votes log decided its block, so the
        decision of an honest record is always there)."""
        height = _record_height(record)
        votes = self._votes
        if height is None or votes is None or height <= self.decisions.height:
            return
        self.decisions.sync(self.follower.height, self.follower.state.schedule)
        while height > self.decisions.height:
            if votes.position >= self._votes_end:
                # Asked again only once read up to the end last seen: the question
                # queues behind the reader's long-polling fetch (up to its wait, 500
                # ms), and asked per height it was a quarter of a catch-up's wall time
                # (0095). An end seen earlier stays an end: the log only grows.
                waited = time.monotonic()
                self._votes_end = await votes.end_offset()
                self.stats.end_offset_wait_s += time.monotonic() - waited
                self.stats.votes_end_asks += 1
                if votes.position >= self._votes_end:
                    break
            waited = time.monotonic()
            read = await votes.read(timeout_ms=READ_TIMEOUT_MS, max_records=READ_RECORDS_MAX)
            self.stats.read_wait_s += time.monotonic() - waited
            self.stats.votes_records_read += len(read)
            for vote in read:
                self.decisions.take(vote)
        self.decisions.forget_below(self.follower.height)

    def _follow(self, record: LogRecord, batch: _Batch | None, *,
                rows: bool = True) -> CopyRows | bool | None:
        """``ChainFollower.follow_copy`` for one record (``rows`` False: ``follow_only``,
        True for a block); a record it cannot project (a fork, a certified block that
        does not apply, a bug) is quarantined, never a stop. ``batch`` None: a replay,
        whose quarantine rows are stored already."""
        began = time.thread_time()
        try:
            if rows:
                return self.follower.follow_copy(record)
            return self.follower.follow_only(record) or None
        except Exception as error:  # one record never stops the projection
            code = error.code if isinstance(error, ValidationError) else "projection-internal"
            detail = f"{type(error).__name__}: {error}"[:MESSAGE_CHARS_MAX]
            if batch is not None:
                logger.error("blocks log offset %d quarantined (%s): %s", record.offset, code,
                          detail)
                batch.quarantined.append(
                    QuarantineRow(self.blocks_topic, record.offset, code, detail))
            return None
        finally:
            self.stats.follow_cpu_s += time.thread_time() - began

    def _check_gap(self) -> None:
        """Say which height the projection waits on when later heights are in the log
        but the next one is not (a committer that never published it)."""
        follower = self.follower
        wanted = follower.height + 1
        if follower.highest_ahead <= wanted:
            self._gap_since = None
            self.stats.waiting_for_height = None
            return
        now = time.monotonic()
        if self._gap_since is None or self._gap_since[0] != wanted:
            self._gap_since = (wanted, now)
        elif (now - self._gap_since[1] >= GAP_REPORT_AFTER_S
              and self.stats.waiting_for_height != wanted):
            self.stats.waiting_for_height = wanted
            logger.warning("waiting for height %d: the blocks log holds records up to height %d "
                        "but none for %d since %.0f s", wanted, follower.highest_ahead, wanted,
                        now - self._gap_since[1])

    def _due(self, batch: _Batch) -> bool:
        return (time.monotonic() - batch.started) * 1000 >= self.batch_interval_ms

    def _has_work(self, batch: _Batch) -> bool:
        """Rows to write, genesis to write, or offsets moved past records that made no
        rows (copies, skipped records): all worth a transaction."""
        return (not batch.empty or self._genesis_pending is not None
                or (self._blocks_position, self._rejected_position) != self._queued)

    async def _load_resume(self, conn: psycopg.AsyncConnection[Any]) -> _Resume | None:
        """The stored state to start from, verified against the rows; None (the reason
        in ``stats.resume_refused``) to replay the blocks log from offset 0 instead."""
        try:
            return await self._read_resume(conn)
        except ResumeRefused as refusal:
            self.stats.resume_refused = f"{refusal.code}: {refusal.message}"
            if refusal.code != "resume-none":
                logger.warning("projector: not resuming from the stored state, replaying the "
                               "blocks log from offset 0: %s [%s]", refusal.message, refusal.code)
            return None

    async def _read_resume(self, conn: psycopg.AsyncConnection[Any]) -> _Resume:
        found = await (await conn.execute(_RESUME_SQL, (self.consumer,))).fetchone()
        if found is None:
            raise ResumeRefused("no stored state", code="resume-none")
        try:
            row = ResumeRow(int(found[0]), str(found[1]), str(found[2]), int(found[3]),
                            int(found[4]), dict(found[5]), dict(found[6]))
        except (TypeError, ValueError) as error:
            raise ResumeRefused(f"the stored state row is malformed: {error}") from None
        head = await (await conn.execute(
            "SELECT height, hash, state_hash, source_offset FROM block "
            "ORDER BY height DESC LIMIT 1")).fetchone()
        if head is None or (int(head[0]), head[1], head[2]) != (
                row.height, row.head_hash, row.state_hash):
            raise ResumeRefused("the stored state is not the block table's head",
                                code="resume-head")
        genesis_row = await (await conn.execute(
            "SELECT hash FROM block WHERE height = 0")).fetchone()
        if genesis_row is None or genesis_row[0] != display_hex(self.genesis.hash_le):
            raise ResumeRefused("the database holds another chain", code="resume-chain")
        epochs = await (await conn.execute("SELECT count(*) FROM membership")).fetchone()
        if epochs is None or int(epochs[0]) != 1:
            # The stored row does not carry the membership schedule (as node snapshots,
            # decision 0101): after a governance change the log is replayed.
            raise ResumeRefused("a governance change was projected", code="resume-governance")
        unspent = await (await conn.execute(_UNSPENT_SQL)).fetchall()
        state = state_from_rows(self.genesis, row, unspent)
        heads = await (await conn.execute(
            "SELECT height, hash FROM block WHERE height > %s AND height > 0",
            (row.height - COPY_WINDOW_HEIGHTS,))).fetchall()
        anchor = 0 if head[3] is None else int(head[3])
        return _Resume(state, row, anchor,
                       tuple((int(h), _hash_from_display(str(x), "hash")) for h, x in heads))

    async def _resume(self, blocks: LogReader, resume: _Resume) -> bool:
        """Anchor the stored state in the log: the record at the head's source offset
        must be a block whose quorum certificate checks, with the head's hash. Then
        the follower and the decision machine continue from there and the blocks log
        from the stored offset. False (the reason in stats) to replay instead."""
        state, row = resume.state, resume.row
        try:
            if row.height > 0:
                await self._check_anchor(blocks, resume.anchor_offset, state)
        except ResumeRefused as refusal:
            self.stats.resume_refused = f"{refusal.code}: {refusal.message}"
            logger.warning("projector: not resuming from the stored state, replaying the "
                           "blocks log from offset 0: %s [%s]", refusal.message, refusal.code)
            return False
        self.follower.resume(state, tx_offset_end=row.tx_offset_end, heads=resume.heads)
        self.decisions.resume(height=state.height, head_hash=state.head_hash,
                              schedule=state.schedule, votes_offset=row.votes_offset)
        blocks.seek(self._blocks_position)
        self._written = self._queued = (self._blocks_position, self._rejected_position)
        self.stats.resumed_from_height = state.height
        return True

    async def _check_anchor(self, blocks: LogReader, offset: int, state: LedgerState) -> None:
        if await blocks.end_offset() <= offset:
            raise ResumeRefused(f"{self.blocks_topic} ends before offset {offset}, where the "
                                "head block's record was read", code="resume-anchor")
        records: list[LogRecord] = []
        deadline = time.monotonic() + REPLAY_STALL_TIMEOUT_S
        while not records and time.monotonic() < deadline:
            records = await blocks.read(timeout_ms=READ_TIMEOUT_MS, max_records=1)
            self.stats.blocks_records_read += len(records)
        try:
            if not records or records[0].offset != offset:
                raise ResumeRefused("no record at that offset")
            decoded = codec.decode(records[0].value, expected="BlockCommitted").record
            committed = committed_from_record(decoded,
                                              block_bytes_max=self.genesis.params.block_bytes_max)
            block = committed.block
            check_certified_block(block, committed.qc, self.follower.view(block.height),
                                  genesis_hash=self.genesis.hash_le)
            if (block.height, block.hash) != (state.height, state.head_hash):
                raise ResumeRefused(f"it holds block {block.height} ({block.hash_hex})")
        except ValidationError as error:
            raise ResumeRefused(
                f"{self.blocks_topic} offset {offset} is not the certified head block "
                f"{state.height} ({display_hex(state.head_hash)}): {error.message}",
                code="resume-anchor") from None

    def _resume_row(self) -> ResumeRow | None:
        """The state row of the batch being closed (the follower's state is that of its
        last block); None when the votes offset of its head is unknown."""
        follower = self.follower
        votes_offset = self.decisions.resume_offsets.get(follower.height)
        if votes_offset is None:
            return None
        return resume_row(follower.state, votes_offset=votes_offset,
                          tx_offset_end=follower.tx_offset_end)

    async def _write_state(self, conn: psycopg.AsyncConnection[Any],
                           row: ResumeRow | None) -> None:
        if row is None:  # the next start replays the log
            await conn.execute("DELETE FROM projection_state WHERE consumer = %s",
                               (self.consumer,))
            return
        await conn.execute(
            "INSERT INTO projection_state (consumer, height, head_hash, state_hash, "
            "votes_offset, tx_offset_end, bindings, supply, updated_at) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, now()) ON CONFLICT (consumer) DO "
            "UPDATE SET height = excluded.height, head_hash = excluded.head_hash, "
            "state_hash = excluded.state_hash, votes_offset = excluded.votes_offset, "
            "tx_offset_end = excluded.tx_offset_end, bindings = excluded.bindings, "
            "supply = excluded.supply, updated_at = excluded.updated_at",
            (self.consumer, row.height, row.head_hash, row.state_hash, row.votes_offset,
             row.tx_offset_end, json.dumps(row.bindings), json.dumps(row.supply)))

    async def _replay(self, blocks: LogReader, conn: psycopg.AsyncConnection[Any]) -> None:
        """Rebuild the in-memory ledger state from the blocks log up to the stored offset
        (rows below it are in the database already), then check it against the head row.
        Rows may reach past the stored offset when a gap was filled by a record later
        in the log than one skipped as ahead (``_advance_blocks_position``): the replay
        then goes on to the database's head and comes back to the stored offset."""
        target = self._blocks_position
        head_cursor = await conn.execute("SELECT max(height) FROM block")
        head_row = await head_cursor.fetchone()
        head_height = -1 if head_row is None or head_row[0] is None else int(head_row[0])
        await self._replay_until(blocks, target, None)
        if head_height > self.follower.height:
            await self._replay_until(blocks, await blocks.end_offset(), head_height)
            blocks.seek(target)
            self._first_ahead_offset = None
            self.follower.lowest_ahead = None
        self._ahead_seen = self.follower.counts.ahead
        await self._check_replayed_head(conn, target)

    async def _replay_until(self, blocks: LogReader, stop_offset: int,
                            height_goal: int | None) -> None:
        """Replay records below ``stop_offset``, or until the follower reaches
        ``height_goal`` when one is given."""
        last_progress = time.monotonic()
        while blocks.position < stop_offset and (
                height_goal is None or self.follower.height < height_goal):
            limit = min(READ_RECORDS_MAX, stop_offset - blocks.position)
            records = await blocks.read(timeout_ms=READ_TIMEOUT_MS, max_records=max(1, limit))
            self.stats.blocks_records_read += len(records)
            if records:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > REPLAY_STALL_TIMEOUT_S:
                raise ProjectionError(
                    f"{self.blocks_topic} ends at offset {blocks.position} but the projection "
                    f"was written further (offset {self._blocks_position}, height of the "
                    "database's head): the topic was recreated or this database belongs to "
                    "another chain; rebuild it (--rebuild)",
                    code="projection-inconsistent",
                )
            for record in records:
                if record.offset >= stop_offset:
                    blocks.seek(stop_offset)
                    return
                await self._decide_through(record)
                if self._follow(record, None, rows=False) is not None:
                    self.stats.replayed_blocks += 1
                rewind = self._note_ahead(record.offset)
                if height_goal is not None and self.follower.height >= height_goal:
                    return
                if rewind is not None:
                    blocks.seek(rewind)
                    break

    async def _check_replayed_head(self, conn: psycopg.AsyncConnection[Any],
                                   target: int) -> None:
        cursor = await conn.execute(
            "SELECT height, hash, state_hash FROM block ORDER BY height DESC LIMIT 1"
        )
        head = await cursor.fetchone()
        state = self.follower.state
        if head is None:
            if target != 0:
                raise ProjectionError(
                    f"projection_offset says {self.blocks_topic} was projected up to offset "
                    f"{target} but the block table is empty; rebuild (--rebuild)",
                    code="projection-inconsistent",
                )
            self._genesis_pending = copy_rows_of(self.follower.genesis_rows())  # height 0
        elif (int(head[0]), head[1], head[2]) != (
            state.height, display_hex(state.head_hash), display_hex(state.state_hash)
        ):
            raise ProjectionError(
                f"the database's head (height {head[0]}, {head[1]}) is not the chain replayed "
                f"from the log up to offset {target} (height {state.height}, "
                f"{display_hex(state.head_hash)}): the database belongs to another chain or "
                "was altered; rebuild it (--rebuild) or use another database",
                code="projection-inconsistent",
            )
        self._written = self._queued = (self._blocks_position, self._rejected_position)

    def _take_rejection(self, record: LogRecord, batch: _Batch) -> None:
        try:
            decoded = codec.decode(record.value, expected="TxRejected").record
            batch.rejections.append(rejection_row(record.offset, decoded))
        except (ValidationError, KeyError, TypeError, ValueError) as error:
            self.stats.invalid_rejections += 1
            logger.warning("rejected log offset %d: unusable record quarantined: %s",
                        record.offset, error)
            code = error.code if isinstance(error, ValidationError) else "record-malformed"
            batch.quarantined.append(QuarantineRow(
                self.rejected_topic, record.offset, code,
                f"{type(error).__name__}: {error}"[:MESSAGE_CHARS_MAX]))

    async def _write(self, conn: psycopg.AsyncConnection[Any], batch: _Batch,
                     rows: Sequence[CopyRows], offsets: tuple[int, int],
                     state_row: ResumeRow | None = None) -> None:
        """Rows (``batch``'s, with genesis first when due) and both tracking rows
        (``offsets``: the positions when the batch closed) in one transaction; the stored
        offsets must be the ones this projector last wrote (a second projector on the
        same rows is refused). Runs on the ``WriterLoop`` thread: of the projector's
        fields it writes only ``_written`` and the counters below, which the projection
        loop never writes (it reads them after the write settled)."""
        # The writer thread's CPU (it does nothing else); on the projection's loop the
        # follower's work between the awaits would count too: not measured then.
        began = time.thread_time() if self._writer is not None else None
        async with conn.transaction():
            await self._lock_offsets(conn)
            if rows:
                await self._write_blocks(conn, rows)
            if batch.rejections:
                async with conn.cursor().copy(
                    _copy_sql("tx_rejection", _REJECTION_COLUMNS)
                ) as copy:
                    for item in batch.rejections:
                        await copy.write_row((
                            item.log_offset, item.txid, item.stage, item.code, item.message,
                            item.institution, item.submitter, item.idempotency_key,
                            item.block_hash, item.source_topic, item.source_partition,
                            item.source_offset, item.rejected_at,
                        ))
            if batch.quarantined:
                await self._write_quarantine(conn, batch.quarantined)
            assert offsets == self._queued  # one write in flight: _write_offsets' offsets
            await self._write_offsets(conn)
            await self._write_state(conn, state_row)
        self._written = offsets
        if began is not None:
            self.stats.write_cpu_s += time.thread_time() - began
        self.stats.batches += 1
        self.stats.blocks += len(batch.rows)
        self.stats.txs += sum(len(rows.txs) for rows in batch.rows)
        self.stats.outputs += sum(len(rows.outputs) for rows in batch.rows)
        self.stats.rejections += len(batch.rejections)
        self.stats.quarantined += len(batch.quarantined)
        for row in batch.quarantined:
            codes = self.stats.quarantined_codes
            codes[row.reason_code] = codes.get(row.reason_code, 0) + 1

    async def _write_quarantine(self, conn: psycopg.AsyncConnection[Any],
                                rows: Sequence[QuarantineRow]) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO projection_quarantine (consumer, topic, partition, \"offset\", "
                "reason_code, detail) VALUES (%s, %s, 0, %s, %s, %s) "
                "ON CONFLICT ON CONSTRAINT projection_quarantine_pkey DO NOTHING",
                [(self.consumer, row.topic, row.offset, row.reason_code, row.detail)
                 for row in rows],
            )

    async def _lock_offsets(self, conn: psycopg.AsyncConnection[Any]) -> None:
        expected = {self.blocks_topic: self._written[0], self.rejected_topic: self._written[1]}
        cursor = await conn.execute(
            'SELECT topic, "offset" FROM projection_offset WHERE consumer = %s AND partition = 0 '
            "AND topic = ANY(%s) FOR UPDATE",
            (self.consumer, list(expected)),
        )
        stored = {topic: int(offset) for topic, offset in await cursor.fetchall()}
        for topic, offset in expected.items():
            if stored.get(topic, 0) != offset:
                raise ProjectionError(
                    f"projection_offset for {self.consumer}/{topic} is {stored.get(topic, 0)}, "
                    f"this projector wrote {offset}: another projector is writing the same "
                    "rows; stop one of them",
                    code="projection-concurrent",
                )

    async def _write_offsets(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The tracking rows of the batch in flight (positions when it closed)."""
        offsets = self._queued
        async with conn.cursor() as cursor:
            await cursor.executemany(
                'INSERT INTO projection_offset (consumer, topic, partition, "offset", updated_at) '
                "VALUES (%s, %s, 0, %s, now()) ON CONFLICT (consumer, topic, partition) DO "
                'UPDATE SET "offset" = excluded."offset", updated_at = excluded.updated_at',
                [
                    (self.consumer, self.blocks_topic, offsets[0]),
                    (self.consumer, self.rejected_topic, offsets[1]),
                ],
            )

    async def _write_blocks(self, conn: psycopg.AsyncConnection[Any],
                            rows: Sequence[CopyRows]) -> None:
        # Outputs spent in the batch that created them are copied spent; the others
        # (created by an earlier batch) are marked by one UPDATE. One dictionary entry
        # per spend, not a set of every output (measured: 0095).
        spends: dict[tuple[str, int], str] = {}
        for block in rows:
            spends.update(block.spends)
        cursor = conn.cursor()
        async with cursor.copy(_copy_sql("block", _BLOCK_COLUMNS)) as copy:
            for block in rows:
                b = block.block
                await copy.write_row((
                    b.height, b.hash, b.prev_hash, b.merkle_root, b.proposer, b.round, b.time_at,
                    b.tx_count, b.size_bytes, b.state_hash, b.tx_offset_start, b.tx_offset_end,
                    list(b.voters), b.source_offset,
                ))
        async with cursor.copy(_copy_sql("tx", _TX_COLUMNS, binary=True)) as copy:
            copy.set_types(list(_TX_TYPES))
            for block in rows:
                for t in block.txs:
                    await copy.write_row(t)
        async with cursor.copy(_copy_sql("tx_output", _OUTPUT_COLUMNS, binary=True)) as copy:
            copy.set_types(list(_OUTPUT_TYPES))
            take = spends.pop
            for block in rows:
                for o in block.outputs:
                    await copy.write_row((*o, take((o[0], o[1]), None)))
        spent_before = [SpendRow(txid, index, spender)
                        for (txid, index), spender in spends.items()]
        memberships = [m for block in rows for m in block.memberships]
        if memberships:
            await cursor.executemany(
                "INSERT INTO membership (start_height, sequence, change_id, kind, member_id, "
                "carried_height, txid, members, signers, quorum, block_interval_ms, "
                "block_bytes_max, block_txs_max, proposer_timeout_ms) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s)",
                [(m.start_height, m.sequence, m.change_id, m.kind, m.member_id,
                  m.carried_height, m.txid, m.members, list(m.signers), *m.params)
                 for m in memberships],
            )
        if spent_before:
            await cursor.execute(
                "UPDATE tx_output AS o SET spent_by_txid = s.spender "
                "FROM unnest(%s::text[], %s::int[], %s::text[]) AS s(txid, idx, spender) "
                'WHERE o.txid = s.txid AND o."index" = s.idx AND o.spent_by_txid IS NULL',
                (
                    [s.txid for s in spent_before],
                    [s.index for s in spent_before],
                    [s.spent_by_txid for s in spent_before],
                ),
            )
            if cursor.rowcount != len(spent_before):
                raise ProjectionError(
                    f"{len(spent_before)} outputs spent by this batch but only "
                    f"{cursor.rowcount} found unspent in tx_output: the database does not "
                    "match the chain; rebuild it (--rebuild)",
                    code="projection-inconsistent",
                )

    def _refresh_stats(self, started: float) -> ProjectionStats:
        state = self.follower.state
        self.stats.blocks_offset = self._blocks_position
        self.stats.rejected_offset = self._rejected_position
        self.stats.height = state.height
        self.stats.head_hash = display_hex(state.head_hash)
        self.stats.state_hash = display_hex(state.state_hash)
        self.stats.copies = self.follower.counts
        self.stats.elapsed_s = time.monotonic() - started
        return self.stats

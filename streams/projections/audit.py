"""Audit replay: re-verify the chain from the logs alone and compare a projection row by row.

Owns:
- ``ChainVerifier``: the chain rebuilt from ``ledger.blocks.v1`` (first certified record
  per height, as the projector takes it), with *everything* re-checked — each quorum
  certificate's signatures against the genesis membership, the proposer's signature,
  the Merkle root, hash links, the tx-log range, every rule of every transaction
  (``check_tx``) and the state hash recomputed after every height; each input's script
  and signature (which the projector skips) by :func:`verify_scripts`, in this process
  or on a worker pool (``workers``), exactly as ``check_tx(verify_scripts=True)`` runs
  them;
- ``VotesCheck``: an observer consensus machine (``ledger.consensus``, ``me=None``) fed
  with ``ledger.votes.v1`` in log order: the block the votes decided at each height must
  be the chain's block there (a certified block that did not win is named);
- ``compare_batch``: per height, a SHA-256 PostgreSQL computes over a canonical text of
  the stored ``tx`` and ``tx_output`` rows against the same digest of the replayed
  block (``block_digests``), the batch's spent marks likewise (decision 0115); where a
  digest differs, ``compare_rows``: expected rows (the projector's own row model,
  ``block_rows``) against the rows PostgreSQL holds, keyed, column by column;
- ``Auditor``: the shell that reads the three logs from offset 0 and the database,
  batch by batch, and fills an ``AuditReport`` of ``Finding`` (table, key, expected,
  found); its reads ahead (``ReadAhead``), queries and comparisons run on the event
  loop between the blocks it verifies (decision 0123).

The audit never writes: it reads the logs and the projection's tables. Design and
limits: docs/decisions/0090-audit-proofs-legacy-surveillance.md.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import multiprocessing
import operator
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ledger.block import (
    Block,
    QuorumCertificate,
    check_block_context_free,
    check_block_links,
    check_certified_block,
)
from ledger.consensus import (
    CertifiedBlockReceived,
    Commit,
    ConsensusConfig,
    ConsensusState,
    RecordEvidence,
    VoteReceived,
    initial_state,
    step,
)
from ledger.errors import ValidationError
from ledger.governance import schedule_from_genesis
from ledger.hashing import display_hex
from ledger.interpreter import verify_input
from ledger.membership import Genesis
from ledger.state import (
    BlockOverlay,
    LedgerRules,
    LedgerState,
    TxEffects,
    apply_delta,
    check_tx,
    delta_from_overlay,
    state_from_genesis,
)
from ledger.tx import Transaction
from streams.common.collector import BlockFreezer
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogRecord
from streams.kafka.records import committed_from_record, vote_from_record
from streams.kafka.topics import BLOCKS, REJECTED, VOTES
from streams.projections.projector import (
    ADDRESS_CACHE_ENTRIES,
    CONSUMER_DEFAULT,
    GC_YOUNG_THRESHOLD,
    TIME_MS_MAX,
    TIME_MS_MIN,
    BlockRows,
    block_rows,
    collector_tuned_for_bulk,
    genesis_rows,
    output_address,
    rejection_row,
)

FINDINGS_MAX = 1_000  # findings kept in the report; more are counted, not listed
# Transactions per comparison batch (one round of queries). Small enough that a batch's
# queries run on the server while the next batch is verified (decision 0123).
COMPARE_TXS_MAX = 5_000
COMPARE_BLOCKS_MAX = 500  # blocks per comparison batch
COMPARISONS_IN_FLIGHT_MAX = 4  # batches sent to PostgreSQL and not yet compared
READ_TIMEOUT_MS = 1_000
READ_RECORDS_MAX = 500  # records per read (votes: bounds the machine's decided queue)
BLOCKS_READ_AHEAD_BYTES_MAX = 64 * 1024 * 1024  # block records read ahead of the verifier
VOTES_READ_AHEAD_BYTES_MAX = 8 * 1024 * 1024  # vote records read ahead of the decisions
# The audit connection's joins of a batch's heights to their outputs and spends go by
# index (nested loops), whatever the statistics say: a hash join reads the whole
# tx_output table for every batch, so a day's chain would cost its length squared
# (decision 0123). Only this session's planner is told; nothing is written.
RANGE_PLAN_SETTINGS = ("SET enable_hashjoin = off", "SET enable_mergejoin = off")
REJECTIONS_BATCH_MAX = 5_000
VALUE_CHARS_MAX = 80  # a value in a finding is cut to this many characters
PROGRESS_INTERVAL_S = 1.0
SCRIPT_CHUNK_TXS = 500  # transactions per script-verification chunk
PENDING_CHUNKS_PER_WORKER = 2
WORKERS_MAX = 64

BLOCK_COLUMNS = ("height", "hash", "prev_hash", "merkle_root", "proposer", "round", "time_at",
                 "tx_count", "size_bytes", "state_hash", "tx_offset_start", "tx_offset_end",
                 "voters", "source_offset")
TX_COLUMNS = ("txid", "height", "position", "size_bytes", "raw", "issued_asset_id",
              "issued_quantity")
OUTPUT_COLUMNS = ("txid", "index", "value", "script_pubkey", "address", "asset_id", "quantity")
REJECTION_COLUMNS = ("log_offset", "txid", "stage", "code", "message", "institution",
                     "submitter", "idempotency_key", "block_hash", "source_topic",
                     "source_partition", "source_offset", "rejected_at")


class AuditStop(ValidationError):
    """The chain cannot be followed further (a certified block that does not link or
    does not apply); the finding that says why is in the report."""

    code = "audit-stop"


@dataclass(frozen=True, slots=True)
class Finding:
    """One difference: where (table or topic, key), what the replay expects, what is there."""

    code: str
    table: str
    key: str
    expected: str
    found: str

    def line(self) -> str:
        return (f"{self.code}: {self.table} [{self.key}] expected {self.expected}, "
                f"found {self.found}")


@dataclass
class AuditReport:
    height: int = 0
    head_hash: str = ""
    state_hash: str = ""
    blocks: int = 0
    txs: int = 0
    inputs_verified: int = 0
    copies_identical: int = 0
    copies_invalid: int = 0
    copies_ahead: int = 0
    votes_read: int = 0
    heights_decided: int = 0
    evidence: dict[str, int] = field(default_factory=dict)
    blocks_compared: int = 0
    rows_compared: int = 0
    heights_recompared: int = 0  # digests that differed: compared row by row (0115)
    rejections_compared: int = 0
    unprojected_blocks: int = 0
    blocks_log_position: int = 0  # next offset to read, for a progress bar
    blocks_log_end: int = 0  # the blocks log's end when the replay started
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    findings_dropped: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time: the rate on a machine shared with others

    @property
    def tx_per_s(self) -> float:
        return self.txs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tx_per_cpu_s(self) -> float:
        return self.txs / self.cpu_s if self.cpu_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.findings and not self.findings_dropped

    def add(self, finding: Finding) -> None:
        if len(self.findings) < FINDINGS_MAX:
            self.findings.append(finding)
        else:
            self.findings_dropped += 1

    def extend(self, findings: Iterable[Finding]) -> None:
        for finding in findings:
            self.add(finding)


def _show(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).hex()
    elif isinstance(value, dt.datetime):
        text = value.astimezone(dt.UTC).isoformat()
    elif isinstance(value, list | tuple):
        text = "{" + ",".join(str(v) for v in value) + "}"
    else:
        text = str(value)
    return text if len(text) <= VALUE_CHARS_MAX else text[: VALUE_CHARS_MAX - 1] + "…"


def _normal(value: Any) -> Any:
    """Database values as the row model holds them (arrays as tuples, bytea as bytes)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def compare_rows(
    table: str,
    columns: Sequence[str],
    key_columns: int,
    expected: Iterable[Sequence[Any]],
    found: Iterable[Sequence[Any]],
) -> list[Finding]:
    """Rows keyed by their first ``key_columns`` columns: a missing row, an unexpected
    row, or each column that differs is one finding. Pure. Equal rows (the common case)
    cost one tuple comparison; labels are built only for findings."""
    want = {tuple(row[:key_columns]): tuple(row) for row in expected}
    have = {tuple(row[:key_columns]): tuple(row) for row in found}
    findings = []
    names = columns[:key_columns]

    def label(key: tuple[Any, ...]) -> str:
        return ", ".join(f"{name}={_show(value)}" for name, value in zip(names, key,
                                                                          strict=True))

    for key, row in want.items():
        got = have.get(key)
        if got is None:
            findings.append(Finding("row-missing", table, label(key), "a row", "none"))
        elif got != row:
            got = tuple(_normal(v) for v in got)
            findings.extend(
                Finding("row-differs", table, label(key), f"{name}={_show(a)}",
                        f"{name}={_show(b)}")
                for name, a, b in zip(columns, row, got, strict=True) if a != b
            )
    findings.extend(Finding("row-unexpected", table, label(key), "no row", "a row")
                    for key in have.keys() - want.keys())
    return findings


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True, slots=True)
class VerifiedBlock:
    """A verified block and what its rows derive from. The projector's row model
    (``rows``) is built only where a digest differs (decision 0115)."""

    block: Block
    qc: QuorumCertificate
    effects: tuple[TxEffects, ...]
    state_hash: bytes
    source_offset: int
    p2pkh_version: int
    p2sh_version: int

    def rows(self) -> BlockRows:
        return block_rows(self.block, self.effects, state_hash=self.state_hash,
                          voters=self.qc.voters, source_offset=self.source_offset,
                          p2pkh_version=self.p2pkh_version, p2sh_version=self.p2sh_version)

    @property
    def height(self) -> int:
        return self.block.height


# height, the transaction (parsed in this process, raw bytes for a worker), spent outputs
ScriptJob = tuple[int, Transaction | bytes, tuple[tuple[bytes, int], ...]]


def verify_scripts(jobs: Sequence[ScriptJob]) -> list[tuple[int, str, int, str]]:
    """Every input's script and signature, exactly as ``check_tx(verify_scripts=True)``
    runs them (``verify_input`` on each spent output); the failures as (height, txid,
    input, "message [code]"). Module-level and pure: runs in a worker process too."""
    failures = []
    for height, raw, spent in jobs:
        tx = Transaction.parse(raw) if isinstance(raw, bytes) else raw
        for index, (script_pubkey, value) in enumerate(spent):
            try:
                verify_input(tx, index, script_pubkey, value, strict=True)
            except ValidationError as error:
                failures.append((height, tx.txid, index, f"{error.message} [{error.code}]"))
    return failures


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Objects that exist before the replay (modules, the genesis, whatever the caller
    holds) leave the cyclic collector's view until it ends (``gc.freeze``): its full
    collections then scan what the replay made, not the whole process (decision 0113).
    Overlapping users only unfreeze early, which costs time, never correctness."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def tune_worker_collector() -> None:
    """A script worker's start: its cyclic collector as tuned as the audit process's."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def apply_verified(
    state: LedgerState, block: Block, rules: LedgerRules
) -> tuple[LedgerState, tuple[TxEffects, ...]]:
    """Apply a block (every rule but scripts, which ``verify_scripts`` checks from the
    effects' spent outputs); each tx's effects."""
    overlay = BlockOverlay()
    spent_from_base: list[tuple[bytes, Any]] = []
    spent_all: list[bytes] = []
    effects: list[TxEffects] = []
    for tx in block.txs:
        effect = check_tx(state, tx, rules, overlay=overlay, verify_scripts=False)
        spent_all.extend(key for key, _ in effect.spent)
        spent_from_base.extend(overlay.absorb(effect))
        effects.append(effect)
    delta = delta_from_overlay(state, block.header, overlay, spent_from_base, spent_all,
                               tx_count=len(block.txs))
    return apply_delta(state, delta), tuple(effects)


class ChainVerifier:
    """The chain from the blocks log, every certificate, signature and script checked."""

    def view(self, height: int) -> Genesis:
        schedule = self.state.schedule
        assert schedule is not None
        return schedule.at(height)

    def __init__(self, genesis: Genesis, report: AuditReport) -> None:
        self.genesis = genesis
        self.genesis_hash = genesis.hash_le
        self.params = genesis.params
        self.rules = LedgerRules.from_genesis(genesis)
        # The membership schedule rides in the state: each height's certificate is
        # checked against the membership in force there (decision 0061).
        self.state: LedgerState = state_from_genesis(
            self.genesis_hash, genesis.allocations,
            schedule=schedule_from_genesis(genesis, self.genesis_hash))
        self.tx_offset_end = 0
        self.report = report
        # height -> (block hash, sha256 of the record's block bytes): 64 bytes per height
        self.seen: dict[int, tuple[bytes, bytes]] = {}
        # outputs that never enter the UTXO set (OP_RETURN markers): unspent rows forever
        self.unspendable: set[tuple[str, int]] = set()
        # scripts still to verify (the shell drains this, in process or in workers)
        self.script_jobs: list[ScriptJob] = []

    def genesis_rows(self) -> BlockRows:
        return genesis_rows(self.genesis, self.state)

    def _stop(self, offset: int, height: int, code: str, expected: str, found: str) -> AuditStop:
        self.report.add(Finding(code, BLOCKS.name, f"offset={offset}, height={height}",
                                expected, found))
        return AuditStop(f"blocks log offset {offset}: {code}", code=code)

    def follow(self, record: LogRecord) -> VerifiedBlock | None:
        """The verified block this record adds, or None (copy, unusable, ahead)."""
        try:
            decoded = codec.decode(record.value, expected="BlockCommitted").record
            height = int(decoded["height"])
            raw_block = bytes(decoded["block"])
        except (ValidationError, KeyError, TypeError, ValueError):
            self.report.copies_invalid += 1
            return None
        if height <= self.state.height:
            self._check_copy(record.offset, height, decoded, raw_block)
            return None
        if height > self.state.height + 1:
            self.report.copies_ahead += 1
            return None
        try:
            committed = committed_from_record(decoded, block_bytes_max=self.params.block_bytes_max)
            check_certified_block(committed.block, committed.qc, self.view(height),
                                  genesis_hash=self.genesis_hash)
        except ValidationError:
            self.report.copies_invalid += 1  # anyone may write; the certificate decides
            return None
        block, qc = committed.block, committed.qc
        try:
            check_block_context_free(block, self.view(height))
            check_block_links(block, prev_hash=self.state.head_hash, height=height)
        except ValidationError as error:
            raise self._stop(record.offset, height, "block-link",
                             f"a block extending {display_hex(self.state.head_hash)}",
                             f"{block.hash_hex}: {error.message} [{error.code}]") from error
        if block.header.tx_offset_start != self.tx_offset_end:
            raise self._stop(record.offset, height, "block-tx-range",
                             f"tx_offset_start={self.tx_offset_end}",
                             f"tx_offset_start={block.header.tx_offset_start}")
        try:
            self.state, effects = apply_verified(self.state, block, self.rules)
        except ValidationError as error:
            raise self._stop(record.offset, height, "block-does-not-apply",
                             "every transaction valid with scripts verified",
                             f"{error.message} [{error.code}]") from error
        self.tx_offset_end = block.header.tx_offset_end
        self.seen[height] = (block.hash, hashlib.sha256(raw_block).digest())
        self._note_unspendable(block, effects)
        self.script_jobs.extend(
            (height, tx, tuple((entry.script_pubkey, entry.value)
                               for _, entry in effect.spent))
            for tx, effect in zip(block.txs, effects, strict=True))
        self.report.blocks += 1
        self.report.txs += len(block.txs)
        self.report.inputs_verified += sum(len(tx.inputs) for tx in block.txs)
        self.report.height = height
        self.report.head_hash = block.hash_hex
        self.report.state_hash = display_hex(self.state.state_hash)
        return VerifiedBlock(block, qc, effects, self.state.state_hash, record.offset,
                             self.params.p2pkh_version, self.params.p2sh_version)

    def _note_unspendable(self, block: Block, effects: Sequence[TxEffects]) -> None:
        for tx, effect in zip(block.txs, effects, strict=True):
            if len(effect.created) == len(tx.outputs):
                continue  # every output entered the UTXO set (the usual payment)
            created = {int.from_bytes(key[32:36], "little") for key, _ in effect.created}
            txid = tx.txid
            self.unspendable.update((txid, i) for i in range(len(tx.outputs))
                                    if i not in created)

    def _check_copy(self, offset: int, height: int, decoded: Mapping[str, Any],
                    raw_block: bytes) -> None:
        seen = self.seen.get(height)
        if seen is None:  # a record for height 0: genesis is not a block
            self.report.copies_invalid += 1
            return
        if hashlib.sha256(raw_block).digest() == seen[1]:
            self.report.copies_identical += 1
            return
        try:
            committed = committed_from_record(decoded, block_bytes_max=self.params.block_bytes_max)
            check_certified_block(committed.block, committed.qc, self.view(height),
                                  genesis_hash=self.genesis_hash)
        except ValidationError:
            self.report.copies_invalid += 1
            return
        if committed.block.hash == seen[0]:
            self.report.copies_identical += 1  # same header, other encoding of the body
            return
        self.report.add(Finding("fork", BLOCKS.name, f"offset={offset}, height={height}",
                                f"block {display_hex(seen[0])}",
                                f"certified block {committed.block.hash_hex}"))


class VotesCheck:
    """The votes log replayed by an observer machine: which block each height decided."""

    def __init__(self, genesis: Genesis, report: AuditReport) -> None:
        self.report = report
        self.machine: ConsensusState = initial_state(ConsensusConfig(genesis, None), now_ms=0)
        self.stopped = False

    def decided(self, height: int) -> bytes | None:
        for decision in self.machine.decided:
            if decision.height == height:
                return decision.block_hash
        return None

    def feed(self, record: LogRecord) -> None:
        self.report.votes_read += 1
        try:
            vote = vote_from_record(codec.decode(record.value, expected="VoteCast").record)
        except (ValidationError, KeyError, TypeError, ValueError):
            self._evidence("vote-undecodable")
            return
        self.machine, actions = step(self.machine, VoteReceived(vote))
        for action in actions:
            if isinstance(action, RecordEvidence):
                self._evidence(action.kind, action.member)

    def _evidence(self, kind: str, member: str = "?") -> None:
        key = f"{kind}/{member}"
        self.report.evidence[key] = self.report.evidence.get(key, 0) + 1

    def settle(self, verified: VerifiedBlock) -> None:
        """The chain's block at a height the votes decided: equal, then commit it."""
        block = verified.block
        decided = self.decided(block.height)
        assert decided is not None
        if decided != block.hash:
            self.report.add(Finding(
                "not-decided", BLOCKS.name, f"height={block.height}",
                f"block {display_hex(decided)} (decided by the votes log)",
                f"certified block {block.hash_hex}"))
            self.stopped = True
            return
        self.machine, actions = step(self.machine, CertifiedBlockReceived(block, verified.qc))
        if not any(isinstance(a, Commit) for a in actions):
            self.report.add(Finding("not-committed", VOTES.name, f"height={block.height}",
                                    "the decided block commits", "no commit"))
            self.stopped = True
            return
        self.report.heights_decided += 1


# --------------------------------------------------------------------------- database


_BLOCK_VALUES = operator.attrgetter(*BLOCK_COLUMNS)
_TX_VALUES = operator.attrgetter(*TX_COLUMNS)
_OUTPUT_VALUES = operator.attrgetter(*OUTPUT_COLUMNS)
_REJECTION_VALUES = operator.attrgetter(*REJECTION_COLUMNS)


def _expected_block_rows(rows: Sequence[BlockRows]) -> tuple[list[tuple[Any, ...]], ...]:
    """The row model's values in column order (``dataclasses.astuple`` deep-copies, ten
    times slower)."""
    blocks = [_BLOCK_VALUES(r.block) for r in rows]
    txs = [_TX_VALUES(t) for r in rows for t in r.txs]
    outputs = [_OUTPUT_VALUES(o) for r in rows for o in r.outputs]
    return blocks, txs, outputs


async def _fetch(conn: psycopg.AsyncConnection[Any], query: str,
                 params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Rows in PostgreSQL's binary format: bytea arrives as bytes, not hex to decode,
    and integers are not parsed from text (decision 0114)."""
    cursor = await conn.execute(query, params, binary=True)
    return list(await cursor.fetchall())


def compare_ordered(table: str, columns: Sequence[str], key_columns: int,
                    expected: list[tuple[Any, ...]],
                    found: list[tuple[Any, ...]]) -> list[Finding]:
    """Both lists in the same key order: equal lists (the common case) cost one list
    comparison; any difference falls back to ``compare_rows``, which names each row.
    Pure. Equal lists imply no finding: the found keys are the table's primary key."""
    if expected == found:
        return []
    return compare_rows(table, columns, key_columns, expected, found)


def _spends_wanted(rows: Sequence[BlockRows]) -> dict[tuple[str, int], str]:
    return {(s.txid, s.index): s.spent_by_txid for r in rows for s in r.spends}


async def compare_spends(conn: psycopg.AsyncConnection[Any], want: Mapping[tuple[str, int], str],
                         low: int, high: int, report: AuditReport) -> None:
    """The spent marks the batch's transactions set: the outputs PostgreSQL says they
    spent (one indexed join, no key list sent), each against the replay's; an expected
    spend not found that way is looked up by key, as a differing or missing mark is a
    finding. A mark the replay does not expect is named elsewhere (the spending
    height's batch, or the final unspent outputs)."""
    if not want:
        return
    found = await _fetch(conn,
        'SELECT o.txid, o."index", o.spent_by_txid FROM tx_output o '
        "JOIN tx t ON t.txid = o.spent_by_txid WHERE t.height BETWEEN %s AND %s",
        (low, high))
    have = {(txid, index): by for txid, index, by in found if (txid, index) in want}
    if len(have) == len(want) and have == want:
        return
    rest = [key for key, by in want.items() if have.get(key) != by]
    found_rest = await _fetch(conn,
        'SELECT o.txid, o."index", o.spent_by_txid FROM tx_output o '
        'JOIN unnest(%s::text[], %s::int[]) AS s(txid, "index") '
        'ON o.txid = s.txid AND o."index" = s."index"',
        ([key[0] for key in rest], [key[1] for key in rest]))
    present = {(str(t), int(i)) for t, i, _ in found_rest}
    report.extend(compare_rows("tx_output", ("txid", "index", "spent_by_txid"), 2,
                               [(*key, want[key]) for key in rest if key in present],
                               found_rest))


async def compare_rows_batch(conn: psycopg.AsyncConnection[Any], rows: Sequence[BlockRows],
                             report: AuditReport) -> None:
    """One batch of consecutive heights against the database, row by row: block, tx and
    tx_output rows column by column (fetched in the row model's order, so equal batches
    compare as two lists), and the spent marks the batch sets. The genesis, and the
    heights whose digests differ (``compare_batch``), are compared this way."""
    await _compare_block_rows(conn, rows, report)
    await _compare_tx_rows(conn, rows, report)
    await compare_spends(conn, _spends_wanted(rows), rows[0].block.height,
                         rows[-1].block.height, report)
    report.blocks_compared += len(rows)


# ----------------------------------------------------------------- digests (decision 0115)
#
# Each height's tx rows, and its tx_output rows, as one canonical text: a line per row
# in key order, columns separated by a tab, text as "<length>:<text>" (so no value can
# pass for a separator), integers in decimal, bytea in lower-case hex, NULL as \N.
# PostgreSQL builds the same text from the stored rows and returns its sha256 per
# height; only a height whose digest differs is fetched and compared row by row, which
# names the table, key, column, expected and found value exactly as before.

NULL_TEXT = "\\N"


def _sql_text(column: str) -> str:
    return f"coalesce(length({column}) || ':' || {column}, '{NULL_TEXT}')"


def _sql_int(column: str) -> str:
    return f"coalesce({column}::text, '{NULL_TEXT}')"


def _sql_line(*parts: str) -> str:
    return " || E'\\t' || ".join(parts) + " || E'\\n'"


TX_DIGEST_SQL = (
    "SELECT height, sha256(convert_to(string_agg("
    + _sql_line(_sql_text("txid"), _sql_int("height"), _sql_int("position"),
                _sql_int("size_bytes"), f"coalesce(encode(raw, 'hex'), '{NULL_TEXT}')",
                _sql_text("issued_asset_id"), _sql_int("issued_quantity"))
    + ", '' ORDER BY position), 'UTF8')) FROM tx WHERE height BETWEEN %s AND %s "
    "GROUP BY height")
OUTPUT_DIGEST_SQL = (
    "SELECT t.height, sha256(convert_to(string_agg("
    + _sql_line(_sql_text("o.txid"), _sql_int('o."index"'), _sql_int("o.value"),
                f"coalesce(encode(o.script_pubkey, 'hex'), '{NULL_TEXT}')",
                _sql_text("o.address"), _sql_text("o.asset_id"), _sql_int("o.quantity"))
    + ", '' ORDER BY t.position, o.\"index\"), 'UTF8')) FROM tx_output o "
    "JOIN tx t ON t.txid = o.txid WHERE t.height BETWEEN %s AND %s GROUP BY t.height")
SPENDS_DIGEST_SQL = (  # lines in code-point order: no order to rebuild from the inputs
    "SELECT sha256(convert_to(string_agg(line, '' ORDER BY line COLLATE \"C\"), 'UTF8')) "
    "FROM (SELECT "
    + _sql_line(_sql_text("o.txid"), _sql_int('o."index"'), _sql_text("o.spent_by_txid"))
    + " AS line FROM tx_output o JOIN tx t ON t.txid = o.spent_by_txid "
    "WHERE t.height BETWEEN %s AND %s) AS spends")


def _text(value: str | None) -> str:
    return NULL_TEXT if value is None else f"{len(value)}:{value}"


def _digest(lines: list[str]) -> bytes | None:
    """sha256 of the lines joined; None for no rows (PostgreSQL returns no group)."""
    return hashlib.sha256("".join(lines).encode()).digest() if lines else None


@functools.lru_cache(maxsize=ADDRESS_CACHE_ENTRIES)
def _script_text(script_pubkey: bytes, p2pkh_version: int, p2sh_version: int) -> str:
    """An output's script_pubkey and address columns (payments reuse few scripts)."""
    address = output_address(script_pubkey, p2pkh_version, p2sh_version)
    return f"{script_pubkey.hex()}\t{_text(address)}"


def block_digests(verified: VerifiedBlock) -> tuple[bytes | None, bytes | None]:
    """The digests of one height's tx rows and tx_output rows, from the block and its
    effects, with the values ``block_rows`` would give (cheaper than building its row
    model: no row objects). Pure."""
    block, height = verified.block, verified.block.height
    p2pkh, p2sh = verified.p2pkh_version, verified.p2sh_version
    tx_lines: list[str] = []
    output_lines: list[str] = []
    for position, (tx, effect) in enumerate(zip(block.txs, verified.effects, strict=True)):
        raw = tx.serialize()
        txid = tx.txid
        txid = f"{len(txid)}:{txid}"
        issued = effect.issued_asset_id
        quantity = NULL_TEXT if issued is None else str(effect.issued_quantity)
        tx_lines.append(f"{txid}\t{height}\t{position}\t{len(raw)}\t{raw.hex()}\t"
                        f"{_text(issued)}\t{quantity}\n")
        colors = {int.from_bytes(key[32:36], "little"): (entry.asset_id, entry.quantity)
                  for key, entry in effect.created if entry.asset_id is not None}
        for index, output in enumerate(tx.outputs):
            script = _script_text(output.script_pubkey, p2pkh, p2sh)
            color = colors.get(index) if colors else None
            if color is None:  # OP_RETURN outputs too: no entry, never colored
                output_lines.append(f"{txid}\t{index}\t{output.value}\t{script}\t\\N\t\\N\n")
            else:
                output_lines.append(f"{txid}\t{index}\t{output.value}\t{script}\t"
                                    f"{_text(color[0])}\t{color[1]}\n")
    return _digest(tx_lines), _digest(output_lines)


def spends_of(blocks: Sequence[VerifiedBlock]) -> dict[tuple[str, int], str]:
    """(spent txid, index) -> spending txid, as ``block_rows``'s spend rows. Pure."""
    return {(key[31::-1].hex(), int.from_bytes(key[32:36], "little")): tx.txid
            for verified in blocks
            for tx, effect in zip(verified.block.txs, verified.effects, strict=True)
            for key, _ in effect.spent}


def spends_digest(blocks: Sequence[VerifiedBlock]) -> bytes | None:
    """The digest ``SPENDS_DIGEST_SQL`` computes: one line per output the batch spends,
    in code-point order (PostgreSQL's "C" collation). Pure."""
    lines: list[str] = []
    for verified in blocks:
        for tx, effect in zip(verified.block.txs, verified.effects, strict=True):
            if not effect.spent:
                continue
            txid = tx.txid
            by = f"{len(txid)}:{txid}\n"
            lines.extend(f"64:{key[31::-1].hex()}\t{int.from_bytes(key[32:36], 'little')}\t{by}"
                         for key, _ in effect.spent)
    lines.sort()
    return _digest(lines)


def _time_at(time_ms: int) -> dt.datetime:
    clamped = min(max(time_ms, TIME_MS_MIN), TIME_MS_MAX)  # as the projector stores it
    return dt.datetime.fromtimestamp(clamped / 1000, tz=dt.UTC)


def block_values(verified: VerifiedBlock) -> tuple[Any, ...]:
    """The block row's values in BLOCK_COLUMNS order, as ``block_rows`` gives them. Pure."""
    block, header = verified.block, verified.block.header
    return (block.height, block.hash_hex, display_hex(header.prev_hash),
            display_hex(header.merkle_root), header.proposer, header.round,
            _time_at(header.time_ms), len(block.txs), block.size_bytes,
            display_hex(verified.state_hash), header.tx_offset_start,
            header.tx_offset_end, tuple(verified.qc.voters), verified.source_offset)


async def compare_batch(conn: psycopg.AsyncConnection[Any], blocks: Sequence[VerifiedBlock],
                        report: AuditReport) -> None:
    """One batch of consecutive heights: the block rows column by column; the tx and
    tx_output rows by one digest per height, each differing height then row by row;
    the spent marks by one digest, then (if it differs) mark by mark."""
    low, high = blocks[0].height, blocks[-1].height
    want_blocks = [block_values(v) for v in blocks]
    found_blocks = await _fetch(conn,
        f"SELECT {', '.join(BLOCK_COLUMNS)} FROM block WHERE height BETWEEN %s AND %s",
        (low, high))
    report.extend(compare_rows("block", BLOCK_COLUMNS, 1, want_blocks, found_blocks))
    found_txs = dict(await _fetch(conn, TX_DIGEST_SQL, (low, high)))
    found_outputs = dict(await _fetch(conn, OUTPUT_DIGEST_SQL, (low, high)))
    for verified in blocks:
        want_txs, want_outputs = block_digests(verified)
        height = verified.height
        if found_txs.get(height) == want_txs and found_outputs.get(height) == want_outputs:
            report.rows_compared += len(verified.block.txs) + sum(
                len(tx.outputs) for tx in verified.block.txs)
        else:
            report.heights_recompared += 1
            await _compare_tx_rows(conn, [verified.rows()], report)
    found = (await _fetch(conn, SPENDS_DIGEST_SQL, (low, high)))[0][0]
    if found != spends_digest(blocks):
        report.heights_recompared += 1
        await compare_spends(conn, spends_of(blocks), low, high, report)
    report.blocks_compared += len(blocks)
    report.rows_compared += len(want_blocks)


async def _compare_block_rows(conn: psycopg.AsyncConnection[Any], rows: Sequence[BlockRows],
                              report: AuditReport) -> None:
    low, high = rows[0].block.height, rows[-1].block.height
    blocks = [_BLOCK_VALUES(r.block) for r in rows]
    found_blocks = await _fetch(conn,
        f"SELECT {', '.join(BLOCK_COLUMNS)} FROM block WHERE height BETWEEN %s AND %s",
        (low, high))
    report.extend(compare_rows("block", BLOCK_COLUMNS, 1, blocks, found_blocks))
    report.rows_compared += len(blocks)


async def _compare_tx_rows(conn: psycopg.AsyncConnection[Any], rows: Sequence[BlockRows],
                           report: AuditReport) -> None:
    """The tx and tx_output rows of consecutive heights, column by column."""
    low, high = rows[0].block.height, rows[-1].block.height
    _, txs, outputs = _expected_block_rows(rows)
    found_txs = await _fetch(conn,
        f"SELECT {', '.join(TX_COLUMNS)} FROM tx WHERE height BETWEEN %s AND %s "
        "ORDER BY height, position", (low, high))
    found_outputs = await _fetch(conn,
        'SELECT o.txid, o."index", o.value, o.script_pubkey, o.address, o.asset_id, '
        "o.quantity FROM tx_output o JOIN tx t ON t.txid = o.txid "
        'WHERE t.height BETWEEN %s AND %s ORDER BY t.height, t.position, o."index"',
        (low, high))
    report.extend(compare_ordered("tx", TX_COLUMNS, 1, txs, found_txs))
    report.extend(compare_ordered("tx_output", OUTPUT_COLUMNS, 2, outputs, found_outputs))
    report.rows_compared += len(txs) + len(outputs)


def expected_unspent_and_balances(
    state: LedgerState, p2pkh_version: int, p2sh_version: int
) -> tuple[set[tuple[str, int]], dict[tuple[str, str], int]]:
    """The unspent outputs as (txid, index) and the balances as (address, asset id or
    '' for native) -> amount, in one pass over the state (each pass sorts it and builds
    every outpoint). Pure."""
    unspent: set[tuple[str, int]] = set()
    totals: dict[tuple[str, str], int] = {}
    for outpoint, entry in state.items():
        unspent.add((outpoint.txid_le[::-1].hex(), outpoint.index))  # display_hex, inline
        address = output_address(entry.script_pubkey, p2pkh_version, p2sh_version)  # cached
        if address is None:
            continue
        totals[(address, "")] = totals.get((address, ""), 0) + entry.value
        if entry.asset_id is not None:
            key = (address, entry.asset_id)
            totals[key] = totals.get(key, 0) + entry.quantity
    return unspent, totals


def expected_balances(state: LedgerState, p2pkh_version: int,
                      p2sh_version: int) -> dict[tuple[str, str], int]:
    """(address, asset id or '' for native) -> amount, from the ledger state. Pure."""
    return expected_unspent_and_balances(state, p2pkh_version, p2sh_version)[1]


async def compare_final(conn: psycopg.AsyncConnection[Any], chain: ChainVerifier,
                        report: AuditReport, expected_counts: Mapping[str, int]) -> None:
    """At the projected head: row counts, the unspent outputs and the balances. The
    expected side is computed on a thread while PostgreSQL answers (decision 0123)."""
    params = chain.params
    expected = asyncio.ensure_future(asyncio.to_thread(
        expected_unspent_and_balances, chain.state, params.p2pkh_version,
        params.p2sh_version))
    try:
        await _compare_final(conn, chain, report, expected_counts, expected)
    finally:
        if not expected.done():
            expected.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expected


async def _compare_final(
    conn: psycopg.AsyncConnection[Any], chain: ChainVerifier, report: AuditReport,
    expected_counts: Mapping[str, int],
    expected: asyncio.Future[tuple[set[tuple[str, int]], dict[tuple[str, str], int]]],
) -> None:
    for table, count in expected_counts.items():
        found = (await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone() or (0,))[0]
        if int(found) != count:
            report.add(Finding("count-differs", table, "count(*)", str(count), str(found)))
    extra = await (await conn.execute(
        "SELECT height FROM block WHERE height > %s ORDER BY height LIMIT 10",
        (chain.state.height,))).fetchall()
    for (height,) in extra:
        report.add(Finding("row-unexpected", "block", f"height={height}", "no row", "a row"))
    want, balances = await expected
    want |= chain.unspendable
    await _compare_unspent(conn, want, report)
    found_balances: dict[tuple[str, str], int] = {}
    for address, asset, amount in await (await conn.execute(
            "SELECT address, coalesce(asset_id, ''), amount FROM address_balance")).fetchall():
        key = (str(address), str(asset))
        found_balances[key] = found_balances.get(key, 0) + int(amount)
    for key in sorted(balances.keys() | found_balances.keys()):
        want_amount, have_amount = balances.get(key, 0), found_balances.get(key, 0)
        if want_amount != have_amount:
            report.add(Finding("balance-differs", "address_balance",
                               f"address={key[0]}, asset={key[1] or 'native'}",
                               str(want_amount), str(have_amount)))


UNSPENT_FETCH_ROWS = 10_000  # rows of the projected unspent outputs per round trip


async def _compare_unspent(conn: psycopg.AsyncConnection[Any], want: set[tuple[str, int]],
                           report: AuditReport) -> None:
    """The projected unspent outputs against ``want`` (emptied on the way), streamed
    through a server-side cursor: the projection's side is never held whole, so the
    comparison's memory is the expected set's, not twice it. The findings come in key
    order, as before."""
    unexpected: list[tuple[str, int]] = []
    unexpected_max = FINDINGS_MAX  # the report keeps no more; the rest are counted
    unexpected_more = 0
    async with conn.transaction():  # a named cursor lives in a transaction
        cursor = conn.cursor("audit_unspent", binary=True)
        try:
            await cursor.execute('SELECT txid, "index" FROM tx_output '
                                 'WHERE spent_by_txid IS NULL ORDER BY txid COLLATE "C", "index"')
            while rows := await cursor.fetchmany(UNSPENT_FETCH_ROWS):
                batch = set(rows)  # (txid text, index int4): the expected side's shape
                found = batch & want
                want -= found
                if len(found) == len(batch):
                    continue
                for key in sorted(batch - found):
                    if len(unexpected) < unexpected_max:
                        unexpected.append(key)
                    else:
                        unexpected_more += 1
        finally:
            await cursor.close()
    for txid, index in sorted(want):
        report.add(Finding("spent-differs", "tx_output", f"txid={txid}, index={index}",
                           "spent_by_txid=NULL (unspent)", "spent"))
    for txid, index in unexpected:  # in key order: byte order ("C"), as Python sorts
        report.add(Finding("spent-differs", "tx_output", f"txid={txid}, index={index}",
                           "spent", "spent_by_txid=NULL (unspent)"))
    report.findings_dropped += unexpected_more


async def projected_offsets(conn: psycopg.AsyncConnection[Any], consumer: str,
                            topics: Sequence[str]) -> dict[str, int]:
    cursor = await conn.execute(
        'SELECT topic, "offset" FROM projection_offset WHERE consumer = %s AND topic = ANY(%s)',
        (consumer, list(topics)))
    return {str(topic): int(offset) for topic, offset in await cursor.fetchall()}


# --------------------------------------------------------------------------- the shell


class ReadAhead:
    """A reader task filling a bounded buffer of batches ahead of its consumer
    (decision 0123): the broker's fetches, TLS and the client's decoding run on the
    event loop between the verified blocks, instead of in series with them.

    Bounded by record bytes: the task waits while the buffer holds ``bytes_max`` or
    more (a batch is taken whole, so one larger than the bound still passes, alone).
    Batches come out in log order; an error of the reader reaches the consumer after
    the batches read before it, as it would have reading directly."""

    def __init__(self, batches: AsyncIterator[list[LogRecord]], *, bytes_max: int) -> None:
        assert bytes_max > 0
        self._source = batches
        self._buffer: collections.deque[tuple[list[LogRecord], int]] = collections.deque()
        self._bytes = 0
        self._bytes_max = bytes_max
        self._space = asyncio.Event()
        self._data = asyncio.Event()
        self._done = False
        self._error: Exception | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        try:
            async for batch in self._source:
                while self._bytes >= self._bytes_max:
                    self._space.clear()
                    await self._space.wait()
                size = sum(len(record.value) for record in batch)
                self._buffer.append((batch, size))
                self._bytes += size
                self._data.set()
        except Exception as error:  # handed to the consumer, in order
            self._error = error
        finally:
            self._done = True
            self._data.set()

    async def next(self) -> list[LogRecord] | None:
        """The next batch, or None once the reader reached its end."""
        while not self._buffer:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            self._data.clear()
            await self._data.wait()
        batch, size = self._buffer.popleft()
        self._bytes -= size
        self._space.set()
        return batch

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        close = getattr(self._source, "aclose", None)  # an async generator's
        if close is not None:
            await close()


ScriptFailure = tuple[int, str, int, str]


class Auditor:
    """Reads the logs from offset 0 and the projection, and fills an ``AuditReport``.

    Overlapped (decision 0123): the chain is verified block by block
    (``_verify_next``) and the event loop is given a turn after each block, so the
    blocks and votes are read ahead (``ReadAhead``), each comparison batch's queries
    run on the server and are compared when they answer (at most
    ``COMPARISONS_IN_FLIGHT_MAX`` batches), and the rejections log is read and
    compared, all while the next blocks are verified. The order of the checks of
    each block is as before. (A thread for the verification overlapped as well but
    cost ~13 % more CPU: the GIL handed back and forth at every I/O wake-up.)"""

    def __init__(self, genesis: Genesis, *, bootstrap: str, dsn: str, topic_prefix: str = "",
                 consumer: str = CONSUMER_DEFAULT, workers: int = 1,
                 on_progress: Callable[[AuditReport], None] | None = None) -> None:
        assert 1 <= workers <= WORKERS_MAX
        self.genesis = genesis
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.prefix = topic_prefix
        self.consumer = consumer
        self.on_progress = on_progress
        self.report = AuditReport()
        self.chain = ChainVerifier(genesis, self.report)
        self.votes = VotesCheck(genesis, self.report)
        self._counts = {"block": 1, "tx": 1, "tx_output": len(genesis.allocations),
                        "tx_rejection": 0}
        self._last_progress = 0.0
        self._cpu_started = 0.0
        self.workers = workers
        self._freezer = BlockFreezer()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending: collections.deque[asyncio.Future[list[ScriptFailure]]] = (
            collections.deque())
        self._comparisons: collections.deque[asyncio.Task[None]] = collections.deque()

    def _record_failures(self, failures: Sequence[ScriptFailure]) -> None:
        for height, txid, index, message in failures:
            self.report.add(Finding("script-invalid", BLOCKS.name,
                                    f"height={height}, txid={txid}, input={index}",
                                    "script and signature verify", message))

    async def _scripts(self, *, flush: bool) -> None:
        """Verify the scripts queued by the chain: in this process (one worker; the
        chain's step takes full chunks itself) or in chunks on the worker pool, with
        at most PENDING_CHUNKS_PER_WORKER chunks per worker in flight (bounded memory;
        the chain runs ahead meanwhile)."""
        jobs = self.chain.script_jobs
        if jobs and (flush or len(jobs) >= SCRIPT_CHUNK_TXS):
            self.chain.script_jobs = []
            if self._pool is None:
                self._record_failures(verify_scripts(jobs))
            else:
                loop = asyncio.get_running_loop()
                for start in range(0, len(jobs), SCRIPT_CHUNK_TXS):
                    # raw bytes cross the process boundary (cached: no re-serializing)
                    chunk = [(height, tx.serialize() if isinstance(tx, Transaction) else tx,
                              spent) for height, tx, spent in jobs[start:start + SCRIPT_CHUNK_TXS]]
                    self._pending.append(loop.run_in_executor(self._pool, verify_scripts, chunk))
        while self._pending and (flush or len(self._pending)
                                 > self.workers * PENDING_CHUNKS_PER_WORKER):
            self._record_failures(await self._pending.popleft())

    def _verify_next(self, records: Sequence[LogRecord],
                     start: int) -> tuple[int, VerifiedBlock | None, list[ScriptFailure]]:
        """Follow ``records`` from ``start`` until one adds a verified block; with no
        pool, a full chunk of scripts is verified here too. The index after the record
        taken, the block (None: the batch ended) and the script failures."""
        for index in range(start, len(records)):
            verified = self.chain.follow(records[index])
            if verified is None:
                continue
            failures: list[ScriptFailure] = []
            if self._pool is None and len(self.chain.script_jobs) >= SCRIPT_CHUNK_TXS:
                jobs, self.chain.script_jobs = self.chain.script_jobs, []
                failures = verify_scripts(jobs)
            return index + 1, verified, failures
        return len(records), None, []

    async def run(self) -> AuditReport:
        if self.workers > 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=tune_worker_collector)
            for _ in range(self.workers):  # spawned now: their start overlaps the connects
                self._pool.submit(int)
        try:
            with collector_tuned_for_bulk(), older_objects_frozen():
                return await self._run()
        finally:
            for future in self._pending:
                future.cancel()
            for task in self._comparisons:
                task.cancel()
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)

    async def _run(self) -> AuditReport:
        started = time.monotonic()
        self._cpu_started = time.process_time()
        topics = [self.prefix + spec.name for spec in (BLOCKS, VOTES, REJECTED)]
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            for setting in RANGE_PLAN_SETTINGS:
                await conn.execute(setting)
            offsets = await projected_offsets(conn, self.consumer, [topics[0], topics[2]])
            readers = [LogReader(self.bootstrap, topic, client_id=client_id) for topic, client_id
                       in zip(topics, ("capledger-audit", "capledger-audit-votes",
                                       "capledger-audit-rejected"), strict=True)]
            stops: list[asyncio.Task[None]] = []
            try:
                # the three readers connect at once (TLS + SCRAM each)
                await asyncio.gather(*(reader.start(0) for reader in readers))
                rejections = asyncio.create_task(
                    self._rejections(conn, readers[2], offsets.get(topics[2], 0)))
                try:
                    all_compared = await self._chain_part(
                        conn, readers[0], readers[1], offsets.get(topics[0], 0), started)
                    # their close (a TLS shutdown each) overlaps what follows
                    stops += [asyncio.create_task(reader.stop()) for reader in readers[:2]]
                    await self._scripts(flush=True)
                    await rejections
                finally:
                    if not rejections.done():
                        rejections.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await rejections
                await self._final(conn, all_compared)
            finally:
                await asyncio.gather(*stops, *(reader.stop() for reader in readers),
                                     return_exceptions=True)
        self.report.elapsed_s = time.monotonic() - started
        self.report.cpu_s = time.process_time() - self._cpu_started
        return self.report

    async def _chain_part(self, conn: psycopg.AsyncConnection[Any], blocks: LogReader,
                          votes: LogReader, projected_offset: int, started: float) -> bool:
        """The blocks and votes, read ahead; False when the replay stopped at a finding
        (the comparisons already sent are finished, as they were before the stop)."""
        blocks_ahead = ReadAhead(
            blocks.read_to_end(timeout_ms=READ_TIMEOUT_MS, max_records=READ_RECORDS_MAX),
            bytes_max=BLOCKS_READ_AHEAD_BYTES_MAX)
        votes_ahead = ReadAhead(
            votes.read_to_end(timeout_ms=READ_TIMEOUT_MS, max_records=READ_RECORDS_MAX),
            bytes_max=VOTES_READ_AHEAD_BYTES_MAX)
        try:
            self.report.blocks_log_end = await blocks.end_offset()
            blocks_ahead.start()
            votes_ahead.start()
            try:
                all_compared = await self._blocks(conn, blocks_ahead, votes_ahead,
                                                  projected_offset, started)
            except AuditStop:
                all_compared = False
                self.report.notes.append(
                    f"the replay stopped after height {self.report.height} (see the finding)")
            while self._comparisons:
                await self._comparisons[0]
                self._comparisons.popleft()
            return all_compared
        finally:
            for task in self._comparisons:  # an error: what is left is not compared
                task.cancel()
            await asyncio.gather(*self._comparisons, return_exceptions=True)
            self._comparisons.clear()
            await blocks_ahead.stop()
            await votes_ahead.stop()

    async def _final(self, conn: psycopg.AsyncConnection[Any], all_compared: bool) -> None:
        if all_compared:
            await compare_final(conn, self.chain, self.report, self._counts)
        else:
            self.report.notes.append(
                f"compared up to height {self.report.blocks_compared - 1}, verified up "
                f"to {self.report.height}: counts, unspent outputs and balances not "
                "compared")

    async def _compare(self, conn: psycopg.AsyncConnection[Any],
                       blocks: list[VerifiedBlock]) -> None:
        """A batch's queries go now; it is compared when they answer, while the chain
        goes on. At most COMPARISONS_IN_FLIGHT_MAX batches wait (bounded memory)."""
        self._comparisons.append(asyncio.create_task(compare_batch(conn, blocks, self.report)))
        while self._comparisons and (self._comparisons[0].done() or len(self._comparisons)
                                     > COMPARISONS_IN_FLIGHT_MAX):
            await self._comparisons.popleft()

    async def _blocks(self, conn: psycopg.AsyncConnection[Any], blocks: ReadAhead,
                      votes: ReadAhead, projected_offset: int, started: float) -> bool:
        """Verify every block, check its decision, compare the projected ones. True when
        every verified block was projected (the final comparisons then apply)."""
        await compare_rows_batch(conn, [self.chain.genesis_rows()], self.report)
        pending: list[VerifiedBlock] = []
        pending_txs = 0
        while (batch := await blocks.next()) is not None:
            index = 0
            while index < len(batch):
                index, verified, failures = self._verify_next(batch, index)
                # the loop's reads ahead, queries and comparisons go on between blocks
                await asyncio.sleep(0)
                self.report.blocks_log_position = batch[index - 1].offset + 1
                self._record_failures(failures)
                if verified is None:
                    continue
                await self._scripts(flush=False)
                self._freezer.block_done()
                await self._decide(verified, votes)
                if self.votes.stopped:
                    # The published chain leaves the decided one here (finding made): the
                    # projector rightly quarantines this block and waits below it, so
                    # only the blocks under it are compared.
                    if pending:
                        await self._compare(conn, pending)
                    return False
                self._progress(started)
                if verified.source_offset >= projected_offset:
                    self.report.unprojected_blocks += 1
                    continue
                pending.append(verified)
                pending_txs += self._count(verified)
                if pending_txs >= COMPARE_TXS_MAX or len(pending) >= COMPARE_BLOCKS_MAX:
                    await self._compare(conn, pending)
                    pending, pending_txs = [], 0
        if pending:
            await self._compare(conn, pending)
        return self.report.unprojected_blocks == 0

    def _count(self, verified: VerifiedBlock) -> int:
        """The rows a projected block adds (for the final counts); its transactions."""
        txs = verified.block.txs
        self._counts["block"] += 1
        self._counts["tx"] += len(txs)
        self._counts["tx_output"] += sum(len(tx.outputs) for tx in txs)
        return len(txs)

    async def _decide(self, verified: VerifiedBlock, votes: ReadAhead) -> None:
        height = verified.block.height
        if self.votes.stopped:
            return
        while self.votes.decided(height) is None:
            batch = await votes.next()
            if batch is None:
                break
            for record in batch:
                self.votes.feed(record)
        if self.votes.decided(height) is None:
            self.report.add(Finding("not-decided", VOTES.name, f"height={height}",
                                    f"a quorum of acks for {verified.block.hash_hex}",
                                    "no decision in the votes log"))
            self.votes.stopped = True
            return
        self.votes.settle(verified)

    async def _rejections(self, conn: psycopg.AsyncConnection[Any], reader: LogReader,
                          projected_offset: int) -> None:
        """The rejections log against ``tx_rejection``, while the chain is verified."""
        async for batch in reader.read_to_end(timeout_ms=READ_TIMEOUT_MS,
                                              max_records=REJECTIONS_BATCH_MAX):
            expected = []
            for record in batch:
                if record.offset >= projected_offset:
                    continue
                try:
                    decoded = codec.decode(record.value, expected="TxRejected").record
                    expected.append(_REJECTION_VALUES(rejection_row(record.offset, decoded)))
                except (ValidationError, KeyError, TypeError, ValueError):
                    continue  # the projector skips an unusable record the same way
            if not batch:
                continue
            found = await (await conn.execute(
                f"SELECT {', '.join(REJECTION_COLUMNS)} FROM tx_rejection "
                "WHERE log_offset BETWEEN %s AND %s",
                (batch[0].offset, batch[-1].offset))).fetchall()
            self.report.extend(compare_rows("tx_rejection", REJECTION_COLUMNS, 1,
                                            expected, found))
            self.report.rejections_compared += len(expected)
            self._counts["tx_rejection"] += len(expected)

    def _progress(self, started: float) -> None:
        now = time.monotonic()
        if self.on_progress is not None and now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.report.elapsed_s = now - started
            self.report.cpu_s = time.process_time() - self._cpu_started
            self.on_progress(self.report)

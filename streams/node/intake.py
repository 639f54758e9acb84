"""A node's intake of tx-log records, with signature checks on a pool of threads.

Owns: ``Verifier`` (N verification threads; N = 1 checks in the caller's thread),
``envelope_lookup`` (the memberships whose keys sign envelopes now, decision 0062) and
``intake_records`` — decode, parse and check a batch of ``ledger.tx.v1`` records into
selection candidates, in log order, each once: the envelope signature
(``ledger.envelope``) and the scripts of every input whose spent output is known now
(committed state, the pool, or an earlier record of the batch). It runs in three
phases so that the costly, pure part runs in parallel:

1. in order, in the caller's thread: Avro decode, transaction parse, prevout lookup;
2. in any order, on the verifier's threads (the caller's among them): the envelope
   check, then the scripts (only when the envelope holds and every prevout is known)
   — pure functions of the record and the looked-up outputs, so their verdicts do not
   depend on the thread or the order; libsecp256k1 runs without the GIL (coincurve
   calls it through cffi);
3. in order, in the caller's thread: the candidates, in log order, with their verdicts.

The pool, the offsets and every verdict are those of checking the records one by one
(decision 0110). A record whose handling raises is returned as an exception, for the
node to quarantine; it never affects another record.

"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ledger.envelope import Refusal, envelope_refusal
from ledger.errors import ValidationError
from ledger.governance import envelope_views
from ledger.interpreter import verify_input
from ledger.membership import Genesis
from ledger.selection import Candidate
from ledger.state import LedgerState, outpoint_key
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import parse_submitted_tx, tx_submission_from_record

# Threads that check signatures; more than the machine's cores only adds switching.
VERIFY_WORKERS_MAX = 64
# Below this many records per thread a batch is checked in the caller's thread: handing
# work to threads costs more than it saves.
PARALLEL_RECORDS_PER_WORKER_MIN = 16

T = TypeVar("T")
R = TypeVar("R")


class Verifier:
    """Maps a pure function over items on ``workers`` threads — the caller's and
    ``workers - 1`` more — results in item order."""

    def __init__(self, workers: int = 1) -> None:
        if not 1 <= workers <= VERIFY_WORKERS_MAX:
            raise ValueError(f"verify workers must be 1..{VERIFY_WORKERS_MAX}, not {workers}")
        self.workers = workers
        self._executor = (ThreadPoolExecutor(workers - 1, thread_name_prefix="verify")
                          if workers > 1 else None)

    def map(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        executor = self._executor
        if executor is None or len(items) < PARALLEL_RECORDS_PER_WORKER_MIN * 2:
            return [function(item) for item in items]
        size = -(-len(items) // self.workers)
        slices = [items[i:i + size] for i in range(0, len(items), size)]
        futures = [executor.submit(_map_slice, function, part) for part in slices[1:]]
        results = _map_slice(function, slices[0])  # the caller's share
        for future in futures:
            results.extend(future.result())
        return results

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _map_slice(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    return [function(item) for item in items]


@dataclass(frozen=True, slots=True)
class _Decoded:
    """Phase 1's result for a record that decoded and parsed: what phase 2 checks.
    ``spends`` is None when some prevout is not known yet (scripts left to the block's
    selection, which checks them against the committed state)."""

    offset: int
    tx: Transaction
    submitter: str
    idempotency_key: str
    signature: bytes
    spends: tuple[tuple[bytes, int], ...] | None


@dataclass(frozen=True, slots=True)
class Intake:
    """One record's outcome: its candidate, whether its scripts verified, or the
    exception its handling raised (``candidate`` is then None)."""

    offset: int
    candidate: Candidate | None
    scripts_verified: bool = False
    error: Exception | None = None


def _decode(record: LogRecord) -> Candidate | _Decoded:
    """Phase 1 for one record, without the prevouts: a refused candidate, or the tx."""
    try:
        decoded: dict[str, Any] = codec.decode(record.value, expected="TxSubmitted").record
        submission = tx_submission_from_record(decoded)
    except ValidationError as error:
        return Candidate(record.offset, None, error_code=error.code,
                         error_message=f"tx-log offset {record.offset}: {error.message}")
    submitter, key = submission.submitter, submission.idempotency_key
    try:
        tx = parse_submitted_tx(submission)
    except ValidationError as error:
        return Candidate(record.offset, None, submitter, key, error.code,
                         f"tx-log offset {record.offset}: {error.message}")
    return _Decoded(record.offset, tx, submitter, key, bytes(decoded["signature"]), None)


def _spends(tx: Transaction, lookup: Callable[[bytes], tuple[bytes, int] | None]
            ) -> tuple[tuple[bytes, int], ...] | None:
    spends = []
    for txin in tx.inputs:
        found = lookup(outpoint_key(txin.prevout))
        if found is None:
            return None
        spends.append(found)
    return tuple(spends)


def _outputs(tx: Transaction) -> dict[bytes, tuple[bytes, int]]:
    txid_le = tx.hash_le
    return {txid_le + struct.pack("<I", index): (output.script_pubkey, output.value)
            for index, output in enumerate(tx.outputs)}


def envelope_lookup(genesis: Genesis, state: LedgerState) -> tuple[Genesis, ...]:
    """The memberships whose keys may sign the envelopes of records read now: the one in
    force at the next height and the latest scheduled one (``ledger.governance.
    envelope_views``, decision 0062); genesis' alone for a state without a schedule."""
    if state.schedule is None:
        return (genesis,)
    return envelope_views(state.schedule, state.height + 1)


def _envelope_refusal(views: tuple[Genesis, ...], genesis_hash: bytes, item: _Decoded
                      ) -> Refusal | None:
    """None when a key of one of ``views`` signed the envelope; else the first refusal
    by a membership that knows the submitter (or, if none does, the first)."""
    refusals = []
    for view in views:
        refusal = envelope_refusal(view, genesis_hash, submitter=item.submitter,
                                   idempotency_key=item.idempotency_key,
                                   txid_le=item.tx.hash_le, signature=item.signature)
        if refusal is None:
            return None
        refusals.append(refusal)
    return next((r for r in refusals if r.code != "envelope-submitter-unknown"), refusals[0])


def _check(views: tuple[Genesis, ...], genesis_hash: bytes,
           item: Candidate | _Decoded | Exception) -> Intake:
    """Phase 2 for one record: the envelope, then the scripts; pure."""
    if isinstance(item, Exception):
        return Intake(-1, None, error=item)
    if isinstance(item, Candidate):
        return Intake(item.offset, item)
    try:
        tx = item.tx
        refusal = _envelope_refusal(views, genesis_hash, item)
        if refusal is not None:
            return Intake(item.offset, Candidate(
                item.offset, tx, item.submitter, item.idempotency_key, refusal.code,
                f"tx-log offset {item.offset}: {refusal.message}"))
        candidate = Candidate(item.offset, tx, item.submitter, item.idempotency_key)
        if item.spends is None:
            return Intake(item.offset, candidate)
        for index, (script, value) in enumerate(item.spends):
            try:
                verify_input(tx, index, script, value)
            except ValidationError:
                return Intake(item.offset, candidate)  # the selection says why
        return Intake(item.offset, candidate, scripts_verified=True)
    except Exception as error:  # one record must never stop the node
        return Intake(item.offset, None, error=error)


def intake_records(
    records: Sequence[LogRecord],
    *,
    genesis: Genesis,
    genesis_hash: bytes,
    state: LedgerState,
    pending_outputs: Mapping[bytes, tuple[bytes, int]],
    verifier: Verifier,
    quarantined: Callable[[int], bool] = lambda _offset: False,
) -> list[Intake]:
    """The outcome of each record, in order; a quarantined record (``quarantined(
    offset)``) is not looked at (its outcome has no candidate and no error).
    ``pending_outputs``: the outputs of the pool's transactions; those of earlier
    records of the batch are added to them here."""
    batch_outputs: dict[bytes, tuple[bytes, int]] = {}

    def lookup(key: bytes) -> tuple[bytes, int] | None:
        entry = state.get_key(key)
        if entry is not None:
            return entry.script_pubkey, entry.value
        return pending_outputs.get(key) or batch_outputs.get(key)

    items: list[Candidate | _Decoded | Exception] = []
    offsets: list[int] = []
    held: set[int] = set()
    for record in records:
        offsets.append(record.offset)
        if quarantined(record.offset):
            held.add(record.offset)
            items.append(Candidate(record.offset, None))  # replaced below
            continue
        try:
            item = _decode(record)
            if isinstance(item, _Decoded):
                item = _Decoded(item.offset, item.tx, item.submitter, item.idempotency_key,
                                item.signature, _spends(item.tx, lookup))
                batch_outputs.update(_outputs(item.tx))
            items.append(item)
        except Exception as error:  # one record must never stop the node
            items.append(error)
    views = envelope_lookup(genesis, state)
    outcomes = verifier.map(lambda item: _check(views, genesis_hash, item), items)
    return [
        Intake(offset, None) if offset in held
        else outcome if outcome.offset == offset
        else Intake(offset, None, error=outcome.error)
        for offset, outcome in zip(offsets, outcomes, strict=True)
    ]

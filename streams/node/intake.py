"""A node's intake of tx-log records, with signature checks on a pool of threads.

Owns: ``Verifier`` (N verification threads; N = 1 checks in the caller's thread),
``envelope_lookup`` (the memberships whose keys sign envelopes now, decision 0062) and
``intake_records`` — decode, parse and check a batch of ``ledger.tx.v1`` records into
selection candidates, in log order, each once: the envelope signature
(``ledger.envelope``) and the scripts of every input whose spent output is known now
(committed state, the pool, or an earlier record of the batch). A ``TxBatchSubmitted``
record (decision 0112) gives one candidate per transaction, all at its offset, in its
order, under one envelope verification. It runs in three phases so that the costly,
pure part runs in parallel:

1. in order, in the caller's thread: Avro decode, transaction parse, prevout lookup;
2. in any order, on the verifier's threads (the caller's among them): (a) each batch's
   limits and signature, then (b) per transaction the envelope check of a single
   record, then the scripts (only when the envelope holds and every prevout is known)
   — pure functions of the record and the looked-up outputs, so their verdicts do not
   depend on the thread or the order; libsecp256k1 runs without the GIL (coincurve
   calls it through cffi);
3. in order, in the caller's thread: the candidates, in log order, with their verdicts.

The pool, the offsets and every verdict are those of checking the records one by one
(decision 0110). A record whose handling raises is returned as an exception, for the
node to quarantine; it never affects another record.

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from ledger.envelope import Refusal, batch_refusal, batch_shape_refusal, envelope_refusal
from ledger.errors import ValidationError
from ledger.governance import envelope_views
from ledger.hashing import sha256d
from ledger.interpreter import verify_input
from ledger.membership import Genesis
from ledger.selection import Candidate, unrefused_candidate
from ledger.state import LedgerState, outpoint_key
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import (
    TxBatchSubmission,
    parse_submitted_tx,
    tx_batch_submission_from_record,
    tx_submission_from_record,
)

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
    """Phase 1's result for a transaction that decoded and parsed: what phase 2 checks.
    ``spends`` is None when some prevout is not known yet (scripts left to the block's
    selection, which checks them against the committed state). ``sealed``: the
    envelope was checked with its batch (phase 2a), only the scripts remain."""

    offset: int
    tx: Transaction
    submitter: str
    idempotency_key: str
    signature: bytes
    spends: tuple[tuple[bytes, int], ...] | None
    sealed: bool = False


@dataclass(frozen=True, slots=True)
class _Batch:
    """Phase 1's result for a TxBatchSubmitted record (decision 0112): its checked
    fields, each item's txid and each item parsed (with its prevouts) or refused."""

    offset: int
    submission: TxBatchSubmission
    txids: tuple[bytes, ...]
    items: tuple[Candidate | _Decoded, ...]


@dataclass(frozen=True, slots=True)
class Intake:
    """One transaction's outcome: its candidate, whether its scripts verified, or the
    exception its handling raised (``candidate`` is then None). A batch record gives
    one per transaction, all with the record's offset."""

    offset: int
    candidate: Candidate | None
    scripts_verified: bool = False
    error: Exception | None = None


_Item = Candidate | _Decoded | Exception
_SUBMISSIONS = frozenset({"TxSubmitted", "TxBatchSubmitted"})


def _decode(record: LogRecord) -> Candidate | _Decoded | TxBatchSubmission:
    """Phase 1 for one record, without the prevouts: a refused candidate, the tx, or a
    batch's checked fields."""
    try:
        decoded = codec.decode(record.value, expected=_SUBMISSIONS)
        if decoded.name == "TxBatchSubmitted":
            return tx_batch_submission_from_record(decoded.record)
        submission = tx_submission_from_record(decoded.record)
    except ValidationError as error:
        return Candidate(record.offset, None, error_code=error.code,
                         error_message=f"tx-log offset {record.offset}: {error.message}")
    submitter, key = submission.submitter, submission.idempotency_key
    try:
        tx = parse_submitted_tx(submission)
    except ValidationError as error:
        return Candidate(record.offset, None, submitter, key, error.code,
                         f"tx-log offset {record.offset}: {error.message}")
    return _Decoded(record.offset, tx, submitter, key, bytes(decoded.record["signature"]), None)


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
    return {key: (output.script_pubkey, output.value)
            for key, output in zip(tx.output_keys, tx.outputs, strict=True)}


def envelope_lookup(genesis: Genesis, state: LedgerState) -> tuple[Genesis, ...]:
    """The memberships whose keys may sign the envelopes of records read now: the one in
    force at the next height and the latest scheduled one (``ledger.governance.
    envelope_views``, decision 0062); genesis' alone for a state without a schedule."""
    if state.schedule is None:
        return (genesis,)
    return envelope_views(state.schedule, state.height + 1)


def _first_acceptance(views: tuple[Genesis, ...],
                      check: Callable[[Genesis], Refusal | None]) -> Refusal | None:
    """None when a key of one of ``views`` signed (``check`` passes for it); else the
    first refusal by a membership that knows the submitter (or, if none does, the
    first). Single envelopes and batches alike."""
    refusals = []
    for view in views:
        refusal = check(view)
        if refusal is None:
            return None
        refusals.append(refusal)
    return next((r for r in refusals if r.code != "envelope-submitter-unknown"), refusals[0])


def _envelope_refusal(views: tuple[Genesis, ...], genesis_hash: bytes, item: _Decoded
                      ) -> Refusal | None:
    return _first_acceptance(views, lambda view: envelope_refusal(
        view, genesis_hash, submitter=item.submitter, idempotency_key=item.idempotency_key,
        txid_le=item.tx.hash_le, signature=item.signature))


assert list(Intake.__dataclass_fields__) == ["offset", "candidate", "scripts_verified", "error"]
_INTAKE_SETTERS = tuple(getattr(Intake, name).__set__ for name in Intake.__dataclass_fields__)


def _verified_intake(offset: int, candidate: Candidate) -> Intake:
    """``Intake(offset, candidate, scripts_verified=True)``, without the frozen
    dataclass's __init__ (decision 0116)."""
    intake: Intake = object.__new__(Intake)
    set_offset, set_candidate, set_verified, set_error = _INTAKE_SETTERS
    set_offset(intake, offset)
    set_candidate(intake, candidate)
    set_verified(intake, True)
    set_error(intake, None)
    return intake


def _check(views: tuple[Genesis, ...], genesis_hash: bytes, item: _Item) -> Intake:
    """Phase 2 for one transaction: the envelope (unless sealed), then the scripts; pure."""
    if isinstance(item, Exception):
        return Intake(-1, None, error=item)
    if isinstance(item, Candidate):
        return Intake(item.offset, item)
    try:
        tx = item.tx
        if not item.sealed:
            refusal = _envelope_refusal(views, genesis_hash, item)
            if refusal is not None:
                return Intake(item.offset, Candidate(
                    item.offset, tx, item.submitter, item.idempotency_key, refusal.code,
                    f"tx-log offset {item.offset}: {refusal.message}"))
        candidate = unrefused_candidate(item.offset, tx, item.submitter, item.idempotency_key)
        if item.spends is None:
            return Intake(item.offset, candidate)
        for index, (script, value) in enumerate(item.spends):
            try:
                verify_input(tx, index, script, value)
            except ValidationError:
                return Intake(item.offset, candidate)  # the selection says why
        return _verified_intake(item.offset, candidate)
    except Exception as error:  # one record must never stop the node
        return Intake(item.offset, None, error=error)


# ---------------------------------------------------------------- batches (decision 0112)


# A batch's parsed transaction as phase 1 leaves it, built without the frozen
# dataclass's __init__ (one object.__setattr__ per field; decision 0116).
assert list(_Decoded.__dataclass_fields__) == [
    "offset", "tx", "submitter", "idempotency_key", "signature", "spends", "sealed"]
_DECODED_SETTERS = tuple(getattr(_Decoded, name).__set__
                         for name in _Decoded.__dataclass_fields__)


def _sealed_item(offset: int, tx: Transaction, submitter: str, key: str,
                 spends: tuple[tuple[bytes, int], ...] | None) -> _Decoded:
    """``_Decoded(offset, tx, submitter, key, b"", spends, sealed=True)``."""
    item: _Decoded = object.__new__(_Decoded)
    (set_offset, set_tx, set_submitter, set_key, set_signature, set_spends,
     set_sealed) = _DECODED_SETTERS
    set_offset(item, offset)
    set_tx(item, tx)
    set_submitter(item, submitter)
    set_key(item, key)
    set_signature(item, b"")
    set_spends(item, spends)
    set_sealed(item, True)
    return item


def _batch_items(offset: int, submission: TxBatchSubmission,
                 lookup: Callable[[bytes], tuple[bytes, int] | None],
                 batch_outputs: dict[bytes, tuple[bytes, int]]) -> _Batch:
    """Phase 1 for a batch: parse each transaction in order, look up its prevouts (an
    earlier transaction of the batch counts), as if each were a record of its own."""
    items: list[Candidate | _Decoded] = []
    submitter = submission.submitter
    for raw, key in zip(submission.raw_txs, submission.idempotency_keys, strict=True):
        try:
            tx = Transaction.parse(raw)
        except ValidationError as error:
            items.append(Candidate(offset, None, submitter, key, error.code,
                                   f"tx-log offset {offset}: {error.message}"))
            continue
        items.append(_sealed_item(offset, tx, submitter, key, _spends(tx, lookup)))
        batch_outputs.update(_outputs(tx))
    txids = tuple(item.tx.hash_le if isinstance(item, _Decoded) else sha256d(raw)
                  for item, raw in zip(items, submission.raw_txs, strict=True))
    return _Batch(offset, submission, txids, tuple(items))


def _seal(views: tuple[Genesis, ...], genesis_hash: bytes, batch: _Batch) -> list[_Item]:
    """Phase 2a for a batch, pure: its limits and its one signature. Refused as a
    whole, every transaction gets the batch's code (with its txid when it parsed);
    else the items go on to their scripts."""
    submission, offset = batch.submission, batch.offset
    try:
        refusal = batch_shape_refusal(views[0], [len(raw) for raw in submission.raw_txs])
        if refusal is None:
            items = list(zip(submission.idempotency_keys, batch.txids, strict=True))
            refusal = _first_acceptance(views, lambda view: batch_refusal(
                view, genesis_hash, submitter=submission.submitter, items=items,
                signature=submission.signature))
    except Exception as error:  # one record must never stop the node
        return [error]
    if refusal is None:
        return list(batch.items)
    message = f"tx-log offset {offset}: {refusal.message}"
    if not batch.items:  # nothing to name: the record itself is refused
        return [Candidate(offset, None, submission.submitter, "", refusal.code, message)]
    return [Candidate(offset, item.tx if isinstance(item, _Decoded) else None,
                      submission.submitter, key, refusal.code, message)
            for item, key in zip(batch.items, submission.idempotency_keys, strict=True)]


def _regroup(offsets: Sequence[int], held: set[int], counts: Sequence[int],
             outcomes: Sequence[Intake]) -> list[Intake]:
    """Phase 3: the flat outcomes back per record, in log order. A record whose
    handling raised anywhere (in any of its transactions) is one error outcome."""
    result: list[Intake] = []
    position = 0
    for offset, count in zip(offsets, counts, strict=True):
        mine = outcomes[position:position + count]
        position += count
        if offset in held:
            result.append(Intake(offset, None))
            continue
        failed = next((o for o in mine if o.error is not None or o.offset != offset), None)
        if failed is not None:
            result.append(Intake(offset, None, error=failed.error))
        else:
            result.extend(mine)
    return result


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
    """The outcome of each transaction, in order (a batch record gives one per
    transaction); a quarantined record (``quarantined(offset)``) is not looked at (its
    outcome has no candidate and no error). ``pending_outputs``: the outputs of the
    pool's transactions; those of earlier records of the batch are added to them here."""
    batch_outputs: dict[bytes, tuple[bytes, int]] = {}

    def lookup(key: bytes) -> tuple[bytes, int] | None:
        entry = state.get_key(key)
        if entry is not None:
            return entry.script_pubkey, entry.value
        return pending_outputs.get(key) or batch_outputs.get(key)

    per_record: list[list[_Item] | _Batch] = []
    offsets: list[int] = []
    held: set[int] = set()
    for record in records:
        offsets.append(record.offset)
        if quarantined(record.offset):
            held.add(record.offset)
            per_record.append([Candidate(record.offset, None)])  # replaced below
            continue
        try:
            per_record.append(_phase_one(record, lookup, batch_outputs))
        except Exception as error:  # one record must never stop the node
            per_record.append([error])
    batches = [entry for entry in per_record if isinstance(entry, _Batch)]
    views = envelope_lookup(genesis, state)
    sealed = iter(verifier.map(lambda batch: _seal(views, genesis_hash, batch), batches))
    units = [next(sealed) if isinstance(entry, _Batch) else entry for entry in per_record]
    outcomes = verifier.map(lambda item: _check(views, genesis_hash, item),
                            [item for unit in units for item in unit])
    return _regroup(offsets, held, [len(unit) for unit in units], outcomes)


def _phase_one(record: LogRecord, lookup: Callable[[bytes], tuple[bytes, int] | None],
               batch_outputs: dict[bytes, tuple[bytes, int]]) -> list[_Item] | _Batch:
    item = _decode(record)
    if isinstance(item, TxBatchSubmission):
        return _batch_items(record.offset, item, lookup, batch_outputs)
    if isinstance(item, _Decoded):
        item = _Decoded(item.offset, item.tx, item.submitter, item.idempotency_key,
                        item.signature, _spends(item.tx, lookup))
        batch_outputs.update(_outputs(item.tx))
    return [item]

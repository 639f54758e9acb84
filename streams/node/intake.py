"""A node's intake of tx-log records, with signature checks on a pool of threads or of
worker processes.

Owns: ``Verifier`` (N verification threads, N = 1 checking in the caller's thread; or N
worker processes returning verdicts, decision 0122),
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

``Verifier(N, processes=True)`` (decision 0122) runs phase 2 in N worker processes
instead: the caller's thread keeps phases 1 and 3 and ships per transaction only bytes
(the raw tx, its looked-up prevout scripts and values, the envelope's fields), in
chunks, while it decodes the next records; a worker parses the tx again and runs the
same ``_phase_two``, returning a small verdict from which the caller builds the same
``Intake``. A chunk whose worker failed or died is checked in the caller's thread.
Decision 0126: chunks are whole pieces of eight transactions, shipped from the first
piece, fewer pieces per chunk at the end of a call; at the end the caller checks
pieces from the last, rebuilds answered chunks meanwhile, and takes back a chunk still
queued behind another one instead of waiting for it.

"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import pickle
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
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

logger = logging.getLogger(__name__)

# Threads that check signatures; more than the machine's cores only adds switching.
VERIFY_WORKERS_MAX = 64
# Below this many records per thread a batch is checked in the caller's thread: handing
# work to threads costs more than it saves.
PARALLEL_RECORDS_PER_WORKER_MIN = 16
# Worker processes (decisions 0122, 0126): transactions are cut into pieces of this
# many; a chunk sent to a worker carries up to this many consecutive pieces (so the
# per-chunk costs, a pickle and two pipe syscalls each way, are spread over up to 32
# transactions), and at the end of a call fewer, down to one, so that the caller's
# thread never waits long for a worker's last chunk.
VERIFY_PIECE_TXS = 8
VERIFY_CHUNK_PIECES_MAX = 4
# A chunk not verified within this long is checked in the caller's thread (a stuck
# worker must not stop the node; the verdicts are the same either way).
VERDICT_WAIT_S_MAX = 60.0
# Worker processes re-started after one died or hung, in a node's life; past it intake
# checks in the node's thread.
WORKER_RESTARTS_MAX = 8
# Chunks sent to one worker and not yet answered: bounds the bytes in its pipe (a chunk
# is ~25 KB, a Linux pipe holds 64 KB) so that sending never blocks for long.
WORKER_CHUNKS_IN_FLIGHT_MAX = 2
# A worker being closed gets this long to exit before it is killed.
WORKER_EXIT_WAIT_S = 5.0
# Memberships a worker keeps unpickled (they change only with governance).
WORKER_VIEWS_CACHED_MAX = 4

T = TypeVar("T")
R = TypeVar("R")


class VerifyWorkerError(Exception):
    """A worker process raised while checking one transaction: its type and text."""


class Verifier:
    """Phase 2's executor on ``workers`` cores: the caller's thread and ``workers - 1``
    more verifiers. Threads (default): ``map`` runs a pure function over items on them,
    results in item order. ``processes=True``: the others are spawned worker processes
    that return verdicts (decision 0122; the caller's thread checks what they have not
    taken yet at the end of each call); ``map`` then runs in the caller's thread."""

    def __init__(self, workers: int = 1, *, processes: bool = False) -> None:
        if not 1 <= workers <= VERIFY_WORKERS_MAX:
            raise ValueError(f"verify workers must be 1..{VERIFY_WORKERS_MAX}, not {workers}")
        self.workers = workers
        self.processes = processes
        self._executor = (ThreadPoolExecutor(workers - 1, thread_name_prefix="verify")
                          if workers > 1 and not processes else None)
        self._processes = (_WorkerProcesses(workers - 1)
                           if processes and workers > 1 else None)
        self._views_memo: tuple[tuple[Genesis, ...], bytes, bytes, bytes] | None = None

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

    @property
    def chunks_answered(self) -> int:
        """Chunks whose verdicts came back from a worker process (0 for threads)."""
        return 0 if self._processes is None else self._processes.chunks_answered

    @property
    def txs_answered(self) -> int:
        """Transactions whose verdicts came back from a worker process."""
        return 0 if self._processes is None else self._processes.txs_answered

    @property
    def answer_wait_s(self) -> float:
        """Seconds the caller's thread waited for worker processes' answers."""
        return 0.0 if self._processes is None else self._processes.wait_s

    def wait_ready(self) -> list[int]:
        """The worker processes' ids once all have started (none for threads)."""
        return [] if self._processes is None else self._processes.wait_ready()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._processes is not None:
            self._processes.close()

    def _shipment(self, views: tuple[Genesis, ...], genesis_hash: bytes,
                  records: int) -> _Shipment | None:
        """A shipment for one intake call, or None to check in the caller's thread."""
        processes = self._processes
        if processes is None or not processes.alive():
            return None
        memo = self._views_memo
        if (memo is None or memo[1] != genesis_hash or len(memo[0]) != len(views)
                or any(a is not b for a, b in zip(memo[0], views, strict=True))):
            blob = pickle.dumps((views, genesis_hash), protocol=pickle.HIGHEST_PROTOCOL)
            memo = (views, genesis_hash, hashlib.sha256(blob).digest(), blob)
            self._views_memo = memo
        return _Shipment(processes, views, genesis_hash, memo[2], memo[3], self.workers,
                         eager=records >= PARALLEL_RECORDS_PER_WORKER_MIN * 2)


@dataclass(slots=True)
class _Worker:
    """One worker process and the node's end of its pipe. ``waiting``: the numbers of
    the chunks sent and not answered yet, in order (-1: its start-up message)."""

    process: BaseProcess
    connection: Connection
    waiting: deque[int] = field(default_factory=lambda: deque([-1]))
    views_key: bytes = b""  # the memberships it was last sent
    pid: int = 0
    # whether its answer is readable, created once (``Connection.poll`` builds a
    # selector per call: ~10 µs, once per piece of 8 transactions)
    poller: select.poll = field(default_factory=select.poll)


class _WorkerProcesses:
    """Worker processes fed over one pipe each, from the node's thread alone: no helper
    thread in the node competes with it for the GIL (a ``ProcessPoolExecutor``'s did:
    each hand-over waited for the GIL's switch interval). A worker that dies or hangs
    is replaced; its chunks are answered None (checked in the node's thread)."""

    def __init__(self, count: int) -> None:
        self._context = multiprocessing.get_context("spawn")  # the node has threads
        self._workers = [self._spawn() for _ in range(count)]
        self._answers: dict[int, list[_Verdict] | None] = {}
        self._owner: dict[int, _Worker] = {}
        self._taken_back: set[int] = set()  # chunks whose answers are to be dropped
        self._next_chunk = 0
        self._restarts = 0
        self.chunks_answered = 0  # chunks whose verdicts came back from a worker
        self.txs_answered = 0  # their transactions
        self.wait_s = 0.0  # time the node's thread waited for an answer
        self.chunks_taken_back = 0  # chunks checked by the node after all (take_back)

    def _spawn(self) -> _Worker:
        mine, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(theirs,),
                                        name="capledger-verify", daemon=True)
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        worker.poller.register(mine.fileno(), select.POLLIN)
        return worker

    def alive(self) -> bool:
        return bool(self._workers)

    def wait_ready(self) -> list[int]:
        for worker in list(self._workers):
            while worker.waiting and worker.waiting[0] == -1 and worker in self._workers:
                self._read(worker)
        return sorted(worker.pid for worker in self._workers)

    def has_room(self) -> bool:
        """Whether a worker can take a chunk now (else sending would wait)."""
        return any(len(w.waiting) < WORKER_CHUNKS_IN_FLIGHT_MAX for w in self._workers)

    def read_ready(self) -> None:
        """Reads every answer already waiting in a pipe, without blocking."""
        for worker in list(self._workers):
            while worker.waiting and worker in self._workers and worker.poller.poll(0):
                self._read(worker)

    def send(self, views_key: bytes, views_blob: bytes, shipped: list[_Shipped]) -> int:
        """The chunk's number, to ask ``answer`` for; -1 when no worker took it."""
        if not self._workers:
            return -1
        worker = min(self._workers, key=lambda w: len(w.waiting))
        while len(worker.waiting) >= WORKER_CHUNKS_IN_FLIGHT_MAX and worker in self._workers:
            self._read(worker)
        if worker not in self._workers:
            return -1
        blob = None if worker.views_key == views_key else views_blob
        number, self._next_chunk = self._next_chunk, self._next_chunk + 1
        try:
            worker.connection.send_bytes(pickle.dumps((views_key, blob, shipped),
                                                      protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError) as error:
            self._lost(worker, f"cannot send to it: {error!r}")
            return -1
        worker.views_key = views_key
        worker.waiting.append(number)
        self._owner[number] = worker
        return number

    def take_back(self, numbers: Sequence[int]) -> list[int]:
        """Of ``numbers``, the chunks queued at a worker behind another one (not started
        yet, as far as the node knows): from now on the caller checks them itself and
        their answers, when they come, are dropped. At the end of a call this keeps
        the caller's thread from waiting for a worker's second chunk while it is idle;
        the worker may still verify it (a piece of eight, once a call) meanwhile."""
        self.read_ready()
        wanted, taken = set(numbers), []
        for worker in self._workers:
            for number in list(worker.waiting)[1:]:
                if number in wanted:
                    taken.append(number)
                    self._taken_back.add(number)
                    del self._owner[number]
        self.chunks_taken_back += len(taken)
        return taken

    def answered(self, number: int) -> bool:
        """Whether chunk ``number``'s answer is back (``answer`` then does not wait)."""
        return number in self._answers

    def answer(self, number: int) -> list[_Verdict] | None:
        if number < 0:
            return None
        if number not in self._answers:
            started = time.perf_counter()
            while number not in self._answers:
                self._read(self._owner[number])
            self.wait_s += time.perf_counter() - started
        del self._owner[number]
        return self._answers.pop(number)

    def _read(self, worker: _Worker) -> None:
        """Reads the worker's next answer (or finds it dead or stuck)."""
        try:
            if not worker.poller.poll(VERDICT_WAIT_S_MAX * 1000):
                self._lost(worker, f"no answer within {VERDICT_WAIT_S_MAX:.0f} s")
                return
            data = worker.connection.recv_bytes()
        except (EOFError, OSError) as error:
            self._lost(worker, f"it exited ({error!r})")
            return
        try:
            answer = pickle.loads(data)  # the worker's own bytes, over the node's own pipe
        except Exception as error:  # a torn answer: the worker cannot be trusted on
            self._lost(worker, f"unreadable answer ({error!r})")
            return
        number = worker.waiting.popleft()
        if number in self._taken_back:
            self._taken_back.discard(number)
        elif number == -1:
            worker.pid = int(answer)
        elif isinstance(answer, list):
            self._answers[number] = answer
            self.chunks_answered += 1
            self.txs_answered += len(answer)
        else:
            logger.warning("a verify worker failed a chunk (%s): checked in the node's "
                           "thread", answer)
            self._answers[number] = None

    def _lost(self, worker: _Worker, why: str) -> None:
        for number in worker.waiting:
            if number in self._taken_back:
                self._taken_back.discard(number)
            elif number >= 0:
                self._answers[number] = None
        self._workers.remove(worker)
        worker.connection.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(WORKER_EXIT_WAIT_S)
        self._restarts += 1
        if self._restarts > WORKER_RESTARTS_MAX:
            logger.error("verify worker process lost (%s), %d lost so far: not replaced",
                         why, self._restarts)
            return
        logger.warning("verify worker process lost (%s): replaced; its records are "
                       "checked in the node's thread", why)
        self._workers.append(self._spawn())

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.connection.close()  # the worker reads the end of its pipe and exits
        for worker in workers:
            worker.process.join(WORKER_EXIT_WAIT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(WORKER_EXIT_WAIT_S)


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
        return _from_verdict(item, _phase_two(views, genesis_hash, item))
    except Exception as error:  # one record must never stop the node
        return Intake(item.offset, None, error=error)


def _phase_two(views: tuple[Genesis, ...], genesis_hash: bytes, item: _Decoded
               ) -> bool | tuple[str, str]:
    """The verdict of ``_check``, as a worker process returns it: (code, message) when
    the envelope refuses the record, else whether every script verified (False too
    when a prevout is unknown: the block's selection checks it and says why)."""
    if not item.sealed:
        refusal = _envelope_refusal(views, genesis_hash, item)
        if refusal is not None:
            return refusal.code, f"tx-log offset {item.offset}: {refusal.message}"
    if item.spends is None:
        return False
    tx = item.tx
    for index, (script, value) in enumerate(item.spends):
        try:
            verify_input(tx, index, script, value)
        except ValidationError:
            return False
    return True


# ---------------------------------------------------------------- batches (decision 0112)


# A batch's parsed transaction as phase 1 leaves it, built without the frozen
# dataclass's __init__ (one object.__setattr__ per field; decision 0116).
assert list(_Decoded.__dataclass_fields__) == [
    "offset", "tx", "submitter", "idempotency_key", "signature", "spends", "sealed"]
_DECODED_SETTERS = tuple(getattr(_Decoded, name).__set__
                         for name in _Decoded.__dataclass_fields__)


def _new_decoded(offset: int, tx: Transaction, submitter: str, key: str, signature: bytes,
                 spends: tuple[tuple[bytes, int], ...] | None, sealed: bool) -> _Decoded:
    """``_Decoded(offset, tx, submitter, key, signature, spends, sealed)``."""
    item: _Decoded = object.__new__(_Decoded)
    (set_offset, set_tx, set_submitter, set_key, set_signature, set_spends,
     set_sealed) = _DECODED_SETTERS
    set_offset(item, offset)
    set_tx(item, tx)
    set_submitter(item, submitter)
    set_key(item, key)
    set_signature(item, signature)
    set_spends(item, spends)
    set_sealed(item, sealed)
    return item


def _sealed_item(offset: int, tx: Transaction, submitter: str, key: str,
                 spends: tuple[tuple[bytes, int], ...] | None) -> _Decoded:
    """``_Decoded(offset, tx, submitter, key, b"", spends, sealed=True)``."""
    return _new_decoded(offset, tx, submitter, key, b"", spends, True)


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


# ---------------------------------------------------------------- worker processes (0122)

# What a worker gets per transaction: offset (for the messages), raw tx, submitter,
# idempotency key, envelope signature, the prevouts' (script, value) or None, sealed.
_Shipped = tuple[int, bytes, str, str, bytes, "tuple[tuple[bytes, int], ...] | None", bool]
# What it returns: True verified, False not verified (unknown prevout or failed
# script: the selection says why), (code, message) refused, str the text of an error.
_Verdict = bool | tuple[str, str] | str


def _shipped(item: _Decoded) -> _Shipped:
    return (item.offset, item.tx.serialize(), item.submitter, item.idempotency_key,
            item.signature, item.spends, item.sealed)


def _from_verdict(item: _Decoded, verdict: _Verdict) -> Intake:
    """The ``Intake`` that ``_check`` of ``item`` returns, rebuilt from its verdict."""
    offset, tx = item.offset, item.tx
    if isinstance(verdict, bool):
        candidate = unrefused_candidate(offset, tx, item.submitter, item.idempotency_key)
        return _verified_intake(offset, candidate) if verdict else Intake(offset, candidate)
    if isinstance(verdict, tuple):
        code, message = verdict
        return Intake(offset, Candidate(offset, tx, item.submitter, item.idempotency_key,
                                        code, message))
    return Intake(offset, None, error=VerifyWorkerError(verdict))


class _Shipment:
    """One intake call's traffic with the worker processes (decision 0126). Phase 1's
    transactions are cut into pieces of ``VERIFY_PIECE_TXS`` as it yields them, from
    the first piece on when the call is large enough; a chunk sent to a worker is up to
    ``VERIFY_CHUNK_PIECES_MAX`` consecutive pieces from the front. At the end the
    caller's thread checks unsent pieces itself from the last, while the workers take
    them from the first, both in numbers that shrink with what is left (so no worker
    is left with a big last chunk), and it rebuilds the outcomes of answered chunks
    while the workers still verify: no core idles for the tail."""

    def __init__(self, processes: _WorkerProcesses, views: tuple[Genesis, ...],
                 genesis_hash: bytes, views_key: bytes, views_blob: bytes,
                 verifiers: int, eager: bool) -> None:
        self._processes = processes
        self._views, self._genesis_hash = views, genesis_hash
        self._views_key, self._views_blob = views_key, views_blob
        self._verifiers = verifiers
        self._eager = eager  # enough records to ship from the first piece on
        self._pending: list[_Decoded] = []
        self._pieces: list[list[_Decoded]] = []
        self._unsent: deque[int] = deque()  # piece indexes not sent yet, in order
        self._sent: dict[int, list[int]] = {}  # chunk number -> its piece indexes
        self._outcomes: dict[int, Intake] = {}
        self._cut_unlooked = 0  # cuts since phase 1 last looked at the pipes

    def add(self, entry: list[_Item] | _Batch) -> None:
        items = entry.items if isinstance(entry, _Batch) else entry
        self._pending.extend(item for item in items if isinstance(item, _Decoded))
        if len(self._pending) >= VERIFY_PIECE_TXS and (
                self._eager or self._pieces
                or len(self._pending) >= PARALLEL_RECORDS_PER_WORKER_MIN * 2):
            self._cut()
            # a worker has room, or a chunk's worth was cut since the last look at the
            # pipes (each look costs a syscall; a worker holds two chunks meanwhile)
            self._cut_unlooked += 1
            if (self._cut_unlooked >= VERIFY_CHUNK_PIECES_MAX
                    or self._processes.has_room()):
                self._cut_unlooked = 0
                self._pump(tail=False)

    def _cut(self) -> None:
        """The pending transactions as pieces."""
        pending = self._pending
        for first in range(0, len(pending), VERIFY_PIECE_TXS):
            self._unsent.append(len(self._pieces))
            self._pieces.append(pending[first:first + VERIFY_PIECE_TXS])
        self._pending = []

    def _pump(self, *, tail: bool) -> None:
        """Takes the answers already back, then sends waiting pieces, in order, while a
        worker has room. ``tail``: phase 1 is over; a chunk is then at most a
        ``2 × verifiers``-th of what is left (at least one piece)."""
        processes = self._processes
        if tail or not processes.has_room():
            processes.read_ready()
        if tail:
            self._take_answers()
        unsent = self._unsent
        while unsent and processes.has_room():
            pieces = self._tail_pieces() if tail else min(len(unsent),
                                                           VERIFY_CHUNK_PIECES_MAX)
            indexes = [unsent.popleft() for _ in range(pieces)]
            shipped = [_shipped(item) for index in indexes for item in self._pieces[index]]
            number = processes.send(self._views_key, self._views_blob, shipped)
            if number < 0:  # no worker took it: checked here
                for index in indexes:
                    self._check_here(index)
                continue
            self._sent[number] = indexes

    def _tail_pieces(self) -> int:
        """Pieces per chunk once phase 1 is over: a ``2 × verifiers``-th of those left,
        at least one (while any is left), at most ``VERIFY_CHUNK_PIECES_MAX``."""
        left = len(self._unsent)
        return min(-(-left // (2 * self._verifiers)), VERIFY_CHUNK_PIECES_MAX)

    def _take_answers(self) -> None:
        """The outcomes of every chunk whose answer is back."""
        processes = self._processes
        for number in [n for n in self._sent if processes.answered(n)]:
            self._take(number)

    def _take(self, number: int) -> None:
        """The outcomes of chunk ``number``, waiting for its answer; a chunk the
        workers did not answer is checked here with ``_check`` (same outcomes)."""
        indexes = self._sent.pop(number)
        verdicts = self._processes.answer(number)
        items = [item for index in indexes for item in self._pieces[index]]
        if verdicts is None or len(verdicts) != len(items):
            for index in indexes:
                self._check_here(index)
            return
        outcomes = self._outcomes
        for item, verdict in zip(items, verdicts, strict=True):
            outcomes[id(item)] = _from_verdict(item, verdict)

    def _check_here(self, index: int) -> None:
        for item in self._pieces[index]:
            self._outcomes[id(item)] = _check(self._views, self._genesis_hash, item)

    def collect(self) -> dict[int, Intake]:
        """Each shipped item's outcome by ``id(item)``."""
        if not self._pieces and len(self._pending) < PARALLEL_RECORDS_PER_WORKER_MIN * 2:
            self._pieces.append(self._pending)  # too few to pay for the pipes
            self._check_here(0)
            return self._outcomes
        if self._pending:
            self._cut()
        self._pump(tail=True)
        unsent = self._unsent
        while unsent:  # the workers are busy: help, from the last piece back, as many
            # pieces between two looks at the pipes as a chunk sent now would hold
            for _ in range(self._tail_pieces()):
                self._check_here(unsent.pop())
            self._pump(tail=True)
        # a one-piece chunk queued behind another is checked here instead of waited
        # for (a bigger one, left by a worker kept from its core, would cost the
        # worker more wasted work than the wait)
        single = [number for number, indexes in self._sent.items() if len(indexes) == 1]
        for number in self._processes.take_back(single) if single else ():
            for index in self._sent.pop(number):
                self._check_here(index)
        while self._sent:  # the oldest first; any other answer back meanwhile too
            self._take(min(self._sent))
            self._take_answers()
        return self._outcomes


def shipped_transactions(records: Sequence[LogRecord], state: LedgerState) -> list[_Shipped]:
    """What a shipment sends for ``records`` (phase 1 against ``state``, earlier records
    counting): ``capledger bench intake``'s measure of the pickling."""
    batch_outputs: dict[bytes, tuple[bytes, int]] = {}

    def lookup(key: bytes) -> tuple[bytes, int] | None:
        entry = state.get_key(key)
        if entry is not None:
            return entry.script_pubkey, entry.value
        return batch_outputs.get(key)

    shipped: list[_Shipped] = []
    for record in records:
        entry = _phase_one(record, lookup, batch_outputs)
        items = entry.items if isinstance(entry, _Batch) else entry
        shipped.extend(_shipped(item) for item in items if isinstance(item, _Decoded))
    return shipped


def _worker_main(connection: Connection) -> None:
    """A worker process: answers each chunk with its verdicts until the node closes its
    end of the pipe, or dies (the pipe's end then reads EOF: the worker exits with the
    node). Ctrl-C is the node's to handle; it closes the pipes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send_bytes(pickle.dumps(os.getpid()))
    while True:
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            views_key, views_blob, shipped = pickle.loads(data)  # the node's own bytes
            answer: list[_Verdict] | str = _verify_chunk(views_key, views_blob, shipped)
        except Exception as error:  # the node checks this chunk itself
            answer = f"{type(error).__name__}: {error}"
        try:
            connection.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return


_worker_views: dict[bytes, tuple[tuple[Genesis, ...], bytes]] = {}


def _verify_chunk(views_key: bytes, views_blob: bytes | None,
                  shipped: list[_Shipped]) -> list[_Verdict]:
    """In a worker process: the verdict of each shipped transaction, pure. The
    memberships come once per worker (``views_blob`` None: the cached ones)."""
    cached = _worker_views.get(views_key)
    if cached is None:
        if views_blob is None:
            raise LookupError("memberships not sent to this worker")
        cached = pickle.loads(views_blob)  # the node's own bytes, over its own pipe
        if len(_worker_views) >= WORKER_VIEWS_CACHED_MAX:
            _worker_views.clear()
        _worker_views[views_key] = cached
    views, genesis_hash = cached
    return [_verdict(views, genesis_hash, entry) for entry in shipped]


def _verdict(views: tuple[Genesis, ...], genesis_hash: bytes, entry: _Shipped) -> _Verdict:
    """``_check`` of the transaction, reduced to what the node needs to rebuild it: the
    same ``_phase_two``, without building the candidate the node builds anyway."""
    offset, raw, submitter, key, signature, spends, sealed = entry
    try:
        item = _new_decoded(offset, Transaction.parse(raw), submitter, key, signature,
                            spends, sealed)
        return _phase_two(views, genesis_hash, item)
    except Exception as error:  # the node parsed these bytes: a bug, this record only
        return f"{type(error).__name__}: {error}"


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
    views = envelope_lookup(genesis, state)
    shipment = verifier._shipment(views, genesis_hash, len(records))
    for record in records:
        offsets.append(record.offset)
        if quarantined(record.offset):
            held.add(record.offset)
            per_record.append([Candidate(record.offset, None)])  # replaced below
            continue
        try:
            entry = _phase_one(record, lookup, batch_outputs)
        except Exception as error:  # one record must never stop the node
            entry = [error]
        per_record.append(entry)
        if shipment is not None:
            shipment.add(entry)
    batches = [entry for entry in per_record if isinstance(entry, _Batch)]
    sealed = iter(verifier.map(lambda batch: _seal(views, genesis_hash, batch), batches))
    units = [next(sealed) if isinstance(entry, _Batch) else entry for entry in per_record]
    items = [item for unit in units for item in unit]
    if shipment is None:
        outcomes = verifier.map(lambda item: _check(views, genesis_hash, item), items)
    else:
        # a batch refused as a whole replaced its items by new candidates: not shipped
        shipped = shipment.collect()
        outcomes = [shipped.get(id(item)) or _check(views, genesis_hash, item)
                    for item in items]
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

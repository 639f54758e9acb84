"""Intake with a pool of verification threads, or of worker processes returning verdicts
(decision 0122), decides exactly what checking the records one by one decides: same
candidates, same refusal codes and messages, same pre-verified txids, in log order
(decision 0110); a worker process that dies or fails costs no record and stops nothing,
and the workers die with the node. Plus the node's use of it: a proposal whose
transactions the pool holds is built from the pool's objects, and a certified block
the node never validated commits from one selection of its range."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from ledger.state import genesis_allocation_tx, outpoint_key, state_from_genesis, validate_block
from ledger.tx import OutPoint
from streams.common.clock import now_ms
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import block_from_proposal, proposal_record, signed_tx_submitted_record
from streams.node.intake import (
    PARALLEL_RECORDS_PER_WORKER_MIN,
    Intake,
    Verifier,
    VerifyWorkerError,
    _from_verdict,
    _verdict,
    envelope_lookup,
    intake_records,
    shipped_transactions,
)
from streams.node.ledger_node import LedgerNode, NodeSettings, Pool
from streams.tools.loadgen import Lanes, interleave, lane_chains, sign_p2pkh_payment
from tests.unit.test_block import KEYS, make_genesis
from tests.unit.test_node_validation import _block

pytestmark = pytest.mark.unit

LANES = Lanes("intake-workers", 6)
GENESIS = dataclasses.replace(make_genesis(), allocations=LANES.allocations())
CHAINS = lane_chains(LANES, GENESIS.hash_le, 8)  # each lane spends its own change


def _value(tx_bytes: bytes, offset: int, *, submitter: str = "securities-a",
           signer: str = "securities-a") -> bytes:
    return codec.encode("TxSubmitted", signed_tx_submitted_record(
        tx_bytes, key=KEYS[signer], genesis_hash=GENESIS.hash_le, submitter=submitter,
        idempotency_key=f"k{offset}", now_ms=1))


def _mixed_records() -> list[LogRecord]:
    """Good chained payments interleaved with every kind of bad record intake sees."""
    good = list(interleave(CHAINS))
    allocation = genesis_allocation_tx(GENESIS.hash_le, LANES.allocations())
    wrong_key = sign_p2pkh_payment(LANES.keys()[1], OutPoint(allocation.hash_le, 0), 10_000_000,
                                   b"\x51", 5)  # lane 1's key on lane 0's output
    unknown_prevout = sign_p2pkh_payment(LANES.keys()[2], OutPoint(b"\x07" * 32, 0), 50, b"\x51", 5)
    values = [_value(tx.serialize(), i) for i, tx in enumerate(good)]
    values[3] = _value(good[3].serialize(), 3, signer="securities-b")  # forged envelope
    values[5] = _value(good[5].serialize(), 5, submitter="nobody")
    values[7] = b"\x00garbage"
    values[9] = _value(b"\x01\x00", 9)  # not a transaction
    values[11] = _value(wrong_key.serialize(), 11)
    values[13] = _value(unknown_prevout.serialize(), 13)
    values[15] = values[14]  # the same record twice
    return [LogRecord(offset * 2, None, value, 0) for offset, value in enumerate(values)]


def _summary(outcomes: list[Intake]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for o in outcomes:
        c = o.candidate
        fields = None if c is None else (c.offset, None if c.tx is None else c.tx.hash_le,
                                         c.submitter, c.idempotency_key, c.error_code,
                                         c.error_message)
        rows.append((o.offset, o.scripts_verified, o.error is not None, fields))
    return rows


def _run(records: list[LogRecord], workers: int, batch: int,
         quarantined: frozenset[int] = frozenset(), *,
         verifier: Verifier | None = None) -> list[Intake]:
    """Intake in calls of ``batch`` records; with ``verifier`` given (left open),
    ``workers`` is ignored."""
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    own = verifier is None
    verifier = Verifier(workers) if verifier is None else verifier
    pool, outcomes = Pool(0), []
    try:
        for first in range(0, len(records), batch):
            for outcome in intake_records(records[first:first + batch], genesis=GENESIS,
                                          genesis_hash=GENESIS.hash_le, state=state,
                                          pending_outputs=pool.pending_outputs,
                                          verifier=verifier,
                                          quarantined=quarantined.__contains__):
                outcomes.append(outcome)
                if outcome.candidate is not None:
                    pool.add(outcome.candidate, 0)
    finally:
        if own:
            verifier.close()
    return outcomes


def test_threads_and_batches_decide_exactly_as_one_record_at_a_time() -> None:
    records = _mixed_records()
    assert len(records) >= PARALLEL_RECORDS_PER_WORKER_MIN * 2  # the threads do run
    reference = _summary(_run(records, workers=1, batch=1))
    for workers, batch in ((1, 500), (2, 500), (3, 17), (4, len(records))):
        assert _summary(_run(records, workers, batch)) == reference, (workers, batch)
    codes = [row[3][4] for row in reference if row[3] is not None]  # type: ignore[index]
    assert {"envelope-signature", "envelope-submitter-unknown"} <= set(codes)
    assert any(code.startswith(("record", "avro", "malformed", "codec")) or "decode" in code
               for code in codes if code)
    verified = {row[0] for row in reference if row[1]}
    assert not verified & {2 * bad for bad in (3, 5, 7, 9, 11, 13)}
    assert len(verified) >= 30
    # a child spending a parent of the same batch is pre-verified too
    assert reference[len(CHAINS)][1] is True


def test_quarantined_records_are_not_looked_at() -> None:
    records = _mixed_records()[:40]
    outcomes = _run(records, workers=2, batch=40, quarantined=frozenset({0, 8}))
    assert [(o.offset, o.candidate, o.error) for o in outcomes if o.offset in (0, 8)] == [
        (0, None, None), (8, None, None)]


def test_an_exception_in_a_worker_quarantines_only_its_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    records = _mixed_records()[:40]
    import streams.node.intake as intake

    real = intake.envelope_refusal

    def explode(*args: object, **kwargs: object) -> object:
        if kwargs["idempotency_key"] == "k4":
            raise MemoryError("verification blew up")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "envelope_refusal", explode)
    outcomes = _run(records, workers=2, batch=40)
    failed = [o for o in outcomes if o.error is not None]
    assert [(o.offset, type(o.error)) for o in failed] == [(8, MemoryError)]
    assert sum(o.scripts_verified for o in outcomes) >= 30


def test_verifier_size_is_bounded() -> None:
    with pytest.raises(ValueError):
        Verifier(0)
    with pytest.raises(ValueError):
        Verifier(65)


def _node(tmp_path: Path, workers: int = 2) -> LedgerNode:
    me = INSTITUTION_IDS[0]
    settings = NodeSettings(me, GENESIS, KEYS[me], "127.0.0.1:1", tmp_path,
                            verify_workers=workers)
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    node.quarantine.load(0)
    return node


def test_the_node_pools_and_preverifies_with_worker_threads(tmp_path: Path) -> None:
    node = _node(tmp_path)
    records = _mixed_records()
    node._intake(records)
    node._intake(records[:10])  # a re-read: already pooled, ignored
    assert node.pool.offsets == [r.offset for r in records]
    reference = _run(records, workers=1, batch=1)
    assert node.pool.candidates == [o.candidate for o in reference]
    assert node.pool.verified == {o.candidate.tx.hash_le for o in reference  # type: ignore[union-attr]
                                  if o.scripts_verified}
    node.verifier.close()


def test_a_proposal_of_pooled_txs_reuses_their_objects(tmp_path: Path) -> None:
    node = _node(tmp_path, workers=1)
    good = list(interleave(CHAINS))[:6]
    node._intake([LogRecord(i, None, _value(tx.serialize(), i), 0) for i, tx in enumerate(good)])
    pooled = [c.tx for c in node.pool.candidates]
    block = _block(node, good, 0, 6)
    record = codec.decode(codec.encode("BlockProposed", proposal_record(block, now_ms=now_ms())),
                          expected="BlockProposed").record
    got = block_from_proposal(record, block_bytes_max=2_000_000, known_txs=node._pooled_txs)
    assert got == block
    assert all(a is b for a, b in zip(got.txs, pooled, strict=True))
    more = list(interleave(CHAINS))[6:8]  # a range beyond what the pool has read
    beyond = _block(node, good + more, 0, 8)
    record = codec.decode(codec.encode("BlockProposed", proposal_record(beyond, now_ms=now_ms())),
                          expected="BlockProposed").record
    got = block_from_proposal(record, block_bytes_max=2_000_000, known_txs=node._pooled_txs)
    assert got == beyond and got.txs[0] is pooled[0] and got.txs[7] is not more[1]
    later = _block(node, more, 6, 8)  # nothing of it read yet: parsed as usual
    record = codec.decode(codec.encode("BlockProposed", proposal_record(later, now_ms=now_ms())),
                          expected="BlockProposed").record
    assert block_from_proposal(record, block_bytes_max=2_000_000,
                               known_txs=node._pooled_txs) == later


def test_a_block_certified_before_local_validation_commits_from_one_selection(
        tmp_path: Path) -> None:
    node = _node(tmp_path, workers=1)
    good = list(interleave(CHAINS))[:6]
    node._intake([LogRecord(i, None, _value(tx.serialize(), i), 0) for i, tx in enumerate(good)])
    block = _block(node, good, 0, 6)
    delta, rejections = node._delta_to_commit(block)
    assert rejections == ()
    assert delta == validate_block(node.state, block, node.rules)  # the full check agrees
    assert outpoint_key(good[0].inputs[0].prevout) in delta.spent_all


def test_signature_verification_runs_without_the_gil() -> None:
    """With a switch interval far longer than the test, a thread gives the GIL up only
    where a C call releases it: the main thread runs while the verifying thread is
    still busy only if libsecp256k1 (through coincurve's cffi) verifies without it."""
    import sys
    import threading

    from ledger.keys import verify_der

    key = KEYS["koscom"]
    message = bytes(range(32))
    signature, sec = key.sign(message), key.public_key.sec
    done = threading.Event()

    def verify_many() -> None:
        for _ in range(2_000):
            assert verify_der(sec, signature, message)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1_000.0)
    try:
        worker = threading.Thread(target=verify_many)
        worker.start()  # returns once the worker has started and let the GIL go
        still_busy = not done.is_set()
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert still_busy


# ---------------------------------------------------------------- worker processes (0122)

WORKER_EXIT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def processes() -> Iterator[Verifier]:
    """Three verifiers: the caller's thread and two worker processes, started once for
    the tests that leave them alive."""
    verifier = Verifier(3, processes=True)
    assert len(verifier.wait_ready()) == 2
    yield verifier
    verifier.close()


def test_worker_processes_decide_exactly_as_one_record_at_a_time(processes: Verifier) -> None:
    records = _mixed_records()
    reference = _summary(_run(records, workers=1, batch=1))
    for batch in (40, len(records)):  # 40 records hold more than 32 transactions
        answered = processes.chunks_answered
        got = _summary(_run(records, 2, batch, verifier=processes))
        assert got == reference, batch
        assert processes.chunks_answered > answered  # the workers did take part
    one = Verifier(1, processes=True)  # the caller's thread alone: no process
    assert one.wait_ready() == []
    assert _summary(_run(records, 1, len(records), verifier=one)) == reference
    one.close()
    quarantined = _run(records[:40], 2, 40, frozenset({0, 8}), verifier=processes)
    assert [(o.offset, o.candidate, o.error) for o in quarantined if o.offset in (0, 8)] == [
        (0, None, None), (8, None, None)]


def test_worker_processes_decide_batches_exactly_as_one_thread(processes: Verifier) -> None:
    from tests.unit.test_batch_submissions import GOOD, _batch, _intake, _single

    raw = [tx.serialize() for tx in GOOD]
    raw[9] = raw[9][:-1] + bytes([raw[9][-1] ^ 1])  # a broken signature inside a batch
    records = [LogRecord(0, None, _batch(raw[:15], [f"k{i}" for i in range(15)]), 0),
               LogRecord(1, None, _single(raw[15], "k15"), 0),
               LogRecord(2, None, _batch(raw[16:30], [f"k{i}" for i in range(16, 30)],
                                         signer="securities-b"), 0),  # refused whole
               LogRecord(3, None, _batch(raw[30:], [f"k{i}" for i in range(30, 40)]), 0)]
    from tests.unit.test_batch_submissions import GENESIS as BATCH_GENESIS

    state = state_from_genesis(BATCH_GENESIS.hash_le, BATCH_GENESIS.allocations)
    answered = processes.chunks_answered
    got = intake_records(records, genesis=BATCH_GENESIS, genesis_hash=BATCH_GENESIS.hash_le,
                         state=state, pending_outputs={}, verifier=processes)
    reference = _intake(records, workers=1)
    assert _summary(got) == _summary(reference)
    assert processes.chunks_answered > answered
    assert sum(o.scripts_verified for o in got) == 13 + 1 + 0 + 10


def test_a_worker_verdict_rebuilds_the_same_outcome_and_an_error_stays_its_records() -> None:
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    records = _mixed_records()
    shipped = shipped_transactions(records, state)
    views = envelope_lookup(GENESIS, state)
    verdicts = [_verdict(views, GENESIS.hash_le, entry) for entry in shipped]
    assert {type(v) for v in verdicts} == {bool, tuple}  # verified, unverified, refused
    broken = (*shipped[0][:5], ((12345, "not a script"),), False)  # a bug's input
    text = _verdict(views, GENESIS.hash_le, broken)
    assert isinstance(text, str) and "Error" in text
    from streams.node.intake import _Decoded, _phase_one

    item = _phase_one(records[0], lambda _key: None, {})[0]
    assert isinstance(item, _Decoded)
    outcome = _from_verdict(item, text)
    assert outcome.candidate is None and isinstance(outcome.error, VerifyWorkerError)


def test_killed_worker_processes_are_replaced_and_cost_no_record() -> None:
    records = _mixed_records()
    reference = _summary(_run(records, workers=1, batch=1))
    verifier = Verifier(3, processes=True)  # two worker processes
    try:
        first = verifier.wait_ready()
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        assert _summary(_run(records, 2, len(records), verifier=verifier)) == reference
        second = verifier.wait_ready()
        assert len(second) == 2 and not set(second) & set(first)
        answered = verifier.chunks_answered
        assert _summary(_run(records, 2, len(records), verifier=verifier)) == reference
        assert verifier.chunks_answered > answered  # the new workers answer
    finally:
        verifier.close()
    for pid in second:
        _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
    while _alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still alive"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_processes_die_with_the_node() -> None:
    """A node killed without closing its verifier (SIGKILL) leaves no worker behind:
    each reads the end of its pipe and exits."""
    script = ("import os, signal, sys\n"
              "from streams.node.intake import Verifier\n"
              "v = Verifier(3, processes=True)\n"
              "print(*v.wait_ready(), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        _wait_gone(pid)


def test_a_chunk_a_worker_cannot_read_is_checked_by_the_node_and_the_worker_goes_on(
        processes: Verifier) -> None:
    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    shipped = shipped_transactions(_mixed_records()[:20], state)
    workers = processes._processes
    assert workers is not None
    pids = processes.wait_ready()
    number = workers.send(b"\x00" * 32, b"not a pickle", shipped)  # the worker raises
    assert number >= 0 and workers.answer(number) is None  # the node checks it itself
    before = processes.chunks_answered
    records = _mixed_records()
    assert _summary(_run(records, 2, len(records), verifier=processes)) == _summary(
        _run(records, workers=1, batch=1))
    assert processes.chunks_answered > before
    assert processes.wait_ready() == pids  # the same workers: none was lost


def test_a_chunk_taken_back_is_dropped_when_answered_and_the_pipe_stays_in_step() -> None:
    """``take_back`` (decision 0126): a chunk queued behind another one is the caller's
    to check; its answer, when it comes, is dropped, and later chunks get their own."""
    import hashlib
    import pickle

    state = state_from_genesis(GENESIS.hash_le, GENESIS.allocations)
    views = envelope_lookup(GENESIS, state)
    shipped = shipped_transactions(_mixed_records(), state)
    blob = pickle.dumps((views, GENESIS.hash_le), protocol=pickle.HIGHEST_PROTOCOL)
    key = hashlib.sha256(blob).digest()

    def verdicts(entries: list[tuple[object, ...]]) -> list[object]:
        return [_verdict(views, GENESIS.hash_le, entry) for entry in entries]  # type: ignore[arg-type]

    verifier = Verifier(2, processes=True)  # one worker process
    try:
        workers = verifier._processes
        assert workers is not None
        (pid,) = verifier.wait_ready()
        os.kill(pid, signal.SIGSTOP)  # both chunks stay queued: the test is not a race
        first = workers.send(key, blob, shipped[:8])
        second = workers.send(key, blob, shipped[8:16])
        assert workers.take_back([first, second]) == [second]  # the first is the worker's
        os.kill(pid, signal.SIGCONT)
        assert workers.answer(first) == verdicts(shipped[:8])
        later = workers.send(key, blob, shipped[16:20])  # 4, not 8: told apart
        assert workers.answer(later) == verdicts(shipped[16:20])
        assert not workers.answered(second) and workers.chunks_taken_back == 1
        assert verifier.wait_ready() == [pid]  # the same worker: none was lost
    finally:
        verifier.close()

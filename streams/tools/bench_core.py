"""Core validation benchmark: what full script validation costs next to bare ECDSA.

Owns: ``bench_validation(seconds) -> dict``, measured on one core (one thread):

* ``p2pkh_tx_per_s``: parse + ``verify_input`` of a 1-input/2-output P2PKH spend,
* ``p2sh_2of3_tx_per_s``: parse + ``verify_input`` of a 2-of-3 P2SH multisig spend,
* the same two with warm caches (``*_warm_tx_per_s``: scripts and keys seen before),
* ``coincurve_verify_per_s``: coincurve's bare ``PublicKey.verify`` (key parsed once),
* ``keys_verify_der_per_s``: ``ledger.keys.verify_der`` (key and DER parsed per call),

and the ratios of the first two to the bare rate (a P2SH 2-of-3 spend checks two
signatures, so its ideal ratio is 0.5; signed by keys 1 and 3 of 3, as here, it
costs three verifications, because CHECKMULTISIG tries keys in order). Each
iteration parses the transaction from bytes; the cold figures also empty the
parsed-script and parsed-key caches, so nothing is reused from the previous
iteration.

"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import coincurve

from ledger import interpreter, keys
from ledger.hashing import hash160, sha256
from ledger.interpreter import verify_input
from ledger.keys import PrivateKey, verify_der
from ledger.script import (
    multisig_script,
    p2pkh_script,
    p2pkh_script_sig,
    p2sh_multisig_script_sig,
    p2sh_script,
)
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.collector import BlockFreezer

if TYPE_CHECKING:
    from ledger.membership import Genesis
    from ledger.state import LedgerState
    from streams.kafka.logio import LogRecord
    from streams.node.intake import Verifier
    from streams.node.ledger_node import Pool

BENCH_SECONDS_MAX = 600.0
_KEYS = tuple(PrivateKey(bytes([0x21 + n]) * 32) for n in range(3))


def sample_p2pkh_spend() -> tuple[bytes, bytes]:
    """(raw tx, script_pubkey spent): 1 input, 2 P2PKH outputs, SIGHASH_ALL."""
    key = _KEYS[0]
    script_pubkey = p2pkh_script(key.public_key.hash160)
    outputs = (TxOut(70_000, p2pkh_script(_KEYS[1].public_key.hash160)),
               TxOut(30_000, script_pubkey))
    tx = Transaction(1, (TxIn(OutPoint(b"\x5a" * 32, 0)),), outputs)
    sig = key.sign(legacy_sighash(tx, 0, script_pubkey, SIGHASH_ALL)) + bytes([SIGHASH_ALL])
    signed = tx.with_script_sig(0, p2pkh_script_sig(sig, key.public_key.sec))
    return signed.serialize(), script_pubkey


def sample_p2sh_spend() -> tuple[bytes, bytes]:
    """(raw tx, script_pubkey spent): a 2-of-3 P2SH multisig input, 2 outputs."""
    redeem = multisig_script(2, [k.public_key.sec for k in _KEYS])
    script_pubkey = p2sh_script(hash160(redeem))
    outputs = (TxOut(60_000, p2pkh_script(_KEYS[2].public_key.hash160)),
               TxOut(40_000, script_pubkey))
    tx = Transaction(1, (TxIn(OutPoint(b"\x5b" * 32, 1)),), outputs)
    digest = legacy_sighash(tx, 0, redeem, SIGHASH_ALL)
    sigs = [_KEYS[n].sign(digest) + bytes([SIGHASH_ALL]) for n in (0, 2)]
    signed = tx.with_script_sig(0, p2sh_multisig_script_sig(sigs, redeem))
    return signed.serialize(), script_pubkey


SLICE_SECONDS = 0.05  # workloads alternate in slices this long (see _rates)


def _rates(operations: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Calls per second of each operation, ``seconds`` of wall time each.

    The operations run interleaved in short slices rather than one after another,
    so that a machine shared with other work (load changing during the run) slows
    them alike and their ratios stay meaningful.
    """
    assert 0 < seconds <= BENCH_SECONDS_MAX
    calls = dict.fromkeys(operations, 0)
    spent = dict.fromkeys(operations, 0.0)
    batch = 16
    while min(spent.values()) < seconds:
        for name, operation in operations.items():
            start = time.perf_counter()
            deadline = start + SLICE_SECONDS
            now = start
            while now < deadline:
                for _ in range(batch):
                    operation()
                calls[name] += batch
                now = time.perf_counter()
            spent[name] += now - start
    return {name: calls[name] / spent[name] for name in operations}


def _rate(operation: Callable[[], object], seconds: float) -> float:
    return _rates({"only": operation}, seconds)["only"]


def _full_validation(raw: bytes, script_pubkey: bytes, *, cold: bool) -> Callable[[], None]:
    """Parse + verify one spend; ``cold`` empties the parsed-script and parsed-key
    caches first (a transaction from strangers), else they stay warm (member keys)."""

    def run() -> None:
        if cold:
            interpreter._parse.cache_clear()
            interpreter._pubkey_hash160.cache_clear()
            keys._parsed_public_key.cache_clear()
        tx = Transaction.parse(raw)
        verify_input(tx, 0, script_pubkey, 0)

    return run


def bare_verify_cpu_us(count: int = 4_000) -> float:
    """CPU µs (this thread's) of one bare coincurve verification, key parsed once: the
    unit a node's CPU per committed transaction is compared with (it transfers between
    loaded and quiet machines better than a rate)."""
    message = bytes(range(32))
    signature = _KEYS[0].sign(message)
    public = coincurve.PublicKey(_KEYS[0].public_key.sec)
    started = time.thread_time()
    for _ in range(count):
        public.verify(signature, message, hasher=None)
    return (time.thread_time() - started) / count * 1e6


# Distinct keys, messages and signatures for the varied unit: as many as a block's
# worth of payments from different holders (a node never checks one input twice).
VARIED_VERIFY_INPUTS = 200


def varied_verify_cpu_us(count: int = 4_000) -> float:
    """CPU µs (this thread's) of one coincurve verification over ``VARIED_VERIFY_INPUTS``
    distinct keys, messages and signatures in turn (keys parsed once, as in
    :func:`bare_verify_cpu_us`). Repeating one input, the bare figure lets the CPU's
    caches and branch predictors learn the computation, which a node's stream of
    distinct payments never does: this one is ~10 % higher on the same machine. Both
    are reported; the ratios of the bars keep the bare one as their unit."""
    signers = [PrivateKey(sha256(b"varied-verify-key" + bytes([n >> 8, n & 0xFF])))
            for n in range(VARIED_VERIFY_INPUTS)]
    messages = [sha256(b"varied-verify-message" + bytes([n >> 8, n & 0xFF]))
                for n in range(VARIED_VERIFY_INPUTS)]
    inputs = [(coincurve.PublicKey(key.public_key.sec), key.sign(message), message)
              for key, message in zip(signers, messages, strict=True)]
    # a refused signature takes another path through libsecp256k1: every one must verify
    assert all(public.verify(signature, message, hasher=None)
               for public, signature, message in inputs)
    rounds = max(1, count // VARIED_VERIFY_INPUTS)
    started = time.thread_time()
    for _ in range(rounds):
        for public, signature, message in inputs:
            public.verify(signature, message, hasher=None)
    return (time.thread_time() - started) / (rounds * VARIED_VERIFY_INPUTS) * 1e6


def bench_validation(seconds: float) -> dict[str, float]:
    """Per-core rates (per second) and ratios; each measurement takes ``seconds``."""
    p2pkh_raw, p2pkh_spk = sample_p2pkh_spend()
    p2sh_raw, p2sh_spk = sample_p2sh_spend()
    # sanity: the samples verify before anything is timed
    verify_input(Transaction.parse(p2pkh_raw), 0, p2pkh_spk, 0)
    verify_input(Transaction.parse(p2sh_raw), 0, p2sh_spk, 0)

    message = bytes(range(32))
    signature = _KEYS[0].sign(message)
    public_sec = _KEYS[0].public_key.sec
    public = coincurve.PublicKey(public_sec)
    assert public.verify(signature, message, hasher=None)

    rates = _rates({
        "bare": lambda: public.verify(signature, message, hasher=None),
        "wrapped": lambda: verify_der(public_sec, signature, message),
        "p2pkh": _full_validation(p2pkh_raw, p2pkh_spk, cold=True),
        "p2sh": _full_validation(p2sh_raw, p2sh_spk, cold=True),
        "p2pkh_warm": _full_validation(p2pkh_raw, p2pkh_spk, cold=False),
        "p2sh_warm": _full_validation(p2sh_raw, p2sh_spk, cold=False),
    }, seconds)
    bare, wrapped, p2pkh, p2sh = rates["bare"], rates["wrapped"], rates["p2pkh"], rates["p2sh"]
    p2pkh_warm, p2sh_warm = rates["p2pkh_warm"], rates["p2sh_warm"]
    return {
        "coincurve_verify_per_s": bare,
        "keys_verify_der_per_s": wrapped,
        "p2pkh_tx_per_s": p2pkh,
        "p2sh_2of3_tx_per_s": p2sh,
        "p2pkh_warm_tx_per_s": p2pkh_warm,
        "p2sh_2of3_warm_tx_per_s": p2sh_warm,
        "p2pkh_ratio_to_bare": p2pkh / bare,
        "p2sh_2of3_ratio_to_bare": p2sh / bare,
        "seconds_per_measurement": seconds,
    }


def profile_validation(seconds: float, which: str = "p2pkh") -> str:
    """cProfile text (top functions by own time) of ``seconds`` of full validation."""
    import cProfile
    import io
    import pstats

    raw, script_pubkey = sample_p2pkh_spend() if which == "p2pkh" else sample_p2sh_spend()
    profiler = cProfile.Profile()
    profiler.enable()
    _rate(_full_validation(raw, script_pubkey, cold=True), seconds)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def bench_intake(records: int = 5_000, *, lanes: int = 500, workers: int = 1,
                 batch: int = 500, processes: bool = False) -> dict[str, float]:
    """A node's intake path per transaction: decode the TxSubmitted Avro record, parse
    the transaction, look up its prevouts (committed state or an earlier pooled tx),
    check the envelope signature and the scripts on ``workers`` threads (or worker
    processes, decision 0122), add it to the pool — ``streams.node.intake.intake_records``
    in batches of ``batch`` records, as ``LedgerNode._intake`` calls it. µs per tx: wall
    (what more workers shorten), CPU of this process (every thread), of its main thread
    (the node's thread: with processes, phases 1 and 3 plus the chunks it checks itself
    while the workers are busy) and of the worker processes; the share of transactions
    the workers verified; the workers' resident memory (MiB)."""
    from streams.node.intake import Verifier
    from streams.node.ledger_node import Pool

    genesis, state, values = _intake_records(records, lanes)
    pool = Pool(0)
    verifier = Verifier(workers, processes=processes)
    pids = verifier.wait_ready()
    workers_before = sum(_proc_cpu_s(pid) for pid in pids)
    queued_before = _runqueue_s("thread-self"), sum(_runqueue_s(str(p)) for p in pids)
    started, started_wall = time.process_time(), time.perf_counter()
    started_thread = time.thread_time()
    with _node_collector() as freezer:
        for first in range(0, len(values), batch):
            _intake_call(values[first:first + batch], genesis, state, pool, verifier)
            freezer.block_done()
    cpu_s, wall_s = time.process_time() - started, time.perf_counter() - started_wall
    thread_s = time.thread_time() - started_thread
    workers_s = sum(_proc_cpu_s(pid) for pid in pids) - workers_before
    thread_queued_s = _runqueue_s("thread-self") - queued_before[0]
    workers_queued_s = sum(_runqueue_s(str(p)) for p in pids) - queued_before[1]
    rss_mib = [_proc_rss_mib(pid) for pid in pids]
    by_workers, waited_s = verifier.txs_answered, verifier.answer_wait_s
    verifier.close()
    assert len(pool.verified) == len(values), "every lane payment should pre-verify"
    count = len(values)
    return {"records": float(count), "workers": float(workers),
            "cpu_us_per_tx": cpu_s / count * 1e6,
            "node_thread_cpu_us_per_tx": thread_s / count * 1e6,
            "worker_processes_cpu_us_per_tx": workers_s / count * 1e6,
            "total_cpu_us_per_tx": (cpu_s + workers_s) / count * 1e6,
            "worker_rss_mib": max(rss_mib, default=0.0),
            "share_verified_by_worker_processes": by_workers / count,
            "node_thread_wait_us_per_tx": waited_s / count * 1e6,
            # ready to run but not running (other processes on the cores): the load's share
            "node_thread_runqueue_us_per_tx": thread_queued_s / count * 1e6,
            "worker_processes_runqueue_us_per_tx": workers_queued_s / count * 1e6,
            "wall_us_per_tx": wall_s / count * 1e6}


@contextlib.contextmanager
def _node_collector() -> Iterator[BlockFreezer]:
    """The cyclic collector as a node runs it (decision 0119): what exists is frozen
    out of its view before the first call and after each (``block_done``), so a full
    collection of the bench's own records and pools does not land on one call; what
    the calls made is unfrozen again at the end."""
    gc.collect()
    gc.freeze()
    try:
        yield BlockFreezer()
    finally:
        gc.unfreeze()


def _intake_call(values: list[LogRecord], genesis: Genesis, state: LedgerState, pool: Pool,
                 verifier: Verifier) -> None:
    """One ``intake_records`` call as ``LedgerNode._intake`` makes it, into ``pool``."""
    from streams.node.intake import intake_records

    for outcome in intake_records(values, genesis=genesis, genesis_hash=genesis.hash_le,
                                  state=state, pending_outputs=pool.pending_outputs,
                                  verifier=verifier):
        assert outcome.candidate is not None and not outcome.candidate.error_code
        pool.add(outcome.candidate, 0)
        if outcome.scripts_verified:
            pool.verified.add(outcome.candidate.tx.hash_le)  # type: ignore[union-attr]


def bench_intake_paired(records: int = 5_000, *, lanes: int = 500, workers: int = 2,
                        batch: int = 500, processes: bool = False) -> dict[str, float]:
    """One verifier and ``workers`` in turn, call by call, on the same records (each
    into its own pool; which goes first alternates): both see the same load, which on
    a shared machine changes from second to second. µs wall per transaction of each,
    their ratio, and the median of the per-call ratios."""
    from streams.node.intake import Verifier
    from streams.node.ledger_node import Pool

    genesis, state, values = _intake_records(records, lanes)
    verifiers = Verifier(1), Verifier(workers, processes=processes)
    verifiers[1].wait_ready()
    pools = Pool(0), Pool(0)
    walls: tuple[list[float], list[float]] = ([], [])
    with _node_collector() as freezer:
        for call, first in enumerate(range(0, len(values), batch)):
            for side in ((0, 1) if call % 2 == 0 else (1, 0)):
                started = time.perf_counter()
                _intake_call(values[first:first + batch], genesis, state, pools[side],
                             verifiers[side])
                walls[side].append(time.perf_counter() - started)
                freezer.block_done()
    for verifier in verifiers:
        verifier.close()
    assert all(len(pool.verified) == len(values) for pool in pools)
    ratios = [one / many for one, many in zip(*walls, strict=True)]
    return {"one_wall_us_per_tx": sum(walls[0]) / len(values) * 1e6,
            "workers_wall_us_per_tx": sum(walls[1]) / len(values) * 1e6,
            "speedup": sum(walls[0]) / sum(walls[1]),
            "median_call_speedup": statistics.median(ratios)}


def _intake_records(records: int, lanes: int) -> tuple[Genesis, LedgerState, list[LogRecord]]:
    """Genesis, state and ``records`` signed TxSubmitted records of chained payments."""
    from ledger.membership import INSTITUTION_IDS
    from ledger.state import state_from_genesis
    from streams.common.genesis_files import build_genesis, seeded_entropy
    from streams.kafka import codec
    from streams.kafka.logio import LogRecord
    from streams.kafka.records import signed_tx_submitted_record
    from streams.tools.loadgen import Lanes, interleave, lane_chains

    genesis, keys = build_genesis(chain_id="bench-intake", time_ms=0,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("bench-intake"))
    genesis_hash = genesis.hash_le
    plan = Lanes("bench-intake", lanes)
    txs = list(interleave(lane_chains(plan, genesis_hash, -(-records // lanes))))[:records]
    values = [
        LogRecord(i, None, codec.encode("TxSubmitted", signed_tx_submitted_record(
            tx.serialize(), key=keys["securities-a"], genesis_hash=genesis_hash,
            submitter="securities-a", idempotency_key=str(i), now_ms=0)), 0)
        for i, tx in enumerate(txs)
    ]
    return genesis, state_from_genesis(genesis_hash, plan.allocations()), values


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runqueue_s(task: str) -> float:
    """Seconds ``/proc/TASK`` (a pid, or ``thread-self``) spent ready to run but not
    running (the second field of ``schedstat``; Linux), 0 if unknown."""
    try:
        with open(f"/proc/{task}/schedstat", encoding="ascii") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bench_verdict_ipc(records: int = 2_000, *, chunk_txs: int = 32) -> dict[str, float]:
    """What shipping to worker processes costs per transaction (decision 0122), apart
    from the pipes: pickling a chunk of shipped tuples and unpickling it, and the same
    for a chunk of verdicts; plus the worker's parse again of the raw transaction."""
    import pickle

    from streams.node.intake import shipped_transactions

    _genesis, state, values = _intake_records(records, 500)
    shipped = shipped_transactions(values, state)
    chunks = [shipped[i:i + chunk_txs] for i in range(0, len(shipped), chunk_txs)]
    verdicts = [[True] * len(chunk) for chunk in chunks]
    count = len(shipped)

    def per_tx(action: Callable[[], object]) -> float:
        started = time.perf_counter()
        action()
        return (time.perf_counter() - started) / count * 1e6

    dumped = [pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL) for c in chunks]
    dumped_verdicts = [pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) for v in verdicts]
    return {
        "shipped_bytes_per_tx": sum(map(len, dumped)) / count,
        "ship_dump_us_per_tx": per_tx(lambda: [pickle.dumps(c, protocol=5) for c in chunks]),
        "ship_load_us_per_tx": per_tx(lambda: [pickle.loads(d) for d in dumped]),
        "verdict_dump_us_per_tx": per_tx(lambda: [pickle.dumps(v, protocol=5)
                                                  for v in verdicts]),
        "verdict_load_us_per_tx": per_tx(lambda: [pickle.loads(d) for d in dumped_verdicts]),
        "reparse_us_per_tx": per_tx(lambda: [Transaction.parse(entry[1]) for entry in shipped]),
    }

"""The tx log's in-flight marker (decision 0124): a fetched batch of tx records is
marked in flight as one offset range before intake and blanked after; a range found at
start-up is handled one record at a time, each marked alone, so a record that kills the
process again is quarantined at the next start-up, and its neighbours are not; the pool
is exactly that of one batch. The crashes are real: a child process dies by
``os._exit`` while handling a chosen record (in the node's thread, or as the re-check
of a chunk whose worker process was killed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.kafka.topics import TX, VOTES
from streams.node.ledger_node import LedgerNode
from streams.node.quarantine import (
    CRASHES_BEFORE_QUARANTINE,
    MARKER_BYTES,
    Position,
    Quarantine,
    Span,
)
from tests.unit.test_intake_workers import _mixed_records, _node

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHILD_EXIT = 77  # the child's exit status when the chosen record killed it


def _pool(node: LedgerNode) -> list[tuple[object, ...]]:
    pool = node.pool
    return [(c.offset, None if c.tx is None else c.tx.hash_le, c.error_code)
            for c in pool.candidates] + [("verified", sorted(pool.verified))]


def test_a_span_marker_is_written_in_place_and_read_back(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)
    quarantine.load(0)
    quarantine.mark_span_in_flight(TX.name, 120, 140)
    text = quarantine.marker_path.read_bytes()
    assert len(text) == MARKER_BYTES
    assert json.loads(text) == {"topic": TX.name, "offset": 120, "end": 140}
    assert quarantine.in_flight_span() == Span(TX.name, 120, 140)
    assert quarantine.in_flight() == Position(TX.name, 120)
    quarantine.mark_in_flight(Position(VOTES.name, 3))  # a single record: end implied
    assert quarantine.in_flight_span() == Span(VOTES.name, 3, 4)
    quarantine.clear_in_flight()
    assert quarantine.in_flight_span() is None
    quarantine.marker_path.write_text('{"topic": "ledger.tx.v1", "offset": 5, "end": 5}')
    assert quarantine.in_flight_span() is None  # an empty span names nothing


def test_one_fetch_is_one_mark_and_one_blank(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    node = _node(tmp_path)
    writes: list[bytes] = []
    real = node.quarantine._write_marker

    def spy(data: bytes) -> None:
        writes.append(data)
        real(data)

    monkeypatch.setattr(node.quarantine, "_write_marker", spy)
    records = _mixed_records()[:20]
    node._marked_intake(records)
    assert len(writes) == 2
    assert json.loads(writes[0]) == {"topic": TX.name, "offset": 0, "end": 39}
    assert not writes[1].strip()
    node.verifier.close()


def test_a_span_found_at_start_up_is_handled_alone_then_batches_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _mixed_records()
    reference = _node(tmp_path / "reference")
    reference._marked_intake(records)
    crashed = _node(tmp_path / "node")
    crashed.quarantine.mark_span_in_flight(TX.name, 10, 30)  # ...and the process died here
    crashed.verifier.close()
    node = _node(tmp_path / "node")
    assert node.quarantine.alone == Span(TX.name, 10, 30) and not node.quarantine.positions
    marks: list[object] = []
    real_mark, real_span = node.quarantine.mark_in_flight, node.quarantine.mark_span_in_flight
    monkeypatch.setattr(node.quarantine, "mark_in_flight",
                        lambda p: (marks.append(p.offset), real_mark(p)))
    monkeypatch.setattr(node.quarantine, "mark_span_in_flight",
                        lambda t, s, e: (marks.append((s, e)), real_span(t, s, e)))
    node._marked_intake(records[:20])  # offsets 0 .. 38
    assert marks == [(0, 9), 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, (30, 39)]
    assert node.quarantine.alone is None  # passed: batches again
    marks.clear()
    node._marked_intake(records[20:])
    assert marks == [(40, records[-1].offset + 1)]
    assert _pool(node) == _pool(reference)  # exactly the pool of one batch
    assert node.quarantine.in_flight() is None
    reference.verifier.close()
    node.verifier.close()


def test_a_record_alone_in_the_span_at_the_next_crash_is_quarantined(tmp_path: Path) -> None:
    first = Quarantine(tmp_path)
    first.load(0)
    first.mark_span_in_flight(TX.name, 100, 120)  # crash 1: the whole fetch
    second = Quarantine(tmp_path)
    assert second.load(1) == [] and second.alone == Span(TX.name, 100, 120)
    second.mark_in_flight(Position(TX.name, 107))  # crash 2: that record alone
    third = Quarantine(tmp_path)
    assert third.load(2) == [Position(TX.name, 107)]
    assert third.positions == {Position(TX.name, 107)}  # not its neighbours
    assert third.alone == Span(TX.name, 100, 120)  # the rest still handled alone
    third.mark_in_flight(Position(TX.name, 112))  # another record of it crashes once
    fourth = Quarantine(tmp_path)
    assert fourth.load(3) == [] and Position(TX.name, 112) not in fourth


def test_a_kill_outside_handling_quarantines_nothing(tmp_path: Path) -> None:
    for start_up in range(CRASHES_BEFORE_QUARANTINE + 1):
        quarantine = Quarantine(tmp_path)
        assert quarantine.load(start_up) == [] and quarantine.alone is None
        quarantine.mark_span_in_flight(TX.name, 0, 20)
        quarantine.clear_in_flight()  # ...killed after the batch, between fetches
    assert not Quarantine(tmp_path).positions


def test_a_span_crashing_twice_quarantines_nothing(tmp_path: Path) -> None:
    """Two kills -9 during batches of the same range: no single record is to blame."""
    for start_up in range(3):
        quarantine = Quarantine(tmp_path)
        assert quarantine.load(start_up) == []
        quarantine.mark_span_in_flight(TX.name, 50, 70)
    assert not Quarantine(tmp_path).positions


CHILD = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
import streams.node.intake as intake
from streams.kafka.topics import TX
from tests.unit.test_intake_workers import _mixed_records, _node

node_dir, deadly, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if mode == "thread":  # the record kills the process while the node decodes it
    real_decode = intake._decode
    def decode(record):
        if record.offset == deadly:
            os._exit(CHILD_EXIT)
        return real_decode(record)
    intake._decode = decode
else:  # its chunk's worker process is killed; the node re-checks it and dies on it
    real_send, real_check = intake._WorkerProcesses.send, intake._check
    def send(self, views_key, views_blob, shipped):
        if not any(entry[0] == deadly for entry in shipped):
            return real_send(self, views_key, views_blob, shipped)
        workers = list(self._workers)
        for worker in workers:  # none may answer before it dies
            os.kill(worker.process.pid, signal.SIGSTOP)
        number = real_send(self, views_key, views_blob, shipped)
        for worker in workers:
            if number >= 0 and self._owner[number] is worker:
                worker.process.kill()
            else:
                os.kill(worker.process.pid, signal.SIGCONT)
        return number
    def check(views, genesis_hash, item):
        if isinstance(item, intake._Decoded) and item.offset == deadly:
            os._exit(CHILD_EXIT)
        return real_check(views, genesis_hash, item)
    intake._WorkerProcesses.send, intake._check = send, check
node = _node(node_dir, workers=1 if mode == "thread" else 3)
if mode == "workers":
    node.verifier.close()
    node.verifier = intake.Verifier(3, processes=True)
    node.verifier.wait_ready()
records = _mixed_records()
asyncio.run(node._handle(TX.name, records))
node.verifier.close()
pool = node.pool
print(json.dumps([[c.offset, c.error_code] for c in pool.candidates]))
""".replace("CHILD_EXIT", str(CHILD_EXIT))


def _start(node_dir: Path, deadly: int, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(node_dir), str(deadly), mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("mode", ["thread", "workers"])
def test_a_tx_record_that_kills_the_process_is_quarantined_alone(
        tmp_path: Path, mode: str) -> None:
    """Start-up 1 dies with the fetch's range marked; start-up 2 handles the range
    record by record and dies on the record alone; start-up 3 quarantines exactly it
    and pools every other record as one batch would."""
    deadly = 24
    results = [_start(tmp_path, deadly, mode) for _ in range(CRASHES_BEFORE_QUARANTINE)]
    assert [r.returncode for r in results] == [CHILD_EXIT] * CRASHES_BEFORE_QUARANTINE, \
        [r.stderr[-2000:] for r in results]
    if mode == "workers":  # the first death was the node re-checking the lost chunk
        assert "verify worker process lost" in results[0].stderr
    survivor = _start(tmp_path, deadly, mode)
    assert survivor.returncode == 0, survivor.stderr[-2000:]
    pool = json.loads(survivor.stdout.splitlines()[-1])
    assert [offset for offset, code in pool if code == "record-quarantined"] == [deadly]
    assert [offset for offset, _ in pool] == [r.offset for r in _mixed_records()]
    (path,) = tmp_path.rglob("quarantine.jsonl")
    quarantined = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(q["topic"], q["offset"]) for q in quarantined] == [(TX.name, deadly)]


def test_a_count_written_by_the_previous_version_still_counts(tmp_path: Path) -> None:
    """A node upgraded between two crashes on one vote: the old suspects file's count."""
    (tmp_path / "crash-suspects.json").write_text('{"ledger.votes.v1@9": 1}')
    Quarantine(tmp_path).mark_in_flight(Position(VOTES.name, 9))
    assert Quarantine(tmp_path).load(0) == [Position(VOTES.name, 9)]

"""Per-record isolation in the node shell: an exception while handling one record is
caught, recorded as evidence and quarantined on disk; a quarantined record is skipped
after a restart; a record in flight at two crashes in a row is quarantined.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.kafka.logio import LogRecord
from streams.kafka.topics import TX, VOTES
from streams.node.ledger_node import LedgerNode, NodeSettings
from streams.node.quarantine import CRASHES_BEFORE_QUARANTINE, Position, Quarantine
from tests.unit.test_block import KEYS, make_genesis

pytestmark = pytest.mark.unit


def _node(tmp_path: Path) -> LedgerNode:
    me = INSTITUTION_IDS[0]
    settings = NodeSettings(me, make_genesis(), KEYS[me], "127.0.0.1:1", tmp_path)
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    node.quarantine.load(0)
    return node


def _evidence(node: LedgerNode) -> list[dict[str, object]]:
    if not node.evidence_path.exists():
        return []
    return [json.loads(line) for line in node.evidence_path.read_text().splitlines()]


async def test_a_record_that_raises_is_quarantined_and_the_node_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = _node(tmp_path)
    handled: list[int] = []

    async def handler(record: LogRecord) -> None:
        handled.append(record.offset)
        if record.offset == 7:
            raise RuntimeError("a bug one record reaches")

    monkeypatch.setattr(node, "_on_vote_record", handler)
    records = [LogRecord(offset, None, b"", 0) for offset in (6, 7, 8)]
    await node._handle(VOTES.name, records)
    assert handled == [6, 7, 8]  # the records after the bad one were still handled
    assert [e["kind"] for e in _evidence(node)] == ["record-handling-failed"]
    assert "ledger.votes.v1 offset 7" in str(_evidence(node)[0]["detail"])
    assert node.quarantine.in_flight() is None  # blanked after the batch

    restarted = _node(tmp_path)
    monkeypatch.setattr(restarted, "_on_vote_record", handler)
    handled.clear()
    await restarted._handle(VOTES.name, records)
    assert handled == [6, 8]  # the quarantined record is skipped after a restart


async def test_a_tx_record_whose_intake_raises_stays_in_the_pool_as_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = _node(tmp_path)

    def explode(record: LogRecord) -> None:
        raise MemoryError("parsing blew up")

    monkeypatch.setattr("streams.node.intake._decode", explode)
    node._intake([LogRecord(0, None, b"x", 0)])
    assert node.pool.end_offset == 1
    assert node.pool.candidates[0].error_code == "record-quarantined"
    assert Position(TX.name, 0) in node.quarantine


def test_a_record_in_flight_at_two_crashes_in_a_row_is_quarantined(tmp_path: Path) -> None:
    position = Position(VOTES.name, 41)
    for start_up in range(CRASHES_BEFORE_QUARANTINE):
        quarantine = Quarantine(tmp_path)
        assert quarantine.load(start_up) == []
        quarantine.mark_in_flight(position)  # ...and the process dies here
    quarantine = Quarantine(tmp_path)
    assert quarantine.load(99) == [position]
    assert position in quarantine
    again = Quarantine(tmp_path)
    assert again.load(100) == [] and position in again  # remembered, not re-counted


def test_one_crash_alone_quarantines_nothing(tmp_path: Path) -> None:
    first = Quarantine(tmp_path)
    first.load(0)
    first.mark_in_flight(Position(VOTES.name, 3))
    second = Quarantine(tmp_path)
    assert second.load(1) == []
    second.mark_in_flight(Position(VOTES.name, 4))  # a different record at the next crash
    third = Quarantine(tmp_path)
    assert third.load(2) == [] and not third.positions


def test_a_torn_quarantine_line_is_ignored(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)
    quarantine.load(0)
    quarantine.add(Position(VOTES.name, 1), "reason", 0)
    with open(quarantine.path, "a") as handle:
        handle.write('{"topic": "ledger.votes.v1", "off')
    again = Quarantine(tmp_path)
    again.load(0)
    assert again.positions == {Position(VOTES.name, 1)}


def test_the_evidence_file_is_rotated_at_its_bound(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streams.node.ledger_node.EVIDENCE_FILE_BYTES_MAX", 300)
    node = _node(tmp_path)
    for index in range(20):
        node._record_evidence("record-text", "unknown", f"record {index} " + "x" * 50)
    rotated = node.evidence_path.with_name("evidence.jsonl.1")
    assert node.evidence_path.stat().st_size < 300 + 200 and rotated.exists()
    assert '"record 19 ' in node.evidence_path.read_text()
    assert not list(tmp_path.rglob("evidence.jsonl.2"))


def test_the_marker_is_one_file_overwritten_in_place_and_blanked(tmp_path: Path) -> None:
    """Decision 0117: no file created and unlinked per record. A longer marker after a
    shorter one, then a shorter one, reads back whole; blanking leaves no position; a
    crash after a blank counts nothing at the next start-up."""
    quarantine = Quarantine(tmp_path)
    quarantine.load(0)
    quarantine.mark_in_flight(Position(VOTES.name, 123_456_789))
    inode = quarantine.marker_path.stat().st_ino
    quarantine.mark_in_flight(Position(VOTES.name, 5))
    assert quarantine.in_flight() == Position(VOTES.name, 5)
    assert quarantine.marker_path.stat().st_ino == inode  # the same file, rewritten
    quarantine.clear_in_flight()
    assert quarantine.in_flight() is None and quarantine.marker_path.exists()
    restarted = Quarantine(tmp_path)
    assert restarted.load(1) == [] and not restarted.suspects_path.exists()


def test_a_marker_left_by_the_previous_version_still_counts(tmp_path: Path) -> None:
    """A node upgraded after a crash finds the old marker (plain JSON, no padding)."""
    position = Position(VOTES.name, 9)
    for start_up in range(CRASHES_BEFORE_QUARANTINE - 1):
        assert Quarantine(tmp_path).load(start_up) == []
        (tmp_path / "in-flight.json").write_text('{"topic": "ledger.votes.v1", "offset": 9}')
    assert Quarantine(tmp_path).load(0) == []
    Quarantine(tmp_path).mark_in_flight(position)
    assert Quarantine(tmp_path).load(1) == [position]


def test_a_torn_or_foreign_marker_names_nothing(tmp_path: Path) -> None:
    (tmp_path / "in-flight.json").write_bytes(b'{"topic": "ledger.vo' + b"\0" * 40)
    quarantine = Quarantine(tmp_path)
    assert quarantine.in_flight() is None
    assert quarantine.load(0) == [] and not quarantine.marker_path.exists()

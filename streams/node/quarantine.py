"""The log records one node refuses to handle again: its quarantine, kept on disk.

Owns: ``Quarantine`` — the positions (topic name, offset) of records whose handling
raised an unexpected exception in this node (``quarantine.jsonl``, one JSON object a
line: topic, offset, reason, at_ms), and the in-flight marker (``in-flight.json``)
written before each consensus record is handled, and before each fetched batch of
tx-log records (its offset range, decision 0124), and blanked after its batch. A process that
dies while handling a record (a crash the per-record ``except`` cannot catch: a
segfault in a C extension, ``os._exit``, the OOM killer) leaves the marker behind;
when the same record is found in flight at ``CRASHES_BEFORE_QUARANTINE`` start-ups
in a row, it is quarantined, so one record can never crash-loop a node. A range found
in flight counts for each record in it, and the node handles that range one record
at a time, each marked alone (``alone``), so the record that crashes again is the one
quarantined, not its neighbours (docs/decisions/0124). Why two and
not one: a ``kill -9`` at an unlucky moment must not make an honest vote disappear
from this node's count (docs/decisions/0050-no-record-stops-the-ledger.md).

Touches: ``<node_dir>/quarantine.jsonl``, ``<node_dir>/in-flight.json``,
``<node_dir>/crash-suspects.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("capledger.node")

CRASHES_BEFORE_QUARANTINE = 2
# A node that quarantines this many records has a bug or is under attack; it stops
# remembering new ones (and says so) rather than growing without bound.
QUARANTINE_ENTRIES_MAX = 100_000
REASON_CHARS_MAX = 500
# The marker is written padded to this width (and blanked with as many spaces), so a
# shorter marker always overwrites a longer one whole.
MARKER_BYTES = 256


@dataclass(frozen=True, slots=True)
class Position:
    topic: str  # the topic's name without the chain's prefix (e.g. "ledger.votes.v1")
    offset: int


@dataclass(frozen=True, slots=True)
class Span:
    """Offsets ``start`` .. ``end - 1`` of one topic: what a marker names."""

    topic: str
    start: int
    end: int  # exclusive; ``start + 1`` for one record

    def __contains__(self, other: Span) -> bool:
        return (other.topic == self.topic and self.start <= other.start
                and other.end <= self.end)


class Quarantine:
    """Quarantined positions of one node, loaded at start-up, appended as it runs."""

    def __init__(self, node_dir: Path) -> None:
        self.path = node_dir / "quarantine.jsonl"
        self.marker_path = node_dir / "in-flight.json"
        self.suspects_path = node_dir / "crash-suspects.json"
        self.positions: set[Position] = set()
        self.full_warned = False
        self.marker_warned = False
        self._marker_fd: int | None = None
        self._marked = False  # a marker is written and not yet blanked
        self._marker_width = MARKER_BYTES  # the longest written (all of it is blanked)
        # The span found in flight at start-up: its records are handled one at a time.
        self.alone: Span | None = None

    def load(self, now_ms: int) -> list[Position]:
        """Read the quarantine and settle a marker left by a crash; the positions
        quarantined because of that crash (empty or one)."""
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                    self.positions.add(Position(str(item["topic"]), int(item["offset"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash: the record is re-handled
        return self._settle_marker(now_ms)

    def _settle_marker(self, now_ms: int) -> list[Position]:
        """Count the marker found (a crash); a single record counted at
        ``CRASHES_BEFORE_QUARANTINE`` start-ups in a row is quarantined. A span counts
        for every record in it: a record marked alone inside the span found at the
        previous start-up is a crash in a row. Sets ``alone``: the span this start-up
        handles one record at a time."""
        span = self.in_flight_span()
        if span is None:
            self.marker_path.unlink(missing_ok=True)
            return []
        previous, count = self._read_suspect()
        outer = previous if previous is not None and span in previous else span
        count = count + 1 if previous is not None and span in previous else 1
        quarantined: list[Position] = []
        if count >= CRASHES_BEFORE_QUARANTINE and span.end == span.start + 1:
            position = Position(span.topic, span.start)
            self.add(position, f"the node died while handling it at {count} "
                               "start-ups in a row", now_ms)
            quarantined.append(position)
            count = 0  # the span's other records start again from nothing
        self.alone = outer
        self.suspects_path.write_text(json.dumps(
            {"topic": outer.topic, "offset": outer.start, "end": outer.end, "count": count}),
            encoding="utf-8")
        self.marker_path.unlink(missing_ok=True)
        return quarantined

    def _read_suspect(self) -> tuple[Span | None, int]:
        """The span counted at the previous start-up and its count (also the format
        before 0124: ``{"topic@offset": count}``)."""
        try:
            item = json.loads(self.suspects_path.read_text(encoding="utf-8"))
            if "count" in item:
                span = Span(str(item["topic"]), int(item["offset"]), int(item["end"]))
                return (span if span.start < span.end else None), int(item["count"])
            for key, value in item.items():
                topic, _, offset = str(key).rpartition("@")
                return Span(topic, int(offset), int(offset) + 1), int(value)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None, 0

    def __contains__(self, position: Position) -> bool:
        return position in self.positions

    def add(self, position: Position, reason: str, now_ms: int) -> None:
        if position in self.positions:
            return
        if len(self.positions) >= QUARANTINE_ENTRIES_MAX:
            if not self.full_warned:
                self.full_warned = True
                logger.error("quarantine full (%d entries): not recording %s@%d",
                          QUARANTINE_ENTRIES_MAX, position.topic, position.offset)
            return
        self.positions.add(position)
        line = json.dumps({"topic": position.topic, "offset": position.offset,
                           "reason": reason[:REASON_CHARS_MAX], "at_ms": now_ms})
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:  # kept in memory: skipped until the next restart
            logger.error("quarantine entry %s@%d not written to %s: %s", position.topic,
                         position.offset, self.path, error.strerror)

    def in_flight(self) -> Position | None:
        """The first position the marker names (None when there is none, it is blank
        or it is unreadable: a torn write after a machine crash names nothing)."""
        span = self.in_flight_span()
        return None if span is None else Position(span.topic, span.start)

    def in_flight_span(self) -> Span | None:
        """The offsets the marker names: one record, or a tx-log fetch's range."""
        try:
            text = self.marker_path.read_text(encoding="utf-8").strip()
            if not text:
                return None
            item = json.loads(text)
            start = int(item["offset"])
            end = int(item.get("end", start + 1))
            return Span(str(item["topic"]), start, end) if start < end else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def mark_in_flight(self, position: Position) -> None:
        """Before handling a record (page cache only: survives a process crash). One
        ``pwrite`` into the marker file kept open. On a full disk the marker is
        skipped (logged once): it guards against crash loops, and the node must go on
        without it rather than stop."""
        marker = json.dumps({"topic": position.topic, "offset": position.offset})
        data = marker.encode("utf-8").ljust(MARKER_BYTES)
        self._marker_width = max(self._marker_width, len(data))
        self._write_marker(data)
        self._marked = True

    def mark_span_in_flight(self, topic: str, start: int, end: int) -> None:
        """Before handling the records at ``start`` .. ``end - 1`` as one batch (a tx
        fetch): one ``pwrite`` for all of them (decision 0124)."""
        marker = json.dumps({"topic": topic, "offset": start, "end": end})
        data = marker.encode("utf-8").ljust(MARKER_BYTES)
        self._marker_width = max(self._marker_width, len(data))
        self._write_marker(data)
        self._marked = True

    def alone_passed(self, end: int) -> None:
        """Records up to ``end - 1`` of the span found at start-up were handled: past
        its end, batches again."""
        if self.alone is not None and end >= self.alone.end:
            self.alone = None

    def clear_in_flight(self) -> None:
        """After a batch: the marker blanked in place (nothing to do if none is set)."""
        if self._marked:
            self._write_marker(b" " * self._marker_width)
            self._marked = False

    def _write_marker(self, data: bytes) -> None:
        try:
            if self._marker_fd is None:
                self._marker_fd = os.open(self.marker_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(self._marker_fd, data, 0)
        except OSError as error:
            if not self.marker_warned:
                self.marker_warned = True
                logger.error("crash marker %s not written: %s", self.marker_path,
                             error.strerror)

    def close(self) -> None:
        if self._marker_fd is not None:
            os.close(self._marker_fd)
            self._marker_fd = None

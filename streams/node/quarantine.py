"""The log records one node refuses to handle again: its quarantine, kept on disk.

Owns: ``Quarantine`` — the positions (topic name, offset) of records whose handling
raised an unexpected exception in this node (``quarantine.jsonl``, one JSON object a
line: topic, offset, reason, at_ms), and the in-flight marker (``in-flight.json``)
written before each consensus record is handled and blanked after its batch. A process that
dies while handling a record (a crash the per-record ``except`` cannot catch: a
segfault in a C extension, ``os._exit``, the OOM killer) leaves the marker behind;
when the same record is found in flight at ``CRASHES_BEFORE_QUARANTINE`` start-ups
in a row, it is quarantined, so one record can never crash-loop a node. Why two and
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
        position = self.in_flight()
        if position is None:
            self.marker_path.unlink(missing_ok=True)
            return []
        suspects: dict[str, int] = {}
        if self.suspects_path.exists():
            try:
                suspects = {str(k): int(v) for k, v in
                            json.loads(self.suspects_path.read_text(encoding="utf-8")).items()}
            except (ValueError, TypeError, AttributeError):
                suspects = {}
        key = f"{position.topic}@{position.offset}"
        suspects = {key: suspects.get(key, 0) + 1}  # only a crash-in-a-row counts
        quarantined: list[Position] = []
        if suspects[key] >= CRASHES_BEFORE_QUARANTINE:
            self.add(position, f"the node died while handling it at {suspects[key]} "
                               "start-ups in a row", now_ms)
            quarantined.append(position)
            suspects = {}
        self.suspects_path.write_text(json.dumps(suspects), encoding="utf-8")
        self.marker_path.unlink(missing_ok=True)
        return quarantined

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
        """The position the marker names (None when there is none, it is blank or
        it is unreadable: a torn write after a machine crash names nothing)."""
        try:
            text = self.marker_path.read_text(encoding="utf-8").strip()
            if not text:
                return None
            item = json.loads(text)
            return Position(str(item["topic"]), int(item["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
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

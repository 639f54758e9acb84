"""Each institution's own durable copy of the chain: one append-only file.

Owns: the file format and its I/O. A record is ``[u32 length][u32 crc32][payload]``
(little-endian), the payload being the Avro-encoded ``BlockCommitted`` event (block +
quorum certificate + log offsets). ``append`` writes and fsyncs before returning, so a
block a node has acknowledged as committed survives ``kill -9``; a write refused for
lack of space is cut back whole. ``load`` reads
records in order and stops at the first one that does not check (torn write,
flipped bit, a block that fails the caller's verification): that record and
everything after it are moved aside as evidence and cut off, and the node heals
from the Kafka log. Why a file and not PostgreSQL: docs/decisions/0031-chain-copy-storage.md.

"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

RECORD_HEADER = struct.Struct("<II")
RECORD_BYTES_MAX = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Damage:
    """What ``load`` cut off: where, why, and where the evidence was kept."""

    offset: int
    record_index: int
    reason: str
    evidence_path: Path | None


class ChainStore:
    """Append-only, fsynced record file. Not thread-safe; one writer per file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - held for the node's lifetime
        # Where the next record goes, and the last record written or loaded: what a
        # state snapshot names as its anchor (streams/node/snapshots.py).
        self.end_offset = self._file.tell()
        self.last_payload: bytes | None = None

    def close(self) -> None:
        self._file.close()

    def append(self, payload: bytes) -> None:
        """Write one record and fsync it, or leave the file as it was and raise: a
        write refused half-way (ENOSPC on a full filesystem, EFBIG past a file-size
        limit) is cut back to the previous record's end, so a full disk never leaves
        a torn record behind (the caller retries when there is room)."""
        assert 0 < len(payload) <= RECORD_BYTES_MAX
        record = memoryview(RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        fd = self._file.fileno()
        size_before = os.fstat(fd).st_size
        try:
            while record:
                record = record[os.write(fd, record):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size_before)
            with contextlib.suppress(OSError):
                os.fsync(fd)
            raise
        self.end_offset += RECORD_HEADER.size + len(payload)
        self.last_payload = payload

    def read_record_before(self, end: int, length: int) -> bytes | None:
        """The payload of the record of ``length`` bytes ending at byte ``end``, if the
        file holds one there whose checksum matches; else None."""
        start = end - RECORD_HEADER.size - length
        if start < 0 or end > self.path.stat().st_size:
            return None
        with open(self.path, "rb") as source:
            source.seek(start)
            raw = source.read(RECORD_HEADER.size + length)
        stored_length, crc = RECORD_HEADER.unpack(raw[: RECORD_HEADER.size])
        payload = raw[RECORD_HEADER.size :]
        if stored_length != length or zlib.crc32(payload) != crc:
            return None
        return payload

    def load(
        self, verify: Callable[[int, bytes], None], *, start: int = 0
    ) -> tuple[list[bytes], Damage | None]:
        """All payloads from byte ``start`` on that check, in order, and what was cut
        off (if anything). ``start`` is 0 or the end of a record (a snapshot's anchor).

        ``verify(index, payload)`` raises any exception to reject a record; the
        record and the rest of the file are then moved to an evidence file and the
        chain file is truncated to the last good record. ``index`` counts from ``start``.
        """
        payloads: list[bytes] = []
        damage: Damage | None = None
        good_end = start
        for index, (offset, payload, problem) in enumerate(_scan(self.path, start)):
            if problem is None:
                assert payload is not None
                try:
                    verify(index, payload)
                except Exception as error:  # any rejection: the record is not trusted
                    problem = f"{type(error).__name__}: {error}"
            if problem is not None:
                damage = Damage(offset, index, problem, self._cut(offset))
                break
            assert payload is not None
            payloads.append(payload)
            good_end = offset + RECORD_HEADER.size + len(payload)
        if damage is None and self.path.exists() and self.path.stat().st_size != good_end:
            damage = Damage(good_end, len(payloads), "trailing bytes", self._cut(good_end))
        self.end_offset = good_end
        if payloads:
            self.last_payload = payloads[-1]
        return payloads, damage

    def _cut(self, offset: int) -> Path | None:
        size = self.path.stat().st_size
        if offset >= size:
            return None
        evidence = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
        with open(self.path, "rb") as source:
            source.seek(offset)
            evidence.write_bytes(source.read())
        self._file.close()
        with open(self.path, "r+b") as target:
            target.truncate(offset)
            target.flush()
            os.fsync(target.fileno())
        self._file = open(self.path, "ab")  # noqa: SIM115
        return evidence


def _scan(path: Path, start: int = 0) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(offset, payload, problem) per record from byte ``start``; stops after the first
    problem."""
    if not path.exists():
        return
    with open(path, "rb") as source:
        source.seek(start)
        offset = start
        while True:
            header = source.read(RECORD_HEADER.size)
            if not header:
                return
            if len(header) < RECORD_HEADER.size:
                yield offset, None, "truncated record header"
                return
            length, crc = RECORD_HEADER.unpack(header)
            if not 0 < length <= RECORD_BYTES_MAX:
                yield offset, None, f"record length {length} out of range"
                return
            payload = source.read(length)
            if len(payload) < length:
                yield offset, None, "truncated record payload"
                return
            if zlib.crc32(payload) != crc:
                yield offset, None, "record checksum mismatch"
                return
            yield offset, payload, None
            offset += RECORD_HEADER.size + length

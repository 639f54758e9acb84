"""The rejection records of the block being committed, kept on disk until the brokers
acknowledged them (decision 0129).

Owns: ``write_pending``, ``read_pending``, ``clear_pending`` of one file in a node's
directory. The node writes the encoded ``TxRejected`` records of a block before it
appends the block to its chain copy and removes the file once they are acknowledged;
a node that died in between finds the file at start-up and publishes the same bytes
again (``LedgerNode.republish_rejections``): readers keep one row per record or the
first outcome per transaction, so a second copy is harmless.

The file is replaced atomically and durably: written beside it, its data synced
(``fdatasync``), renamed, and the directory synced, all before the block is appended to
the chain copy, so a chain copy that holds the block after a power loss also has the
file. It costs one data sync and one directory sync per block that has rejections
(none for a block without).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import ValidationError
from streams.common.durable import fsync_directory

FILE_NAME = "rejections-pending.bin"
MAGIC = b"CLRJ1\n"
HASH_BYTES = 32
RECORDS_MAX = 200_000  # a block range's records at most (the pool's bound is lower)
RECORD_BYTES_MAX = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PendingRejections:
    height: int
    block_hash: bytes
    payloads: tuple[bytes, ...]


def pending_path(node_dir: Path) -> Path:
    return node_dir / FILE_NAME


def write_pending(path: Path, pending: PendingRejections) -> None:
    """Replace the file with ``pending``, durably (see the module's note)."""
    parts = [MAGIC, struct.pack("<Q", pending.height), pending.block_hash,
             struct.pack("<I", len(pending.payloads))]
    for payload in pending.payloads:
        parts.append(struct.pack("<I", len(payload)))
        parts.append(payload)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(b"".join(parts))
        file.flush()
        os.fdatasync(file.fileno())
    os.replace(partial, path)
    fsync_directory(path.parent)


def read_pending(path: Path) -> PendingRejections | None:
    """The file's contents, None when there is none. A file that does not parse (it is
    read as hostile like any input) raises ``ValidationError`` code
    ``rejections-pending-malformed``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    head = len(MAGIC) + 8 + HASH_BYTES + 4
    if len(raw) < head or raw[:len(MAGIC)] != MAGIC:
        raise _malformed(f"{len(raw)} bytes without the header")
    (height,) = struct.unpack_from("<Q", raw, len(MAGIC))
    block_hash = raw[len(MAGIC) + 8:len(MAGIC) + 8 + HASH_BYTES]
    (count,) = struct.unpack_from("<I", raw, head - 4)
    if count > RECORDS_MAX:
        raise _malformed(f"{count} records, over {RECORDS_MAX}")
    payloads, at = [], head
    for _ in range(count):
        if at + 4 > len(raw):
            raise _malformed("cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        if size > RECORD_BYTES_MAX or at + 4 + size > len(raw):
            raise _malformed(f"a record of {size} bytes at byte {at}")
        payloads.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    if at != len(raw):
        raise _malformed(f"{len(raw) - at} bytes after the last record")
    return PendingRejections(height, block_hash, tuple(payloads))


def clear_pending(path: Path) -> None:
    path.unlink(missing_ok=True)


def _malformed(detail: str) -> ValidationError:
    return ValidationError(f"pending rejections file: {detail}",
                           code="rejections-pending-malformed")

"""A node's state snapshots on disk: written atomically, loaded newest first, refused
with a code when they do not check.

Owns: the directory ``<node_dir>/snapshots/`` with files ``snapshot-<height>.dat``
(format and verification: ``ledger.snapshot``). ``write_snapshot`` writes a temporary
file, fsyncs it, renames it into place and fsyncs the directory, so a crash leaves
either the old set or the new one, never a half file under a snapshot's name; it keeps
the newest ``SNAPSHOTS_KEPT``. ``load_newest`` returns the newest snapshot that
decodes, verifies (``decode_snapshot``) and passes the caller's anchor check against
the chain copy; each refused file is renamed ``*.refused-<code>`` (kept as evidence,
never tried again) and reported, and with none left the node replays its whole chain
copy. Why and what is guaranteed: docs/decisions/0101-node-snapshots.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import ValidationError
from ledger.keys import PublicKey
from ledger.membership import Genesis
from ledger.snapshot import Snapshot, SnapshotError, decode_snapshot
from streams.common.durable import fsync_directory

SNAPSHOTS_KEPT = 2
SNAPSHOT_FILE_BYTES_MAX = 64 * 1024 * 1024 * 1024
SNAPSHOT_EVERY_HEIGHTS_DEFAULT = 1_000
_NAME = re.compile(r"^snapshot-(\d{12})\.dat$")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A snapshot file that was not used, why (``snapshot-*`` code) and where it went."""

    path: Path
    code: str
    message: str


def snapshot_dir(node_dir: Path) -> Path:
    return node_dir / "snapshots"


def snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    """(height, path) of the snapshot files, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def write_snapshot(directory: Path, height: int, data: bytes) -> Path:
    """Write ``data`` as the snapshot of ``height`` atomically; prune older ones."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"snapshot-{height:012d}.dat"
    temporary = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_directory(directory)
    for _, old in snapshot_files(directory)[SNAPSHOTS_KEPT:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return final


def load_newest(
    directory: Path, genesis: Genesis, anchor: Callable[[Snapshot], None], *,
    signer_keys: tuple[PublicKey, ...] = (),
) -> tuple[Snapshot | None, list[Refusal]]:
    """The newest usable snapshot (or None) and the files refused on the way.

    ``anchor(snapshot)`` raises ``ValidationError`` when the snapshot does not fit the
    node's chain copy (``snapshot-anchor``); ``signer_keys``: keys trusted to have
    signed besides the member's genesis key (the node's own, possibly rotated, key)."""
    refusals: list[Refusal] = []
    for height, path in snapshot_files(directory):
        try:
            snapshot = _read_verified(path, genesis, signer_keys)
            if snapshot.state.height != height:
                raise SnapshotError(f"named height {height}, holds {snapshot.state.height}",
                                    code="snapshot-format")
            anchor(snapshot)
        except ValidationError as error:
            refusals.append(Refusal(_set_aside(path, error.code), error.code, error.message))
            continue
        except OSError as error:
            refusals.append(Refusal(path, "snapshot-unreadable", str(error)))
            continue
        return snapshot, refusals
    return None, refusals


def _read_verified(path: Path, genesis: Genesis,
                   signer_keys: tuple[PublicKey, ...]) -> Snapshot:
    size = path.stat().st_size
    if size > SNAPSHOT_FILE_BYTES_MAX:
        raise SnapshotError(f"{size} bytes, more than {SNAPSHOT_FILE_BYTES_MAX}",
                            code="snapshot-format")
    return decode_snapshot(path.read_bytes(), genesis, signer_keys=signer_keys)


def _set_aside(path: Path, code: str) -> Path:
    """Rename a refused snapshot so it is kept as evidence and never tried again."""
    target = path.with_name(f"{path.name}.refused-{code}")
    try:
        os.replace(path, target)
    except OSError:
        return path
    return target

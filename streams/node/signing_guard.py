"""What keeps a node's key from signing twice: a process lock and a persisted position.

Owns: :func:`hold_key_lock` — an exclusive, non-blocking ``flock`` on
``<keys dir>/<institution>.lock`` and on ``<node dir>/node.lock``, held until the
process exits (the kernel drops it even on kill -9), so a second process with the
same key or the same node directory refuses to start; and :class:`SigningGuard` —
the last (height, round) this node signed a vote for, with what it signed there,
written to ``<node dir>/signed-votes.slots`` (durably, one ``fdatasync``) *before* the
vote is signed. Across restarts the node therefore never signs an ack/nack for a
(height, round) that differs from the one it signed before, never signs an
ack/nack after its own timeout vote there, and never signs for an older position.
The consensus core stays pure; ``ledger_node`` asks :func:`permit_vote` first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ledger.errors import ValidationError
from streams.common.durable import fsync_directory

logger = logging.getLogger("capledger.signing_guard")

# Before decision 0120: one JSON file replaced atomically (tmp file, fsync, rename,
# directory fsync) at every vote. Still read when no slot holds a state.
STATE_FILENAME = "signed-votes.json"
STATE_BYTES_MAX = 4096
# Since decision 0120: two fixed slots in one file kept open; each state is written
# over the older slot and fdatasync'ed, so a write torn by a machine crash leaves the
# other slot's state (the last one whose vote may have left) whole.
SLOTS_FILENAME = "signed-votes.slots"
SLOT_BYTES = 4096
SLOT_COUNT = 2
SLOT_BLANK = b" "
VOTE_TIMEOUT = "timeout"

_held: list[IO[str]] = []  # open lock files: closing one would release its lock


class KeyLockError(ValidationError):
    code = "key-locked"


def _lock(path: Path, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process life
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read(32).strip() or "another process"
        handle.close()
        raise KeyLockError(f"{what} is in use by pid {holder} (lock {path}); two processes "
                           f"signing with one key could equivocate", code="key-locked") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held.append(handle)


def hold_key_lock(keys_dir: Path, institution: str, node_dir: Path) -> None:
    """Lock ``institution``'s key and its node directory for this process's life."""
    _lock(Path(keys_dir) / "keys" / f"{institution}.lock", f"the key of {institution}")
    _lock(Path(node_dir) / "node.lock", f"the node directory {node_dir}")


def release_locks() -> None:
    """Drop every lock this process holds (tests; a process exit does the same)."""
    while _held:
        handle = _held.pop()
        with contextlib.suppress(OSError):
            handle.close()


@dataclass(frozen=True, slots=True)
class Signed:
    """The last position signed for and what was signed there."""

    height: int
    round: int
    decision: tuple[str, str, str] | None  # (kind, block hash hex, reason) of ack/nack
    timed_out: bool

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "round": self.round,
                "decision": list(self.decision) if self.decision else None,
                "timed_out": self.timed_out}


class SigningGuard:
    """The persisted last-signed position of one node (``<node dir>/signed-votes.slots``;
    a ``signed-votes.json`` of an earlier version is read when no slot holds a state)."""

    def __init__(self, node_dir: Path) -> None:
        self.path = Path(node_dir) / STATE_FILENAME
        self.slots_path = Path(node_dir) / SLOTS_FILENAME
        self._fd: int | None = None
        self._sequence = 0  # of the newest slot written or read
        self.last = self._load()

    def _load(self) -> Signed | None:
        newest = _newest_slot(self.slots_path)
        if newest is not None:
            self._sequence, signed = newest
            return signed
        try:
            raw = self.path.read_bytes()[:STATE_BYTES_MAX + 1]
        except FileNotFoundError:
            return None
        try:
            return _signed_from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, IndexError):
            raise _damaged(self.path) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _slots_fd(self) -> int:
        """The slots file, open; created whole (both slots blank, fsynced with its
        directory) before its first state is written, so a later write only
        overwrites allocated bytes and ``fdatasync`` suffices."""
        if self._fd is not None:
            return self._fd
        self.slots_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.slots_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size < SLOT_BYTES * SLOT_COUNT:
                os.pwrite(fd, SLOT_BLANK * (SLOT_BYTES * SLOT_COUNT - size), size)
                os.fsync(fd)
                with contextlib.suppress(OSError):
                    fsync_directory(self.slots_path.parent)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def record(self, signed: Signed) -> None:
        """Persist durably before the vote is signed and sent: the state goes over the
        older slot, then ``fdatasync``. A failed write is retried by the caller into the
        same slot (the sequence moves on only once a write is durable)."""
        fd = self._slots_fd()
        sequence = self._sequence + 1
        os.pwrite(fd, _slot_bytes(sequence, signed), SLOT_BYTES * (sequence % SLOT_COUNT))
        os.fdatasync(fd)
        self._sequence = sequence
        self.last = signed
        if sequence == 1:  # the slots hold the state now: the old file is not read again
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    def check(self, height: int, round_: int, kind: str, block_hash: bytes,
              reason_code: str) -> Signed | None:
        """The new state if this vote may be signed, else None (the reason is logged)."""
        decision = None if kind == VOTE_TIMEOUT else (kind, block_hash.hex(), reason_code)
        last = self.last
        if last is None or (height, round_) > (last.height, last.round):
            return Signed(height, round_, decision, kind == VOTE_TIMEOUT)
        if (height, round_) < (last.height, last.round):
            # A late message of a round this node has left: normal, not an error.
            logger.info("refusing to sign %s at height %d round %d: already signed at height %d "
                      "round %d", kind, height, round_, last.height, last.round)
            return None
        if decision is None:
            return Signed(height, round_, last.decision, True)
        if last.timed_out and last.decision is None:
            logger.info("refusing to sign %s at height %d round %d after this node's timeout "
                      "vote there", kind, height, round_)
            return None
        if last.decision is not None and last.decision != decision:
            logger.error("refusing to sign a second, different vote at height %d round %d "
                      "(signed %s before)", height, round_, last.decision[0])
            return None
        return Signed(height, round_, decision, last.timed_out)

    def permit(self, height: int, round_: int, kind: str, block_hash: bytes,
               reason_code: str) -> bool:
        signed = self.check(height, round_, kind, block_hash, reason_code)
        if signed is None:
            return False
        if signed != self.last:
            self.record(signed)
        return True


def _signed_from_json(data: Any) -> Signed:
    decision = data["decision"]
    return Signed(int(data["height"]), int(data["round"]),
                  None if decision is None else (str(decision[0]), str(decision[1]),
                                                 str(decision[2])),
                  bool(data["timed_out"]))


def _damaged(path: Path) -> ValidationError:
    # Refusing to start is safer than forgetting what was signed.
    return ValidationError(f"{path} is damaged; it records the last vote this node "
                           f"signed. Restore it, or remove it only if certain the node "
                           f"signed nothing since", code="signing-state")


def _slot_bytes(sequence: int, signed: Signed) -> bytes:
    """One slot: the JSON state, a newline, its SHA-256 (hex), padded with blanks."""
    body = json.dumps({"sequence": sequence, **signed.to_json()},
                      separators=(",", ":")).encode("utf-8")
    data = body + b"\n" + hashlib.sha256(body).hexdigest().encode("ascii")
    assert len(data) <= SLOT_BYTES, len(data)
    return data.ljust(SLOT_BYTES, SLOT_BLANK)


def _parse_slot(data: bytes) -> tuple[int, Signed] | None:
    """A slot's (sequence, state), or None when it is blank, torn or foreign."""
    body, _, digest = data.rstrip(SLOT_BLANK).rpartition(b"\n")
    if not body or hashlib.sha256(body).hexdigest().encode("ascii") != digest:
        return None
    try:
        item = json.loads(body)
        return int(item["sequence"]), _signed_from_json(item)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _newest_slot(path: Path) -> tuple[int, Signed] | None:
    """The newest whole state in the slots file (None: no file, or no state written).
    Both slots written and neither whole is damage, not a torn write: refused."""
    try:
        raw = path.read_bytes()[:SLOT_BYTES * SLOT_COUNT]
    except FileNotFoundError:
        return None
    slots = [raw[i * SLOT_BYTES:(i + 1) * SLOT_BYTES] for i in range(SLOT_COUNT)]
    whole = [parsed for parsed in map(_parse_slot, slots) if parsed is not None]
    if whole:
        return max(whole, key=lambda item: item[0])
    if all(slot.strip(SLOT_BLANK) for slot in slots):
        raise _damaged(path)
    return None  # never written, or its first write torn (that vote never left)


_guards: dict[Path, SigningGuard] = {}


def guard_for(node_dir: Path) -> SigningGuard:
    """The one guard of this process for the node directory ``node_dir`` (a node
    looks it up once, not at every vote: resolving the path costs system calls)."""
    key = Path(node_dir).resolve()
    guard = _guards.get(key)
    if guard is None:
        guard = _guards[key] = SigningGuard(key)
    return guard


def permit_vote(node_dir: Path, height: int, round_: int, kind: str, block_hash: bytes,
                reason_code: str) -> bool:
    """Whether the node whose directory is ``node_dir`` may sign this vote (recorded
    durably when it may)."""
    return guard_for(node_dir).permit(height, round_, kind, block_hash, reason_code)

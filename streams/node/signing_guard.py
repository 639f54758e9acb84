"""What keeps a node's key from signing twice: a process lock and a persisted position.

Owns: :func:`hold_key_lock` — an exclusive, non-blocking ``flock`` on
``<keys dir>/<institution>.lock`` and on ``<node dir>/node.lock``, held until the
process exits (the kernel drops it even on kill -9), so a second process with the
same key or the same node directory refuses to start; and :class:`SigningGuard` —
the last (height, round) this node signed a vote for, with what it signed there,
written to ``<node dir>/signed-votes.json`` (atomically, fsynced) *before* the vote
is signed. Across restarts the node therefore never signs an ack/nack for a
(height, round) that differs from the one it signed before, never signs an
ack/nack after its own timeout vote there, and never signs for an older position.
The consensus core stays pure; ``ledger_node`` asks :func:`permit_vote` first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ledger.errors import ValidationError

logger = logging.getLogger("capledger.signing_guard")

STATE_FILENAME = "signed-votes.json"
STATE_BYTES_MAX = 4096
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
    """The persisted last-signed position of one node (``<node dir>/signed-votes.json``)."""

    def __init__(self, node_dir: Path) -> None:
        self.path = Path(node_dir) / STATE_FILENAME
        self.last = self._load()

    def _load(self) -> Signed | None:
        try:
            raw = self.path.read_bytes()[:STATE_BYTES_MAX + 1]
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            decision = data["decision"]
            return Signed(int(data["height"]), int(data["round"]),
                          None if decision is None else (str(decision[0]), str(decision[1]),
                                                         str(decision[2])),
                          bool(data["timed_out"]))
        except (ValueError, KeyError, TypeError, IndexError):
            # Refusing to start is safer than forgetting what was signed.
            raise ValidationError(f"{self.path} is damaged; it records the last vote this "
                                  f"node signed. Restore it, or remove it only if certain "
                                  f"the node signed nothing since", code="signing-state") from None

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

    def record(self, signed: Signed) -> None:
        """Persist durably before the vote is signed and sent."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(signed.to_json(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.last = signed

    def permit(self, height: int, round_: int, kind: str, block_hash: bytes,
               reason_code: str) -> bool:
        signed = self.check(height, round_, kind, block_hash, reason_code)
        if signed is None:
            return False
        if signed != self.last:
            self.record(signed)
        return True


_guards: dict[Path, SigningGuard] = {}


def permit_vote(node_dir: Path, height: int, round_: int, kind: str, block_hash: bytes,
                reason_code: str) -> bool:
    """Whether the node whose directory is ``node_dir`` may sign this vote (recorded
    durably when it may)."""
    key = Path(node_dir).resolve()
    guard = _guards.get(key)
    if guard is None:
        guard = _guards[key] = SigningGuard(key)
    return guard.permit(height, round_, kind, block_hash, reason_code)

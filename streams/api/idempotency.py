"""Idempotency keys for writes: the same key and body answer the same, once.

Owns: :class:`IdempotencyStore`, a bounded map (caller, key) -> the first answer,
with the request's fingerprint so a reused key with another body is refused
(``idempotency-key-reused``). Given a path (``idempotency.jsonl`` in the API's state
directory, mode 0600) every answer is appended there and read back on start, so an
API restart still answers a retried write with its first answer (decision 0081); the
file is rewritten with the newest entries once it holds twice the bound. Lines that
do not parse are skipped (the file is input like any other).

A write is *claimed* first (:meth:`IdempotencyStore.claim`): a ``pending`` line
(status 0), fsynced before anything goes to Kafka, and the write carries
:func:`nonce_for` the key. If the process dies before the answer, the retry finds the
pending entry and the route looks the nonce up in the market's log (decision 0082);
so the answer line after it need not be fsynced. A write that sends a ledger
transaction (issuance, a transfer) also records the signed transaction with its claim
(:meth:`IdempotencyStore.record_tx`, fsynced) before sending it, so the retry sends or
finds that very transaction and never builds a second one (decision 0083).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.api.problems import ApiProblem

ENTRIES_MAX = 10_000
KEY_CHARS_MAX = 128
KEY_CHARS_MIN = 8
IDEMPOTENCY_FILE = "idempotency.jsonl"
LINE_CHARS_MAX = 256 * 1024  # a stored answer larger than this is kept in memory only


PENDING_STATUS = 0  # claimed, outcome not answered yet: the log knows it


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprint: str
    status: int
    body: Any

    @property
    def pending(self) -> bool:
        return self.status == PENDING_STATUS

    @property
    def recorded_tx(self) -> tuple[str, str] | None:
        """(txid, raw hex) of the transaction a pending claim recorded before sending it;
        ``None`` when it recorded none (nothing was sent)."""
        if not self.pending or not isinstance(self.body, dict):
            return None
        txid, raw = self.body.get("txid"), self.body.get("tx")
        if isinstance(txid, str) and isinstance(raw, str):
            return txid, raw
        return None


def nonce_for(caller: str, key: str) -> str:
    """The nonce a write with this caller's Idempotency-Key carries into the market's
    log (128 bits, hex, as a fresh nonce): a retry after a restart looks it up there."""
    return hashlib.sha256(f"capital-ledger/idempotency-nonce/v1\n{caller}\n{key}".encode()
                          ).hexdigest()[:32]


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


def check_key(key: str | None, *, required: bool) -> str | None:
    if key is None:
        if required:
            raise ApiProblem(400, "idempotency-key-required",
                             "writes need an Idempotency-Key header (8..128 characters)")
        return None
    if not KEY_CHARS_MIN <= len(key) <= KEY_CHARS_MAX or not key.isprintable():
        raise ApiProblem(400, "idempotency-key-invalid",
                         f"an Idempotency-Key has {KEY_CHARS_MIN}..{KEY_CHARS_MAX} printable "
                         "characters")
    return key


@dataclass(frozen=True, slots=True)
class KeyedWrite:
    """A write's Idempotency-Key, its request's fingerprint, and what the store holds
    for them: ``None`` (first time), a pending claim, or the answer to give again."""
    key: str
    print_: str
    stored: Stored | None

    @property
    def answered(self) -> Stored | None:
        return self.stored if self.stored is not None and not self.stored.pending else None


def keyed_write(store: IdempotencyStore, caller: str, key_header: str | None,
                method: str, path: str, body: bytes) -> KeyedWrite:
    """The preamble of every keyed write: the key is required and checked, a key
    reused with another request is refused (``idempotency-key-reused``)."""
    key = check_key(key_header, required=True)
    assert key is not None
    print_ = fingerprint(method, path, body)
    return KeyedWrite(key, print_, store.lookup(caller, key, print_))


def _append_private(path: Path, text: str, *, truncate: bool = False,
                    durable: bool = True) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
    descriptor = os.open(path, flags, 0o600)
    with os.fdopen(descriptor, "a" if not truncate else "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


def _line(caller: str, key: str, stored: Stored) -> str:
    return json.dumps({"caller": caller, "key": key, "fingerprint": stored.fingerprint,
                       "status": stored.status, "body": stored.body},
                      ensure_ascii=False, separators=(",", ":")) + "\n"


def _parse(line: str) -> tuple[str, str, Stored] | None:
    if len(line) > LINE_CHARS_MAX:
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    caller, key, print_, status = (entry.get(name) for name in
                                   ("caller", "key", "fingerprint", "status"))
    if not (isinstance(caller, str) and isinstance(key, str) and isinstance(print_, str)
            and isinstance(status, int) and not isinstance(status, bool)
            and (100 <= status <= 599 or status == PENDING_STATUS)
            and KEY_CHARS_MIN <= len(key) <= KEY_CHARS_MAX):
        return None
    return caller, key, Stored(print_, status, entry.get("body"))


class IdempotencyStore:
    def __init__(self, entries_max: int = ENTRIES_MAX, *, path: Path | None = None) -> None:
        self._entries: OrderedDict[tuple[str, str], Stored] = OrderedDict()
        self._entries_max = entries_max
        self._in_flight: set[tuple[str, str]] = set()
        self._path = path
        self._lines = 0
        self._file_lock = threading.Lock()  # claims append from worker threads
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                self._lines += 1
                parsed = _parse(line)
                if parsed is not None:
                    self._put(parsed[0], parsed[1], parsed[2])

    def _put(self, caller: str, key: str, stored: Stored) -> None:
        self._entries[(caller, key)] = stored
        self._entries.move_to_end((caller, key))
        while len(self._entries) > self._entries_max:
            self._entries.popitem(last=False)

    def _persist(self, caller: str, key: str, stored: Stored, *, durable: bool = True) -> bool:
        """Append the entry; False when it is too large to keep on disk."""
        with self._file_lock:
            return self._persist_locked(caller, key, stored, durable=durable)

    def _persist_locked(self, caller: str, key: str, stored: Stored, *, durable: bool) -> bool:
        if self._path is None:
            return True
        line = _line(caller, key, stored)
        if len(line) > LINE_CHARS_MAX:
            return False
        if self._lines + 1 > 2 * self._entries_max:
            text = "".join(_line(c, k, s) for (c, k), s in list(self._entries.items()))
            temporary = self._path.with_suffix(".tmp")
            _append_private(temporary, text, truncate=True)
            os.replace(temporary, self._path)
            self._lines = len(self._entries)
            return True
        _append_private(self._path, line, durable=durable)
        self._lines += 1
        return True

    def begin(self, caller: str, key: str) -> None:
        """Claim a key for one running request; a second one with it waits its turn."""
        if (caller, key) in self._in_flight:
            raise ApiProblem(409, "idempotency-key-in-flight",
                             "a request with this Idempotency-Key is still running; retry")
        if len(self._in_flight) >= self._entries_max:
            raise ApiProblem(503, "too-many-writes", "too many writes in flight; retry")
        self._in_flight.add((caller, key))

    def end(self, caller: str, key: str) -> None:
        self._in_flight.discard((caller, key))

    def lookup(self, caller: str, key: str, print_: str) -> Stored | None:
        stored = self._entries.get((caller, key))
        if stored is None:
            return None
        if stored.fingerprint != print_:
            raise ApiProblem(422, "idempotency-key-reused",
                             "this Idempotency-Key was used for a different request")
        self._entries.move_to_end((caller, key))
        return stored

    def remember(self, caller: str, key: str, print_: str, status: int, body: Any, *,
                 durable: bool = True) -> None:
        """The answer to give again. ``durable=False`` after a :meth:`claim`: the
        pending line already on disk lets a retry find the outcome in the log."""
        stored = Stored(print_, status, body)
        self._put(caller, key, stored)
        self._persist(caller, key, stored, durable=durable)

    async def claim(self, caller: str, key: str, print_: str) -> None:
        """Record the write as pending, on disk (fsynced, in a worker thread) before the
        caller writes anything to Kafka; :meth:`begin` must hold the key."""
        stored = Stored(print_, PENDING_STATUS, None)
        self._put(caller, key, stored)
        await asyncio.to_thread(self._persist, caller, key, stored)

    async def record_tx(self, caller: str, key: str, print_: str, txid: str,
                        raw_hex: str) -> None:
        """Record the signed transaction a claimed write is about to send, on disk
        (fsynced) before it is sent: a retry after a crash sends or finds this very
        transaction (decision 0083). Refused (nothing sent) if it cannot be kept."""
        stored = Stored(print_, PENDING_STATUS, {"txid": txid, "tx": raw_hex})
        self._put(caller, key, stored)
        if not await asyncio.to_thread(self._persist, caller, key, stored):
            self._put(caller, key, Stored(print_, PENDING_STATUS, None))
            raise ApiProblem(413, "transaction-too-large",
                             "the transaction is too large to record before sending it")

"""Idempotency keys for writes: the same key and body answer the same, once.

Owns: :class:`IdempotencyStore`, a bounded in-memory map (caller, key) -> the first
answer, with the request's fingerprint so a reused key with another body is refused
(``idempotency-key-reused``). The key is also passed down to the Kafka write (the
ledger's duplicate check and the market's command keys), so a retry after an API
restart, which empties this map, still writes nothing twice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from streams.api.problems import ApiProblem

ENTRIES_MAX = 10_000
KEY_CHARS_MAX = 128
KEY_CHARS_MIN = 8


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprint: str
    status: int
    body: Any


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


class IdempotencyStore:
    def __init__(self, entries_max: int = ENTRIES_MAX) -> None:
        self._entries: OrderedDict[tuple[str, str], Stored] = OrderedDict()
        self._entries_max = entries_max
        self._in_flight: set[tuple[str, str]] = set()

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

    def remember(self, caller: str, key: str, print_: str, status: int, body: Any) -> None:
        self._entries[(caller, key)] = Stored(print_, status, body)
        self._entries.move_to_end((caller, key))
        while len(self._entries) > self._entries_max:
            self._entries.popitem(last=False)

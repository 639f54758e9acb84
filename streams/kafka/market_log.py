"""The market's logs: signed ``MarketEventRecorded`` envelopes on the ``market.*.v1``
topics, written by the market services and read by them and by the market projector.

Owns: ``envelope`` / ``open_envelope`` (encode an event signed by its writer's identity
key; decode, check size, signature and that the writer is a genesis member allowed to
write that topic), and ``read_events`` (a whole market topic, bad records skipped and
reported, never applied).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.errors import ValidationError
from ledger.keys import PrivateKey, verify_der
from ledger.market import MarketError, MarketEvent, canonical_bytes
from ledger.membership import Genesis
from streams.common.clock import now_ms as clock_now_ms
from streams.kafka import codec
from streams.kafka.logio import LogReader

PAYLOAD_BYTES_MAX = 64 * 1024
RECORD = "MarketEventRecorded"
EVENT_TAG = b"capital-ledger/market/event/v1\x00"
READ_TIMEOUT_MS = 500


@dataclass(frozen=True, slots=True)
class Recorded:
    """A checked event as read from a market topic."""

    event: MarketEvent
    stream_id: str
    writer: str
    recorded_at_ms: int
    offset: int


def _signed_digest(kind: str, stream_id: str, payload: bytes) -> bytes:
    return hashlib.sha256(EVENT_TAG + kind.encode() + b"\x00" + stream_id.encode() + b"\x00"
                          + payload).digest()


def envelope(event: MarketEvent, stream_id: str, *, writer: str, key: PrivateKey,
             now_ms: int | None = None) -> bytes:
    payload = event.payload_bytes()
    assert len(payload) <= PAYLOAD_BYTES_MAX, f"{event.kind} payload of {len(payload)} bytes"
    return codec.encode(RECORD, {
        "kind": event.kind, "stream_id": stream_id, "payload": payload, "writer": writer,
        "signer_pubkey": key.public_key.sec,
        "signature": key.sign(_signed_digest(event.kind, stream_id, payload)),
        "recorded_at": clock_now_ms() if now_ms is None else now_ms,
    })


def open_envelope(value: bytes, genesis: Genesis, writers: frozenset[str],
                  offset: int = 0) -> Recorded:
    """The event of one record; MarketError/ValidationError when it must not be applied."""
    record = codec.decode(value, expected=RECORD).record
    writer = str(record["writer"])
    member = genesis.member(writer)
    if member is None or writer not in writers:
        raise MarketError(f"{writer!r} may not write this market topic",
                          code="market-writer-not-allowed")
    pubkey = bytes(record["signer_pubkey"])
    if pubkey not in (member.public_key.compressed().sec, member.public_key.uncompressed().sec):
        raise MarketError(f"signer key is not {writer}'s", code="market-writer-key")
    payload = bytes(record["payload"])
    if len(payload) > PAYLOAD_BYTES_MAX:
        raise MarketError("payload too large", code="market-payload-too-large")
    kind, stream_id = str(record["kind"]), str(record["stream_id"])
    if not verify_der(pubkey, bytes(record["signature"]), _signed_digest(kind, stream_id,
                                                                         payload)):
        raise MarketError("event signature does not verify", code="market-bad-signature")
    try:
        data: Any = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MarketError("payload is not JSON", code="market-bad-payload") from None
    if not isinstance(data, dict) or canonical_bytes(data) != payload:
        raise MarketError("payload is not canonical JSON", code="market-bad-payload")
    recorded_at = record["recorded_at"]
    at_ms = int(recorded_at.timestamp() * 1000) if hasattr(recorded_at, "timestamp") else int(
        recorded_at)
    return Recorded(MarketEvent(kind, data), stream_id, writer, at_ms, offset)


async def read_events(bootstrap: str, topic: str, genesis: Genesis, writers: frozenset[str],
                      *, client_id: str) -> tuple[list[Recorded], list[str]]:
    """Every checked event of ``topic`` to its end as of now, and the refused ones' reasons."""
    reader = LogReader(bootstrap, topic, client_id=client_id)
    await reader.start(0)
    events: list[Recorded] = []
    refused: list[str] = []
    try:
        async for batch in reader.read_to_end(timeout_ms=READ_TIMEOUT_MS):
            for record in batch:
                try:
                    events.append(open_envelope(record.value, genesis, writers, record.offset))
                except ValidationError as error:
                    refused.append(f"{topic}@{record.offset}: {error.code}: {error}")
    finally:
        await reader.stop()
    return events, refused


def payload_of(recorded: Recorded) -> Mapping[str, Any]:
    return recorded.event.payload

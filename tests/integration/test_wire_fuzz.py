"""A bounded wire fuzzer against five real node processes.

Mutated records on every topic the nodes read (``ledger.tx.v1``, ``ledger.proposals.v1``,
``ledger.votes.v1`` while running; ``ledger.blocks.v1`` at start-up (republish scan)
and when catching up; ``ledger.status.v1`` in the peer watcher), built from real records of the
running chain: fields at the limits of their Avro types, random bytes after a valid
header, unknown fingerprints, truncated bodies, one flipped bit, oversized values.
Checks: no node exits; commits go on; every fuzzed tx-log record has a rejection with a
code on the rejected log; every proposal or vote the test itself finds undecodable
(codec + ``streams.kafka.records`` checks) has an evidence entry naming its offset at
every node; a node restarted afterwards catches up past the fuzzed logs and agrees.
Prints the seed and the count of records of each kind per topic.

Bounded for CI: ``FUZZ_RECORDS_PER_TOPIC`` records per topic (3,000 in all, ~25 s).
A longer run: ``CAPLEDGER_FUZZ_RECORDS_PER_TOPIC=5000 CAPLEDGER_FUZZ_SEED=7 pytest -s -k fuzz``
(docs/failure-tests.md).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger.errors import ValidationError
from ledger.membership import INSTITUTION_IDS
from streams.kafka import codec
from streams.kafka.logio import LogWriter
from streams.kafka.records import block_from_proposal, tx_submitted_record, vote_from_record
from streams.kafka.topics import BLOCKS, PROPOSALS, REJECTED, STATUS, TX, VOTES
from tests.integration.cluster_fixtures import ChainRun, read_log, running_chain, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

FUZZ_RECORDS_PER_TOPIC = int(os.environ.get("CAPLEDGER_FUZZ_RECORDS_PER_TOPIC", "600"))
FUZZ_SEED = int(os.environ.get("CAPLEDGER_FUZZ_SEED", str(time.time_ns() % 1_000_000)))
OVERSIZED_BYTES = 1_200_000  # over TX_BYTES_MAX, under the broker's message limit
OVERSIZED_COUNT = 2  # per topic (each is a 1.2 MB write)
DECIDE_TIMEOUT_S = 120.0
AGREE_TIMEOUT_S = 60.0
SEND_CHUNK = 200

EDGE_LONGS = (0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63), -(2**31))
EDGE_INTS = (0, -1, 1, 2**31 - 1, -(2**31))
EDGE_STRINGS = ("", "é", "거부", "a\x00b", "\x1b[2J", "koscom", "x" * 5_000)
EDGE_BYTES = (b"", b"\x00" * 31, b"\xff" * 33, b"\x00" * 32, b"\x30" * 74)
EDGE_MILLIS = (0, 1, 2**42)


def _edge_value(rng: random.Random, field_type: Any) -> Any:
    """A value at the limit of an Avro field type (None: a type this does not vary)."""
    if isinstance(field_type, dict):
        if field_type.get("logicalType") == "timestamp-millis":
            return rng.choice(EDGE_MILLIS)
        if field_type.get("type") == "enum":
            return rng.choice(field_type["symbols"])
        return None
    return {"long": lambda: rng.choice(EDGE_LONGS), "int": lambda: rng.choice(EDGE_INTS),
            "string": lambda: rng.choice(EDGE_STRINGS),
            "bytes": lambda: rng.choice(EDGE_BYTES)}.get(str(field_type), lambda: None)()


def _edge_record(rng: random.Random, name: str, template: dict[str, Any]) -> bytes:
    fields = codec.default_registry().schema(name).parsed["fields"]
    for _ in range(20):
        entry = rng.choice(fields)
        value = _edge_value(rng, entry["type"])
        if value is not None:
            return codec.encode(name, {**template, entry["name"]: value})
    return codec.encode(name, template)


def _mutations(rng: random.Random, name: str, template: dict[str, Any],
               oversized: Callable[[], bytes]) -> dict[str, Callable[[], bytes]]:
    valid = codec.encode(name, template)
    header = valid[:codec.HEADER_BYTES]

    def bit_flip() -> bytes:
        position = rng.randrange(codec.HEADER_BYTES, len(valid))
        return (valid[:position] + bytes([valid[position] ^ (1 << rng.randrange(8))])
                + valid[position + 1:])

    return {
        "edge-fields": lambda: _edge_record(rng, name, template),
        "random-body": lambda: header + rng.randbytes(rng.randrange(0, 300)),
        "unknown-fingerprint": lambda: codec.MARKER + rng.randbytes(8) + valid[10:],
        "truncated": lambda: valid[:rng.randrange(0, len(valid))],
        "bit-flip": bit_flip,
        "oversized": oversized,
        "not-avro": lambda: rng.randbytes(rng.randrange(0, 64)),
    }


async def _templates(run: ChainRun) -> dict[str, tuple[str, dict[str, Any]]]:
    """One real record per topic (the first of each), as decoded dicts."""
    templates = {}
    for topic, name in ((PROPOSALS.name, "BlockProposed"), (VOTES.name, "VoteCast"),
                        (BLOCKS.name, "BlockCommitted"), (STATUS.name, "NodeStatusReported")):
        templates[topic] = (name, (await read_log(run.bootstrap, run.topic(topic), name))[0])
    templates[TX.name] = ("TxSubmitted", tx_submitted_record(
        b"\x01\x00", submitter="fuzzer", idempotency_key="fuzz", now_ms=int(time.time() * 1000)))
    return templates


def _oversized(name: str, template: dict[str, Any]) -> Callable[[], bytes]:
    field = {"TxSubmitted": "tx", "BlockProposed": "block", "BlockCommitted": "block",
             "VoteCast": "signature", "NodeStatusReported": "head_hash"}[name]
    return lambda: codec.encode(name, {**template, field: b"\x01" * OVERSIZED_BYTES})


def _refused_at_decode(topic: str, value: bytes) -> bool:
    """What a node's decode step refuses (so it must record evidence for it)."""
    try:
        if topic == VOTES.name:
            vote_from_record(codec.decode(value, expected="VoteCast").record)
        else:
            block_from_proposal(codec.decode(value, expected="BlockProposed").record,
                                block_bytes_max=2_000_000)
    except ValidationError:
        return True
    return False


async def _send(run: ChainRun, topic: str, values: list[bytes]) -> list[int]:
    writer = LogWriter(run.bootstrap, client_id="wire-fuzzer")
    await writer.start()
    offsets: list[int] = []
    try:
        for start in range(0, len(values), SEND_CHUNK):
            chunk = values[start:start + SEND_CHUNK]
            offsets.extend(await writer.send_many(run.topic(topic), [(b"fuzz", v) for v in chunk]))
    finally:
        await writer.stop()
    return offsets


def _offsets_with_evidence(run: ChainRun, institution: str, what: str) -> set[int]:
    found = set()
    for entry in run.evidence(institution):
        detail = str(entry.get("detail", ""))
        prefix = f"{what} at offset "
        if detail.startswith(prefix):
            found.add(int(detail[len(prefix):].split(":", 1)[0]))
    return found


async def test_wire_fuzzer_against_five_real_nodes(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str,
) -> None:
    rng = random.Random(FUZZ_SEED)
    print(f"\nwire fuzzer seed {FUZZ_SEED} (replay: CAPLEDGER_FUZZ_SEED={FUZZ_SEED}), "
          f"{FUZZ_RECORDS_PER_TOPIC} records per topic")
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        first = run.next_batch(1)
        await run.submit(first)
        await run.wait_committed([tx.txid for tx in first], timeout_s=DECIDE_TIMEOUT_S)
        counts: dict[str, collections.Counter[str]] = {}
        sent: dict[str, list[tuple[int, bytes]]] = {}
        for topic, (name, template) in (await _templates(run)).items():
            kinds = _mutations(rng, name, template, _oversized(name, template))
            small = sorted(k for k in kinds if k != "oversized")
            chosen = [rng.choice(small) for _ in range(FUZZ_RECORDS_PER_TOPIC - OVERSIZED_COUNT)]
            chosen += ["oversized"] * OVERSIZED_COUNT
            values = [kinds[kind]() for kind in chosen]
            counts[topic] = collections.Counter(chosen)
            sent[topic] = list(zip(await _send(run, topic, values), values, strict=True))
        for topic, counter in counts.items():
            print(f"  {topic}: {sum(counter.values())} records: {dict(sorted(counter.items()))}")

        # Commits go on, and no node exits.
        after = run.next_batch(1)
        await run.submit(after)
        await run.wait_committed([tx.txid for tx in after], timeout_s=DECIDE_TIMEOUT_S)
        assert all(code is None for code in run.cluster.exit_codes().values()), (
            run.cluster.exit_codes())

        # Every fuzzed tx-log record has a rejection with a code.
        tx_offsets = {offset for offset, _ in sent[TX.name]}

        async def rejected_offsets() -> set[int]:
            records = await read_log(run.bootstrap, run.topic(REJECTED.name), "TxRejected")
            return {int(r["source_offset"]) for r in records if r["code"]}

        seen: set[int] = set()
        deadline = time.monotonic() + DECIDE_TIMEOUT_S
        while not tx_offsets <= seen and time.monotonic() < deadline:
            seen = await rejected_offsets()
            await asyncio.sleep(0.5)
        assert tx_offsets <= seen, f"{len(tx_offsets - seen)} fuzzed tx records not rejected"

        # Every proposal or vote refused at decode has evidence at every node.
        for topic, what in ((VOTES.name, "vote"), (PROPOSALS.name, "proposal")):
            refused = {offset for offset, value in sent[topic]
                       if _refused_at_decode(topic, value)}
            for institution in INSTITUTION_IDS:
                await wait_until(
                    lambda i=institution, w=what, r=refused:
                        r <= _offsets_with_evidence(run, i, w),
                    timeout_s=AGREE_TIMEOUT_S, what=f"{institution}: evidence for {topic}")
            print(f"  {topic}: {len(refused)} refused at decode, each with evidence at all "
                  f"{len(INSTITUTION_IDS)} nodes")

        # A restarted node replays the fuzzed logs and takes part again.
        run.cluster.stop("koscom")
        run.cluster.start("koscom")
        last = run.next_batch(1)
        await run.submit(last)
        await run.wait_committed([tx.txid for tx in last], timeout_s=DECIDE_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=AGREE_TIMEOUT_S)
        assert all(code is None for code in run.cluster.exit_codes().values())
        assert not any(e["kind"] == "record-handling-failed"
                       for i in INSTITUTION_IDS for e in run.evidence(i)), (
            "a fuzzed record reached code that raised")

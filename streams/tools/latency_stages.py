"""Where a committed transaction's time went, from a kept bench step's logs.

Owns: ``stage_samples`` (pure) and ``read_stage_inputs`` — for each transaction of the
tx log that a decided block holds, the time from its ``submitted_at`` to its record in
the log (``send``), then waiting while the previous height was still being decided
(``wait_previous_commit``), then until the decided proposal's ``proposed_at``
(``wait_cut``: the proposer's cut and its read of the range), then until the quorum-th
ack of that block (``validate_and_vote``), then until the first ``BlockCommitted`` of
the height (``commit``); ``total`` from ``submitted_at`` to that first commit (the
client's own read of it comes after). Record timestamps are the writers' clocks, all
on one machine for a bench. Decision 0111; ``capledger bench stages``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledger.block import Block
from ledger.errors import ValidationError
from streams.kafka import codec
from streams.kafka.logio import read_all
from streams.kafka.records import millis
from streams.kafka.topics import BLOCKS, PROPOSALS, TX, VOTES

TX_RECORDS = frozenset({"TxSubmitted", "TxBatchSubmitted"})
STAGES = ("send", "wait_previous_commit", "wait_cut", "validate_and_vote", "commit", "total")
QUORUM_DEFAULT = 4  # of five members


@dataclass(frozen=True, slots=True)
class HeightTimes:
    """One decided height: its proposal, its quorum of acks and its first commit."""

    proposed_ms: int
    tx_offset_start: int
    tx_offset_end: int
    quorum_ms: int
    committed_ms: int


def stage_samples(submitted: Mapping[int, tuple[int, ...]],
                  heights: Mapping[int, HeightTimes]) -> dict[str, list[int]]:
    """Milliseconds per stage, one sample per transaction found in a decided block.
    ``submitted``: tx-log offset -> (``submitted_at``, the record's log time[, the
    transactions the record holds: a batch record counts once per transaction])."""
    samples: dict[str, list[int]] = {stage: [] for stage in STAGES}
    for height, times in sorted(heights.items()):
        previous = heights.get(height - 1)
        previous_ms = previous.committed_ms if previous is not None else None
        for offset in range(times.tx_offset_start, times.tx_offset_end):
            entry = submitted.get(offset)
            if entry is None:
                continue
            submitted_ms, logged_ms = entry[0], entry[1]
            ready_ms = logged_ms if previous_ms is None else max(logged_ms, previous_ms)
            row = {"send": logged_ms - submitted_ms,
                   "wait_previous_commit": ready_ms - logged_ms,
                   "wait_cut": times.proposed_ms - ready_ms,
                   "validate_and_vote": times.quorum_ms - times.proposed_ms,
                   "commit": times.committed_ms - times.quorum_ms,
                   "total": times.committed_ms - submitted_ms}
            count = entry[2] if len(entry) > 2 else 1
            for stage, value in row.items():
                samples[stage].extend([value] * count)
    return samples


def summarize(samples: Mapping[str, list[int]]) -> dict[str, dict[str, float]]:
    """p50, p90, p99 and mean of each stage (ms)."""
    def at(ordered: list[int], share: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(share * len(ordered)))])

    figures: dict[str, dict[str, float]] = {}
    for stage, values in samples.items():
        if not values:
            continue
        ordered = sorted(values)
        figures[stage] = {"p50": at(ordered, 0.5), "p90": at(ordered, 0.9),
                          "p99": at(ordered, 0.99),
                          "mean": round(statistics.fmean(ordered), 1)}
    return figures


def _decoded(value: bytes, expected: str | frozenset[str]) -> dict[str, Any] | None:
    try:
        return codec.decode(value, expected=expected).record
    except ValidationError:
        return None  # not ours to judge here: a bad record has no stage


async def read_stage_inputs(
    bootstrap: str, prefix: str, *, quorum: int = QUORUM_DEFAULT,
) -> tuple[dict[int, tuple[int, int, int]], dict[int, HeightTimes]]:
    """The inputs of ``stage_samples`` read from the four logs under ``prefix``."""
    async def records(name: str, expected: str | frozenset[str],
                      ) -> list[tuple[int, int, dict[str, Any]]]:
        found = await read_all(bootstrap, prefix + name, client_id="capledger-stages")
        return [(r.offset, r.timestamp_ms, d) for r in found
                if (d := _decoded(r.value, expected)) is not None]

    submitted = {offset: (millis(d["submitted_at"]), logged, len(d.get("txs") or (1,)))
                 for offset, logged, d in await records(TX.name, TX_RECORDS)}
    committed: dict[int, tuple[int, bytes]] = {}
    for _, logged, d in await records(BLOCKS.name, "BlockCommitted"):
        committed.setdefault(d["height"], (logged, d["block_hash"]))
    acks: dict[int, list[int]] = {}
    for _, _, d in await records(VOTES.name, "VoteCast"):
        if d["kind"] == "ack" and committed.get(d["height"], (0, b""))[1] == d["block_hash"]:
            acks.setdefault(d["height"], []).append(millis(d["voted_at"]))
    heights: dict[int, HeightTimes] = {}
    for _, _, d in await records(PROPOSALS.name, "BlockProposed"):
        height = d["height"]
        if committed.get(height, (0, b""))[1] != d["block_hash"] or height not in acks:
            continue
        try:
            header = Block.parse(d["block"]).header
        except ValidationError:
            continue
        votes = sorted(acks[height])
        heights[height] = HeightTimes(millis(d["proposed_at"]), header.tx_offset_start,
                                      header.tx_offset_end, votes[min(quorum, len(votes)) - 1],
                                      committed[height][0])
    return submitted, heights

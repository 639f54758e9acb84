"""Node heartbeats: read them from the status log, classify each node, render the report.

Owns: the heartbeat view (``Heartbeat``), the classification of each member (OK,
BEHIND, SILENT, MISSING, DISAGREES, WRONG-CHAIN, or the condition a node reports
itself, e.g. DISK-FULL: :func:`classify`), the report as a
rich table or JSON, and :class:`StatusWatcher` (follows ``ledger.status.v1``; given the
genesis, it counts only heartbeats signed by the member they name). Used by
``capledger status``, the demo and the projector's heartbeat audit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from ledger.errors import ValidationError
from ledger.governance import (
    MembershipSchedule,
    SignedChange,
    apply_signed_change,
    membership_summary,
    schedule_from_genesis,
)
from ledger.hashing import display_hex
from ledger.membership import INSTITUTION_IDS, Genesis
from streams.common.clock import now_ms
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogRecord
from streams.kafka.records import (
    check_condition,
    check_height,
    millis,
    signed_change_from_record,
    status_from_record,
)
from streams.kafka.topics import GOVERNANCE, STATUS, admin_client

SILENT_AFTER_MS = 5_000  # heartbeats come every second (streams.node.app.STATUS_INTERVAL_S)


BEHIND_BLOCKS_MAX = 10


# Reading the compacted topic from its start is cheap (closed segments hold one
# record per institution); the active segment is bounded by this many records.
STATUS_READ_RECORDS_MAX = 200_000


READ_TIMEOUT_MS = 200


CATCH_UP_TIMEOUT_S = 15.0


ADMIN_TIMEOUT_MS = 5_000
# Announcements kept per governance sequence number while reading (each node writes
# one copy; more would be someone else's junk).
GOVERNANCE_CANDIDATES_MAX = 16


class StatusError(ValidationError):
    """The status topic cannot be read (no broker, no such topic, too slow)."""

    code = "status"


# Flags, most severe first.
DISAGREES = "DISAGREES"


WRONG_CHAIN = "WRONG-CHAIN"


SILENT = "SILENT"


MISSING = "MISSING"


BEHIND = "BEHIND"


OK = "OK"


_SEVERE = frozenset({DISAGREES, WRONG_CHAIN})


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One ``NodeStatusReported`` record, decoded."""

    institution: str
    chain_id: str
    height: int
    head_hash: bytes
    state_hash: bytes
    consumer_lag: int
    version: str
    reported_at_ms: int
    round: int = 0
    pending_txs: int = 0
    condition: str = ""  # a node's own report that it cannot work (e.g. disk-full)
    broker_outages: int = 0  # v4: the node's own view of its link to the brokers
    broker_last_outage_ms: int = 0

    @property
    def broker(self) -> str:
        """What the node said of the brokers: "ok", or its outages and the last one's
        length (a node cannot report while cut off: status shows it SILENT then)."""
        if not self.broker_outages:
            return "ok"
        return (f"{self.broker_outages} outage{'s' if self.broker_outages > 1 else ''}, "
                f"last {self.broker_last_outage_ms / 1000:.1f} s")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Heartbeat:
        return cls(
            institution=str(record["institution"]),
            chain_id=str(record["chain_id"]),
            height=int(record["height"]),
            head_hash=bytes(record["head_hash"]),
            state_hash=bytes(record["state_hash"]),
            consumer_lag=int(record["consumer_lag"]),
            version=str(record["version"]),
            reported_at_ms=millis(record["reported_at"]),
            round=int(record.get("round", 0)),
            pending_txs=int(record.get("pending_txs", 0)),
            condition=check_condition(record.get("condition", "")),
            broker_outages=int(record.get("broker_outages", 0)),
            broker_last_outage_ms=int(record.get("broker_last_outage_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class NodeView:
    """What status says about one member: its latest heartbeat and the flags raised."""

    institution: str
    heartbeat: Heartbeat | None
    flags: tuple[str, ...]
    age_ms: int | None

    @property
    def state(self) -> str:
        return self.flags[0] if self.flags else OK


@dataclass(frozen=True, slots=True)
class StatusReport:
    nodes: tuple[NodeView, ...]
    height_max: int
    now_ms: int
    # The membership in force at height_max and the changes pending after it, from
    # ledger.governance.v1 (``membership_summary``); None without a genesis.
    membership: Mapping[str, Any] | None = None

    @property
    def disagreement(self) -> bool:
        return any(flag in _SEVERE for node in self.nodes for flag in node.flags)

    @property
    def healthy(self) -> bool:
        return bool(self.nodes) and all(not node.flags for node in self.nodes)



def _disagreeing(heartbeats: Sequence[Heartbeat]) -> set[str]:
    """Institutions whose (head, state) at their height differs from the majority there.

    At each height the largest group of identical (head hash, state hash) is the
    reference; everyone else at that height disagrees. Without a unique largest group
    (a tie) there is no reference and every node at that height disagrees.
    """
    flagged: set[str] = set()
    by_height: dict[int, list[Heartbeat]] = {}
    for beat in heartbeats:
        by_height.setdefault(beat.height, []).append(beat)
    for beats in by_height.values():
        groups = Counter((beat.head_hash, beat.state_hash) for beat in beats)
        if len(groups) == 1:
            continue
        ranked = groups.most_common()
        reference = ranked[0][0] if ranked[0][1] > ranked[1][1] else None
        flagged.update(beat.institution for beat in beats
                       if (beat.head_hash, beat.state_hash) != reference)
    return flagged


def _genesis_order(institution: str) -> tuple[int, str]:
    known = INSTITUTION_IDS.index(institution) if institution in INSTITUTION_IDS else 99
    return known, institution


def classify(
    heartbeats: Mapping[str, Heartbeat],
    *,
    now_ms: int,
    members: Iterable[str] | None = None,
    chain_id: str | None = None,
    silent_after_ms: int = SILENT_AFTER_MS,
    behind_blocks_max: int = BEHIND_BLOCKS_MAX,
) -> StatusReport:
    """Flag each member: DISAGREES, WRONG-CHAIN, SILENT, MISSING, BEHIND (or none: OK).

    ``heartbeats`` maps institution to its latest report. ``members`` (genesis order)
    lists who should report; without it, whoever reported. With ``chain_id`` a report
    of another chain is WRONG-CHAIN and left out of the height comparisons. A silent
    node's last report still counts for disagreement: a fork is a fork.
    """
    assert silent_after_ms > 0 and behind_blocks_max >= 0
    names = list(members) if members is not None else []
    names += sorted(set(heartbeats) - set(names), key=_genesis_order)  # unlisted reporters
    on_chain = [beat for beat in heartbeats.values()
                if chain_id is None or beat.chain_id == chain_id]
    height_max = max((beat.height for beat in on_chain), default=0)
    disagreeing = _disagreeing(on_chain)
    views = []
    for name in names:
        beat = heartbeats.get(name)
        if beat is None:
            views.append(NodeView(name, None, (MISSING,), None))
            continue
        flags: list[str] = []
        age_ms = max(0, now_ms - beat.reported_at_ms)
        if chain_id is not None and beat.chain_id != chain_id:
            flags.append(WRONG_CHAIN)
        else:
            if name in disagreeing:
                flags.append(DISAGREES)
            if beat.condition:  # the node's own word: DISK-FULL, ...
                flags.append(beat.condition.upper())
            if height_max - beat.height > behind_blocks_max:
                flags.append(BEHIND)
        if age_ms > silent_after_ms:
            flags.insert(1 if flags and flags[0] in _SEVERE else 0, SILENT)
        views.append(NodeView(name, beat, tuple(flags), age_ms))
    return StatusReport(tuple(views), height_max, now_ms)


def _short(hash_le: bytes, chars: int = 16) -> str:
    return display_hex(hash_le)[:chars]


def report_json(report: StatusReport) -> dict[str, Any]:
    """The report as plain JSON data (hashes in display order, full length)."""
    nodes = []
    for view in report.nodes:
        beat = view.heartbeat
        item: dict[str, Any] = {"institution": view.institution, "state": view.state,
                                "flags": list(view.flags), "age_ms": view.age_ms}
        if beat is not None:
            item.update(
                chain_id=beat.chain_id, height=beat.height,
                head_hash=display_hex(beat.head_hash), state_hash=display_hex(beat.state_hash),
                consumer_lag=beat.consumer_lag, version=beat.version,
                reported_at_ms=beat.reported_at_ms, round=beat.round,
                pending_txs=beat.pending_txs, condition=beat.condition,
                broker_outages=beat.broker_outages,
                broker_last_outage_ms=beat.broker_last_outage_ms,
            )
        nodes.append(item)
    return {"now_ms": report.now_ms, "height_max": report.height_max,
            "disagreement": report.disagreement, "healthy": report.healthy, "nodes": nodes,
            "membership": None if report.membership is None else dict(report.membership)}


def membership_at(schedule: MembershipSchedule, height: int) -> dict[str, Any]:
    """What status shows of governance: the membership in force at ``height`` and the
    changes committed but not yet in force there."""
    summary = membership_summary(schedule.at(height))
    summary["sequence"] = max((i for i, e in enumerate(schedule.epochs)
                               if e.start_height <= height), default=0)
    summary["pending"] = [
        {"from_height": e.start_height, "members": [m.id for m in e.view.members],
         "quorum": e.view.params.quorum}
        for e in schedule.epochs[1:] if e.start_height > height
    ]
    return summary


def membership_line(report: StatusReport) -> str | None:
    summary = report.membership
    if summary is None:
        return None
    members = ", ".join(m["id"] for m in summary["members"])
    line = (f"membership at height {report.height_max} (change {summary['sequence']}): "
            f"{members}; quorum {summary['quorum']}, block interval "
            f"{summary['block_interval_ms']} ms, at most {summary['block_txs_max']} txs / "
            f"{summary['block_bytes_max']} bytes")
    for pending in summary["pending"]:
        line += (f"\npending from height {pending['from_height']}: "
                 f"{', '.join(pending['members'])}; quorum {pending['quorum']}")
    return line


async def read_membership(bootstrap: str, genesis: Genesis, *, topic_prefix: str = "",
                          principal: str | None = None) -> MembershipSchedule:
    """The membership schedule from the governance announcements (decision 0061). No
    writer is trusted: each change is checked as the nodes checked it (signatures of a
    majority of the membership it amends), in sequence order; anything else is skipped.
    A missing topic (a chain from before governance) is the genesis membership."""
    reader = LogReader(bootstrap, topic_prefix + GOVERNANCE.name,
                       client_id="capledger-status-governance", principal=principal)
    try:
        await reader.start(0)
        if not await reader.exists():
            return schedule_from_genesis(genesis)
        records = [record async for batch in reader.read_to_end() for record in batch]
    except Exception:  # no topic or no access: genesis is what status can vouch for
        return schedule_from_genesis(genesis)
    finally:
        with contextlib.suppress(Exception):
            await reader.stop()
    return schedule_from_announcements(genesis, records)


def schedule_from_announcements(genesis: Genesis, records: Iterable[LogRecord]
                                ) -> MembershipSchedule:
    """The schedule the ``MembershipChanged`` announcements prove, checked change by
    change in sequence order (a forged or undecodable record is skipped)."""
    schedule = schedule_from_genesis(genesis)
    found: dict[int, list[tuple[SignedChange, int]]] = {}
    for record in records:
        try:
            decoded = codec.decode(record.value, expected="MembershipChanged").record
            signed, carried = signed_change_from_record(decoded)
        except (ValidationError, KeyError, TypeError, ValueError):
            continue
        candidates = found.setdefault(signed.change.sequence, [])
        if len(candidates) < GOVERNANCE_CANDIDATES_MAX and (signed, carried) not in candidates:
            candidates.append((signed, carried))
    while candidates := found.get(schedule.sequence + 1, []):
        before = schedule.sequence
        for signed, carried in candidates:  # a forged copy cannot hide the real one
            with contextlib.suppress(ValidationError):
                schedule = apply_signed_change(schedule, signed, height=carried)
                break
        if schedule.sequence == before:
            break
    return schedule


_STYLE = {OK: "green", BEHIND: "yellow", SILENT: "red", MISSING: "red",
          DISAGREES: "bold red", WRONG_CHAIN: "bold red"}


def report_table(report: StatusReport, *, title: str | None = None) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    for column in ("institution", "state", "height", "head", "state hash", "round",
                   "pending", "lag", "age s", "version", "broker"):
        table.add_column(column, justify="right" if column in
                         ("height", "round", "pending", "lag", "age s") else "left")
    for view in report.nodes:
        state = " ".join(f"[{_STYLE.get(flag, 'red')}]{flag}[/]" for flag in view.flags) \
            or "[green]OK[/]"
        beat = view.heartbeat
        if beat is None:
            table.add_row(view.institution, state, *["-"] * 9)
            continue
        table.add_row(
            view.institution, state, str(beat.height), _short(beat.head_hash),
            _short(beat.state_hash), str(beat.round), str(beat.pending_txs),
            str(beat.consumer_lag), f"{(view.age_ms or 0) / 1000:.1f}", beat.version,
            beat.broker,
        )
    return table


class StatusWatcher:
    """The latest heartbeat per institution, read from the status topic."""

    def __init__(self, bootstrap: str, *, topic_prefix: str = "",
                 genesis: Genesis | None = None) -> None:
        """``genesis``: when given, a heartbeat counts only if signed by the member it
        names (decision 0051); refusals are counted by code in ``refused``."""
        from streams.kafka.logio import LogReader

        self.latest: dict[str, Heartbeat] = {}
        self.skipped = 0
        self.refused: dict[str, int] = {}
        self.genesis = genesis
        self.schedule = None if genesis is None else schedule_from_genesis(genesis)
        self.topic_prefix = topic_prefix
        self._has_governance = False
        self.topic = topic_prefix + STATUS.name
        self._bootstrap = bootstrap
        self._reader = LogReader(bootstrap, self.topic, client_id="capledger-status")

    async def start(self) -> None:
        await self._check_topic()
        if self.genesis is not None and self._has_governance:
            # Heartbeats are signed with the key in force at their height (0061).
            self.schedule = await read_membership(self._bootstrap, self.genesis,
                                                  topic_prefix=self.topic_prefix)
        await self._reader.start(0)
        end = await self._reader.end_offset()
        self._reader.seek(max(0, end - STATUS_READ_RECORDS_MAX))

    async def _check_topic(self) -> None:
        """Fail fast (aiokafka would retry an unknown topic for 40 s)."""
        admin = admin_client(self._bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS)
        try:
            await admin.start()
            topics = await admin.list_topics()
        except Exception as error:
            raise StatusError(f"cannot reach the Kafka broker at {self._bootstrap}: "
                              f"{type(error).__name__}: {error}", code="status-broker") from None
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        self._has_governance = self.topic_prefix + GOVERNANCE.name in topics
        if self.topic not in topics:
            raise StatusError(f"no topic {self.topic} on {self._bootstrap}: no node has run "
                              f"with this topic prefix", code="status-topic")

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._reader.stop()

    def report(self, *, now_ms: int, members: Sequence[str] | None = None,
               chain_id: str | None = None,
               behind_blocks_max: int = BEHIND_BLOCKS_MAX) -> StatusReport:
        """``classify`` the latest heartbeats; with a genesis, the members expected are
        those in force at the highest reported height, and the report shows them."""
        if self.schedule is None:
            return classify(self.latest, now_ms=now_ms, members=members, chain_id=chain_id,
                            behind_blocks_max=behind_blocks_max)
        first = classify(self.latest, now_ms=now_ms, chain_id=chain_id,
                         behind_blocks_max=behind_blocks_max)
        view = self.schedule.at(first.height_max)
        report = classify(self.latest, now_ms=now_ms, members=[m.id for m in view.members],
                          chain_id=chain_id, behind_blocks_max=behind_blocks_max)
        return dataclasses.replace(report,
                                   membership=membership_at(self.schedule, report.height_max))

    async def catch_up(self, *, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Read up to the end offset as of now (bounded in time)."""
        end = await self._reader.end_offset()
        deadline = time.monotonic() + timeout_s
        while self._reader.position < end:
            if time.monotonic() > deadline:
                raise StatusError(f"status topic {self._reader.topic}: read up to offset "
                                  f"{self._reader.position} of {end} in {timeout_s} s",
                                  code="status-timeout")
            await self.poll()

    async def poll(self, timeout_ms: int = READ_TIMEOUT_MS) -> None:
        for record in await self._reader.read(timeout_ms=timeout_ms):
            try:
                decoded = codec.decode(record.value, expected="NodeStatusReported").record
                if self.genesis is not None and self.schedule is not None:
                    view = self.schedule.at(check_height("height", decoded.get("height")))
                    status_from_record(decoded).check_signature(view, self.genesis.hash_le)
                beat = Heartbeat.from_record(decoded)
            except ValidationError as error:
                self.skipped += 1  # someone else's bad record: not ours to crash on
                self.refused[error.code] = self.refused.get(error.code, 0) + 1
                continue
            except (KeyError, TypeError, ValueError):
                self.skipped += 1
                continue
            known = self.latest.get(beat.institution)
            if known is None or beat.reported_at_ms >= known.reported_at_ms:
                self.latest[beat.institution] = beat


async def read_status(
    bootstrap: str,
    *,
    topic_prefix: str = "",
    members: Sequence[str] | None = None,
    chain_id: str | None = None,
    behind_blocks_max: int = BEHIND_BLOCKS_MAX,
    genesis: Genesis | None = None,
) -> StatusReport:
    """One report from the status topic as it stands now (with ``genesis``: signed
    heartbeats only)."""
    watcher = await _caught_up(bootstrap, topic_prefix=topic_prefix, genesis=genesis)
    return watcher.report(now_ms=now_ms(), members=members, chain_id=chain_id,
                          behind_blocks_max=behind_blocks_max)


async def _caught_up(bootstrap: str, *, topic_prefix: str,
                     genesis: Genesis | None) -> StatusWatcher:
    watcher = StatusWatcher(bootstrap, topic_prefix=topic_prefix, genesis=genesis)
    try:
        await watcher.start()
        await watcher.catch_up()
    finally:
        await watcher.stop()
    return watcher


async def latest_heartbeats(bootstrap: str, *, topic_prefix: str = "",
                            genesis: Genesis | None = None) -> dict[str, Heartbeat]:
    """The latest heartbeat of each institution in the status topic as it stands now."""
    watcher = await _caught_up(bootstrap, topic_prefix=topic_prefix, genesis=genesis)
    return watcher.latest

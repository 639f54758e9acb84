"""The node's Prometheus metrics and readiness, kept beside the node, not in it.

Owns: ``NodeMetrics`` — one ``CollectorRegistry`` per node (never the global one, so
several nodes in one test process do not collide) with the series a supervisor and the
failure tests read (names and meaning: docs/decisions/0102), and ``node_readiness``, the
rule behind ``/readyz``. The node calls the ``on_*`` methods at the points where the
events happen (commit, nack, view change, broker contact, disk full); the gauges that
describe a state (height, pool, lags) are refreshed by ``streams.node.app`` once a
second and before each scrape.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.common.probes import Readiness

# A node is ready when it heard from the broker this recently...
BROKER_SILENT_S = 5.0
# ...and has at most this many votes-log records still to read.
READY_VOTES_LAG_MAX = 200
# Distinct code labels per counter; further codes count under "other" (a label per
# arbitrary string would let bad input grow the registry without bound).
CODE_LABELS_MAX = 64
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
FSYNC_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LOGS = ("tx", "proposals", "votes")


class NodeMetrics:
    """The series of one node (label ``institution`` on every one)."""

    def __init__(self, institution: str) -> None:
        self.institution = institution
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["institution"]
        self.height = Gauge("capledger_node_height", "Committed height", labels, registry=r)
        self.round = Gauge("capledger_node_round", "Voting round at the next height", labels,
                           registry=r)
        self.log_lag = Gauge("capledger_node_log_lag_records",
                             "Records between this node's read position and the log end",
                             ["institution", "log"], registry=r)
        self.commit_latency = Histogram(
            "capledger_node_commit_latency_seconds",
            "From this node's intake of a block's oldest transaction to its commit here",
            labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.commits = Counter("capledger_node_commits", "Blocks committed by this node",
                               labels, registry=r)
        self.committed_txs = Counter("capledger_node_committed_txs",
                                     "Transactions in blocks committed by this node", labels,
                                     registry=r)
        self.pool_txs = Gauge("capledger_node_pool_txs", "Undecided tx-log records held",
                              labels, registry=r)
        self.pool_bytes = Gauge("capledger_node_pool_bytes", "Bytes of the held records",
                                labels, registry=r)
        self.rejections = Counter("capledger_node_rejections",
                                  "Transactions rejected at commit, by code",
                                  ["institution", "code"], registry=r)
        self.nacks = Counter("capledger_node_nacks", "Proposals this node refused, by code",
                             ["institution", "code"], registry=r)
        self.view_changes = Counter("capledger_node_view_changes",
                                    "Rounds above 0 entered (proposer skipped)", labels,
                                    registry=r)
        self.broker_connected = Gauge(
            "capledger_node_broker_connected",
            f"1 when the broker answered within the last {BROKER_SILENT_S:.0f} s", labels,
            registry=r)
        self.broker_contact_age = Gauge("capledger_node_broker_contact_age_seconds",
                                        "Seconds since the broker last answered", labels,
                                        registry=r)
        self.fsync = Histogram("capledger_node_chain_fsync_seconds",
                               "Chain-copy append: write and fsync of one block", labels,
                               buckets=FSYNC_BUCKETS_S, registry=r)
        self.disk_full = Gauge("capledger_node_disk_full",
                               "1 while the node cannot write its state directory", labels,
                               registry=r)
        self.disk_full_events = Counter("capledger_node_disk_full_events",
                                        "Writes refused for lack of space", labels, registry=r)
        self.bodies_used = Counter(
            "capledger_node_bodies_used",
            "Blocks whose transactions came from their bodies, not the pool (where: "
            "proposal parse, commit validate_block); decision 0129", ["institution", "where"],
            registry=r)
        self.fetched_taken_ahead = Counter(
            "capledger_node_fetched_taken_ahead",
            "Proposals or certified blocks before which fetched tx records were taken in",
            labels, registry=r)
        self.clock_offset = Gauge("capledger_node_clock_offset_ms",
                                  "Configured offset of this node's clock", labels, registry=r)
        self.ready = Gauge("capledger_node_ready", "1 when /readyz answers 200", labels,
                           registry=r)
        self._codes: dict[str, set[str]] = {"rejections": set(), "nacks": set()}
        self.broker_contact_at: float | None = None  # time.monotonic()

    def _code(self, family: str, code: str) -> str:
        seen = self._codes[family]
        if code in seen or len(seen) < CODE_LABELS_MAX:
            seen.add(code)
            return code
        return "other"

    def on_commit(self, *, height: int, txs: int, latency_s: float | None,
                  fsync_s: float, rejection_codes: list[str]) -> None:
        me = self.institution
        self.height.labels(me).set(height)
        self.commits.labels(me).inc()
        self.committed_txs.labels(me).inc(txs)
        self.fsync.labels(me).observe(fsync_s)
        if latency_s is not None:
            self.commit_latency.labels(me).observe(max(0.0, latency_s))
        for code in rejection_codes:
            self.rejections.labels(me, self._code("rejections", code)).inc()

    def on_bodies_used(self, where: str) -> None:
        self.bodies_used.labels(self.institution, where).inc()

    def on_fetched_taken_ahead(self) -> None:
        self.fetched_taken_ahead.labels(self.institution).inc()

    def on_nack(self, code: str) -> None:
        self.nacks.labels(self.institution, self._code("nacks", code)).inc()

    def on_view_change(self) -> None:
        self.view_changes.labels(self.institution).inc()

    def on_broker_contact(self) -> None:
        self.broker_contact_at = time.monotonic()

    def on_disk_full(self, full: bool) -> None:
        if full:
            self.disk_full_events.labels(self.institution).inc()
        self.disk_full.labels(self.institution).set(1 if full else 0)

    def broker_contact_age_s(self) -> float | None:
        at = self.broker_contact_at
        return None if at is None else time.monotonic() - at

    def refresh(self, *, height: int, round_: int, pool_txs: int, pool_bytes: int,
                lags: dict[str, int], clock_offset_ms: int) -> None:
        me = self.institution
        self.height.labels(me).set(height)
        self.round.labels(me).set(round_)
        self.pool_txs.labels(me).set(pool_txs)
        self.pool_bytes.labels(me).set(pool_bytes)
        for log, lag in lags.items():
            self.log_lag.labels(me, log).set(lag)
        age = self.broker_contact_age_s()
        self.broker_contact_age.labels(me).set(-1 if age is None else age)
        self.broker_connected.labels(me).set(
            1 if age is not None and age <= BROKER_SILENT_S else 0)
        self.clock_offset.labels(me).set(clock_offset_ms)
        self.disk_full.labels(me)  # present (0) from the start


def node_readiness(*, started: bool, broker_contact_age_s: float | None, disk_full: bool,
                   votes_lag: int | None, decided_waiting: bool) -> Readiness:
    """Ready = started, connected, able to write, caught up. Pure (for the unit test)."""
    if not started:
        return Readiness(False, "starting")
    if disk_full:
        return Readiness(False, "disk-full")
    if broker_contact_age_s is None or broker_contact_age_s > BROKER_SILENT_S:
        return Readiness(False, "broker-unreachable")
    if votes_lag is None:
        return Readiness(False, "lag-unknown")
    if decided_waiting or votes_lag > READY_VOTES_LAG_MAX:
        return Readiness(False, "behind")
    return Readiness(True)

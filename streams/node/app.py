"""The faust-streaming worker that hosts one institution's ledger node.

Owns: the faust ``App`` per institution (its own app id, hence its own consumer group
and identity), with
- the consensus pipeline of ``streams.node.ledger_node.LedgerNode`` — intake, proposer,
  validator, committer and view change — reading the ordered logs with plain aiokafka
  readers (why: docs/decisions/0030-node-pipeline.md), and
- the heartbeat on ``ledger.status.v1`` (institution, height, head hash, state hash,
  tx-log lag, version), both started with the app (``LedgerApp.on_start``), never
  held back by faust's group assignment;
- ``watch_peers`` (agent): reads every institution's heartbeat in batches and warns
  when a peer disagrees with this node at the same height or falls silent;
- with a metrics port, the node's ``/metrics``, ``/healthz`` and ``/readyz``
  (``streams.common.probes``, ``streams.node.metrics``), its state gauges refreshed
  every METRICS_INTERVAL_S.

"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust
from faust.utils.terminal import SpinnerHandler

from ledger.errors import ValidationError
from ledger.hashing import display_hex
from streams.common.clock import now_ms, offset_ms
from streams.common.probes import ProbeServer, Readiness
from streams.kafka import codec
from streams.kafka.acls import member_group_prefix
from streams.kafka.records import StatusReport, status_from_record
from streams.kafka.resilience import quiet_repeated_client_logs
from streams.kafka.topics import STATUS, faust_settings
from streams.node.ledger_node import LedgerNode, NodeHalted, NodeSettings
from streams.node.metrics import node_readiness

logger = logging.getLogger("capledger.node")

STATUS_INTERVAL_S = 1.0
SNAPSHOT_CHECK_INTERVAL_S = 1.0
PEER_SILENT_MS = 5_000
BROKER_SESSION_TIMEOUT_S = 10.0
EXIT_HALTED = 70
METRICS_INTERVAL_S = 1.0
LAG_TIMEOUT_S = 2.0


class LedgerApp(faust.App):
    """A faust App that starts the node's pipeline and heartbeat as soon as the app
    starts, not after faust's consumer-group assignment: faust runs ``@app.task`` and
    ``@app.timer`` only once its group has recovered, and after ``kill -9`` the broker
    keeps the dead member in the group until its session times out, which would hold
    the restarted node idle for that long."""

    ledger_node: LedgerNode | None = None
    probe_server: ProbeServer | None = None
    node_probes: NodeProbes | None = None
    _node_started = False

    async def on_start(self) -> None:
        await super().on_start()
        drop_spinner_logging()
        node = self.ledger_node
        if node is not None and not self._node_started:
            self._node_started = True
            self.add_future(_run_node(node))
            self.add_future(_report_status(node))
            if self.probe_server is not None and self.node_probes is not None:
                await self.probe_server.start()
                self.add_future(_refresh_metrics(self.node_probes))
            self.add_future(_write_snapshots(node))


def drop_spinner_logging(root: logging.Logger | None = None) -> bool:
    """Undo what faust's Worker does for its terminal spinner at a log level of WARN
    or above: a handler that only spins, and the root logger set to DEBUG for it. With
    that, every debug call of the Kafka clients (a few per request and response)
    builds a record, looks up its caller and runs the filters, for nothing: ~10 % of
    an idle node's CPU (decision 0111). The root level goes back to the lowest level
    of the handlers that print. Whether anything was changed."""
    root = root or logging.getLogger()
    spinners = [h for h in root.handlers if isinstance(h, SpinnerHandler)]
    printing = [h.level for h in root.handlers if not isinstance(h, SpinnerHandler)]
    if not spinners or not printing or logging.NOTSET in printing:
        return False
    for handler in spinners:
        root.removeHandler(handler)
    root.setLevel(max(root.level, min(printing)))
    return True


async def _run_node(node: LedgerNode) -> None:
    try:
        await node.run()
    except asyncio.CancelledError:
        raise
    except NodeHalted as error:
        logger.critical("%s", error)
        node.quarantine.clear_in_flight()  # the node's own fault, not the record's
        os._exit(EXIT_HALTED)
    except BaseException:
        # Brokers or network away never get here (the node waits them out, decision
        # 0100): this is a bug, and no record is to blame.
        logger.exception("%s: node crashed", node.me)
        node.quarantine.clear_in_flight()
        os._exit(EXIT_HALTED)
    finally:
        await node.stop()


async def _report_status(node: LedgerNode) -> None:
    while True:
        await asyncio.sleep(STATUS_INTERVAL_S)
        try:
            await node.publish_status()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a missed heartbeat must never stop the node
            logger.warning("%s: heartbeat not sent: %s", node.me, error)


class NodeProbes:
    """What the probe server asks of one node: readiness and fresh gauges."""

    def __init__(self, node: LedgerNode) -> None:
        self.node = node
        self.votes_lag: int | None = None

    def readiness(self) -> Readiness:
        node = self.node
        state = node_readiness(started=node.started.is_set(),
                               broker_contact_age_s=node.metrics.broker_contact_age_s(),
                               disk_full=node.disk_full, votes_lag=self.votes_lag,
                               decided_waiting=node.waiting_for_bodies())
        node.metrics.ready.labels(node.me).set(1 if state.ready else 0)
        return state

    def refresh(self, lags: dict[str, int] | None = None) -> None:
        node = self.node
        if lags is not None:
            self.votes_lag = lags.get("votes")
        node.metrics.refresh(height=node.state.height, round_=node.machine.vote_round,
                             pool_txs=len(node.pool.candidates),
                             pool_bytes=node.pool.bytes_total, lags=lags or {},
                             clock_offset_ms=offset_ms())
        self.readiness()


async def _refresh_metrics(probes: NodeProbes) -> None:
    node = probes.node
    failing = False
    while True:
        lags: dict[str, int] | None = None
        if node.started.is_set():
            try:
                lags = await asyncio.wait_for(node.log_lags(), LAG_TIMEOUT_S)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the broker is away: the gauges say so
                if not failing:  # once per outage, not once a second
                    logger.warning("%s: log lags not read: %s: %s", node.me,
                                   type(error).__name__, error)
                failing = True
        probes.refresh(lags)
        await asyncio.sleep(METRICS_INTERVAL_S)


async def _write_snapshots(node: LedgerNode) -> None:
    """Every ``snapshot_every_heights`` heights, a state snapshot (streams/node/snapshots.py)."""
    while True:
        await asyncio.sleep(SNAPSHOT_CHECK_INTERVAL_S)
        if not node.snapshot_due:
            continue
        try:
            await node.write_snapshot()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # e.g. a full disk: the chain copy is the authority
            logger.warning("%s: snapshot not written: %s", node.me, error)


def build_app(settings: NodeSettings, *, metrics_port: int = 0,
              metrics_host: str = "127.0.0.1") -> tuple[faust.App, LedgerNode]:
    """The node's faust app; ``metrics_port`` > 0 serves its metrics and probes there."""
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    app = LedgerApp(
        # The app id is the consumer group: it starts with the institution so that the
        # ACLs can give each member its own groups only (streams/kafka/acls.py).
        member_group_prefix(settings.institution) + settings.topic_prefix,
        broker=f"kafka://{settings.bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        datadir=str(settings.node_dir / "faust"),
        consumer_auto_offset_reset="latest",
        # The group only serves the peer-status agent; a short session lets a node
        # restarted after kill -9 take its partitions back quickly.
        broker_session_timeout=BROKER_SESSION_TIMEOUT_S,
        broker_heartbeat_interval=BROKER_SESSION_TIMEOUT_S / 3,
        **faust_settings(),
    )
    app.ledger_node = node
    if metrics_port > 0:
        probes = app.node_probes = NodeProbes(node)
        app.probe_server = ProbeServer(node.metrics.registry, probes.readiness,
                                       host=metrics_host, port=metrics_port,
                                       before_scrape=probes.refresh)
    quiet_repeated_client_logs()  # brokers away: one line per kind per 10 s, not hundreds
    status_topic = app.topic(
        settings.topic(STATUS.name), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )
    peers: dict[str, StatusReport] = {}
    warned: set[tuple[str, int]] = set()
    # Computed once: Genesis.hash_le re-encodes the genesis (JSON) and hashes it on
    # every call, ~0.5 ms a heartbeat, five heartbeats a second (decision 0120).
    genesis, genesis_hash = settings.genesis, node.genesis_hash

    @app.agent(status_topic)
    async def watch_peers(stream: Any) -> None:
        async for batch in stream.take(100, within=STATUS_INTERVAL_S):
            for value in batch:
                try:
                    report = status_from_record(
                        codec.decode(value, expected="NodeStatusReported").record)
                    # only members, each signing its own: the table stays bounded by the
                    # membership and no one reports in another's name (decision 0051)
                    report.check_signature(genesis, genesis_hash)
                except ValidationError:  # a bad heartbeat is someone else's problem
                    continue
                peers[report.institution] = report
            _compare_peers(node, peers, warned)

    return app, node


def _compare_peers(
    node: LedgerNode, peers: dict[str, StatusReport], warned: set[tuple[str, int]]
) -> None:
    mine_height = node.state.height
    mine_hash = node.state.head_hash
    for institution, record in peers.items():
        if institution == node.me:
            continue
        age_ms = now_ms() - record.reported_at_ms
        if age_ms > PEER_SILENT_MS and (institution, -1) not in warned:
            warned.add((institution, -1))
            logger.warning("%s: peer %s silent for %d ms", node.me, institution, age_ms)
        elif age_ms <= PEER_SILENT_MS:
            warned.discard((institution, -1))
        disagrees = record.height == mine_height and record.head_hash != mine_hash
        if disagrees and (institution, mine_height) not in warned:
            warned.add((institution, mine_height))
            logger.error("%s: peer %s has head %s at height %d, this node %s", node.me,
                      institution, display_hex(record.head_hash)[:16], mine_height,
                      display_hex(mine_hash)[:16])

"""A Kafka cluster of the test module's own: started once per module, killed and
restarted broker by broker by the tests, stopped at the end.

Owns: ``started_broker_cluster`` (the body of a module-scoped fixture: ``BrokerCluster`` of
``BROKERS`` brokers, default 3, in a state dir under the module's tmp directory, on
loopback ports from ``BROKER_PORT_BASE``; the process environment points every
client of the test — and the node processes it starts — at it), ``partition_leader``
and ``LoadGenerator`` (the test's pre-signed lane payments submitted at a steady rate
in the background, retrying a batch the brokers refused), ``offered_load`` (that
rate from ``CAPLEDGER_FAULT_RATE_TPS``, default 100 tx/s) and ``partition_replicas``.

Never touches the shared broker on 9092: the tests of issue 9 kill brokers.
Touches: its own state dir, its brokers' processes, ports BROKER_PORT_BASE..+2n.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from streams.common import config
from streams.kafka.resilience import quiet_repeated_client_logs
from streams.kafka.topics import admin_client
from streams.tools.devstack import kafka

BROKER_PORT_BASE = 19192
BROKER_HEAP = "-Xms128m -Xmx384m"  # three brokers and five nodes on two shared cores
LEADER_TIMEOUT_S = 60.0
PROJECTOR_STOP_TIMEOUT_S = 15.0


@dataclass
class BrokerCluster:
    settings: config.Settings
    state_dir: Path

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap

    @property
    def node_ids(self) -> list[int]:
        return [node.node_id for node in kafka.broker_nodes(self.settings)]

    def kill(self, node_id: int) -> None:
        """``kill -9`` one broker (no clean shutdown, no flush)."""
        assert kafka.stop_broker(self.settings, node_id, kill=True), f"broker {node_id} not up"

    async def start(self, *node_ids: int) -> None:
        """Start the named brokers (default: every one not running) and wait for them,
        in a thread: the test's load and log followers keep running meanwhile."""
        await asyncio.to_thread(kafka.start_brokers, self.settings, None, node_ids)

    def running(self) -> list[int]:
        return [n for n in self.node_ids if kafka.broker_running(self.settings, n)]


def started_broker_cluster(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, *,
        before_start: Callable[[config.Settings], None] | None = None,
) -> Iterator[BrokerCluster]:
    """The body of a test module's ``broker_cluster`` fixture (module scope);
    ``before_start`` may write files into the fresh state dir (extra listeners)."""
    brokers = int(getattr(request.module, "BROKERS", 3))
    base = int(getattr(request.module, "BROKER_PORT", BROKER_PORT_BASE))
    state = tmp_path_factory.mktemp("brokers")
    env = {
        "CAPLEDGER_STATE_DIR": str(state),
        "CAPLEDGER_KAFKA_BOOTSTRAP": f"127.0.0.1:{base}",
        "CAPLEDGER_KAFKA_BROKERS": str(brokers),
        "CAPLEDGER_KAFKA_HEAP": BROKER_HEAP,
        "CAPLEDGER_KAFKA_SECURITY": "sasl_ssl",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in ("CAPLEDGER_KAFKA_CONTROLLER_PORT", "CAPLEDGER_REPLICATION_FACTOR",
                     "CAPLEDGER_KAFKA_PRINCIPAL", "CAPLEDGER_KAFKA_PASSWORD_FILE",
                     "CAPLEDGER_KAFKA_CA_FILE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        settings = config.load()
        cluster = BrokerCluster(settings, state)
        quiet_repeated_client_logs()  # the test's own clients, while brokers are down
        try:
            if before_start is not None:
                before_start(settings)
            kafka.start_brokers(settings)
            yield cluster
        finally:
            kafka.stop(settings)


async def partition_leader(bootstrap: str, topic: str, *,
                           timeout_s: float = LEADER_TIMEOUT_S) -> int:
    """The broker id leading partition 0 of ``topic`` (waits while there is none)."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = admin_client(bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            topics = await admin.describe_topics([topic])
            leader = int(topics[0]["partitions"][0]["leader"])
            if leader >= 0:
                return leader
        except Exception:
            if time.monotonic() > deadline:
                raise
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader for {topic} within {timeout_s} s")
        await asyncio.sleep(0.5)


async def partition_replicas(bootstrap: str, topics: list[str]) -> dict[str, tuple[int, list[int]]]:
    """(leader, in-sync replicas) of partition 0 of each topic, as the broker(s) at
    ``bootstrap`` see it; {} when they do not answer."""
    admin = admin_client(bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        described = await admin.describe_topics(topics)
        return {t["topic"]: (int(t["partitions"][0]["leader"]),
                             sorted(int(r) for r in t["partitions"][0]["isr"]))
                for t in described if t["partitions"]}
    except Exception:
        return {}
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


# The offered load of the fault tests: CAPLEDGER_FAULT_RATE_TPS (default 100 tx/s),
# sent as one batch every LOAD_BATCH_INTERVAL_S of ``per_lane`` payments per lane.
FAULT_RATE_ENV = "CAPLEDGER_FAULT_RATE_TPS"
FAULT_RATE_TPS_DEFAULT = 100
LOAD_BATCH_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class OfferedLoad:
    rate_tps: int
    per_lane: int  # payments per lane per batch
    per_lane_txs: int  # pre-signed payments per lane: load for ``seconds``


def offered_load(lanes: int, seconds: float) -> OfferedLoad:
    """The load the environment asks for, as batches over ``lanes`` lanes lasting
    at least ``seconds`` at the full rate."""
    rate = int(os.environ.get(FAULT_RATE_ENV, FAULT_RATE_TPS_DEFAULT))
    assert rate > 0, f"{FAULT_RATE_ENV}={rate}"
    per_lane = max(1, round(rate * LOAD_BATCH_INTERVAL_S / lanes))
    batches = int(seconds / LOAD_BATCH_INTERVAL_S) + 1
    return OfferedLoad(rate, per_lane, per_lane * batches)


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


@dataclass
class LoadGenerator:
    """Submits ``run.next_batch(per_lane)`` every ``interval_s`` in the background;
    a batch the brokers refuse is submitted again (the same records: a duplicate is
    rejected by the nodes, never committed twice). ``failures`` counts refusals.

    A batch whose send was neither acknowledged nor refused when the load stopped is
    ``in_doubt``: the ledger promised nothing for it, but a producer may still deliver
    it, so it may commit — once (``promised``)."""

    run: Any  # cluster_fixtures.ChainRun
    per_lane: int = 1
    interval_s: float = 0.2
    batches_max: int = 1_000
    failures: int = 0
    batches: int = 0
    in_doubt: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while self.batches < self.batches_max and self._lanes_left():
            batch = self.run.next_batch(self.per_lane)
            self.in_doubt = [tx.txid for tx in batch]
            while True:
                try:
                    await asyncio.wait_for(self.run.submit(batch), 30)
                    self.in_doubt = []
                    break
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception:
                    self.failures += 1
                    await asyncio.sleep(1.0)
            self.batches += 1
            await asyncio.sleep(self.interval_s)

    def promised(self, committed: set[str]) -> list[str]:
        """Every acknowledged submission, and those in doubt that committed."""
        return [*self.run.submitted, *[t for t in self.in_doubt if t in committed]]

    def _lanes_left(self) -> bool:
        return all(cursor + self.per_lane <= len(txs)
                   for cursor, txs in zip(self.run.lane_cursor, self.run.lane_txs,
                                          strict=True))


def node_log_says(run: Any, institution: str, text: str) -> bool:
    path = run.cluster.nodes[institution].log_path
    return path.exists() and text in path.read_text(errors="replace")


def environment_brokers() -> int:
    return int(os.environ.get("CAPLEDGER_KAFKA_BROKERS", "1"))


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A fresh, migrated database on CAPLEDGER_PG_DSN's server (dropped afterwards),
    without the shared stack's fixtures (which would start the shared broker)."""
    import uuid

    import psycopg
    from psycopg import sql

    from streams.tools.devstack.postgres import migrate, with_database

    admin_dsn = config.load().pg_dsn
    name = "capledger_test_" + uuid.uuid4().hex[:16]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_database(admin_dsn, name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


def projected_height(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(max(height), 0) FROM block").fetchone()
    return int(row[0]) if row else 0


def start_projector(run: Any, dsn: str, log_path: Path) -> subprocess.Popen[bytes]:
    """``capledger project --follow`` of the chain as a real process, logging to a file."""
    log = log_path.open("ab")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "streams", "project", "--genesis", str(run.chain_dir),
             "--topic-prefix", run.prefix, "--dsn", dsn, "--follow"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_projector(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, bounded wait, SIGKILL; the exit code it had before (None: running)."""
    before = process.poll()
    if before is None:
        process.terminate()
        try:
            process.wait(PROJECTOR_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(PROJECTOR_STOP_TIMEOUT_S)
    return before

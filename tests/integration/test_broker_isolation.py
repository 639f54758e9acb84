"""A minority of the brokers cut off (issue 9): three brokers of this module's own whose
every inter-broker route (replication fetches and controller traffic, each ordered
pair through a TCP proxy the test controls: ``netfault.BrokerRoutes``, decision 0103)
can be black-holed. Under load, the broker leading the votes partition is isolated from
the other two for 30 s, then healed; clients (the five nodes) still reach all three.

Expected: the two brokers of the majority fence the isolated one and move its
leaderships (min ISR 2 holds with two), the nodes go on committing, nothing committed
is lost or doubled, no node exits, and after the heal the isolated broker rejoins the
in-sync replicas of every ledger topic (caught up). Figures (with ``-s``) go to
docs/failure-tests.md. Slow: four to six minutes here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.common import config
from streams.kafka.topics import BLOCKS, TX, VOTES
from streams.tools.devstack import kafka
from tests.integration.broker_fixtures import (
    LOAD_BATCH_INTERVAL_S,
    BrokerCluster,
    LoadGenerator,
    load_average,
    offered_load,
    partition_leader,
    partition_replicas,
    started_broker_cluster,
)
from tests.integration.cluster_fixtures import ChainRun, running_chain, wait_until
from tests.integration.netfault import BrokerRoutes

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BROKERS = 3
BROKER_PORT = 19892  # brokers at 19892..19897; the other fault modules use other ports
PEER_PORT_BASE = 19920  # 9 routes x 4 ports
LANES = 10
LOAD_S = 120.0
CUT_S = 30.0
MAJORITY_BLOCKS_MIN = 3
FIRST_BLOCKS_TIMEOUT_S = 90.0
# Producers that were talking to the isolated leader learn of the new one when their
# request times out (30 s), readers at their next metadata refresh (10 s,
# streams/kafka/topics.py METADATA_MAX_AGE_MS); the fencing itself takes 9 s.
MAJORITY_COMMIT_TIMEOUT_S = 120.0
REJOIN_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 180.0
POLL_S = 1.0


def _routes(settings: config.Settings) -> BrokerRoutes:
    return BrokerRoutes(PEER_PORT_BASE, [node.node_id for node in kafka.broker_nodes(settings)])


@pytest.fixture(scope="module", name="broker_routes")
def _broker_routes() -> Iterator[list[BrokerRoutes]]:
    holder: list[BrokerRoutes] = []
    yield holder
    for routes in holder:
        routes.stop()


@pytest.fixture(scope="module", name="broker_cluster")
def _broker_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    broker_routes: list[BrokerRoutes]) -> Iterator[BrokerCluster]:
    """The routes relay from before the brokers start (the KRaft quorum forms through
    them) until after they stop (``broker_routes`` is torn down last)."""
    def routed(settings: config.Settings) -> None:
        routes = _routes(settings)
        routes.write_routes(settings.kafka_state_dir)
        routes.start()
        broker_routes.append(routes)

    yield from started_broker_cluster(request, tmp_path_factory, before_start=routed)


def _address(cluster: BrokerCluster, node_id: int) -> str:
    return kafka.broker_node(cluster.settings, node_id).address


async def _all_in_sync(cluster: BrokerCluster, run: ChainRun, via: int) -> bool:
    topics = [run.topic(name) for name in (TX.name, VOTES.name, BLOCKS.name)]
    replicas = await partition_replicas(_address(cluster, via), topics)
    return len(replicas) == len(topics) and all(
        isr == cluster.node_ids for _, isr in replicas.values())


async def _poll(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> float:
    """Like ``wait_until`` for an async predicate; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not reached within {timeout_s} s")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class WhileCut:
    majority: list[int]
    first_commit_s: float
    moved_s: float
    blocks: int
    txs: int
    load_average: str
    cut_s: float


async def _isolated(cluster: BrokerCluster, run: ChainRun,
                    victim: int) -> WhileCut:
    """What happens during the CUT_S the routes of ``victim`` are black-holed."""
    majority = [n for n in cluster.node_ids if n != victim]
    head, submitted_before = run.blocks.head_height, len(run.submitted)
    cut_at = time.monotonic()
    first_commit_s = await wait_until(lambda: run.blocks.head_height > head + 1,
                                      timeout_s=MAJORITY_COMMIT_TIMEOUT_S,
                                      what="commits without the isolated broker")
    # The cut lasts CUT_S, longer if need be until the majority has committed
    # MAJORITY_BLOCKS_MIN blocks without the isolated broker.
    await wait_until(lambda: run.blocks.head_height >= head + MAJORITY_BLOCKS_MIN,
                     timeout_s=MAJORITY_COMMIT_TIMEOUT_S, what="blocks while cut")

    async def moved() -> bool:
        seen = await partition_replicas(_address(cluster, majority[0]),
                                        [run.topic(VOTES.name)])
        return bool(seen) and all(leader in majority and victim not in isr
                                  for leader, isr in seen.values())

    moved_s = await _poll(moved, timeout_s=CUT_S, what="the votes leadership moves")
    await wait_until(lambda: time.monotonic() - cut_at >= CUT_S, timeout_s=CUT_S + 5,
                     what="the cut")
    blocks = run.blocks.head_height - head
    assert all(code is None for code in run.cluster.exit_codes().values())
    assert victim in cluster.running()
    return WhileCut(majority, first_commit_s, moved_s, blocks,
                    len(run.submitted) - submitted_before, load_average(),
                    time.monotonic() - cut_at)


async def test_the_votes_leader_isolated_from_the_other_brokers_for_30_s(
        broker_cluster: BrokerCluster, broker_routes: list[BrokerRoutes], tmp_path,
        unique_id: str) -> None:
    routes = broker_routes[0]
    offered = offered_load(LANES, LOAD_S)
    async with running_chain(tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
                             per_lane_txs=offered.per_lane_txs) as run:
        load = LoadGenerator(run, per_lane=offered.per_lane, interval_s=LOAD_BATCH_INTERVAL_S)
        load.start()
        await wait_until(lambda: run.blocks.head_height >= 3,
                         timeout_s=FIRST_BLOCKS_TIMEOUT_S, what="first blocks under load")
        victim = await partition_leader(run.bootstrap, run.topic(VOTES.name))
        routes.isolate(victim)
        try:
            figures = await _isolated(broker_cluster, run, victim)
        finally:
            routes.heal(victim)  # also when the test fails: teardown needs the brokers
        rejoin_s = await _poll(lambda: _all_in_sync(broker_cluster, run, figures.majority[0]),
                               timeout_s=REJOIN_TIMEOUT_S,
                               what=f"broker {victim} back in every ISR")
        await load.stop()
        await run.wait_committed(run.submitted, timeout_s=SETTLE_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=SETTLE_TIMEOUT_S)
        run.assert_exactly_once(load.promised(run.blocks.committed_txids()))
        assert all(code is None for code in run.cluster.exit_codes().values())
        assert await _all_in_sync(broker_cluster, run, victim)  # its own view agrees
        leaders = await partition_replicas(_address(broker_cluster, victim),
                                           [run.topic(VOTES.name)])
        print(f"\nFIGURE broker {victim} (votes leader) isolated from the other two "
              f"{figures.cut_s:.0f} s at {offered.rate_tps} tx/s offered: first commit without it "
              f"{figures.first_commit_s:.1f} s, votes leadership moved after "
              f"{figures.moved_s:.1f} s, {figures.blocks} blocks and {figures.txs} txs "
              f"accepted while cut, back in every ISR {rejoin_s:.1f} s after the heal, "
              f"{len(run.submitted)} txs, {load.failures} refused batches, lost 0, "
              f"duplicated 0; load average {figures.load_average} during the cut; "
              f"{routes.connections()} proxied connections; votes leader now {leaders}")

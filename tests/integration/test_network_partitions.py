"""Network partitions (issue 9): one node cut off from the brokers under load, then
healed; the current proposer cut off. Five real node processes, a broker of this
module's own whose extra listeners route each node through a TCP proxy the test
controls (``netfault.NodeRoutes``; why and how: docs/decisions/0100).

Expected: the other four go on committing; the cut-off node neither exits nor acts on
a stale view, reports the broker unreachable, shows SILENT in ``capledger status``,
and after the heal rejoins and agrees; nothing committed is lost or doubled.
Figures (with ``-s``) go to docs/failure-tests.md. Slow: about two minutes a test.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ledger.block import proposer_for
from ledger.membership import INSTITUTION_IDS
from streams.common import config
from tests.integration.broker_fixtures import (
    LOAD_BATCH_INTERVAL_S,
    BrokerCluster,
    LoadGenerator,
    node_log_says,
    offered_load,
    started_broker_cluster,
)
from tests.integration.cluster_fixtures import ChainRun, running_chain, wait_until
from tests.integration.netfault import NodeRoutes

pytestmark = [pytest.mark.slow]

BROKERS = 1  # the partition is between a node and the brokers; one broker keeps CPU down
BROKER_PORT = 19292
ROUTE_PORT_BASE = 19400
LANES = 10
LOAD_S = 30.0  # of pre-signed payments at the offered rate (CAPLEDGER_FAULT_RATE_TPS)
CUT_S = 30.0
MAJORITY_BLOCKS_MIN = 3  # commits the four must make while one is cut off
FIRST_BLOCKS_TIMEOUT_S = 90.0
REJOIN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 180.0
STATUS_TIMEOUT_S = 60.0


def _routes() -> NodeRoutes:
    return NodeRoutes(ROUTE_PORT_BASE, tuple(INSTITUTION_IDS), tuple(range(1, BROKERS + 1)))


@pytest.fixture(scope="module", name="broker_cluster")
def _broker_cluster(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    def listeners(settings: config.Settings) -> None:
        _routes().write_listeners(settings.kafka_state_dir)

    yield from started_broker_cluster(request, tmp_path_factory, before_start=listeners)


@contextlib.asynccontextmanager
async def _started_routes() -> AsyncIterator[NodeRoutes]:
    """The proxies, in the test's own event loop (a fixture's loop would not relay)."""
    routes = _routes()
    await routes.start()
    try:
        yield routes
    finally:
        await routes.stop()


def _status_json(run: ChainRun) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "streams", "status", "--genesis", str(run.chain_dir),
         "--topic-prefix", run.prefix, "--json"],
        capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=False)
    return dict(json.loads(done.stdout))


def _flags(report: dict[str, Any], institution: str) -> list[str]:
    return next(n["flags"] for n in report["nodes"] if n["institution"] == institution)


async def _partition(run: ChainRun, routes: NodeRoutes,
                     choose: Callable[[int], str]) -> tuple[str, dict[str, float]]:
    """Cut ``choose(head height)`` off for CUT_S under load, heal; who and the figures."""
    load = LoadGenerator(run, per_lane=offered_load(LANES, LOAD_S).per_lane,
                         interval_s=LOAD_BATCH_INTERVAL_S)
    load.start()
    await wait_until(lambda: run.blocks.head_height >= 3, timeout_s=FIRST_BLOCKS_TIMEOUT_S,
                     what="first blocks under load")
    head = run.blocks.head_height
    victim = choose(head)
    routes.cut(victim)
    cut_at = time.monotonic()
    first_commit_s = await wait_until(lambda: run.blocks.head_height > head + 1,
                                      timeout_s=CUT_S, what="the majority commits")
    await wait_until(lambda: node_log_says(run, victim, "broker unreachable"),
                     timeout_s=CUT_S, what=f"{victim} reports the broker unreachable")
    silent = _flags(_status_json(run), victim)
    await wait_until(lambda: time.monotonic() - cut_at >= CUT_S, timeout_s=CUT_S + 5,
                     what="the cut")
    majority_blocks = run.blocks.head_height - head
    assert majority_blocks >= MAJORITY_BLOCKS_MIN, f"{majority_blocks} blocks while cut"
    # Its turns came while it was cut off: the others changed view past it (height
    # head + 1 may still be its proposal, sent before the cut).
    while_cut = [run.blocks.block_at(h).header
                 for h in range(head + 2, head + majority_blocks + 1)]
    assert all(header.proposer != victim for header in while_cut)
    view_changes = sum(1 for header in while_cut if header.round >= 1)
    assert view_changes >= 1 or majority_blocks < len(INSTITUTION_IDS)
    assert run.cluster.exit_codes()[victim] is None, run.cluster.log_tail(victim)
    routes.heal(victim)
    rejoin_s = await wait_until(lambda: node_log_says(run, victim, "broker reachable again"),
                                timeout_s=REJOIN_TIMEOUT_S, what=f"{victim} reconnects")
    healed_at = time.monotonic()
    await run.wait_agreement(INSTITUTION_IDS, timeout_s=REJOIN_TIMEOUT_S)
    agree_s = time.monotonic() - healed_at + rejoin_s
    await load.stop()
    await run.wait_committed(run.submitted, timeout_s=SETTLE_TIMEOUT_S)
    await run.wait_agreement(INSTITUTION_IDS, timeout_s=SETTLE_TIMEOUT_S)
    run.assert_exactly_once(load.promised(run.blocks.committed_txids()))
    assert all(code is None for code in run.cluster.exit_codes().values())
    assert "SILENT" in silent, silent
    return victim, {"first_commit_s": first_commit_s, "majority_blocks": majority_blocks,
                    "agree_s": agree_s, "txs": len(run.submitted),
                    "view_changes": view_changes}


async def test_one_node_cut_off_for_30_s_under_load_rejoins_and_agrees(
        broker_cluster: BrokerCluster, tmp_path, unique_id: str) -> None:
    async with _started_routes() as routes, running_chain(
            tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
            per_lane_txs=offered_load(LANES, LOAD_S).per_lane_txs,
            node_env=routes.node_env()) as run:
        _, figures = await _partition(run, routes, lambda _head: "securities-b")
        print(f"\nFIGURE one node cut {CUT_S:.0f} s: first commit without it "
              f"{figures['first_commit_s']:.1f} s, {figures['majority_blocks']} blocks while "
              f"cut ({figures['view_changes']} in round >= 1), back in agreement "
              f"{figures['agree_s']:.1f} s after the heal, "
              f"{figures['txs']} txs, lost 0, duplicated 0")


async def test_the_current_proposer_cut_off_the_rest_change_view_and_go_on(
        broker_cluster: BrokerCluster, tmp_path, unique_id: str) -> None:
    async with _started_routes() as routes, running_chain(
            tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
            per_lane_txs=offered_load(LANES, LOAD_S).per_lane_txs,
            node_env=routes.node_env()) as run:
        # The proposer of the height after the head when the cut comes (round 0).
        victim, figures = await _partition(
            run, routes, lambda head: proposer_for(run.genesis, head + 1, 0))
        print(f"\nFIGURE proposer {victim} cut {CUT_S:.0f} s: first commit without it "
              f"{figures['first_commit_s']:.1f} s, {figures['majority_blocks']} blocks while "
              f"cut ({figures['view_changes']} in round >= 1), back in agreement "
              f"{figures['agree_s']:.1f} s after the heal, "
              f"{figures['txs']} txs, lost 0, duplicated 0")

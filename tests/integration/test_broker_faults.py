"""Broker faults under load (issue 9): a three-broker KRaft cluster of this module's
own (``broker_fixtures.broker_cluster``: replication factor 3, min.insync.replicas 2,
unclean leader election off), five real node processes per test, and load from the
test's own pre-signed lane payments.

- the whole broker cluster killed for longer than the producer timeout, then
  restarted: no node exits, each says "broker unreachable", each resumes by itself;
- the leader of the tx and votes partitions killed (kill -9) under load: commits
  resume on the new leader, nothing committed lost, nothing doubled;
- two of three brokers killed: writes are refused (min ISR), so commits halt and
  nothing is lost; restarted, the chain resumes.

Figures (printed with ``-s``) go to docs/failure-tests.md. All slow: a cluster start
takes about a minute on this machine, each test two to four.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.kafka.topics import TX, VOTES
from tests.integration.broker_fixtures import (
    LOAD_BATCH_INTERVAL_S,
    BrokerCluster,
    LoadGenerator,
    fresh_database,
    node_log_says,
    offered_load,
    partition_leader,
    projected_height,
    start_projector,
    started_broker_cluster,
    stop_projector,
)
from tests.integration.cluster_fixtures import ChainRun, running_chain, wait_until

pytestmark = [pytest.mark.slow]

BROKERS = 3
LANES = 10
LOAD_S = 30.0  # of pre-signed payments at the offered rate (CAPLEDGER_FAULT_RATE_TPS)
# Longer than the producer's request timeout (30 s), after which nodes used to exit.
OUTAGE_S = 40.0
FIRST_BLOCKS_TIMEOUT_S = 90.0
RESUME_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 180.0
STATUS_TIMEOUT_S = 60.0


@pytest.fixture(scope="module", name="broker_cluster")
def _broker_cluster(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerCluster]:
    yield from started_broker_cluster(request, tmp_path_factory)


def _status_json(run: ChainRun) -> dict[str, Any]:
    """``capledger status --json`` of the chain, run as the operator would."""
    done = subprocess.run(
        [sys.executable, "-m", "streams", "status", "--genesis", str(run.chain_dir),
         "--topic-prefix", run.prefix, "--json"],
        capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


def _alive(run: ChainRun) -> dict[str, int | None]:
    return run.cluster.exit_codes()


def _assert_all_alive(run: ChainRun) -> None:
    dead = {name: code for name, code in _alive(run).items() if code is not None}
    assert not dead, f"nodes exited: {dead}"


async def _settle(run: ChainRun, load: LoadGenerator) -> None:
    """Stop the load, wait for every submitted payment and agreement, check exactly once."""
    await load.stop()
    await run.wait_committed(run.submitted, timeout_s=SETTLE_TIMEOUT_S)
    await run.wait_agreement(INSTITUTION_IDS, timeout_s=SETTLE_TIMEOUT_S)
    run.assert_exactly_once(load.promised(run.blocks.committed_txids()))
    _assert_all_alive(run)


async def _loaded_chain_started(run: ChainRun) -> LoadGenerator:
    load = LoadGenerator(run, per_lane=offered_load(LANES, LOAD_S).per_lane,
                         interval_s=LOAD_BATCH_INTERVAL_S)
    load.start()
    await wait_until(lambda: run.blocks.head_height >= 3, timeout_s=FIRST_BLOCKS_TIMEOUT_S,
                     what="first blocks under load")
    return load


async def _commits_resume(run: ChainRun, *, after_height: int) -> float:
    return await wait_until(lambda: run.blocks.head_height > after_height + 1,
                            timeout_s=RESUME_TIMEOUT_S, what="commits resume")


async def test_whole_broker_cluster_restart_every_node_waits_and_resumes(
        broker_cluster: BrokerCluster, tmp_path, unique_id: str) -> None:
    async with running_chain(tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
                             per_lane_txs=offered_load(LANES, LOAD_S).per_lane_txs) as run:
        with fresh_database() as dsn:
            projector = start_projector(run, dsn, tmp_path / "projector.log")
            try:
                await _whole_cluster_restart(broker_cluster, run, dsn, projector)
            finally:
                exited = stop_projector(projector)
            assert exited is None, (tmp_path / "projector.log").read_text()[-3000:]


async def _whole_cluster_restart(broker_cluster: BrokerCluster, run: ChainRun, dsn: str,
                                 projector: subprocess.Popen[bytes]) -> None:
    load = await _loaded_chain_started(run)
    for node_id in broker_cluster.node_ids:
        broker_cluster.kill(node_id)
    killed_at = time.monotonic()
    await wait_until(lambda: all(node_log_says(run, name, "broker unreachable")
                                 for name in INSTITUTION_IDS),
                     timeout_s=OUTAGE_S, what="every node reports the broker unreachable")
    await wait_until(lambda: time.monotonic() - killed_at > OUTAGE_S
                     or any(code is not None for code in _alive(run).values()),
                     timeout_s=OUTAGE_S + 10, what="the outage")
    _assert_all_alive(run)
    head = run.blocks.head_height
    restart_began = time.monotonic()
    await broker_cluster.start()
    brokers_up = time.monotonic()
    resumed_s = await _commits_resume(run, after_height=head)
    await wait_until(lambda: all(node_log_says(run, name, "broker reachable again")
                                 for name in INSTITUTION_IDS),
                     timeout_s=RESUME_TIMEOUT_S, what="every node reconnected")
    await _settle(run, load)
    head = run.blocks.head_height
    await wait_until(lambda: projected_height(dsn) >= head, timeout_s=SETTLE_TIMEOUT_S,
                     what=f"the projector (still following) reaches height {head}")
    assert projector.poll() is None
    reported = _status_json(run)["nodes"]
    assert all(node["broker_outages"] >= 1 and node["broker_last_outage_ms"] >= OUTAGE_S * 1000
               for node in reported), reported
    print(f"\nFIGURE whole-cluster restart: brokers down {restart_began - killed_at:.1f} s, "
          f"cluster start {brokers_up - restart_began:.1f} s, commits resumed "
          f"{resumed_s:.1f} s after the brokers answered, "
          f"{len(run.submitted)} txs submitted, {load.failures} refused batches, "
          f"head {run.blocks.head_height}, lost 0, duplicated 0")


async def test_leader_of_tx_and_votes_killed_under_load(
        broker_cluster: BrokerCluster, tmp_path, unique_id: str) -> None:
    async with running_chain(tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
                             per_lane_txs=offered_load(LANES, LOAD_S).per_lane_txs) as run:
        load = await _loaded_chain_started(run)
        # The votes leader is killed; the tx leader with it when one broker leads both
        # (killing two brokers would go below min ISR: the next test).
        leaders = {name: await partition_leader(run.bootstrap, run.topic(name))
                   for name in (TX.name, VOTES.name)}
        victim = leaders[VOTES.name]
        head = run.blocks.head_height
        killed_at = time.monotonic()
        broker_cluster.kill(victim)
        resumed_s = await _commits_resume(run, after_height=head)
        for name in (TX.name, VOTES.name):
            assert await partition_leader(run.bootstrap, run.topic(name)) != victim
        await wait_until(lambda: time.monotonic() - killed_at > 10, timeout_s=20,
                         what="load on the new leader")
        await broker_cluster.start()
        await _settle(run, load)
        print(f"\nFIGURE leader kill: leaders {leaders}, broker {victim} killed, commits "
              f"resumed in {resumed_s:.1f} s (kill to two more heights), {len(run.submitted)} txs, "
              f"{load.failures} refused batches, lost 0, duplicated 0")


async def test_two_of_three_brokers_down_halts_then_resumes(
        broker_cluster: BrokerCluster, tmp_path, unique_id: str) -> None:
    async with running_chain(tmp_path, unique_id, broker_cluster.bootstrap, lane_count=LANES,
                             per_lane_txs=offered_load(LANES, LOAD_S).per_lane_txs) as run:
        load = await _loaded_chain_started(run)
        leader = await partition_leader(run.bootstrap, run.topic(VOTES.name))
        victims = [leader, *[n for n in broker_cluster.node_ids if n != leader][:1]]
        for node_id in victims:
            broker_cluster.kill(node_id)
        # Blocks whose votes were acknowledged before the kill may still commit; then
        # nothing: with one in-sync replica of 3, min ISR 2 refuses every write.
        await wait_until(lambda: node_log_says(run, "koscom", "broker unreachable"),
                         timeout_s=OUTAGE_S * 2, what="koscom reports the broker unreachable")
        halted_head = run.blocks.head_height
        halted_at = time.monotonic()
        await wait_until(lambda: time.monotonic() - halted_at > OUTAGE_S / 2
                         or run.blocks.head_height > halted_head + 1,
                         timeout_s=OUTAGE_S, what="the halt")
        assert run.blocks.head_height <= halted_head + 1, "commits went on below min ISR"
        _assert_all_alive(run)
        restart_began = time.monotonic()
        await broker_cluster.start(*victims)
        brokers_up = time.monotonic()
        resumed_s = await _commits_resume(run, after_height=run.blocks.head_height)
        await _settle(run, load)
        print(f"\nFIGURE two of three down: halted at height {halted_head} for "
              f"{restart_began - halted_at:.1f} s, brokers restarted in "
              f"{brokers_up - restart_began:.1f} s, commits resumed {resumed_s:.1f} s after "
              f"they answered, {len(run.submitted)} txs, {load.failures} refused batches, "
              f"lost 0, duplicated 0")

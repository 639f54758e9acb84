"""Metrics and health of real node processes (issue 9, "operable"): five ``capledger
node`` processes, each with its own metrics port; the test reads ``/metrics``,
``/healthz`` and ``/readyz`` over HTTP and checks the values move as blocks commit,
a node is killed (view changes on the others) and its probe port goes away.

Owns: nothing but the tests. Figures: docs/failure-tests.md (operability section).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from tests.integration.cluster_fixtures import ChainRun, running_chain
from tests.integration.ops_fixtures import Probe, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

COMMIT_TIMEOUT_S = 40.0
READY_TIMEOUT_S = 40.0


def _metric(samples: dict[str, float], name: str) -> float:
    return samples.get(name, 0.0)


async def _all_ready(probes: dict[str, Probe]) -> str | None:
    for name, probe in probes.items():
        status, body = await probe.get("/readyz")
        if status != 200:
            return f"{name}: {status} {body.strip()}"
    return None


async def _heights(probes: dict[str, Probe]) -> dict[str, float]:
    return {name: _metric(await probe.metrics(), "capledger_node_height")
            for name, probe in probes.items()}


async def _commit_more(run: ChainRun, probes: dict[str, Probe], above: float) -> None:
    batch = run.next_batch(2)
    await run.submit(batch)
    await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)

    async def moved() -> str | None:
        heights = await _heights(probes)
        low = {n: h for n, h in heights.items() if h <= above}
        return None if not low else f"heights {low} not above {above}"

    await wait_for(moved, timeout_s=COMMIT_TIMEOUT_S, what="height gauges move")


async def test_node_metrics_and_probes_move_with_the_chain(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str
) -> None:
    ports = {name: free_port() for name in INSTITUTION_IDS}
    env = {name: {"CAPLEDGER_METRICS_PORT": str(port)} for name, port in ports.items()}
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, node_env=env,
                             proposer_timeout_ms=1_000, block_interval_ms=200) as run:
        probes = {name: Probe(port) for name, port in ports.items()}
        await wait_for(lambda: _all_ready(probes), timeout_s=READY_TIMEOUT_S,
                       what="every node ready")
        for probe in probes.values():
            assert await probe.get("/healthz") == (200, "alive\n")
            assert (await probe.get("/nowhere"))[0] == 404
        before = {name: await probe.metrics() for name, probe in probes.items()}
        for samples in before.values():
            assert samples["capledger_node_broker_connected"] == 1
            assert samples["capledger_node_disk_full"] == 0
            assert samples["capledger_node_ready"] == 1
            assert 'capledger_node_log_lag_records{log="votes"}' in samples

        await _commit_more(run, probes, above=max((await _heights(probes)).values()))
        after = {name: await probe.metrics() for name, probe in probes.items()}
        for name in INSTITUTION_IDS:
            old, new = before[name], after[name]
            assert new["capledger_node_commits_total"] > old.get(
                "capledger_node_commits_total", 0), name
            assert new["capledger_node_committed_txs_total"] >= len(run.submitted), name
            assert new["capledger_node_commit_latency_seconds_count"] > old.get(
                "capledger_node_commit_latency_seconds_count", 0), name
            assert new["capledger_node_commit_latency_seconds_sum"] > 0
            assert new["capledger_node_chain_fsync_seconds_count"] == \
                new["capledger_node_commits_total"], name
            assert new["capledger_node_pool_txs"] >= 0

        # A dead node: its port closes; the others' view-change counters move once the
        # rotation reaches it, and they stay ready.
        run.cluster.kill("koscom")
        assert not await probes["koscom"].answers()
        live = {n: p for n, p in probes.items() if n != "koscom"}
        for _ in range(6):
            await _commit_more(run, live, above=max((await _heights(live)).values()))
        rounds = [block.header.round for block in run.blocks.blocks.values()]
        assert max(rounds) >= 1, f"no view change happened: rounds {rounds}"
        changes = [_metric(await p.metrics(), "capledger_node_view_changes_total")
                   for p in live.values()]
        assert all(count >= 1 for count in changes), changes
        await wait_for(lambda: _all_ready(live), timeout_s=READY_TIMEOUT_S,
                       what="the live nodes ready")
        run.assert_exactly_once()

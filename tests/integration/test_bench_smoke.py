"""``capledger bench`` smoke run: two short, low-rate steps against five real node
processes; every field of the issue's JSON object is there and nothing is lost.

The figures themselves are not asserted (a benchmark, not a timed test): only the
accounting (committed == submitted, lost == 0) and the shape of the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streams.cli.bench import cli
from streams.tools import bench

pytestmark = pytest.mark.integration

LATENCY_KEYS = {"p50", "p95", "p99", "max"}
NODE_KEYS = {"pid", "cpu_s", "cpu_cores", "rss_mb_start", "rss_mb_end", "rss_mb_max"}


def test_bench_json_has_every_field_and_loses_nothing(kafka_bootstrap: str,
                                                     tmp_path: Path) -> None:
    runner = CliRunner()  # click >= 8.2 keeps stderr (progress) out of result.stdout
    out = tmp_path / "steps.json"
    result = runner.invoke(cli, ["--rates", "5,40", "--duration", "3", "--lanes", "20",
                                 "--drain-timeout", "30", "--all-rates", "--json",
                                 "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    steps = [json.loads(line) for line in lines]
    assert [step["rate_target"] for step in steps] == [5.0, 40.0]
    for step in steps:
        assert tuple(step) == bench.RECORD_FIELDS
        assert step["submitted"] == round(step["rate_target"] * 3)
        assert step["committed"] == step["submitted"], step
        assert step["lost"] == 0
        assert 0 < step["committed_tps"] <= step["rate_target"] * 1.05
        assert set(step["latency_ms"]) == LATENCY_KEYS
        latency = step["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert step["block_bytes_median"] > 0
        assert step["verify_per_s_per_core"] > 1_000
        assert set(step["nodes"]) == {"otc-operator", "surveillance", "koscom",
                                      "securities-a", "securities-b"}
        for node in step["nodes"].values():
            assert set(node) == NODE_KEYS
            assert node["cpu_s"] > 0 and node["rss_mb_max"] > 0
        assert step["rss_mb_max"] == max(n["rss_mb_max"] for n in step["nodes"].values())
    # the generator's parts (decision 0128): its outcome watcher read every block
    for saved in json.loads(out.read_text())["steps"]:
        extras = saved["extras"]
        assert 0 < extras["watcher_cpu_us_per_tx"] < extras["loadgen_cpu_us_per_tx"], extras
        assert extras["block_copies_reused"] >= 0


@pytest.mark.slow
@pytest.mark.cluster
def test_bench_batches_of_oap_transfers_lose_nothing(kafka_bootstrap: str) -> None:
    """``--batch 20 --mix oap``: one issuance then Open Assets transfers, 20 per signed
    TxBatchSubmitted record (decision 0112); every transaction decided and committed."""
    runner = CliRunner()
    result = runner.invoke(cli, ["--rates", "40", "--duration", "3", "--lanes", "10",
                                 "--drain-timeout", "30", "--batch", "20", "--mix", "oap",
                                 "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    step = next(json.loads(line) for line in result.stdout.splitlines()
                if line.startswith("{"))
    assert step["submitted"] == 120 and step["committed"] == 120 and step["lost"] == 0, step
    assert step["latency_ms"]["p50"] > 0


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 0.5) == 50.0
    assert bench.percentile(values, 0.99) == 99.0
    assert bench.percentile(values, 1.0) == 100.0
    assert bench.percentile([], 0.5) == 0.0


class _FakeClient:
    """What ``bench._result`` reads from a LedgerClient: outcomes and committed blocks."""

    def __init__(self, outcomes: dict[str, object], blocks: list[tuple[int, int, int, int]]):
        self._outcomes = outcomes
        self.committed_blocks = blocks
        self.watch_cpu_s = 0.002
        self.block_copies_reused = 3

    def outcome(self, txid: str) -> object:
        return self._outcomes.get(txid)


class _FakeSampler:
    def __init__(self) -> None:
        self.processes = {"koscom": type("P", (), {"pid": 7})()}
        self.rss = {"koscom": [(100.0, 64 * bench.MIB), (101.0, 80 * bench.MIB),
                               (102.0, 72 * bench.MIB)]}

    def rss_between(self, name: str, start: float, end: float) -> list[int]:
        return [rss for at, rss in self.rss[name] if start <= at <= end]


def test_result_accounting_latency_from_schedule_and_blocks() -> None:
    from streams.client.ledger_client import Outcome

    start_s = 100.0
    # 4 txs at 2/s: scheduled at 0, 500, 1000, 1500 ms after the start.
    outcomes = {
        "a": Outcome("a", True, height=1, decided_at_ms=100_300),  # 300 ms
        "b": Outcome("b", True, height=2, decided_at_ms=100_900),  # 400 ms
        "c": Outcome("c", False, code="tx-double-spend", decided_at_ms=101_000),
        # "d" never decided: lost
    }
    blocks = [(1, 1, 400, 100_300), (2, 1, 600, 100_900), (3, 0, 100, 99_000)]
    result = bench._result(
        rate=2.0, options=bench.StepOptions(bootstrap="x", duration_s=2.0),
        client=_FakeClient(outcomes, blocks),  # type: ignore[arg-type]
        txids=["a", "b", "c", "d"],
        window=bench._Window(started_wall_s=start_s, load_end_wall_s=start_s + 2,
                             end_wall_s=start_s + 4, send_lag_max_s=0.0, failed=0),
        verify_per_s=20_000.0, sampler=_FakeSampler(),  # type: ignore[arg-type]
        cpu_s={"koscom": 1.0}, others_cpu_s={"loadgen": 0.01}, extras={},
    )
    assert (result.submitted, result.committed, result.rejected, result.lost) == (4, 2, 1, 1)
    assert result.latency_ms == {"p50": 300.0, "p95": 400.0, "p99": 400.0, "max": 400.0}
    assert result.committed_tps == 1.0  # 2 committed over max(2 s, 0.9 s)
    assert result.block_interval_ms_median == 600.0  # heights 1 -> 2 (3 predates the start)
    assert result.block_bytes_median == 500.0
    assert result.rss_mb_max == 80.0
    assert result.nodes["koscom"]["cpu_cores"] == 0.25
    assert result.extras["rejected_codes"] == {"tx-double-spend": 1}
    # the generator per committed tx: 10 ms of its CPU, 2 of them watching, 2 committed
    assert result.extras["loadgen_cpu_us_per_tx"] == 5_000.0
    assert result.extras["watcher_cpu_us_per_tx"] == 1_000.0
    assert result.extras["block_copies_reused"] == 3
    assert tuple(result.record()) == bench.RECORD_FIELDS

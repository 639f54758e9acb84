"""``capledger bench`` smoke run: two short, low-rate steps against five real node
processes; every field of the issue's JSON object is there and nothing is lost.

The figures themselves are not asserted (a benchmark, not a timed test): only the
accounting (committed == submitted, lost == 0) and the shape of the result.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streams import bench
from streams.bench_cli import cli

pytestmark = pytest.mark.integration

LATENCY_KEYS = {"p50", "p95", "p99", "max"}
NODE_KEYS = {"pid", "cpu_s", "cpu_cores", "rss_mb_start", "rss_mb_end", "rss_mb_max"}


def test_bench_json_has_every_field_and_loses_nothing(kafka_bootstrap: str) -> None:
    runner = CliRunner()  # click >= 8.2 keeps stderr (progress) out of result.stdout
    result = runner.invoke(cli, ["--rates", "5,40", "--duration", "3", "--lanes", "20",
                                 "--drain-timeout", "30", "--all-rates", "--json"])
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


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 0.5) == 50.0
    assert bench.percentile(values, 0.99) == 99.0
    assert bench.percentile(values, 1.0) == 100.0
    assert bench.percentile([], 0.5) == 0.0

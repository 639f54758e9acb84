"""``capledger bench soak`` for half a minute at a low rate against five real node
processes, the broker and a fresh PostgreSQL database: every transaction committed,
the per-minute rows, the disk figures and the projector's two runs are there.

The figures are not asserted (a benchmark, not a timed test), only the accounting and
the shape; the 30-minute soak is a documented command (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streams.cli.bench import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_soak_commits_everything_and_reports_each_figure(
    kafka_bootstrap: str, pg_dsn: str, tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    result = CliRunner().invoke(cli, ["soak", "--minutes", "0.5", "--rate", "20", "--lanes",
                                      "10", "--dsn", pg_dsn, "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(out.read_text())
    assert report["submitted"] == 600 == report["committed"], report
    assert report["undecided"] == 0 and report["rejected"] == 0
    [minute] = report["per_minute"]
    assert minute["committed"] == 600
    assert 0 < minute["p50_ms"] <= minute["p95_ms"] <= minute["p99_ms"] <= minute["max_ms"]
    assert len(minute["rss_mb"]) == 5 and min(minute["rss_mb"].values()) > 0
    disk = report["disk"]
    assert disk["chain_copy_bytes_per_tx"] > 100  # a P2PKH payment alone is ~226 bytes
    assert disk["broker_bytes_per_tx_by_topic"]["ledger.tx.v1"] > 100
    assert disk["broker_bytes_per_tx_by_topic"]["ledger.blocks.v1"] > 100
    projection = report["projection"]
    assert projection["bytes_per_tx"] > 0
    # The second run resumes from its stored state (decision 0093): one block record.
    assert projection["first_startup_block_records"] == 0
    assert projection["restart_startup_block_records"] == 1, projection
    assert report["days_of_history"]["gb_per_day"] > 0

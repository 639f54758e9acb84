"""A short run of the demo (`capledger demo`) on the real broker with five real nodes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.kafka.topics import delete_topics
from streams.tools.demo import run_demo
from tests.conftest import run_async

TX_COUNT = 40


def test_demo_commits_every_payment_and_refuses_the_double_spend(
    tmp_path: Path, kafka_bootstrap: str, stack_settings: Any
) -> None:
    out = io.StringIO()
    result = run_demo(stack_settings, tx_count=TX_COUNT, rounds=2, state_dir=tmp_path / "demo",
                      console=Console(file=out, width=150))
    try:
        text = out.getvalue()
        assert result.submitted == TX_COUNT + 1
        assert result.committed == TX_COUNT
        assert sum(result.rejected.values()) == 1, result.rejected
        heights = [row.height for row in result.blocks]
        assert heights == list(range(1, len(heights) + 1))
        assert sum(row.tx_count for row in result.blocks) == TX_COUNT
        members = {"otc-operator", "surveillance", "koscom", "securities-a", "securities-b"}
        for row in result.blocks:
            assert len(set(row.qc_voters)) >= 3 and set(row.qc_voters) <= members
            assert row.proposer in members and row.block_bytes > 0
            assert result.acks.get(row.height, 0) >= 3
            assert f"block {row.height:>3} {row.block_hash[:12]}" in text
        status = result.status
        assert status is not None and status.healthy, status
        assert {view.heartbeat.height for view in status.nodes if view.heartbeat} == {heights[-1]}
        assert all(code is not None for code in result.node_exit_codes.values())
        assert f"{TX_COUNT} of {TX_COUNT + 1} committed" in text
        assert (tmp_path / "demo" / "chain" / "genesis.json").is_file()
    finally:
        run_async(delete_topics(kafka_bootstrap, prefix=result.topic_prefix))

"""Node snapshots against five real node processes and the real broker: nodes write
snapshots every few heights while committing; a node killed with ``kill -9`` resumes
from its newest snapshot and agrees with the others again; with its snapshots damaged
it refuses them (``snapshot-digest``, kept as evidence), replays its chain copy and
still agrees. Nothing is lost or doubled (issue 9, decision 0101).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.node.snapshots import snapshot_dir, snapshot_files
from tests.integration.cluster_fixtures import ChainRun, running_chain, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

SNAPSHOT_EVERY = 3
COMMIT_TIMEOUT_S = 90.0
AGREE_TIMEOUT_S = 60.0
SNAPSHOT_TIMEOUT_S = 120.0
RESTARTED = "koscom"


async def _commit_heights(run: ChainRun, heights: int) -> None:
    target = run.blocks.head_height + heights
    lane = 0
    while run.blocks.head_height < target:
        batch = run.next_batch(1, lanes=[lane % run.lanes.count])
        lane += 1
        await run.submit(batch)
        await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)


async def _commit_until_two_snapshots(run: ChainRun, directory: Path) -> None:
    """The writer checks once a second, so how many heights pass between snapshots
    depends on the commit rate: commit a height at a time until two are on disk."""
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while len(snapshot_files(directory)) < 2:
        assert time.monotonic() < deadline, f"no two snapshots within {SNAPSHOT_TIMEOUT_S} s"
        await _commit_heights(run, 1)
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: len(snapshot_files(directory)) >= 2, timeout_s=1.5,
                             what="two snapshots written")


def _log(run: ChainRun) -> str:
    return run.cluster.nodes[RESTARTED].log_path.read_text(errors="replace")


async def _restart_and_agree(run: ChainRun) -> None:
    run.cluster.start(RESTARTED)
    await _commit_heights(run, 2)
    await run.wait_agreement(INSTITUTION_IDS, timeout_s=AGREE_TIMEOUT_S)


async def test_a_killed_node_resumes_from_its_snapshot_or_replays_when_it_is_damaged(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPLEDGER_SNAPSHOT_EVERY", str(SNAPSHOT_EVERY))
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        directory = snapshot_dir(run.node_dir(RESTARTED))
        await _commit_until_two_snapshots(run, directory)
        run.cluster.kill(RESTARTED)
        newest = snapshot_files(directory)[0][0]
        await _restart_and_agree(run)
        assert f"resumed from the snapshot of height {newest}" in _log(run)

        run.cluster.kill(RESTARTED)
        for _, path in snapshot_files(directory):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
        await _restart_and_agree(run)
        refused = sorted(p.name for p in directory.glob("*.refused-snapshot-digest"))
        assert len(refused) == 2, sorted(p.name for p in directory.iterdir())
        kinds = [entry["kind"] for entry in run.evidence(RESTARTED)]
        assert kinds.count("snapshot-refused") == 2
        run.assert_exactly_once()
        assert all(code is None for code in run.cluster.exit_codes().values())

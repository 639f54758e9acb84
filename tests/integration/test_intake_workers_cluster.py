"""Five real node processes with two verify workers each (``CAPLEDGER_VERIFY_WORKERS``):
threads (decision 0110) or worker processes returning verdicts
(``CAPLEDGER_VERIFY_PROCESSES``, decision 0122). A burst of chained payments, read by
the nodes in fetches of many records (so intake runs in chunks on both workers,
children often in a later chunk than their parents), commits every transaction exactly
once, the nodes agree, and no record's intake failed.

Owns: nothing but the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from tests.integration.cluster_fixtures import running_chain

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]

LANES = 20
PER_LANE = 6  # each lane's payments spend the one before: 120 records in one burst
COMMIT_TIMEOUT_S = 120.0
AGREE_TIMEOUT_S = 60.0


@pytest.mark.parametrize("processes", ["0", "1"], ids=["threads", "processes"])
async def test_a_burst_commits_exactly_once_with_two_verify_workers_per_node(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str, processes: str
) -> None:
    env = {name: {"CAPLEDGER_VERIFY_WORKERS": "2", "CAPLEDGER_VERIFY_PROCESSES": processes}
           for name in INSTITUTION_IDS}
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=LANES,
                             node_env=env) as run:
        batch = run.next_batch(PER_LANE)
        assert len(batch) == LANES * PER_LANE
        await run.submit(batch)
        await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=AGREE_TIMEOUT_S)
        run.assert_exactly_once()
        for name in INSTITUTION_IDS:
            failed = [e for e in run.evidence(name) if e["kind"] == "record-handling-failed"]
            assert not failed, (name, failed[:3])
            process = run.cluster.nodes[name].process
            assert process is not None
            workers = _spawned_children(process.pid)
            # two verifiers: the node's thread and one worker process
            assert len(workers) == (1 if processes == "1" else 0), (name, workers)
            log = run.cluster.nodes[name].log_path.read_text(errors="replace")
            assert "verify worker process lost" not in log, name


def _spawned_children(pid: int) -> list[int]:
    """The node's children started by multiprocessing's spawn (its verify workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in command:  # not the resource tracker
                found.append(int(child))
    return found

"""Clock skew (issue 9): five real node processes, one whose clock runs minutes ahead
and one slightly behind (``CAPLEDGER_CLOCK_OFFSET_MS``, applied by
``streams.common.clock``). Expected: safety untouched (every tx exactly once, no fork),
the block-time rule (ledger/block_time.py) refuses the far-off node's proposals with
``block-time-future`` at every honest validator, the slightly-off node's proposals are
accepted, the view changes to the next proposer at the far-off node's heights within the
schedule, and the chain goes on. Figures: docs/failure-tests.md.

Owns: nothing but the test.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from ledger.block import proposer_for
from ledger.membership import INSTITUTION_IDS
from tests.integration.cluster_fixtures import running_chain
from tests.integration.ops_fixtures import Probe, free_port

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

FAR_OFF = "securities-b"
FAR_OFFSET_MS = 150_000  # 2.5 minutes ahead: beyond the +10 s a validator allows
SLIGHTLY_OFF = "koscom"
SLIGHT_OFFSET_MS = -4_000  # 4 s behind: within both bounds
PROPOSER_TIMEOUT_MS = 1_500
BLOCK_INTERVAL_MS = 200
HEIGHTS = 11  # the far-off node is round-0 proposer at two of them at least
COMMIT_TIMEOUT_S = 40.0
AGREE_TIMEOUT_S = 40.0
# A height proposed by the far-off node: its round 0 dies on four nacks (or its timeout),
# round 1's proposer commits. Allowed: two rounds plus slack for a loaded 2-core machine.
SKEWED_HEIGHT_S_MAX = 2 * (PROPOSER_TIMEOUT_MS + BLOCK_INTERVAL_MS) / 1000 + 8.0


async def test_skewed_clocks_safety_block_time_and_view_changes(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str
) -> None:
    ports = {name: free_port() for name in INSTITUTION_IDS}
    env = {name: {"CAPLEDGER_METRICS_PORT": str(port)} for name, port in ports.items()}
    env[FAR_OFF]["CAPLEDGER_CLOCK_OFFSET_MS"] = str(FAR_OFFSET_MS)
    env[SLIGHTLY_OFF]["CAPLEDGER_CLOCK_OFFSET_MS"] = str(SLIGHT_OFFSET_MS)
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, node_env=env,
                             proposer_timeout_ms=PROPOSER_TIMEOUT_MS,
                             block_interval_ms=BLOCK_INTERVAL_MS) as run:
        took: dict[int, float] = {}
        for _ in range(HEIGHTS):
            batch = run.next_batch(1)
            started = time.monotonic()
            await run.submit(batch)
            await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
            took[run.blocks.head_height] = time.monotonic() - started
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=AGREE_TIMEOUT_S)
        run.assert_exactly_once()

        blocks = {run.blocks.block_at(h).height: run.blocks.block_at(h)
                  for h in range(1, run.blocks.head_height + 1)}
        skewed_heights = [h for h in blocks if proposer_for(run.genesis, h, 0) == FAR_OFF]
        assert len(skewed_heights) >= 2, skewed_heights
        for height, block in blocks.items():
            assert block.header.proposer != FAR_OFF, f"height {height}: a skewed block won"
            assert block.header.time_ms <= time.time() * 1000 + 10_000
        for height in skewed_heights:
            assert blocks[height].header.round >= 1, f"height {height}: no view change"
            if height in took:  # the heights each batch made (one batch, one height)
                assert took[height] <= SKEWED_HEIGHT_S_MAX, (height, took[height])
        slight = [b for b in blocks.values() if b.header.proposer == SLIGHTLY_OFF]
        assert slight, "the slightly-off node never got a block in"

        honest = [n for n in INSTITUTION_IDS if n != FAR_OFF]
        for name in honest:
            against = [e for e in run.evidence(name) if e["member"] == FAR_OFF]
            assert any(e["kind"] == "nack-block-time-future" for e in against), name
            assert not [e for e in run.evidence(name) if e["member"] == SLIGHTLY_OFF
                        and str(e["kind"]).startswith("nack-block-time")], name
            samples = await Probe(ports[name]).metrics()
            assert samples['capledger_node_nacks_total{code="block-time-future"}'] >= len(
                skewed_heights) - 1, (name, samples)
            assert samples["capledger_node_view_changes_total"] >= 1, name
        # The far-off node sees honest blocks 150 s in its past and nacks them; the
        # majority commits anyway and it follows the certified chain.
        far = await Probe(ports[FAR_OFF]).metrics()
        assert far['capledger_node_nacks_total{code="block-time-past"}'] >= 1
        assert far["capledger_node_clock_offset_ms"] == FAR_OFFSET_MS
        others = sorted(t for h, t in took.items() if h not in skewed_heights)
        at_skewed = [round(took.get(h, -1), 2) for h in skewed_heights]
        print(f"\nclock skew: {len(blocks)} heights, far-off proposer at {skewed_heights}; "
              f"seconds per height there {at_skewed}, elsewhere median "
              f"{statistics.median(others):.2f}")

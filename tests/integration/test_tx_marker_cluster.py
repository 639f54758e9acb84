"""A tx-log record that kills every node process (decision 0124): the nodes die with
the fetch's offset range marked in flight, die again on that record alone at the next
start-up, and at the third start-up quarantine exactly that record and go on; the chain
commits every other transaction, once. Without the marker the chain would crash-loop.

Every node reads the record: one victim alone would not be made to read it again (the
others commit past it meanwhile, and a restarted node reads the tx log from its
committed end). The crash is test-only: the nodes are started with a
``sitecustomize`` module on their ``PYTHONPATH``, written here into ``tmp_path``, that
makes intake call ``os._exit`` at one offset. Nothing in ``streams`` carries a crash
hook; no record's content can trigger it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.kafka.topics import TX
from streams.node.quarantine import Position, Quarantine, Span
from tests.integration.cluster_fixtures import ChainRun, running_chain, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]

DEADLY_OFFSET = 2  # the third record of a fresh tx log (the client writes no markers)
CRASH_EXIT = 77
CRASH_TIMEOUT_S = 90.0
COMMIT_TIMEOUT_S = 90.0
AGREE_TIMEOUT_S = 90.0

HOOK = """
import os
import streams.node.intake as _intake

_deadly = int(os.environ["CAPLEDGER_TEST_CRASH_TX_OFFSET"])
_real_decode = _intake._decode


def _decode(record):
    if record.offset == _deadly:
        os._exit(CRASH_EXIT)
    return _real_decode(record)


_intake._decode = _decode
""".replace("CRASH_EXIT", str(CRASH_EXIT))


def _hook_env(tmp_path: Path) -> dict[str, str]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "CAPLEDGER_TEST_CRASH_TX_OFFSET": str(DEADLY_OFFSET)}


async def _all_die(run: ChainRun) -> set[Span | None]:
    """Waits for every node's crash; the spans their markers name (read, not settled)."""
    await wait_until(lambda: None not in run.cluster.exit_codes().values(),
                     timeout_s=CRASH_TIMEOUT_S, what="every node dies on the record")
    codes = run.cluster.exit_codes()
    assert set(codes.values()) == {CRASH_EXIT}, (codes, run.cluster.log_tail(INSTITUTION_IDS[0]))
    return {Quarantine(run.node_dir(name)).in_flight_span() for name in INSTITUTION_IDS}


async def test_a_tx_record_that_kills_every_node_is_quarantined_after_two_crashes(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str
) -> None:
    hook = _hook_env(tmp_path)
    async with running_chain(tmp_path, unique_id, kafka_bootstrap,
                             node_env={name: hook for name in INSTITUTION_IDS}) as run:
        batch = run.next_batch(1)
        offsets = await run.submit(batch)
        deadly_txid = batch[offsets.index(DEADLY_OFFSET)].txid
        for span in await _all_die(run):  # in a batch: the fetch's range is marked
            assert span is not None and span.topic == TX.name
            assert span.start <= DEADLY_OFFSET < span.end
        run.cluster.start()
        assert await _all_die(run) == {Span(TX.name, DEADLY_OFFSET, DEADLY_OFFSET + 1)}
        assert not list(run.state_dir.rglob("quarantine.jsonl"))
        run.cluster.start()  # the third start-up: quarantined, the chain goes on
        run.submitted.remove(deadly_txid)
        await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
        deadly_lane = offsets.index(DEADLY_OFFSET)  # its change is never created
        await run.submit(run.next_batch(1, [lane for lane in range(run.lanes.count)
                                            if lane != deadly_lane]))
        await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
        await run.wait_agreement(INSTITUTION_IDS, timeout_s=AGREE_TIMEOUT_S)
        assert all(node.alive for node in run.cluster.nodes.values())
        for name in INSTITUTION_IDS:
            quarantine = Quarantine(run.node_dir(name))
            quarantine.load(0)
            assert quarantine.positions == {Position(TX.name, DEADLY_OFFSET)}, name
            kinds = [e["kind"] for e in run.evidence(name)]
            assert kinds.count("record-crashed-node") == 1, name
        run.assert_exactly_once()  # the submitted ones, the deadly one not among them

"""`capledger tx submit` and `capledger status` against a real five-node cluster.

One short-lived cluster (real node processes, the real broker): transactions
committed through the client and through `capledger tx submit` (committed, rejected,
refused locally), then `capledger status --json` until all five agree at the chain's
height, then one node stopped until status calls it SILENT.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.logio import LogReader
from streams.kafka.topics import BLOCKS, delete_topics, ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.loadgen import LANE_VALUE, Lanes, interleave, lane_chains, sign_p2pkh_payment
from tests.conftest import run_async

LANE_COUNT = 10
PER_LANE = 2
WAIT_S = 60.0
STATUS_WAIT_S = 30.0
CLI_TIMEOUT_S = 60.0
TAIL_RECORDS = 20
REPO_DIR = Path(__file__).resolve().parents[2]


def capledger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams", *args], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


@pytest.fixture
def chain(tmp_path: Path, kafka_bootstrap: str, unique_id: str) -> Iterator[dict[str, Any]]:
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, LANE_COUNT)
    genesis = create_chain(tmp_path / "chain", chain_id=unique_id, lanes=lanes)
    run_async(ensure_topics(kafka_bootstrap, prefix=prefix))
    cluster = LocalCluster(tmp_path / "chain", state_dir=tmp_path / "state", topic_prefix=prefix)
    cluster.start()
    try:
        yield {"prefix": prefix, "lanes": lanes, "genesis": genesis, "cluster": cluster,
               "dir": tmp_path / "chain", "bootstrap": kafka_bootstrap}
    finally:
        cluster.stop()
        run_async(delete_topics(kafka_bootstrap, prefix=prefix))


async def _commit_through_client(chain: dict[str, Any]) -> int:
    genesis, lanes = chain["genesis"], chain["lanes"]
    client = LedgerClient(chain["bootstrap"], genesis, submitter="securities-b",
                          topic_prefix=chain["prefix"],
                          signing_key=load_institution_key(chain["dir"], "securities-b"))
    await client.start()
    try:
        txs = list(interleave(lane_chains(lanes, genesis.hash_le, PER_LANE)))
        await client.submit_many(txs)
        outcomes = await client.wait([tx.txid for tx in txs], timeout_s=WAIT_S)
    finally:
        await client.stop()
    assert all(outcome.committed for outcome in outcomes.values()), outcomes
    return max(outcome.height or 0 for outcome in outcomes.values())


async def _last_block_height(chain: dict[str, Any]) -> int:
    reader = LogReader(chain["bootstrap"], chain["prefix"] + BLOCKS.name,
                       client_id="test-cli-status")
    await reader.start(0)
    try:
        end = await reader.end_offset()
        assert end > 0
        reader.seek(max(0, end - TAIL_RECORDS))  # every node publishes each commit
        records: list[Any] = []
        deadline = time.monotonic() + WAIT_S
        while reader.position < end:
            assert time.monotonic() < deadline, "the blocks log's tail did not arrive"
            records += await reader.read(timeout_ms=200)
        return max(int(codec.decode(record.value, expected="BlockCommitted").record["height"])
                   for record in records)
    finally:
        await reader.stop()


def _status(chain: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    result = capledger("status", "--json", "--genesis", str(chain["dir"]),
                       "--topic-prefix", chain["prefix"])
    assert result.returncode in (0, 4, 5), result.stderr
    return result.returncode, json.loads(result.stdout)


def _wait_status(chain: dict[str, Any], done: Any) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + STATUS_WAIT_S
    while True:
        code, report = _status(chain)
        if done(code, report):
            return code, report
        assert time.monotonic() < deadline, f"status never settled: {code} {report}"


def test_tx_submit_and_status_on_a_five_node_cluster(chain: dict[str, Any]) -> None:
    height = asyncio.run(_commit_through_client(chain))
    assert height >= 1

    # A locally unparsable transaction is refused before anything is sent.
    bad = capledger("tx", "submit", "--genesis", str(chain["dir"]), "--submitter",
                    "securities-a", "--hex", "0100000001", "--topic-prefix", chain["prefix"])
    assert bad.returncode == 2 and "not a valid transaction" in bad.stderr, bad

    # Lane 0's next payment commits; its genesis output spent again is rejected.
    genesis, lanes = chain["genesis"], chain["lanes"]
    key = lanes.keys()[0]
    last = lane_chains(lanes, genesis.hash_le, PER_LANE)[0][-1]
    payment = sign_p2pkh_payment(key, OutPoint(last.hash_le, 0), LANE_VALUE - PER_LANE,
                                 last.outputs[1].script_pubkey, 5)
    allocation = genesis_allocation_tx(genesis.hash_le, lanes.allocations())
    double_spend = sign_p2pkh_payment(key, OutPoint(allocation.hash_le, 0), LANE_VALUE,
                                      last.outputs[1].script_pubkey, 7)
    tx_file = chain["dir"].parent / "payment.hex"
    tx_file.write_text(payment.serialize().hex() + "\n")
    ok = capledger("tx", "submit", "--genesis", str(chain["dir"]), "--submitter",
                   "securities-a", "--file", str(tx_file), "--topic-prefix", chain["prefix"],
                   "--timeout", str(WAIT_S))
    assert ok.returncode == 0, ok
    assert ok.stdout.startswith("committed at height ") and payment.txid in ok.stdout
    committed_height = int(ok.stdout.split()[3])
    assert committed_height > height
    rejected = capledger("tx", "submit", "--genesis", str(chain["dir"]), "--submitter",
                         "securities-a", "--hex", double_spend.serialize().hex(),
                         "--topic-prefix", chain["prefix"], "--timeout", str(WAIT_S))
    assert rejected.returncode == 3, rejected
    assert rejected.stdout.startswith("rejected: ") and len(rejected.stdout.split(":")) >= 3

    # All five agree at the chain's height (heartbeats come every second). The range
    # holding the double spend is decided by a block of its own (empty if all rejected),
    # so the chain's height is read from the blocks log, not assumed.
    chain_height = run_async(_last_block_height(chain))
    assert chain_height >= committed_height

    def agreed(code: int, report: dict[str, Any]) -> bool:
        heights = {node.get("height") for node in report["nodes"]}
        return code == 0 and heights == {chain_height}

    code, report = _wait_status(chain, agreed)
    assert [node["institution"] for node in report["nodes"]] == [
        member.id for member in genesis.members]
    assert all(node["state"] == "OK" for node in report["nodes"])
    assert len({node["head_hash"] for node in report["nodes"]}) == 1
    assert len({node["state_hash"] for node in report["nodes"]}) == 1
    assert report["healthy"] and not report["disagreement"] and code == 0

    # One node stops: status calls it SILENT (exit 5), the others stay OK.
    chain["cluster"].stop("koscom")
    code, report = _wait_status(
        chain, lambda code, report: code == 5 and any(
            node["institution"] == "koscom" and node["state"] == "SILENT"
            for node in report["nodes"]))
    states = {node["institution"]: node["state"] for node in report["nodes"]}
    assert states.pop("koscom") == "SILENT"
    assert set(states.values()) == {"OK"}

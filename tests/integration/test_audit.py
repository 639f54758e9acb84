"""Audit replay and inclusion proofs against real Kafka and PostgreSQL.

A synthetic chain (blocks certified with a test genesis's keys, each height published
by three committers, the certificates' votes written to the votes log, rejection
records) is projected by the real projector; then:
- ``Auditor`` re-verifies everything and finds the projection equal to the replay;
- rows altered, deleted or added in PostgreSQL are each named (table, key, expected,
  found), and ``capledger audit replay`` exits 4 printing them;
- a votes log that decided another block at a height names that height;
- comparison batches of two transactions, many in flight, name what one batch names;
- ``capledger audit prove`` writes a proof that ``capledger audit verify-proof`` accepts
  offline, and refuses once a byte of it is changed;
- the replay speed is measured (tx/s with every signature verified).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import dataclasses
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.block import QuorumCertificate, sign_vote
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.tx import Transaction
from streams.common.genesis_files import write_genesis_dir
from streams.kafka import codec
from streams.kafka.logio import LogWriter
from streams.kafka.records import vote_record
from streams.kafka.topics import BLOCKS, REJECTED, VOTES
from streams.projections import audit as audit_module
from streams.projections.audit import Auditor
from streams.projections.projector import Projector
from streams.tools.loadgen import Lanes, certified_blocks, interleave, lane_chains
from tests.integration.test_projector import (
    COMMITTERS,
    TIME_MS,
    chain_topics,
    committed_payload,
    rejection_payload,
    synthetic_genesis,
)

SUBPROCESS_TIMEOUT_S = 120.0
PERF_BLOCKS = int(os.environ.get("CAPLEDGER_AUDIT_PERF_BLOCKS", "20"))  # benchmarks.md
PERF_TXS_PER_BLOCK = 250
PROFILE_OUT = os.environ.get("CAPLEDGER_PROFILE_OUT")  # cProfile of Auditor.run
AUDIT_TX_PER_S_MIN = 300  # a floor that catches a regression, far under the measured rate


def vote_payloads(qc: QuorumCertificate) -> list[bytes]:
    return [codec.encode("VoteCast", vote_record(vote, now_ms=TIME_MS)) for vote in qc.votes]


async def publish_chain(bootstrap: str, prefix: str, chain: list[Any],
                        rejections: int = 0, votes: list[bytes] | None = None) -> None:
    writer = LogWriter(bootstrap, client_id=f"{prefix}writer")
    await writer.start()
    try:
        vote_items = votes if votes is not None else [
            payload for _, qc in chain for payload in vote_payloads(qc)]
        await writer.send_many(prefix + VOTES.name, [(None, v) for v in vote_items])
        for block, qc in chain:
            await writer.send_many(prefix + BLOCKS.name, [
                (None, committed_payload(block, qc, committer)) for committer in COMMITTERS])
        await writer.send_many(prefix + REJECTED.name, [
            (None, rejection_payload(i // 3, COMMITTERS[i % 3], prefix))
            for i in range(rejections)])
    finally:
        await writer.stop()


@contextlib.asynccontextmanager
async def projected(bootstrap: str, dsn: str, prefix: str, genesis: Genesis,
                    chain: list[Any], *, rejections: int = 0) -> AsyncIterator[None]:
    """The chain's topics, the chain published in them, and projected into ``dsn``;
    the topics (and their rules) deleted after."""
    async with chain_topics(bootstrap, prefix):
        await publish_chain(bootstrap, prefix, chain, rejections=rejections)
        await Projector(genesis, bootstrap=bootstrap, dsn=dsn, topic_prefix=prefix).run()
        yield


def build_chain(unique_id: str, lanes: int, per_lane: int,
                per_block: int) -> tuple[Genesis, dict[str, PrivateKey], list[Any]]:
    lane_set = Lanes(unique_id, lanes)
    genesis, keys = synthetic_genesis(unique_id, lane_set)
    txs = list(interleave(lane_chains(lane_set, genesis.hash_le, per_lane)))
    chain = certified_blocks(genesis, keys, [txs[i:i + per_block]
                                             for i in range(0, len(txs), per_block)],
                             time_ms=TIME_MS)
    return genesis, keys, chain


def execute(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql, params)


async def run_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ})
    out, _ = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
    return int(process.returncode or 0), out.decode()


async def test_audit_names_altered_rows_and_proofs_verify_offline(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, tmp_path: Path
) -> None:
    prefix = f"{unique_id}."
    genesis, _, chain = build_chain(unique_id, 4, 6, 5)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain, rejections=6):

        def auditor() -> Auditor:
            return Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn, topic_prefix=prefix)

        # 1. the projection equals the replay; every block decided by the votes log
        clean = await auditor().run()
        assert clean.ok, [f.line() for f in clean.findings]
        assert clean.blocks == len(chain) and clean.heights_decided == len(chain)
        assert clean.txs == sum(len(b.txs) for b, _ in chain) == clean.inputs_verified
        assert clean.copies_identical == 2 * len(chain) and clean.rejections_compared == 6
        assert clean.blocks_compared == len(chain) + 1
        assert clean.heights_recompared == 0  # every height's digests equal (decision 0115)

        # 2. altered, deleted and added rows are each named
        block3, _ = chain[2]
        victim = block3.txs[1]
        execute(pg_dsn, 'UPDATE tx_output SET value = value + 1 WHERE txid = %s AND "index" = 1',
                (victim.txid,))
        execute(pg_dsn, "UPDATE block SET state_hash = %s WHERE height = 4", ("ab" * 32,))
        execute(pg_dsn, "DELETE FROM tx_rejection WHERE log_offset = 2")
        altered = await auditor().run()
        lines = [f.line() for f in altered.findings]
        assert altered.heights_recompared == 1, lines  # height 3's output digest only
        value = victim.outputs[1].value
        assert (f"row-differs: tx_output [txid={victim.txid}, index=1] expected value={value}, "
                f"found value={value + 1}") in lines, lines
        assert any(line.startswith("row-differs: block [height=4] expected state_hash=")
                   and line.endswith("found state_hash=" + "ab" * 32) for line in lines), lines
        assert "row-missing: tx_rejection [log_offset=2] expected a row, found none" in lines
        assert any(line.startswith("count-differs: tx_rejection [count(*)] expected 6, found 5")
                   for line in lines), lines
        assert any(line.startswith("balance-differs: address_balance") for line in lines)

        # 3. the CLI exits 4 and prints the findings
        genesis_dir = tmp_path / "genesis"
        write_genesis_dir(genesis_dir, genesis, {})
        code, text = await run_cli("audit", "replay", "--genesis", str(genesis_dir),
                                   "--topic-prefix", prefix, "--dsn", pg_dsn, "--workers", "2")
        assert code == 4, text
        assert f"FINDING row-differs: tx_output [txid={victim.txid}, index=1]" in text
        assert "tx/s" in text

        # 4. a proof from the logs verifies offline; a changed byte fails
        proof_path = tmp_path / "proof.json"
        code, text = await run_cli("audit", "prove", victim.txid, "--genesis", str(genesis_dir),
                                   "--topic-prefix", prefix, "--dsn", pg_dsn,
                                   "--out", str(proof_path))
        assert code == 0, text
        code, text = await run_cli("audit", "verify-proof", str(proof_path), "--chain-id",
                                   display_hex(genesis.hash_le))
        assert code == 0 and f"tx {victim.txid} is in block {block3.hash_hex} at height 3" \
            in text, text
        # the same proof without the projection, by scanning the blocks log
        scanned = tmp_path / "scanned.json"
        code, text = await run_cli("audit", "prove", victim.txid, "--genesis", str(genesis_dir),
                                   "--topic-prefix", prefix, "--scan-log", "--out", str(scanned))
        assert code == 0, text
        assert json.loads(scanned.read_text()) == json.loads(proof_path.read_text())
        document = json.loads(proof_path.read_text())
        tx_hex = document["tx_hex"]
        document["tx_hex"] = tx_hex[:100] + ("0" if tx_hex[100] != "0" else "1") + tx_hex[101:]
        proof_path.write_text(json.dumps(document))
        code, text = await run_cli("audit", "verify-proof", str(proof_path))
        assert code == 3 and "INVALID (proof-" in text, text
        code, text = await run_cli("audit", "prove", "00" * 32, "--genesis", str(genesis_dir),
                                   "--topic-prefix", prefix, "--dsn", pg_dsn,
                                   "--out", str(proof_path))
        assert code == 2 and "unknown-txid" in text, text


async def test_audit_names_a_certified_block_the_votes_did_not_decide(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str
) -> None:
    """The votes log decides another block at height 2 than the one published: named."""
    prefix = f"{unique_id}."
    genesis, keys, chain = build_chain(unique_id, 2, 3, 2)
    genesis_hash = genesis.hash_le
    votes = [p for _, qc in chain[:1] for p in vote_payloads(qc)]
    other_hash = bytes(range(32))
    votes += [codec.encode("VoteCast", vote_record(
        sign_vote(keys[voter], genesis_hash, voter=voter, height=2, round_=0, kind="ack",
                  block_hash=other_hash), now_ms=TIME_MS)) for voter in genesis.member_ids[:3]]
    async with chain_topics(kafka_bootstrap, prefix):
        await publish_chain(kafka_bootstrap, prefix, chain, votes=votes)
        await Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                        topic_prefix=prefix).run()
        report = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix).run()
    lines = [f.line() for f in report.findings]
    assert lines == [
        f"not-decided: ledger.blocks.v1 [height=2] expected block {display_hex(other_hash)} "
        f"(decided by the votes log), found certified block {chain[1][0].hash_hex}"], lines
    # the projector quarantined the losing block (hardening, decision 0050): the rows
    # under it match, and nothing is claimed missing above it
    assert report.heights_decided == 1


async def test_audit_names_altered_spent_marks(kafka_bootstrap: str, unique_id: str,
                                               pg_dsn: str) -> None:
    """A spent mark cleared and one pointing at the wrong spender are each named with
    the output's key (the batch's spends are fetched by an indexed join; a mark not
    found that way is looked up by key, decision 0114)."""
    prefix = f"{unique_id}."
    genesis, _, chain = build_chain(unique_id, 2, 3, 2)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain):
        cleared_by, moved_by = chain[1][0].txs  # height 2: each spends one earlier output
        cleared, moved = cleared_by.inputs[0].prevout, moved_by.inputs[0].prevout
        execute(pg_dsn, 'UPDATE tx_output SET spent_by_txid = NULL WHERE txid = %s AND '
                '"index" = %s', (display_hex(cleared.txid_le), cleared.index))
        execute(pg_dsn, 'UPDATE tx_output SET spent_by_txid = %s WHERE txid = %s AND '
                '"index" = %s', (cleared_by.txid, display_hex(moved.txid_le), moved.index))
        # and an output nothing spends marked spent: the other direction of the final
        # comparison of unspent outputs (streamed from PostgreSQL, decision 0134)
        last = chain[-1][0].txs[-1]
        execute(pg_dsn, 'UPDATE tx_output SET spent_by_txid = %s WHERE txid = %s AND '
                '"index" = 0', (cleared_by.txid, last.txid))
        report = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix).run()
    lines = [f.line() for f in report.findings]
    assert (f"spent-differs: tx_output [txid={last.txid}, index=0] expected "
            "spent_by_txid=NULL (unspent), found spent") in lines, lines
    cleared_key = f"txid={display_hex(cleared.txid_le)}, index={cleared.index}"
    moved_key = f"txid={display_hex(moved.txid_le)}, index={moved.index}"
    assert (f"row-differs: tx_output [{cleared_key}] expected spent_by_txid="
            f"{cleared_by.txid}, found spent_by_txid=NULL") in lines, lines
    assert (f"row-differs: tx_output [{moved_key}] expected spent_by_txid={moved_by.txid}, "
            f"found spent_by_txid={cleared_by.txid}") in lines, lines
    assert (f"spent-differs: tx_output [{cleared_key}] expected spent, found "
            "spent_by_txid=NULL (unspent)") in lines, lines


async def test_audit_lists_unexpected_unspent_outputs_in_key_order_up_to_the_cap(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs projected unspent that the chain spent are named in key order, as the
    whole set's comparison named them; past the report's cap they are counted, not
    listed, and the comparison keeps only that many (decision 0134)."""
    prefix = f"{unique_id}."
    genesis, _, chain = build_chain(unique_id, 3, 4, 3)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain):
        execute(pg_dsn, "UPDATE tx_output SET spent_by_txid = NULL "
                "WHERE spent_by_txid IS NOT NULL", ())
        full = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                             topic_prefix=prefix).run()
        unspent = [f.key for f in full.findings
                   if f.code == "spent-differs" and f.expected == "spent"]
        assert len(unspent) >= 3, [f.line() for f in full.findings]
        keys = [(k.split(", ")[0], int(k.split("index=")[1])) for k in unspent]
        assert keys == sorted(keys)
        # a cap that ends the list at the first unexpected output: the same findings
        # up to it, the same ones in all (listed or counted)
        cap = [f.key for f in full.findings].index(unspent[0]) + 1
        monkeypatch.setattr(audit_module, "FINDINGS_MAX", cap)
        capped = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix).run()
    assert [f.line() for f in capped.findings] == [f.line() for f in full.findings[:cap]]
    assert (len(capped.findings) + capped.findings_dropped
            == len(full.findings) + full.findings_dropped)


async def test_audit_findings_the_same_with_many_batches_in_flight(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comparison batches of two transactions (many in flight while the chain goes on,
    decision 0123) name exactly what one batch names: the same findings and counts."""
    prefix = f"{unique_id}."
    genesis, _, chain = build_chain(unique_id, 4, 6, 5)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain, rejections=6):
        victim = chain[2][0].txs[1]
        execute(pg_dsn, 'UPDATE tx_output SET value = value + 1 WHERE txid = %s AND "index" = 1',
                (victim.txid,))
        execute(pg_dsn, "UPDATE block SET state_hash = %s WHERE height = 4", ("ab" * 32,))
        spender = chain[1][0].txs[0]
        spent = spender.inputs[0].prevout
        execute(pg_dsn, 'UPDATE tx_output SET spent_by_txid = NULL WHERE txid = %s AND '
                '"index" = %s', (display_hex(spent.txid_le), spent.index))
        execute(pg_dsn, "DELETE FROM tx_rejection WHERE log_offset = 2")

        async def audit() -> Any:
            return await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                 topic_prefix=prefix).run()

        one_batch = await audit()
        monkeypatch.setattr(audit_module, "COMPARE_TXS_MAX", 2)
        monkeypatch.setattr(audit_module, "COMPARISONS_IN_FLIGHT_MAX", 3)
        many = await audit()
    lines = sorted(f.line() for f in one_batch.findings)
    assert sorted(f.line() for f in many.findings) == lines
    assert len(lines) >= 5 and any("spent_by_txid=NULL" in line for line in lines), lines

    def counts(report: Any) -> tuple[int, ...]:
        return (report.blocks, report.txs, report.blocks_compared, report.rows_compared,
                report.rejections_compared, report.heights_decided, report.findings_dropped)

    assert counts(many) == counts(one_batch)
    assert one_batch.heights_recompared == 2  # height 3's outputs, height 2's spends
    assert many.heights_recompared == 2


@pytest.mark.parametrize("workers", [1, 2])
async def test_audit_replay_speed(kafka_bootstrap: str, unique_id: str, pg_dsn: str,
                                  workers: int) -> None:
    """tx/s of the audit replay with every script and signature verified (printed)."""
    prefix = f"{unique_id}."
    genesis, _, chain = build_chain(unique_id, PERF_TXS_PER_BLOCK, PERF_BLOCKS,
                                    PERF_TXS_PER_BLOCK)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain):
        profile = cProfile.Profile() if PROFILE_OUT else None
        started = time.monotonic()
        if profile is not None:
            profile.enable()
        report = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix, workers=workers).run()
        if profile is not None:
            profile.disable()
            profile.dump_stats(f"{PROFILE_OUT}.{workers}")
        elapsed = time.monotonic() - started
    assert report.ok, [f.line() for f in report.findings[:5]]
    assert report.heights_recompared == 0  # digests equal: no row fetched (decision 0115)
    rate = report.txs / elapsed
    print(f"audit replay, {workers} worker(s): {report.txs} txs, {report.inputs_verified} "
          f"signatures verified, "
          f"{report.blocks} blocks compared with PostgreSQL in {elapsed:.2f} s: {rate:.0f} tx/s; "
          f"{report.cpu_s:.2f} CPU s in this process: {report.tx_per_cpu_s:.0f} tx per CPU s")
    assert report.txs == PERF_BLOCKS * PERF_TXS_PER_BLOCK
    assert rate >= AUDIT_TX_PER_S_MIN, f"{rate:.0f} tx/s"


async def test_audit_survives_hostile_records_and_names_a_fork(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str
) -> None:
    """Garbage in every log is counted and skipped; a second certified block at a
    projected height (written after the projection) is a ``fork`` finding."""
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, 2)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 3)))  # 6 txs
    chain = certified_blocks(genesis, keys, [txs[:2], txs[2:4], txs[4:]], time_ms=TIME_MS)
    other = certified_blocks(genesis, keys, [txs[:2], txs[2:3]], time_ms=TIME_MS)[1]
    assert other[0].hash != chain[1][0].hash and other[0].height == 2
    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-garbage")
        await writer.start()
        try:
            for topic in (BLOCKS, VOTES, REJECTED):
                await writer.send(prefix + topic.name, b"not avro at all")
        finally:
            await writer.stop()
        await publish_chain(kafka_bootstrap, prefix, chain)
        await Projector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                        topic_prefix=prefix).run()
        clean = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                              topic_prefix=prefix).run()
        assert clean.ok, [f.line() for f in clean.findings]
        assert clean.copies_invalid == 1 and clean.evidence == {"vote-undecodable/?": 1}
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-fork")
        await writer.start()
        try:
            await writer.send(prefix + BLOCKS.name, committed_payload(*other, "koscom"))
        finally:
            await writer.stop()
        forked = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix).run()
    lines = [f.line() for f in forked.findings]
    assert len(lines) == 1 and lines[0].startswith(
        f"fork: ledger.blocks.v1 [offset={1 + 3 * len(chain)}, height=2] expected block "
        f"{chain[1][0].hash_hex}, found certified block {other[0].hash_hex}"), lines
    assert forked.unprojected_blocks == 0 and forked.blocks == len(chain)


def _forged(tx: Transaction) -> Transaction:
    """The same payment with one byte of its signature changed (still parses)."""
    script_sig = bytearray(tx.inputs[0].script_sig)
    script_sig[10] ^= 0x01
    return Transaction(tx.version, (dataclasses.replace(tx.inputs[0],
                                                        script_sig=bytes(script_sig)),),
                       tx.outputs, tx.lock_time)


@pytest.mark.parametrize("workers", [1, 2])
async def test_audit_names_a_certified_transaction_whose_signature_fails(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, workers: int
) -> None:
    """A majority certified a block holding a forged signature (the projector trusts the
    certificate); the audit verifies every signature, in process or in a worker pool."""
    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, 3)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    chains = lane_chains(lanes, genesis.hash_le, 2)
    forged = _forged(chains[1][-1])  # the last payment of lane 1: nothing spends it
    chains[1][-1] = forged
    txs = list(interleave(chains))
    chain = certified_blocks(genesis, keys, [txs[:3], txs[3:]], time_ms=TIME_MS)
    async with projected(kafka_bootstrap, pg_dsn, prefix, genesis, chain):
        report = await Auditor(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=prefix, workers=workers).run()
    lines = [f.line() for f in report.findings]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"script-invalid: ledger.blocks.v1 [height=2, txid={forged.txid}, "
                               "input=0] expected script and signature verify, found "), lines
    assert report.blocks == 2 and report.heights_decided == 2 and report.blocks_compared == 3


@pytest.mark.cluster
async def test_audit_of_a_real_chain(kafka_bootstrap: str, unique_id: str, pg_dsn: str,
                                     tmp_path: Path) -> None:
    """Five real nodes (their votes log with late acks and every member's copies, a
    double spend refused): projected, then audited with no finding; every height decided
    by the votes log; and the CLI agrees."""
    from ledger.state import genesis_allocation_tx
    from ledger.tx import OutPoint
    from streams.tools.loadgen import LANE_VALUE, sign_p2pkh_payment, sink_script
    from tests.integration.cluster_fixtures import running_chain

    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=3) as run:
        batch = run.next_batch(3)
        allocation = genesis_allocation_tx(run.genesis.hash_le, run.genesis.allocations)
        double_spend = sign_p2pkh_payment(run.lanes.keys()[0], OutPoint(allocation.hash_le, 0),
                                          LANE_VALUE, sink_script(run.lanes.seed), 2)
        await run.submit([*batch, double_spend])
        await run.wait_committed([tx.txid for tx in batch], timeout_s=60)
        head = await run.wait_agreement(list(run.genesis.member_ids), timeout_s=30)
        run.cluster.stop()
        await Projector(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                        topic_prefix=run.prefix).run()
        report = await Auditor(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                               topic_prefix=run.prefix).run()
        assert report.ok, [f.line() for f in report.findings]
        assert report.height == head == report.heights_decided
        assert report.txs == len(batch) and report.rejections_compared > 0
        code, text = await run_cli("audit", "replay", "--genesis", str(run.chain_dir),
                                   "--topic-prefix", run.prefix, "--dsn", pg_dsn, "--quiet")
    assert code == 0 and "audit: OK" in text and f"height {head}\n" in text, text

"""Governance on five real node processes and the real broker (issue 10, decision 0061):
a change signed by a minority is refused with its code (through the CLI); a key
rotation signed by a majority takes effect at its height, the old key's votes are
refused from there and the chain keeps committing, and the member's node, restarted
with its new key, votes again; a member removed by the majority no longer counts,
blocks go on with 4 members and quorum 3, the proposer rotation skips it, and its
node, still running, stops voting and follows the chain. koscom's node, once
restarted with its new key, writes a snapshot every few heights: those written after
the changes carry the membership schedule (decision 0103), and killed and restarted
it resumes from one signed with its rotated key and keeps agreeing.

Owns: nothing but the test. Imports: ``ledger``, ``streams``, the helpers of
``tests/integration/cluster_fixtures.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from ledger.block import Vote, proposer_for
from ledger.governance import (
    ACTIVATION_DELAY_MIN_HEIGHTS,
    KIND_REMOVE,
    KIND_ROTATE,
    MembershipSchedule,
    SignedChange,
    governance_tx,
)
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.proof import ProofError, verify_proof
from ledger.snapshot import SnapshotError, decode_snapshot
from streams.cli import exit_codes
from streams.client.governance import draft_change
from streams.client.ledger_client import LedgerClient
from streams.common.genesis_files import load_institution_key
from streams.kafka import codec
from streams.kafka.acls import external_system_name
from streams.kafka.logio import read_all
from streams.kafka.records import vote_from_record
from streams.kafka.topics import REJECTED, VOTES
from streams.node.snapshots import snapshot_dir, snapshot_files
from streams.projections.audit import Auditor
from streams.projections.consensus_evidence import EvidenceProjector
from streams.projections.projector import Projector
from streams.projections.proofs import build_proof_from_logs
from streams.tools.cluster import node_kafka_env
from tests.integration.cluster_fixtures import ChainRun, read_log, running_chain, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

COMMIT_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 90.0
SIGNERS = ("otc-operator", "surveillance", "securities-a")
# Room between the block expected to carry a change and its effective height.
ACTIVATION_MARGIN_HEIGHTS = 6
SNAPSHOT_EVERY = 3  # koscom's node: snapshots before and after the changes
SNAPSHOT_TIMEOUT_S = 120.0


async def commit_batch(run: ChainRun) -> int:
    """One payment of the next lane (round robin; each lane holds 40), committed; the
    head height after. One payment is enough to make a block."""
    lane = len(run.submitted) % run.lanes.count
    batch = run.next_batch(1, lanes=[lane])
    await run.submit(batch)
    await run.wait_committed([tx.txid for tx in batch], timeout_s=COMMIT_TIMEOUT_S)
    return run.blocks.head_height


async def grow_to(run: ChainRun, height: int) -> None:
    while run.blocks.head_height < height:
        await commit_batch(run)


async def commit_change(run: ChainRun, signed: SignedChange) -> int:
    tx = governance_tx(signed)
    await run.submit([tx])
    outcome = (await run.client.wait([tx.txid], timeout_s=COMMIT_TIMEOUT_S))[tx.txid]
    assert outcome.committed, f"governance change refused: {outcome.code}: {outcome.message}"
    assert outcome.height is not None
    return outcome.height


def signed_by(signed: SignedChange, run: ChainRun, *members: str) -> SignedChange:
    for member in members:
        signed = signed.signed_by(member, run.key(member))
    return signed


def cli(run: ChainRun, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **node_kafka_env("securities-a", run.cluster.kafka_settings))
    return subprocess.run([sys.executable, "-m", "streams", "governance", *args],
                          capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S,
                          check=False)


def minority_is_refused_by_the_cli(run: ChainRun, tmp_path: Path, effective: int) -> None:
    path = tmp_path / "minority.json"
    result = cli(run, "propose", "--genesis", str(run.chain_dir), "--kind", KIND_REMOVE,
                 "--member", "otc-operator", "--sequence", "1",
                 "--effective-height", str(effective), "--out", str(path))
    assert result.returncode == 0, result.stderr
    for member in ("securities-a", "securities-b"):
        result = cli(run, "sign", str(path), "--genesis", str(run.chain_dir), "--member", member)
        assert result.returncode == 0, result.stderr
    result = cli(run, "submit", str(path), "--genesis", str(run.chain_dir),
                 "--submitter", "securities-a", "--topic-prefix", run.prefix, "--timeout", "60")
    assert result.returncode == exit_codes.REJECTED, (result.stdout, result.stderr)
    assert "rejected: governance-minority" in result.stdout


async def votes_by(run: ChainRun, voter: str) -> list[Vote]:
    records = await read_log(run.bootstrap, run.topic(VOTES.name), "VoteCast")
    return [v for v in map(vote_from_record, records) if v.voter == voter]


async def rotate_koscom(run: ChainRun) -> tuple[int, PrivateKey]:
    """Rotation, signed by a majority; returns its effective height and the new key."""
    new_key = PrivateKey(os.urandom(32))
    head = run.blocks.head_height
    effective = head + ACTIVATION_DELAY_MIN_HEIGHTS + ACTIVATION_MARGIN_HEIGHTS
    draft = draft_change(run.genesis, kind=KIND_ROTATE, sequence=1, effective_height=effective,
                         member_id="koscom", public_key_hex=new_key.public_key.sec.hex())
    carried = await commit_change(run, signed_by(draft, run, *SIGNERS))
    assert carried + ACTIVATION_DELAY_MIN_HEIGHTS <= effective
    return effective, new_key


async def test_rotation_removal_and_minority_on_five_nodes(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str, pg_dsn: str
) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, block_interval_ms=50,
                             proposer_timeout_ms=1_000, back_offices=("securities-a",)) as run:
        await commit_batch(run)
        await back_office_submits_with_its_own_key(run)
        minority_is_refused_by_the_cli(run, tmp_path, run.blocks.head_height + 40)

        # --- rotation: koscom's node keeps its old key past the effective height
        effective, new_key = await rotate_koscom(run)
        await grow_to(run, effective + 3)
        # koscom's old-key votes for those heights may still be on their way: wait for
        # the refusal instead of reading the evidence once.
        await wait_until(lambda: any(
            e.get("member") == "koscom" and e["kind"] == "vote-forged"
            for e in run.evidence("otc-operator")),
            timeout_s=30.0, what="koscom's old-key votes refused after the rotation")
        assert not run.blocks.bad_records, run.blocks.bad_records[:3]
        schedule: MembershipSchedule = run.blocks.schedule
        assert schedule.at(effective).member("koscom").public_key == new_key.public_key  # type: ignore[union-attr]
        for height in range(effective, run.blocks.head_height + 1):
            assert "koscom" not in _qc_voters(run, height), f"old key counted at {height}"

        # --- koscom restarts with its new key and votes again
        retired_key = run.key("koscom")
        run.cluster.stop("koscom")
        (run.chain_dir / "keys" / "koscom.wif").write_text(new_key.to_wif() + "\n")
        # From now on a snapshot every few heights (not before: the check of the old
        # key's votes above needs koscom's votes on time, unhurried by snapshots).
        run.cluster.node_env["koscom"] = {"CAPLEDGER_SNAPSHOT_EVERY": str(SNAPSHOT_EVERY)}
        run.cluster.start("koscom")
        restarted_at = run.blocks.head_height
        await grow_to(run, restarted_at + 4)

        async def new_key_votes() -> bool:
            votes = await votes_by(run, "koscom")
            return any(v.height > restarted_at and v.kind == "ack"
                       and new_key.public_key.verify(v.signature, v.message(run.genesis.hash_le))
                       for v in votes)

        await _eventually(new_key_votes, run)
        await rotated_member_submits_in_its_own_name(run, new_key, retired_key)

        # --- removal of securities-b: 4 members, quorum 3, rotation over 4
        head = run.blocks.head_height
        removal_at = head + ACTIVATION_DELAY_MIN_HEIGHTS + ACTIVATION_MARGIN_HEIGHTS
        draft = draft_change(run.genesis, kind=KIND_REMOVE, sequence=2,
                             effective_height=removal_at, member_id="securities-b")
        await commit_change(run, signed_by(draft, run, *SIGNERS))
        await grow_to(run, removal_at + 5)
        view = run.blocks.schedule.at(removal_at)
        assert len(view.members) == 4 and view.params.quorum == 3
        for height in range(removal_at, run.blocks.head_height + 1):
            block = run.blocks.block_at(height)
            assert block.header.proposer == proposer_for(view, height, block.header.round)
            assert "securities-b" not in _qc_voters(run, height)
        # The removed member's node runs on as an observer: it follows the chain and
        # casts no vote where it is no longer a member.
        late = [v for v in await votes_by(run, "securities-b") if v.height >= removal_at]
        assert not late, f"securities-b voted after its removal: {late[:2]}"
        live = [name for name, node in run.cluster.nodes.items() if node.alive]
        await run.wait_agreement(live, timeout_s=COMMIT_TIMEOUT_S)
        assert not run.blocks.forks() and not run.blocks.bad_records
        await projection_and_audit_follow(run, pg_dsn, effective, new_key, removal_at)
        await evidence_follows_the_membership(run, pg_dsn, effective, new_key)
        status_shows_the_membership(run)
        await resumes_from_a_snapshot_after_governance(run, new_key, removal_at)


async def good_commits_forged_is_refused(run: ChainRun, client: LedgerClient,
                                        forger: LedgerClient) -> None:
    """One payment through ``client`` (started) commits; one through ``forger`` (the
    same submitter name, a key that may not sign for it) is refused at intake with
    envelope-signature. Stops both clients."""
    try:
        good, bad = run.next_batch(1, lanes=[0]), run.next_batch(1, lanes=[1])
        await client.submit_many(good)
        run.submitted.extend(tx.txid for tx in good)
        offsets = await forger.submit_many(bad)
        run.lane_cursor[1] -= 1  # refused, not spent: a later batch sends that payment again
        outcome = (await client.wait([good[0].txid], timeout_s=COMMIT_TIMEOUT_S))[good[0].txid]
        assert outcome.committed, (outcome.code, outcome.message)
    finally:
        await client.stop()
        await forger.stop()
    rejected: list[dict[str, object]] = []

    async def refused() -> bool:
        rejected[:] = [r for r in await read_log(run.bootstrap, run.topic(REJECTED.name),
                                                 "TxRejected")
                       if r["source_offset"] == offsets[0]]
        return bool(rejected)

    await _eventually(refused, run)
    assert {r["code"] for r in rejected} == {"envelope-signature"}, rejected


async def back_office_submits_with_its_own_key(run: ChainRun) -> None:
    """securities-a's back office (an external principal) signs envelopes with its
    registered submit key: committed. Its member's identity key signing in the back
    office's name is refused at intake with envelope-signature."""
    name = "securities-a-backoffice"
    office_key = load_institution_key(run.chain_dir, name)
    client = LedgerClient(run.bootstrap, run.genesis, submitter=name, signing_key=office_key,
                          topic_prefix=run.prefix, principal=external_system_name("securities-a"))
    forger = LedgerClient(run.bootstrap, run.genesis, submitter=name,
                          signing_key=run.key("securities-a"), topic_prefix=run.prefix,
                          principal=external_system_name("securities-a"))
    await client.start(watch_from_start=True)
    await forger.start()
    await good_commits_forged_is_refused(run, client, forger)


async def rotated_member_submits_in_its_own_name(run: ChainRun, new_key: PrivateKey,
                                                 retired_key: PrivateKey) -> None:
    """After its rotation koscom's envelopes verify under its new key (intake follows the
    membership in force, decision 0062); its retired key in its name is refused with
    envelope-signature. The client starts at the logs' end, learns the rotation from
    the governance announcements (as an external system's principal) and counts signed
    commits against the quorum in force; it does not trust its own node."""
    principal = external_system_name("koscom")
    client = LedgerClient(run.bootstrap, run.genesis, submitter="koscom", signing_key=new_key,
                          topic_prefix=run.prefix, principal=principal, trust_own_node=False)
    forger = LedgerClient(run.bootstrap, run.genesis, submitter="koscom",
                          signing_key=retired_key, topic_prefix=run.prefix,
                          principal=principal)
    await client.start()
    await forger.start(watch_from_start=True)
    try:
        assert client.schedule.sequence == 1, "the rotation was not learnt at start"
    except AssertionError:
        await client.stop()
        await forger.stop()
        raise
    await good_commits_forged_is_refused(run, client, forger)


async def evidence_follows_the_membership(run: ChainRun, dsn: str, rotated_at: int,
                                          new_key: PrivateKey) -> None:
    """The consensus-evidence projection judges each vote by the membership in force at
    its height (the projector's ``membership`` rows, decision 0062): koscom's votes
    signed by its retired key from the rotation's height on are ``vote-forged``, its
    new key's votes are not, and no other vote is reported forged or unknown."""
    stats = await EvidenceProjector(run.genesis, bootstrap=run.bootstrap, dsn=dsn,
                                    topic_prefix=run.prefix).run()
    assert stats.votes > 0 and not stats.waiting
    old_key = run.genesis.member("koscom").public_key  # type: ignore[union-attr]
    signers: dict[int, str] = {}
    for record in await read_all(run.bootstrap, run.topic(VOTES.name), client_id="gov-votes"):
        vote = vote_from_record(codec.decode(record.value, expected="VoteCast").record)
        if vote.voter == "koscom":
            message = vote.message(run.genesis.hash_le)
            signers[record.offset] = ("new" if new_key.public_key.verify(vote.signature, message)
                                      else "old" if old_key.verify(vote.signature, message)
                                      else "other")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT log_offset, height, voter, evidence FROM consensus_vote "
                            "WHERE log_offset <= %s", (stats.offset - 1,)).fetchall()
    koscom = [(signers[offset], height >= rotated_at, evidence)
              for offset, height, voter, evidence in rows if voter == "koscom"]
    assert ("new", True, None) in koscom and ("old", False, None) in koscom
    assert ("old", True, "vote-forged") in koscom  # the retired key, still reported
    # (a late vote, after its height was decided, is not judged: evidence null)
    forged = {(signer, in_force) for signer, in_force, evidence in koscom
              if evidence == "vote-forged"}
    assert forged == {("old", True)}, forged
    others = [r for r in rows if r[2] != "koscom"
              and r[3] in ("vote-forged", "vote-unknown-voter")]
    assert not others, others[:3]


def status_shows_the_membership(run: ChainRun) -> None:
    """``capledger status`` rebuilds the schedule from the governance announcements,
    checks koscom's heartbeats against its new key and shows the membership."""
    env = dict(os.environ, **node_kafka_env("securities-a", run.cluster.kafka_settings))
    result = subprocess.run(
        [sys.executable, "-m", "streams", "status", "--genesis", str(run.chain_dir),
         "--topic-prefix", run.prefix, "--json"],
        capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False)
    report = json.loads(result.stdout)
    membership = report["membership"]
    assert membership["sequence"] == 2 and membership["quorum"] == 3, membership
    assert [m["id"] for m in membership["members"]] == [
        "otc-operator", "surveillance", "koscom", "securities-a"]
    states = {n["institution"]: n["state"] for n in report["nodes"]}
    assert states["koscom"] == "OK", (states, result.stderr)  # new-key heartbeats count


async def projection_and_audit_follow(run: ChainRun, dsn: str, rotated_at: int,
                                      new_key: PrivateKey, removed_at: int) -> None:
    """The projector writes the membership by height and projects every block (it
    decides heights by the votes log with the membership in force); the audit replay
    re-verifies all of it and finds the projection equal."""
    await Projector(run.genesis, bootstrap=run.bootstrap, dsn=dsn, topic_prefix=run.prefix).run()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT start_height, sequence, kind, member_id, quorum, members, "
                            "signers FROM membership ORDER BY start_height").fetchall()
        projected = conn.execute("SELECT max(height) FROM block").fetchone()
    assert [r[:5] for r in rows] == [(0, 0, "genesis", None, 3),
                                     (rotated_at, 1, KIND_ROTATE, "koscom", 3),
                                     (removed_at, 2, KIND_REMOVE, "securities-b", 3)]
    koscom = next(m for m in rows[1][5] if m["id"] == "koscom")
    assert koscom["public_key"] == new_key.public_key.sec.hex()
    assert len(rows[2][5]) == 4 and sorted(rows[2][6]) == sorted(SIGNERS)
    assert projected is not None and projected[0] >= run.blocks.head_height - 2
    report = await Auditor(run.genesis, bootstrap=run.bootstrap, dsn=dsn,
                           topic_prefix=run.prefix).run()
    assert report.ok, [f.line() for f in report.findings][:5]
    assert report.heights_decided == report.blocks >= projected[0]
    await proofs_carry_the_membership(run, dsn, removed_at, projected[0])


async def proofs_carry_the_membership(run: ChainRun, dsn: str, removed_at: int,
                                      projected: int) -> None:
    """A proof of a tx committed after the removal carries both changes; the offline
    verifier rebuilds the 4-member membership; without them the proof fails."""
    height = next(h for h in range(removed_at, projected + 1)
                  if run.blocks.block_at(h).header.proposer
                  != proposer_for(run.genesis, h, run.blocks.block_at(h).header.round))
    txid = run.blocks.block_at(height).txs[0].txid
    proof = await build_proof_from_logs(run.genesis, txid, bootstrap=run.bootstrap, dsn=dsn,
                                        topic_prefix=run.prefix)
    assert [g["carried_height"] for g in proof["governance"]] == sorted(
        g["carried_height"] for g in proof["governance"]) and len(proof["governance"]) == 2
    result = verify_proof(json.loads(json.dumps(proof)),
                          trusted_genesis_hash=display_hex(run.genesis.hash_le))
    assert result.height == height and result.quorum == 3
    stripped = {k: v for k, v in proof.items() if k != "governance"}
    with pytest.raises(ProofError) as refused:
        verify_proof(stripped)
    assert refused.value.code == "proof-proposer"


async def resumes_from_a_snapshot_after_governance(run: ChainRun, new_key: PrivateKey,
                                                   removal_at: int) -> None:
    """koscom's newest snapshot, written after both changes with its rotated key,
    carries the schedule; killed and restarted, koscom resumes from it and agrees."""
    directory = snapshot_dir(run.node_dir("koscom"))
    deadline = asyncio.get_running_loop().time() + SNAPSHOT_TIMEOUT_S
    while not snapshot_files(directory) or snapshot_files(directory)[0][0] <= removal_at:
        assert asyncio.get_running_loop().time() < deadline, "no snapshot after the removal"
        await commit_batch(run)
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: bool(snapshot_files(directory))
                             and snapshot_files(directory)[0][0] > removal_at,
                             timeout_s=1.5, what="a snapshot after the removal")
    newest, path = snapshot_files(directory)[0]
    snapshot = decode_snapshot(path.read_bytes(), run.genesis,
                               signer_keys=(new_key.public_key,))
    schedule = snapshot.state.schedule
    assert schedule is not None and schedule.sequence == 2 and snapshot.version == 2
    assert schedule.digest == run.blocks.schedule.digest
    with pytest.raises(SnapshotError) as caught:  # signed by the rotated key, not genesis's
        decode_snapshot(path.read_bytes(), run.genesis)
    assert caught.value.code == "snapshot-signature"
    run.cluster.kill("koscom")
    run.cluster.start("koscom")
    restarted_at = run.blocks.head_height
    await grow_to(run, restarted_at + 3)
    live = [name for name, node in run.cluster.nodes.items() if node.alive]
    await run.wait_agreement(live, timeout_s=COMMIT_TIMEOUT_S)
    log = run.cluster.nodes["koscom"].log_path.read_text(errors="replace")
    assert f"resumed from the snapshot of height {newest}" in log
    assert not [e for e in run.evidence("koscom") if e["kind"] == "snapshot-refused"]
    assert not run.blocks.forks() and not run.blocks.bad_records


def _qc_voters(run: ChainRun, height: int) -> set[str]:
    return set(run.blocks.qc_voters.get(run.blocks.block_at(height).hash, ()))


async def _eventually(check: object, run: ChainRun, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        assert callable(check)
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{getattr(check, '__name__', check)}: not within {timeout_s} s")
        await commit_batch(run)

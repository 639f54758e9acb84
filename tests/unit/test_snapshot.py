"""Node state snapshots: the format round-trips, every kind of damage is refused with its
own code, and a node resumes from a snapshot to exactly the state a full replay of its
chain copy gives, or falls back to that replay when the snapshot does not check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.snapshot import SNAPSHOT_DOMAIN_TAG, SnapshotError, decode_snapshot, encode_snapshot
from ledger.state import LedgerState
from streams.node.chainstore import ChainStore
from streams.node.ledger_node import LedgerNode
from streams.node.snapshots import (
    SNAPSHOTS_KEPT,
    load_newest,
    snapshot_dir,
    snapshot_files,
    write_snapshot,
)
from streams.tools.bench_startup import (
    BENCH_INSTITUTION,
    BenchChain,
    bench_chain,
    bench_node,
    generate_chain_copy,
)

pytestmark = pytest.mark.unit

BLOCK_TXS = 20
TXS = 100  # five blocks


@pytest.fixture(scope="module")
def chain() -> BenchChain:
    return bench_chain(BLOCK_TXS)


def _loaded(state_dir: Path, chain: BenchChain) -> LedgerNode:
    node = bench_node(state_dir, chain)
    node.load_chain_copy()
    return node


def _with_chain(tmp_path: Path, chain: BenchChain, txs: int = TXS) -> Path:
    node_dir = bench_node(tmp_path, chain).settings.node_dir
    generate_chain_copy(node_dir, chain, txs)
    return node_dir


def _close(node: LedgerNode) -> None:
    assert node.chain is not None
    node.chain.close()


def _snapshot_bytes(node: LedgerNode) -> bytes:
    path = asyncio.run(node.write_snapshot())
    assert path is not None
    return path.read_bytes()


def _evidence_kinds(node_dir: Path) -> list[str]:
    path = node_dir / "evidence.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["kind"] for line in path.read_text().splitlines()]


def test_a_snapshot_round_trips_to_the_same_state(tmp_path: Path, chain: BenchChain) -> None:
    _with_chain(tmp_path, chain)
    node = _loaded(tmp_path, chain)
    data = _snapshot_bytes(node)
    snapshot = decode_snapshot(data, chain.genesis)
    assert snapshot.institution == BENCH_INSTITUTION
    assert snapshot.state.state_hash == node.state.state_hash == snapshot.state_hash
    assert snapshot.state.height == node.state.height == TXS // BLOCK_TXS
    assert dict(snapshot.state.items()) == dict(node.state.items())
    assert snapshot.state._spent_recent == node.state._spent_recent
    assert list(snapshot.state._spent_journal) == list(node.state._spent_journal)
    assert snapshot.state.supplies() == node.state.supplies()
    assert snapshot.state.native_total == node.state.native_total
    _close(node)


def _resign(data: bytes, chain: BenchChain, signer: str) -> bytes:
    """The same snapshot body with a new signature by ``signer`` and a fresh digest."""
    signed = data[:-32]
    body = signed[: len(signed) - 1 - signed[-1]]
    signature = chain.keys[signer].sign(
        hashlib.sha256(SNAPSHOT_DOMAIN_TAG + body).digest())
    resigned = body + signature + bytes([len(signature)])
    return resigned + hashlib.sha256(resigned).digest()


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


def _refusal_cases(data: bytes, chain: BenchChain) -> dict[str, bytes]:
    with_digest = lambda signed: signed + hashlib.sha256(signed).digest()  # noqa: E731
    signed = data[:-32]
    flipped_body = _flip(signed, len(signed) // 2)
    other = next(m for m in chain.genesis.member_ids if m != BENCH_INSTITUTION)
    return {
        "snapshot-truncated": data[:40],
        "snapshot-digest": data[: len(data) // 2],
        "snapshot-digest-flip": _flip(data, len(data) // 3),
        "snapshot-format": with_digest(b"XXSNAP\x00\x01" + signed[8:]),
        "snapshot-chain": with_digest(signed[:8] + bytes(32) + signed[40:]),
        "snapshot-signature": with_digest(flipped_body),
        "snapshot-signature-other-member": _resign(data, chain, other),
    }


def test_every_kind_of_damage_is_refused_with_its_code(tmp_path: Path,
                                                        chain: BenchChain) -> None:
    _with_chain(tmp_path, chain)
    node = _loaded(tmp_path, chain)
    data = _snapshot_bytes(node)
    _close(node)
    for name, damaged in _refusal_cases(data, chain).items():
        with pytest.raises(SnapshotError) as caught:
            decode_snapshot(damaged, chain.genesis)
        assert name.startswith(caught.value.code), (name, caught.value)


def test_entries_that_do_not_hash_to_the_recorded_state_hash_are_refused(
    tmp_path: Path, chain: BenchChain
) -> None:
    """A writer bug (or a key holder's lie) that records a state hash the entries do not
    give is caught by recomputing the accumulator: ``snapshot-state-hash``."""
    _with_chain(tmp_path, chain)
    node = _loaded(tmp_path, chain)
    good = node.state.copy()
    lying = LedgerState(height=good.height, head_hash=good.head_hash, utxos=dict(good._utxos),
                        bindings={}, supply={}, accumulator=good.accumulator + 1,
                        native_total=good.native_total, script_index=None, spent_recent={},
                        spent_journal=good._spent_journal)
    assert node.chain is not None and node.chain.last_payload is not None
    data = encode_snapshot(lying, genesis_hash=chain.genesis.hash_le,
                           institution=BENCH_INSTITUTION, key=chain.keys[BENCH_INSTITUTION],
                           chain_copy_end=node.chain.end_offset,
                           head_record=node.chain.last_payload)
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(data, chain.genesis)
    assert caught.value.code == "snapshot-state-hash"
    _close(node)


def test_a_node_resumes_from_its_snapshot_and_applies_the_blocks_after_it(
    tmp_path: Path, chain: BenchChain
) -> None:
    node_dir = _with_chain(tmp_path, chain, txs=60)
    node = _loaded(tmp_path, chain)
    _snapshot_bytes(node)
    _close(node)
    (node_dir / "chain.dat").unlink()
    generate_chain_copy(node_dir, chain, TXS)  # the same first 3 blocks, then 2 more
    full = tmp_path / "full"
    generate_chain_copy(bench_node(full, chain).settings.node_dir, chain, TXS)
    replayed = _loaded(full, chain)
    resumed = _loaded(tmp_path, chain)
    assert resumed.snapshot_height == 3 and replayed.snapshot_height == 0
    assert resumed.state.state_hash == replayed.state.state_hash
    assert resumed.height == replayed.height == 5
    assert resumed.head is not None and replayed.head is not None
    assert resumed.head.block.hash == replayed.head.block.hash
    assert resumed.committed_end == replayed.committed_end == TXS
    assert sorted(resumed.unpublished) == [3, 4, 5]  # the snapshot's head and after
    _close(resumed)
    _close(replayed)


@pytest.mark.parametrize("damage", ["flip", "truncate", "chain-cut", "foreign"])
def test_a_bad_snapshot_is_refused_and_the_node_replays_its_chain_copy(
    tmp_path: Path, chain: BenchChain, damage: str
) -> None:
    node_dir = _with_chain(tmp_path, chain)
    node = _loaded(tmp_path, chain)
    expected = node.state.state_hash
    path = asyncio.run(node.write_snapshot())
    assert path is not None
    _close(node)
    data = path.read_bytes()
    code = {"flip": "snapshot-digest", "truncate": "snapshot-digest",
            "chain-cut": "snapshot-anchor", "foreign": "snapshot-foreign"}[damage]
    if damage == "flip":
        path.write_bytes(_flip(data, len(data) - 100))
    elif damage == "truncate":
        path.write_bytes(data[: len(data) - 1000])
    elif damage == "chain-cut":  # the chain copy lost its last block after the snapshot
        store = ChainStore(node_dir / "chain.dat")
        store.close()
        with open(node_dir / "chain.dat", "r+b") as handle:
            handle.truncate(store.end_offset - 10)
    else:
        path.write_bytes(_resign_as(data, chain))
    resumed = _loaded(tmp_path, chain)
    assert resumed.snapshot_height == 0
    height = TXS // BLOCK_TXS - (1 if damage == "chain-cut" else 0)
    assert resumed.height == height
    if damage != "chain-cut":
        assert resumed.state.state_hash == expected
    assert "snapshot-refused" in _evidence_kinds(node_dir)
    refused = list(snapshot_dir(node_dir).glob(f"*.refused-{code}"))
    assert len(refused) == 1 and not snapshot_files(snapshot_dir(node_dir))
    _close(resumed)


def _resign_as(data: bytes, chain: BenchChain) -> bytes:
    """The snapshot rewritten as another member's, signed by that member."""
    other = next(m for m in chain.genesis.member_ids if m != BENCH_INSTITUTION)
    signed = data[:-32]
    name = BENCH_INSTITUTION.encode()
    position = 40 + 1
    assert signed[40] == len(name) and signed[position : position + len(name)] == name
    renamed = signed[:40] + bytes([len(other)]) + other.encode() + signed[position + len(name):]
    return _resign(renamed + bytes(32), chain, other)


def test_the_older_snapshot_is_used_when_the_newest_is_bad(tmp_path: Path,
                                                          chain: BenchChain) -> None:
    node_dir = _with_chain(tmp_path, chain, txs=60)
    node = _loaded(tmp_path, chain)
    _snapshot_bytes(node)
    _close(node)
    (node_dir / "chain.dat").unlink()
    generate_chain_copy(node_dir, chain, TXS)
    node = _loaded(tmp_path, chain)
    newest = asyncio.run(node.write_snapshot())
    assert newest is not None
    _close(node)
    newest.write_bytes(newest.read_bytes()[:-1])
    resumed = _loaded(tmp_path, chain)
    assert resumed.snapshot_height == 3 and resumed.height == 5
    _close(resumed)


def test_writes_are_atomic_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    directory = tmp_path / "snapshots"
    for height in range(1, 6):
        write_snapshot(directory, height, b"x" * height)
    files = snapshot_files(directory)
    assert [h for h, _ in files] == [5, 4][:SNAPSHOTS_KEPT]
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for _, p in files)


def test_an_unreadable_directory_entry_never_stops_the_load(tmp_path: Path,
                                                           chain: BenchChain) -> None:
    directory = tmp_path / "snapshots"
    (directory / "snapshot-000000000007.dat").mkdir(parents=True)  # a directory, not a file
    snapshot, refusals = load_newest(directory, chain.genesis, lambda _: None)
    assert snapshot is None and [r.code for r in refusals] == ["snapshot-unreadable"]


def test_the_node_setting_defaults_to_a_snapshot_every_thousand_heights(
    tmp_path: Path, chain: BenchChain
) -> None:
    node = bench_node(tmp_path, chain)
    assert node.settings.snapshot_every_heights == 1_000
    off = LedgerNode(dataclasses.replace(node.settings, snapshot_every_heights=0))
    off.started.set()
    assert not off.snapshot_due


@pytest.fixture(scope="module")
def snapshot_data(tmp_path_factory: pytest.TempPathFactory, chain: BenchChain) -> bytes:
    state_dir = tmp_path_factory.mktemp("fuzz")
    generate_chain_copy(bench_node(state_dir, chain).settings.node_dir, chain, 40)
    node = _loaded(state_dir, chain)
    data = _snapshot_bytes(node)
    _close(node)
    return data


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damage_with_a_fixed_digest_is_refused_with_a_snapshot_code(
    snapshot_data: bytes, chain: BenchChain, data: st.DataObject
) -> None:
    """Hostile bytes (digest recomputed, so the parser sees them): only SnapshotError."""
    signed = bytearray(snapshot_data[:-32])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(signed) - 1))
        signed[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(signed)))
    damaged = bytes(signed[:cut] if data.draw(st.booleans()) else signed)
    damaged += hashlib.sha256(damaged).digest()
    if damaged == snapshot_data:
        return
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(damaged, chain.genesis)
    assert caught.value.code.startswith("snapshot-")


def test_a_full_disk_while_writing_a_snapshot_never_stops_the_writer(
    tmp_path: Path, chain: BenchChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the write is a warning; the writer task goes on and writes the
    snapshot once space returns; no temporary file is left behind."""
    from streams.node import app, ledger_node

    _with_chain(tmp_path, chain, txs=BLOCK_TXS)
    node = _loaded(tmp_path, chain)
    node.settings = dataclasses.replace(node.settings, snapshot_every_heights=1)
    node.started.set()
    directory = snapshot_dir(node.settings.node_dir)
    real_write = ledger_node.write_snapshot
    attempts: list[int] = []

    def full_disk(where: Path, height: int, data: bytes) -> Path:
        attempts.append(height)
        if len(attempts) < 3:
            raise OSError(28, "No space left on device")
        return real_write(where, height, data)

    monkeypatch.setattr(ledger_node, "write_snapshot", full_disk)
    monkeypatch.setattr(app, "SNAPSHOT_CHECK_INTERVAL_S", 0.01)

    async def run() -> None:
        task = asyncio.create_task(app._write_snapshots(node))
        for _ in range(500):
            # the file appears in the writer's thread before the task records it
            if snapshot_files(directory) and node.snapshot_height == 1:
                break
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()

    asyncio.run(run())
    assert attempts[:3] == [1, 1, 1]
    assert [h for h, _ in snapshot_files(directory)] == [1]
    assert node.snapshot_height == 1
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]
    _close(node)


def test_the_members_snapshots_fall_at_different_heights(tmp_path: Path,
                                                         chain: BenchChain) -> None:
    """Member i of n writes at multiples of ``every`` shifted by i * every // n, so five
    nodes never spend their snapshot CPU at the same height."""
    node = bench_node(tmp_path, chain)
    ids = chain.genesis.member_ids
    firsts = []
    for institution in ids:
        settings = dataclasses.replace(node.settings, institution=institution,
                                       snapshot_every_heights=1_000)
        member = LedgerNode(settings)
        firsts.append(member.next_snapshot_height)
        member.snapshot_height = member.next_snapshot_height + 3  # written a little late
        assert member.next_snapshot_height == firsts[-1] + 1_000
    assert firsts == [1_000 if i == 0 else i * 1_000 // len(ids) for i in range(len(ids))]
    assert len(set(firsts)) == len(ids)

"""Start-up time of a node after a long chain, with and without a state snapshot.

Owns: ``generate_chain_copy`` (a node's chain copy of many committed payments, built
offline with the pure core: real P2PKH signatures, blocks certified by a quorum of the
bench genesis's member keys, the node's own ``BlockCommitted`` records, streamed to
disk block by block so memory stays flat) and ``bench_startup`` (load that chain copy
with the real ``LedgerNode.load_chain_copy`` by full replay, write a snapshot, load
again from the snapshot; wall and CPU seconds, snapshot size). No Kafka: start-up's
Kafka part (positioning three readers) does not grow with the chain.
Command: ``capledger bench startup --txs 1000000``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ledger.block import VOTE_ACK, QuorumCertificate, make_block, proposer_for, sign_vote
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.script import p2pkh_script, p2pkh_script_sig
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.common.genesis_files import (
    build_genesis,
    load_genesis,
    load_institution_key,
    seeded_entropy,
)
from streams.kafka import codec
from streams.kafka.records import committed_record
from streams.node.chainstore import ChainStore
from streams.node.ledger_node import LedgerNode, NodeSettings
from streams.node.snapshots import snapshot_dir, snapshot_files
from streams.tools.loadgen import (
    LANE_VALUE,
    PAYMENT_VALUE,
    Lanes,
    sign_p2pkh_payment,
    sink_script,
)

BENCH_SEED = "bench-startup"
BENCH_INSTITUTION = INSTITUTION_IDS[0]
NO_BROKER = "127.0.0.1:1"  # load_chain_copy never connects


@dataclass(frozen=True, slots=True)
class BenchChain:
    genesis: Genesis
    keys: dict[str, PrivateKey]
    lanes: Lanes


@dataclass(frozen=True, slots=True)
class StartupResult:
    txs: int
    heights: int
    chain_copy_bytes: int
    generate_s: float
    replay_wall_s: float
    replay_cpu_s: float
    snapshot_write_s: float
    snapshot_bytes: int
    snapshot_wall_s: float
    snapshot_cpu_s: float
    utxos: int
    state_hash: str


def bench_chain(block_txs: int) -> BenchChain:
    """The bench genesis: five members, one lane (key and allocation) per tx of a block."""
    genesis, keys = build_genesis(chain_id=BENCH_SEED, time_ms=1_764_000_000_000,
                                  institutions=INSTITUTION_IDS, entropy=seeded_entropy(BENCH_SEED))
    lanes = Lanes(BENCH_SEED, block_txs)
    genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
    return BenchChain(genesis, keys, lanes)


def _sign_transfer(key: PrivateKey, prevout: OutPoint, value: int) -> Transaction:
    """1 input, 1 output back to the same key: the UTXO set does not grow."""
    own = p2pkh_script(key.public_key.hash160)
    unsigned = Transaction(1, (TxIn(prevout),), (TxOut(value, own),), 0)
    digest = legacy_sighash(unsigned, 0, own, SIGHASH_ALL)
    script_sig = p2pkh_script_sig(key.sign(digest) + bytes([SIGHASH_ALL]), key.public_key.sec)
    return unsigned.with_script_sig(0, script_sig)


def _blocks_of_payments(chain: BenchChain, txs: int,
                        utxo_growth: bool) -> Iterator[list[Transaction]]:
    """Block after block, the next payment of each lane (a block holds one per lane):
    1-in/2-out payments to a sink (the UTXO set grows by one per tx) or, without
    ``utxo_growth``, 1-in/1-out transfers (the set stays at one output per lane)."""
    allocation = genesis_allocation_tx(chain.genesis.hash_le, chain.lanes.allocations())
    keys = chain.lanes.keys()
    sink = sink_script(chain.lanes.seed)
    heads = [(OutPoint(allocation.hash_le, lane), LANE_VALUE) for lane in range(len(keys))]
    left = txs
    while left > 0:
        block = []
        for lane in range(min(left, len(keys))):
            prevout, value = heads[lane]
            if utxo_growth:
                tx = sign_p2pkh_payment(keys[lane], prevout, value, sink, PAYMENT_VALUE)
                value -= PAYMENT_VALUE
            else:
                tx = _sign_transfer(keys[lane], prevout, value)
            block.append(tx)
            heads[lane] = (OutPoint(tx.hash_le, 0), value)
        left -= len(block)
        yield block


def generate_chain_copy(node_dir: Path, chain: BenchChain, txs: int, *,
                        utxo_growth: bool = True) -> int:
    """Write ``node_dir/chain.dat`` holding ``txs`` committed payments; the height."""
    genesis, keys = chain.genesis, chain.keys
    genesis_hash = genesis.hash_le
    voters = genesis.member_ids[: genesis.params.quorum]
    store = ChainStore(node_dir / "chain.dat")
    prev_hash, offset, height = genesis_hash, 0, 0
    try:
        for height, block_txs in enumerate(_blocks_of_payments(chain, txs, utxo_growth),
                                             start=1):
            proposer = proposer_for(genesis, height, 0)
            block = make_block(keys[proposer], height=height, prev_hash=prev_hash,
                               time_ms=genesis.time_ms + height * genesis.params.block_interval_ms,
                               proposer=proposer, round_=0, txs=block_txs,
                               tx_offset_start=offset, tx_offset_end=offset + len(block_txs))
            votes = tuple(sign_vote(keys[voter], genesis_hash, voter=voter, height=height,
                                    round_=0, kind=VOTE_ACK, block_hash=block.hash)
                          for voter in voters)
            qc = QuorumCertificate(height, 0, block.hash, votes)
            store.append(codec.encode("BlockCommitted", committed_record(
                block, qc, vote_offsets=[height * len(voters) + i for i in range(len(voters))],
                proposal_offset=height, committer=BENCH_INSTITUTION,
                now_ms=block.header.time_ms, key=keys[BENCH_INSTITUTION],
                genesis_hash=genesis_hash)))
            prev_hash, offset = block.hash, offset + len(block_txs)
    finally:
        store.close()
    return height


def bench_node(state_dir: Path, chain: BenchChain) -> LedgerNode:
    settings = NodeSettings(BENCH_INSTITUTION, chain.genesis, chain.keys[BENCH_INSTITUTION],
                            NO_BROKER, state_dir)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    return LedgerNode(settings)


def _timed_load(state_dir: Path, chain: BenchChain) -> tuple[LedgerNode, float, float]:
    node = bench_node(state_dir, chain)
    wall, cpu = time.perf_counter(), time.process_time()
    node.load_chain_copy()
    return node, time.perf_counter() - wall, time.process_time() - cpu


def bench_startup(state_dir: Path, *, txs: int, block_txs: int, runs: int,
                  utxo_growth: bool = True) -> StartupResult:
    """Generate the chain copy once, then ``runs`` times each: a full replay (no
    snapshot) and a start from a snapshot at the head. Medians."""
    chain = bench_chain(block_txs)
    node_dir = bench_node(state_dir, chain).settings.node_dir
    started = time.perf_counter()
    heights = generate_chain_copy(node_dir, chain, txs, utxo_growth=utxo_growth)
    generate_s = time.perf_counter() - started
    replays, loads, writes = [], [], []
    snapshot_bytes = 0
    for _ in range(runs):
        shutil.rmtree(snapshot_dir(node_dir), ignore_errors=True)
        node, wall, cpu = _timed_load(state_dir, chain)
        assert node.height == heights and node.snapshot_height == 0
        replays.append((wall, cpu))
        replayed_hash = node.state.state_hash
        begun = time.perf_counter()
        path = asyncio.run(node.write_snapshot())
        writes.append(time.perf_counter() - begun)
        assert path is not None
        snapshot_bytes = path.stat().st_size
        assert node.chain is not None
        node.chain.close()
        node, wall, cpu = _timed_load(state_dir, chain)
        assert node.snapshot_height == heights and node.state.state_hash == replayed_hash
        loads.append((wall, cpu))
        assert node.chain is not None
        node.chain.close()
    return StartupResult(
        txs=txs, heights=heights, chain_copy_bytes=(node_dir / "chain.dat").stat().st_size,
        generate_s=generate_s,
        replay_wall_s=statistics.median(w for w, _ in replays),
        replay_cpu_s=statistics.median(c for _, c in replays),
        snapshot_write_s=statistics.median(writes), snapshot_bytes=snapshot_bytes,
        snapshot_wall_s=statistics.median(w for w, _ in loads),
        snapshot_cpu_s=statistics.median(c for _, c in loads),
        utxos=len(node.state), state_hash=display_hex(node.state.state_hash))


@dataclass(frozen=True, slots=True)
class ExistingStartup:
    institution: str
    heights: int
    chain_copy_bytes: int
    utxos: int
    snapshot_height: int  # the newest snapshot's (0: none)
    snapshot_bytes: int
    snapshot_wall_s: float  # start from the newest snapshot (+ the blocks after it)
    snapshot_cpu_s: float
    replay_wall_s: float  # start with the snapshots set aside: the whole chain copy
    replay_cpu_s: float


def _load_existing(settings: NodeSettings) -> tuple[LedgerNode, float, float]:
    node = LedgerNode(settings)
    wall, cpu = time.perf_counter(), time.process_time()
    node.load_chain_copy()
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    assert node.chain is not None
    node.chain.close()
    return node, *elapsed


def bench_existing(state_dir: Path, genesis_dir: Path, institution: str,
                   runs: int) -> ExistingStartup:
    """Start-up of a kept node (e.g. ``bench soak --keep``'s): from its newest
    snapshot, then with its snapshot directory set aside (renamed, put back after,
    whatever happens) as a full replay. Medians of ``runs`` loads each; nothing in the
    node's directory is changed."""
    genesis = load_genesis(genesis_dir)
    settings = NodeSettings(institution, genesis,
                            load_institution_key(genesis_dir, institution, genesis=genesis),
                            NO_BROKER, state_dir)
    snapshots = snapshot_dir(settings.node_dir)
    kept = snapshot_files(snapshots)
    newest = kept[0][1] if kept else None
    from_snapshot = [_load_existing(settings) for _ in range(runs)]
    aside = snapshots.with_name(snapshots.name + ".bench-aside")
    if snapshots.exists():
        snapshots.rename(aside)
    try:
        replays = [_load_existing(settings) for _ in range(runs)]
    finally:
        if aside.exists():
            aside.rename(snapshots)
    node = replays[-1][0]
    return ExistingStartup(
        institution=institution, heights=node.height,
        chain_copy_bytes=(settings.node_dir / "chain.dat").stat().st_size,
        utxos=len(node.state), snapshot_height=from_snapshot[-1][0].snapshot_height,
        snapshot_bytes=newest.stat().st_size if newest is not None else 0,
        snapshot_wall_s=statistics.median(w for _, w, _ in from_snapshot),
        snapshot_cpu_s=statistics.median(c for _, _, c in from_snapshot),
        replay_wall_s=statistics.median(w for _, w, _ in replays),
        replay_cpu_s=statistics.median(c for _, _, c in replays))


def bench_snapshot_codec(utxos: int, runs: int) -> dict[str, float]:
    """CPU seconds to encode (and sign) and to decode (and verify: digest, signature,
    parse, accumulator recomputed) a snapshot of ``utxos`` distinct P2PKH outputs, and
    its size: what a snapshot costs at a given UTXO-set size, whatever the history."""
    import hashlib

    from ledger.script import p2pkh_script
    from ledger.snapshot import decode_snapshot, encode_snapshot
    from ledger.state import state_from_genesis

    chain = bench_chain(1)
    allocations = [(p2pkh_script(hashlib.sha256(i.to_bytes(8, "little")).digest()[:20]),
                    1_000 + i % 977) for i in range(utxos)]
    state = state_from_genesis(hashlib.sha256(b"bench-snapshot").digest(), allocations)
    del allocations
    encodes, decodes = [], []
    data = b""
    for _ in range(runs):
        started = time.process_time()
        data = encode_snapshot(state, genesis_hash=chain.genesis.hash_le,
                               institution=BENCH_INSTITUTION,
                               key=chain.keys[BENCH_INSTITUTION], chain_copy_end=0,
                               head_record=b"")
        encodes.append(time.process_time() - started)
        started = time.process_time()
        decoded = decode_snapshot(data, chain.genesis)
        decodes.append(time.process_time() - started)
        assert decoded.state_hash == state.state_hash and len(decoded.state) == utxos
        del decoded
    return {"utxos": utxos, "snapshot_bytes": len(data),
            "encode_cpu_s": round(statistics.median(encodes), 2),
            "decode_verify_cpu_s": round(statistics.median(decodes), 2)}

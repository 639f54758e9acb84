"""Rejection records survive a crash between a block's commit and their publication
(decision 0129): five real nodes over in-memory logs (as ``capledger bench node`` runs
them); one dies when it sends its rejections, after its chain copy took the block; the
node made again from its directory publishes them at start-up, once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.kafka import codec
from streams.kafka.records import rejected_from_record
from streams.kafka.topics import REJECTED
from streams.node import ledger_node
from streams.node.ledger_node import LedgerNode, NodeSettings
from streams.node.pending_rejections import PendingRejections, pending_path, write_pending
from streams.tools import bench_node as bench

pytestmark = pytest.mark.unit

VICTIM = "surveillance"


class _Crash(BaseException):
    """The process dying (not an ``Exception``: nothing in the node catches it)."""


class _DyingWriter:
    def __init__(self, logs: bench._MemoryLogs) -> None:
        self.logs = logs

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        return self.logs.append(topic, value, key)

    async def send_many(self, topic: str, items: list[tuple[bytes | None, bytes]]) -> list[int]:
        if topic == REJECTED.name:
            raise _Crash
        return [self.logs.append(topic, value, key) for key, value in items]


def _rejections_by(logs: bench._MemoryLogs, member: str) -> list[tuple[bytes | None, int]]:
    found = []
    for record in logs.logs.get(REJECTED.name, []):
        checked = rejected_from_record(codec.decode(record.value, expected="TxRejected").record)
        if checked.institution == member:
            found.append((checked.block_hash, checked.source_offset))
    return found


def _restarted(tmp_path: Path, genesis: object, keys: dict[str, object],
               logs: bench._MemoryLogs) -> LedgerNode:
    settings = NodeSettings(VICTIM, genesis, keys[VICTIM], "memory:0", tmp_path)  # type: ignore[arg-type]
    node = LedgerNode(settings)
    node.load_chain_copy()
    node._writer = logs  # type: ignore[assignment]
    return node


def test_a_node_dead_before_its_rejections_were_acknowledged_publishes_them_on_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    genesis, keys, values = bench._workload(20, "p2pkh")
    values = [*values[:10], b"not a record", b"\xc3\x01 nor this", *values[10:]]
    logs = bench._MemoryLogs()
    logs.now_ms = genesis.time_ms + 1_000
    monkeypatch.setattr(ledger_node, "now_ms", lambda: logs.now_ms)  # the bench's clock
    nodes = bench._start(genesis, keys, tmp_path, logs, 1)
    nodes[VICTIM]._writer = _DyingWriter(logs)  # type: ignore[assignment]
    try:
        with pytest.raises(_Crash):
            asyncio.run(bench._drive(nodes, logs, values, 1_000.0))
        committed = nodes[VICTIM].height
    finally:
        for node in nodes.values():
            node.verifier.close()
            assert node.chain is not None
            node.chain.close()
    assert committed >= 1 and _rejections_by(logs, VICTIM) == []
    others = {m for m in INSTITUTION_IDS if m != VICTIM}
    node = _restarted(tmp_path, genesis, keys, logs)
    try:
        assert node.height == committed
        sent = asyncio.run(node.republish_rejections())
        head_hash = node.head.block.hash if node.head is not None else None
    finally:
        node.verifier.close()
    assert sent == 2
    assert _rejections_by(logs, VICTIM) == [(head_hash, 10), (head_hash, 11)]
    assert any(_rejections_by(logs, member) for member in others)
    assert not pending_path(node.settings.node_dir).exists()
    again = _restarted(tmp_path, genesis, keys, logs)
    try:
        assert asyncio.run(again.republish_rejections()) == 0  # once, not at every start
    finally:
        again.verifier.close()


def test_pending_rejections_of_a_height_not_committed_here_are_dropped(
        tmp_path: Path) -> None:
    """The node died before its chain copy took the block: the height is decided again
    (and its rejections written again then); the leftover file is not published."""
    genesis, keys, _ = bench._workload(5, "p2pkh")
    logs = bench._MemoryLogs()
    (tmp_path / VICTIM).mkdir(parents=True)
    node = _restarted(tmp_path, genesis, keys, logs)
    try:
        path = pending_path(node.settings.node_dir)
        write_pending(path, PendingRejections(1, b"\x01" * 32, (b"x",)))
        assert asyncio.run(node.republish_rejections()) == 0
        assert not path.exists() and REJECTED.name not in logs.logs
        path.write_bytes(b"CLRJ1\n garbage")  # hostile: refused with its code, removed
        assert asyncio.run(node.republish_rejections()) == 0
        assert not path.exists()
        assert "rejections-pending-malformed" in node.evidence_path.read_text()
    finally:
        node.verifier.close()


def test_the_pending_rejections_file_is_synced_before_it_replaces_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 0129 (amended): the file's data reaches the disk before the rename and
    the directory entry after it, so a power loss after the chain copy's append cannot
    leave the block without its rejections file."""
    import os

    from streams.node import pending_rejections

    events: list[str] = []
    real_fdatasync, real_fsync, real_replace = os.fdatasync, os.fsync, os.replace

    def fdatasync(fd: int) -> None:
        events.append("data")
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        events.append("directory")
        real_fsync(fd)

    def replace(source: object, target: object) -> None:
        events.append("rename")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(pending_rejections.os, "fdatasync", fdatasync)
    monkeypatch.setattr(pending_rejections.os, "fsync", fsync)
    monkeypatch.setattr(pending_rejections.os, "replace", replace)
    path = pending_path(tmp_path)
    pending = PendingRejections(7, b"\x02" * 32, (b"one", b"two"))
    write_pending(path, pending)
    assert events == ["data", "rename", "directory"]
    assert pending_rejections.read_pending(path) == pending

"""A client's own copy of the ledger state, kept from the certified blocks log.

Owns: ``ChainView`` — follows ``ledger.blocks.v1`` from offset 0, checks each record's
quorum certificate and committer signature, takes a block once it is final (a quorum
of distinct members committed it: ``ledger.attestation``, decision 0051; a certified
losing block never is), applies final blocks in height order to
a ``LedgerState`` (scripts indexed, so per-address coins are cheap) and wakes waiters.
Services that build transactions (the market's settlement, issuance) read coins from
it; a record that does not check is skipped, never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from ledger.attestation import FinalityTally
from ledger.block import Block, check_certified_block
from ledger.errors import ValidationError
from ledger.governance import schedule_from_genesis
from ledger.membership import Genesis
from ledger.state import LedgerRules, LedgerState, apply_block, state_from_genesis
from streams.kafka import codec
from streams.kafka.logio import LogReader
from streams.kafka.records import BlockCopies, committed_from_record
from streams.kafka.topics import BLOCKS

READ_TIMEOUT_MS = 100
FINAL_AHEAD_BLOCKS_MAX = 64  # final blocks held while an earlier height is not final


class ChainView:
    def __init__(self, bootstrap: str, genesis: Genesis, *, topic_prefix: str = "",
                 client_id: str = "capledger-chain-view") -> None:
        self.genesis = genesis
        self.rules = LedgerRules.from_genesis(genesis)
        # The state carries the membership schedule (decision 0061).
        self.state: LedgerState = state_from_genesis(
            genesis.hash_le, genesis.allocations, index_scripts=True,
            schedule=schedule_from_genesis(genesis))
        self.block_hashes: dict[int, bytes] = {}
        self.block_times_ms: dict[int, int] = {}
        self.skipped: list[str] = []
        # txid (internal byte order) -> the height it committed at (None: not yet), for
        # the transactions a service asked about (``watch``); empty, it costs nothing
        self._watched: dict[bytes, int | None] = {}
        self._finality = FinalityTally(genesis.params.quorum)
        self._final_ahead: dict[int, Block] = {}
        self._copies = BlockCopies()  # members' copies of a block parsed once (0128)
        self._reader = LogReader(bootstrap, topic_prefix + BLOCKS.name, client_id=client_id)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def height(self) -> int:
        return self.state.height

    async def start(self) -> None:
        await self._reader.start(0)
        self._task = asyncio.create_task(self._run(), name="chain-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._reader.stop()

    def watch(self, txid_le: bytes) -> None:
        """Note the height ``txid_le`` commits at, from the blocks applied from now on
        (call before ``start`` to cover the whole chain): ``committed_height``."""
        self._watched.setdefault(txid_le, None)

    def watching(self, txid_le: bytes) -> bool:
        return txid_le in self._watched

    def unwatch(self, txid_le: bytes) -> None:
        self._watched.pop(txid_le, None)

    def committed_height(self, txid_le: bytes) -> int | None:
        """The height a watched transaction committed at; None if it has not (yet)."""
        return self._watched.get(txid_le)

    async def wait_committed(self, txid_le: bytes, *, timeout_s: float) -> int:
        """Until a watched transaction has committed: its height; TimeoutError otherwise
        (also when it committed before it was watched)."""
        self.watch(txid_le)
        await self._wait_until(lambda: self._watched.get(txid_le) is not None, timeout_s,
                               lambda: f"{txid_le[::-1].hex()} not committed")
        height = self._watched[txid_le]
        assert height is not None
        return height

    async def wait_height(self, height: int, *, timeout_s: float) -> None:
        """Until the view has applied ``height``; TimeoutError otherwise."""
        await self._wait_until(lambda: self.state.height >= height, timeout_s,
                               lambda: f"chain view at {self.state.height}, not {height},")

    async def wait_caught_up(self, *, timeout_s: float) -> None:
        """Until every block record written before this call has been read."""
        end = await self._reader.end_offset()
        await self._wait_until(lambda: self._reader.position >= end, timeout_s,
                               lambda: f"chain view at offset {self._reader.position} of "
                                       f"{end}")

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float,
                          where: Callable[[], str]) -> None:
        """Until ``done()`` holds, checked whenever the view changes; TimeoutError
        (saying ``where()`` it stands) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{where()} after {timeout_s} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def _run(self) -> None:
        while True:
            records = await self._reader.read(timeout_ms=READ_TIMEOUT_MS)
            for record in records:
                key = record.key
                if key is not None and key.isdigit() and len(key) <= 20 and (
                        int(key) <= self.state.height):
                    continue  # another member's copy of a height already applied
                try:
                    self._apply(record.value, record.timestamp_ms)
                except ValidationError as error:
                    self.skipped.append(f"offset {record.offset}: {error.code}: {error}")
            if records:
                async with self._changed:
                    self._changed.notify_all()

    def _apply(self, value: bytes, timestamp_ms: int) -> bool:
        """Tally one committed record; apply every block now final in height order."""
        record = codec.decode(value, expected="BlockCommitted").record
        committed = committed_from_record(
            record, block_bytes_max=self.genesis.params.block_bytes_max, copies=self._copies)
        block = committed.block
        if block.height <= self.state.height or (
                block.height > self.state.height + FINAL_AHEAD_BLOCKS_MAX):
            return False
        # The membership of heights up to state height + 16 is final (decision 0061);
        # beyond, the latest known one is the best guess (a record it refuses returns).
        schedule = self.state.schedule
        assert schedule is not None
        view = schedule.at(block.height)
        committed.check_signature(view, self.genesis.hash_le)
        check_certified_block(block, committed.qc, view, genesis_hash=self.genesis.hash_le)
        if not self._finality.add(block.height, block.hash, committed.committer,
                                  view.params.quorum):
            return False
        self._final_ahead[block.height] = block
        while (final := self._final_ahead.pop(self.state.height + 1, None)) is not None:
            # Certified by a quorum that validated every script: apply without re-verifying.
            self.state = apply_block(self.state, final, self.rules, verify_scripts=False)
            self.block_hashes[final.height] = final.hash
            self.block_times_ms[final.height] = timestamp_ms
            if self._watched:
                for tx in final.txs:
                    if tx.hash_le in self._watched:
                        self._watched[tx.hash_le] = final.height
        return True

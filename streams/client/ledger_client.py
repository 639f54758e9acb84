"""The submission client institution systems use: submit signed transactions and
learn, from the logs, whether each committed (at which height) or was rejected (why).

Owns: ``LedgerClient`` — an idempotent producer onto ``ledger.tx.v1`` and a watcher
of ``ledger.blocks.v1`` and ``ledger.rejected.v1`` that resolves per-txid outcomes.
A committed block is final for the client once a quorum of distinct members signed
committed records for it, or the submitter's own node did, each with a certificate
that checks against the membership in force at its height, and that membership's
quorum (``ledger.attestation.FinalityTally``, decisions 0061, 0062):
an external system may not read the votes log (decision 0060), and a certified
*losing* block, which honest members never commit, gets no such quorum (decision 0051).

"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ledger.attestation import FinalityTally
from ledger.block import Block, check_certified_block, merkle_root
from ledger.errors import BlockError, ValidationError
from ledger.governance import schedule_after_block, schedule_from_genesis
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.tx import Transaction
from streams.common.clock import now_ms
from streams.kafka import codec
from streams.kafka.logio import LogReader, LogWriter
from streams.kafka.records import (
    BlockCopies,
    committed_from_record,
    rejected_from_record,
    signed_tx_batch_record,
    signed_tx_submitted_record,
)
from streams.kafka.topics import BLOCKS, REJECTED, TX

WATCH_READ_TIMEOUT_MS = 100
MEMBERSHIP_READ_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one submitted transaction."""

    txid: str
    committed: bool
    height: int | None = None
    code: str | None = None
    message: str | None = None
    decided_at_ms: int = 0
    rejected_by: str | None = None


ENVELOPE_CODE_PREFIX = "envelope-"


class LedgerClient:
    def __init__(self, bootstrap: str, genesis: Genesis, *, submitter: str,
                 signing_key: PrivateKey, topic_prefix: str = "",
                 principal: str | None = None, trust_own_node: bool = True) -> None:
        """``signing_key``: the submitter member's identity key, which signs every
        envelope (intake refuses a record not signed by the member it names).
        ``principal``: the Kafka principal to connect as (default: this process's,
        CAPLEDGER_KAFKA_PRINCIPAL); an external system's principal suffices (it writes
        the tx log and reads blocks and rejections).
        ``trust_own_node``: a block committed (signed) by the submitter's own node is
        final at once — that node commits only the block the votes log decided, and an
        institution trusts its own node; other blocks wait for a quorum of members'
        signed commits (decision 0051)."""
        self.genesis = genesis
        self._signing_key = signing_key
        self._principal = principal
        self.genesis_hash = genesis.hash_le
        # Membership by height, amended by the governance transactions of the final
        # blocks this client reads (decision 0061); a client that starts watching
        # mid-stream knows only the changes it reads.
        self.schedule = schedule_from_genesis(genesis, self.genesis_hash)
        self.submitter = submitter
        self.prefix = topic_prefix
        self._bootstrap = bootstrap
        self._writer = LogWriter(bootstrap, client_id=f"capledger-client-{submitter}",
                                 principal=principal)
        self._outcomes: dict[str, Outcome] = {}
        self._heights: dict[int, bytes] = {}
        # Up to five members' copies of each block: parsed once (decision 0128).
        self._copies = BlockCopies()
        # CPU (this thread's) spent handling the records watched, so a benchmark can
        # tell the watcher's share of its process from the sender's.
        self.watch_cpu_s = 0.0
        self._body_checked: Block | None = None
        self._changed = asyncio.Condition()
        self._watchers: list[asyncio.Task[None]] = []
        self.committed_blocks: list[tuple[int, int, int, int]] = []  # height, txs, bytes, ms
        self._finality = FinalityTally(
            genesis.params.quorum,
            trusted=frozenset({submitter}) if trust_own_node else frozenset())

    async def start(self, *, watch_from_start: bool = False) -> None:
        """Watch the blocks and rejections logs from their start, or from their end:
        then the membership changes made before come from the governance announcements
        (``learn_membership``)."""
        await self._writer.start()
        if not watch_from_start:
            await self.learn_membership()
        for name in (BLOCKS.name, REJECTED.name):
            reader = LogReader(self._bootstrap, self.prefix + name,
                               client_id=f"capledger-client-{self.submitter}-{name}",
                               principal=self._principal)
            await reader.start(0)
            if not watch_from_start:
                reader.seek(await reader.end_offset())
            self._watchers.append(asyncio.create_task(self._watch(name, reader)))

    async def learn_membership(self) -> None:
        """The schedule from the governance announcements (decision 0062), each change
        checked as the nodes check it; within ``MEMBERSHIP_READ_TIMEOUT_S``, else (no
        topic, no read access: an external system's principal) the schedule stays as
        it was: the blocks read later amend it."""
        from streams.client.status import read_membership

        with contextlib.suppress(TimeoutError):
            learned = await asyncio.wait_for(
                read_membership(self._bootstrap, self.genesis, topic_prefix=self.prefix,
                                principal=self._principal),
                MEMBERSHIP_READ_TIMEOUT_S)
            if learned.sequence > self.schedule.sequence:
                self.schedule = learned

    async def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._writer.stop()

    async def submit(self, tx: Transaction, *, idempotency_key: str | None = None) -> int:
        """Send one transaction; the tx-log offset it got."""
        return (await self.submit_many([tx], idempotency_keys=[idempotency_key]))[0]

    async def submit_many(
        self, txs: Sequence[Transaction], *, idempotency_keys: Sequence[str | None] | None = None
    ) -> list[int]:
        keys = idempotency_keys or [None] * len(txs)
        now = now_ms()
        items = [
            (
                f"{self.submitter}/{key}".encode(),
                codec.encode(
                    "TxSubmitted",
                    signed_tx_submitted_record(
                        tx.serialize(), key=self._signing_key, genesis_hash=self.genesis_hash,
                        submitter=self.submitter, idempotency_key=key, now_ms=now),
                ),
            )
            for tx, key in zip(txs, [k or str(uuid.uuid4()) for k in keys], strict=True)
        ]
        return await self._writer.send_many(self.prefix + TX.name, items)

    async def submit_batch(
        self, txs: Sequence[Transaction], *, idempotency_keys: Sequence[str | None] | None = None
    ) -> int:
        """Send transactions as one TxBatchSubmitted record under one envelope signature
        (decision 0112; at most ``ledger.envelope.BATCH_TXS_MAX`` and a block's worth);
        the tx-log offset it got. Each transaction is decided on its own: ``wait`` for
        their txids as for ``submit_many``."""
        keys = [k or str(uuid.uuid4()) for k in (idempotency_keys or [None] * len(txs))]
        record = signed_tx_batch_record(
            [tx.serialize() for tx in txs], key=self._signing_key,
            genesis_hash=self.genesis_hash, submitter=self.submitter,
            idempotency_keys=keys, now_ms=now_ms())
        value = codec.encode("TxBatchSubmitted", record)
        key = f"{self.submitter}/{keys[0] if keys else ''}".encode()
        return (await self._writer.send_many(self.prefix + TX.name, [(key, value)]))[0]

    def outcome(self, txid: str) -> Outcome | None:
        return self._outcomes.get(txid)

    @property
    def block_copies_reused(self) -> int:
        """Members' copies of committed blocks not parsed again (decision 0128)."""
        return self._copies.reused

    def block_hash(self, height: int) -> bytes | None:
        """Hash (internal byte order) of the final block at ``height``, if any."""
        return self._heights.get(height)

    async def wait(self, txids: Iterable[str], *, timeout_s: float) -> dict[str, Outcome]:
        """Outcomes of ``txids`` once all are decided; TimeoutError names the rest."""
        wanted = set(txids)
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while not wanted <= self._outcomes.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(wanted - self._outcomes.keys())
                    raise TimeoutError(
                        f"{len(missing)} of {len(wanted)} transactions undecided after "
                        f"{timeout_s} s (first: {missing[:3]})"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        return {txid: self._outcomes[txid] for txid in wanted}

    async def _watch(self, name: str, reader: LogReader) -> None:
        try:
            while True:
                records = await reader.read(timeout_ms=WATCH_READ_TIMEOUT_MS)
                if not records:
                    continue
                began_s = time.thread_time()
                arrived = now_ms()
                for record in records:
                    try:
                        if name == BLOCKS.name:
                            if self._is_known_height(record.key):
                                continue  # another member's copy of a height already checked
                            self._on_block(record.value, arrived)
                        else:
                            self._on_rejection(record.value, arrived)
                    except ValidationError:
                        continue  # a bad record decides nothing for us
                self.watch_cpu_s += time.thread_time() - began_s
                async with self._changed:
                    self._changed.notify_all()
        finally:
            await reader.stop()

    def _is_known_height(self, key: bytes | None) -> bool:
        """Every member publishes each committed height (key: the height in ASCII); the
        copies are checked until one block is final, later ones are skipped."""
        if key is None or not key.isdigit() or len(key) > 20:
            return False
        return int(key) in self._heights

    def _on_block(self, value: bytes, arrived_ms: int) -> None:
        record = codec.decode(value, expected="BlockCommitted").record
        committed = committed_from_record(
            record, block_bytes_max=self.schedule.latest.params.block_bytes_max,
            copies=self._copies,
        )
        height = committed.block.height
        if height in self._heights:
            return
        view = self.schedule.at(height)
        committed.check_signature(view, self.genesis_hash)
        check_certified_block(committed.block, committed.qc, view,
                              genesis_hash=self.genesis_hash)
        self._check_body(committed.block)
        if not self._finality.add(height, committed.block.hash, committed.committer,
                                  view.params.quorum):
            return  # not final yet: fewer than a quorum of members committed this block
        self._heights[height] = committed.block.hash
        self.schedule, _ = schedule_after_block(self.schedule, height, committed.block.txs)
        self.committed_blocks.append(
            (height, len(committed.block.txs), len(record["block"]), arrived_ms)
        )
        for tx in committed.block.txs:
            # A commit overrides a rejection read earlier (e.g. a duplicate submission
            # of this very transaction was rejected while the first copy committed).
            self._outcomes[tx.txid] = Outcome(tx.txid, True, height=height,
                                              decided_at_ms=arrived_ms)

    def _check_body(self, block: Block) -> None:
        """The transactions are the ones the certified header commits to: the signatures
        and the certificate cover the header's hash only, and the outcomes come from the
        copy that makes the block final. A copy parsed before (``BlockCopies`` returns
        the same object for the same bytes) is not hashed again."""
        if block is self._body_checked:
            return
        if merkle_root([tx.hash_le for tx in block.txs]) != block.header.merkle_root:
            raise BlockError(f"committed block {block.hash_hex}: its transactions do not "
                             "match its Merkle root", code="block-merkle")
        self._body_checked = block

    def _on_rejection(self, value: bytes, arrived_ms: int) -> None:
        record = rejected_from_record(codec.decode(value, expected="TxRejected").record)
        if record.txid is None:
            return
        if record.code.startswith(ENVELOPE_CODE_PREFIX):
            # Someone else's record naming this tx (this client signs its own): a
            # forgery must not decide the outcome of the genuine submission.
            return
        # Only the member it names may reject (decision 0051): raises otherwise.
        record.check_signature(self.schedule.latest, self.genesis_hash)
        txid = display_hex(record.txid)
        if txid in self._outcomes:
            return
        self._outcomes[txid] = Outcome(
            txid, False, code=record.code, message=record.message,
            decided_at_ms=arrived_ms, rejected_by=record.institution,
        )

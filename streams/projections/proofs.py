"""Building an inclusion proof from the logs: the projection finds the block, the blocks
log supplies it.

Owns: :func:`build_proof_from_logs`. The database is used only to locate the record
(``tx.height`` -> ``block.source_offset``); the block and its certificate come from
``ledger.blocks.v1`` and are checked (certificate, hash equal to the projected one)
before the proof is built, and the proof is verified with ``ledger.proof.verify_proof``
before it is returned, so a wrong proof is never written.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ledger.block import check_certified_block
from ledger.errors import ValidationError
from ledger.governance import (
    MembershipSchedule,
    SignedChange,
    apply_signed_change,
    change_from_tx,
    is_governance_tx,
    schedule_from_genesis,
)
from ledger.hashing import display_hex
from ledger.membership import Genesis
from ledger.proof import build_proof, verify_proof
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogReader
from streams.kafka.records import committed_from_record
from streams.kafka.topics import BLOCKS

READ_TIMEOUT_MS = 2_000
READ_ATTEMPTS_MAX = 5


class ProofUnavailable(ValidationError):
    """No proof can be built for this txid (unknown, genesis, or the record is unusable)."""

    code = "proof-unavailable"


async def _locate(dsn: str, txid: str) -> tuple[int, str, int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(
            "SELECT t.height, b.hash, b.source_offset FROM tx t JOIN block b USING (height) "
            "WHERE t.txid = %s", (txid,))).fetchone()
    if row is None:
        raise ProofUnavailable(f"tx {txid} is not in the projection", code="unknown-txid")
    height, block_hash, source_offset = row
    if source_offset is None:
        raise ProofUnavailable(f"tx {txid} is the genesis allocation (height 0): it is proved "
                               "by the genesis record itself", code="genesis-tx")
    return int(height), str(block_hash), int(source_offset)


SCAN_READ_RECORDS_MAX = 200


class _ScanGovernance:
    """The governance changes of the blocks a log scan has checked, in height order:
    what a proof must carry so its verifier knows the membership (decision 0061)."""

    def __init__(self, genesis: Genesis) -> None:
        self.schedule: MembershipSchedule = schedule_from_genesis(genesis)
        self.changes: list[tuple[SignedChange, int]] = []
        self.height = 0

    def note(self, height: int, txs: tuple[Transaction, ...]) -> None:
        if height != self.height + 1:
            return  # a copy, or ahead of the chain scanned so far
        self.height = height
        for tx in txs:
            if is_governance_tx(tx):
                try:
                    signed = change_from_tx(tx)
                    self.schedule = apply_signed_change(self.schedule, signed, height=height)
                except ValidationError:
                    continue
                self.changes.append((signed, height))


def _certified_with(genesis: Genesis, value: bytes, txid: str,
                    scan: _ScanGovernance) -> dict[str, Any] | None:
    """The proof of ``txid`` from one blocks-log record, if it is a certified block that
    holds it; None for any other record (anyone can write to the log)."""
    try:
        decoded = codec.decode(value, expected="BlockCommitted").record
        committed = committed_from_record(decoded, block_bytes_max=genesis.params.block_bytes_max)
        block = committed.block
        check_certified_block(block, committed.qc, scan.schedule.at(block.height),
                              genesis_hash=genesis.hash_le)
    except (ValidationError, KeyError, TypeError, ValueError):
        return None
    if all(tx.txid != txid for tx in block.txs):
        scan.note(block.height, block.txs)
        return None
    return build_proof(genesis, block, committed.qc, txid, scan.changes)


async def build_proof_from_log_scan(genesis: Genesis, txid: str, *, bootstrap: str,
                                    topic_prefix: str = "") -> dict[str, Any]:
    """Without a projection: the first certified record of the blocks log holding
    ``txid`` (a scan from offset 0)."""
    reader = LogReader(bootstrap, topic_prefix + BLOCKS.name, client_id="capledger-prove")
    await reader.start(0)
    scan = _ScanGovernance(genesis)
    try:
        async for batch in reader.read_to_end(max_records=SCAN_READ_RECORDS_MAX):
            for record in batch:
                proof = _certified_with(genesis, record.value, txid, scan)
                if proof is not None:
                    verify_proof(proof, trusted_genesis_hash=display_hex(genesis.hash_le))
                    return proof
    finally:
        await reader.stop()
    raise ProofUnavailable(f"tx {txid} is in no certified block of the log", code="unknown-txid")


async def _governance_below(dsn: str, height: int) -> list[tuple[SignedChange, int]]:
    """The governance changes carried below ``height``, from the projection (table
    ``membership`` and the carrying transactions' bytes), in sequence order."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        rows = await (await conn.execute(
            "SELECT t.raw, m.carried_height FROM membership m JOIN tx t ON t.txid = m.txid "
            "WHERE m.sequence > 0 AND m.carried_height < %s ORDER BY m.sequence",
            (height,))).fetchall()
    return [(change_from_tx(Transaction.parse(bytes(raw))), int(carried))
            for raw, carried in rows]


async def build_proof_from_logs(genesis: Genesis, txid: str, *, bootstrap: str, dsn: str,
                                topic_prefix: str = "") -> dict[str, Any]:
    height, block_hash, offset = await _locate(dsn, txid)
    changes = await _governance_below(dsn, height)
    schedule = schedule_from_genesis(genesis)
    for signed, carried in changes:
        schedule = apply_signed_change(schedule, signed, height=carried)
    reader = LogReader(bootstrap, topic_prefix + BLOCKS.name, client_id="capledger-prove")
    await reader.start(offset)
    try:
        records = []
        for _ in range(READ_ATTEMPTS_MAX):
            records = await reader.read(timeout_ms=READ_TIMEOUT_MS, max_records=1)
            if records:
                break
    finally:
        await reader.stop()
    if not records or records[0].offset != offset:
        raise ProofUnavailable(f"blocks log offset {offset} unreadable", code="record-missing")
    try:
        decoded = codec.decode(records[0].value, expected="BlockCommitted").record
        committed = committed_from_record(decoded, block_bytes_max=genesis.params.block_bytes_max)
        check_certified_block(committed.block, committed.qc, schedule.at(height),
                              genesis_hash=genesis.hash_le)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        raise ProofUnavailable(f"blocks log offset {offset}: {error}",
                               code="record-unusable") from None
    block = committed.block
    if (block.height, block.hash_hex) != (height, block_hash):
        raise ProofUnavailable(
            f"blocks log offset {offset} holds block {block.height} {block.hash_hex}, the "
            f"projection says {height} {block_hash}: run capledger audit replay",
            code="projection-differs")
    proof = build_proof(genesis, block, committed.qc, txid, changes)
    verify_proof(proof, trusted_genesis_hash=display_hex(genesis.hash_le))
    return proof

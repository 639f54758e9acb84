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
from ledger.hashing import display_hex
from ledger.membership import Genesis
from ledger.proof import build_proof, verify_proof
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


def _certified_with(genesis: Genesis, value: bytes, txid: str) -> dict[str, Any] | None:
    """The proof of ``txid`` from one blocks-log record, if it is a certified block that
    holds it; None for any other record (anyone can write to the log)."""
    try:
        decoded = codec.decode(value, expected="BlockCommitted").record
        committed = committed_from_record(decoded, block_bytes_max=genesis.params.block_bytes_max)
        if all(tx.txid != txid for tx in committed.block.txs):
            return None
        check_certified_block(committed.block, committed.qc, genesis)
    except (ValidationError, KeyError, TypeError, ValueError):
        return None
    return build_proof(genesis, committed.block, committed.qc, txid)


async def build_proof_from_log_scan(genesis: Genesis, txid: str, *, bootstrap: str,
                                    topic_prefix: str = "") -> dict[str, Any]:
    """Without a projection: the first certified record of the blocks log holding
    ``txid`` (a scan from offset 0)."""
    reader = LogReader(bootstrap, topic_prefix + BLOCKS.name, client_id="capledger-prove")
    await reader.start(0)
    try:
        async for batch in reader.read_to_end(max_records=SCAN_READ_RECORDS_MAX):
            for record in batch:
                proof = _certified_with(genesis, record.value, txid)
                if proof is not None:
                    verify_proof(proof, trusted_genesis_hash=display_hex(genesis.hash_le))
                    return proof
    finally:
        await reader.stop()
    raise ProofUnavailable(f"tx {txid} is in no certified block of the log", code="unknown-txid")


async def build_proof_from_logs(genesis: Genesis, txid: str, *, bootstrap: str, dsn: str,
                                topic_prefix: str = "") -> dict[str, Any]:
    height, block_hash, offset = await _locate(dsn, txid)
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
        check_certified_block(committed.block, committed.qc, genesis)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        raise ProofUnavailable(f"blocks log offset {offset}: {error}",
                               code="record-unusable") from None
    block = committed.block
    if (block.height, block.hash_hex) != (height, block_hash):
        raise ProofUnavailable(
            f"blocks log offset {offset} holds block {block.height} {block.hash_hex}, the "
            f"projection says {height} {block_hash}: run capledger audit replay",
            code="projection-differs")
    proof = build_proof(genesis, block, committed.qc, txid)
    verify_proof(proof, trusted_genesis_hash=display_hex(genesis.hash_le))
    return proof

"""Mapping between the core's types and the Avro event records of ``schemas/``.

Owns: one ``*_record`` function per event the node writes and one ``*_from_record``
per event it reads, checking that envelope copies agree with the canonical bytes
they accompany (a mismatch is a ``ValidationError`` with a specific code, never a
crash). Encoding/decoding of the bytes themselves is ``streams.kafka.codec``'s.

"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.block import ZERO_HASH, Block, QuorumCertificate, Vote
from ledger.envelope import sign_envelope
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.selection import Rejection


class RecordError(ValidationError):
    code = "record"


def millis(value: Any) -> int:
    """A timestamp-millis field as int ms (fastavro reads them as aware datetimes)."""
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    return int(value)


def tx_submitted_record(
    raw_tx: bytes, *, submitter: str, idempotency_key: str, now_ms: int,
    signature: bytes = b"",
) -> dict[str, Any]:
    """A TxSubmitted record; ``signature`` from :func:`signed_tx_submitted_record`
    (intake refuses an unsigned one)."""
    return {
        "tx": raw_tx,
        "submitter": submitter,
        "idempotency_key": idempotency_key,
        "submitted_at": now_ms,
        "signature": signature,
    }


def signed_tx_submitted_record(
    raw_tx: bytes, *, key: PrivateKey, genesis_hash: bytes, submitter: str,
    idempotency_key: str, now_ms: int,
) -> dict[str, Any]:
    """A TxSubmitted record signed by the submitter (ledger.envelope)."""
    return tx_submitted_record(
        raw_tx, submitter=submitter, idempotency_key=idempotency_key, now_ms=now_ms,
        signature=sign_envelope(key, genesis_hash, submitter, idempotency_key, raw_tx))


def _block_fields(block: Block) -> dict[str, Any]:
    """The block and the header copies BlockProposed and BlockCommitted both carry."""
    header = block.header
    return {
        "height": header.height,
        "round": header.round,
        "proposer": header.proposer,
        "block_hash": block.hash,
        "prev_hash": header.prev_hash,
        "tx_count": len(block.txs),
        "block": block.serialize(),
    }


def proposal_record(block: Block, *, now_ms: int) -> dict[str, Any]:
    return {**_block_fields(block), "proposed_at": now_ms}


def _check_envelope(record: Mapping[str, Any], block: Block, what: str) -> None:
    header = block.header
    copies = (
        record["height"], record["round"], record["proposer"], record["block_hash"],
        record["prev_hash"], record["tx_count"],
    )
    actual = (
        header.height, header.round, header.proposer, block.hash, header.prev_hash,
        len(block.txs),
    )
    if copies != actual:
        raise RecordError(
            f"{what} envelope (height {record['height']}, round {record['round']}, proposer "
            f"{record['proposer']}) does not match the block it carries",
            code="proposal-envelope",
        )


def block_from_proposal(record: Mapping[str, Any], *, block_bytes_max: int) -> Block:
    block = Block.parse(record["block"], block_bytes_max=block_bytes_max)
    _check_envelope(record, block, "proposal")
    return block


def vote_record(vote: Vote, *, now_ms: int) -> dict[str, Any]:
    return {
        "voter": vote.voter,
        "height": vote.height,
        "round": vote.round,
        "kind": vote.kind,
        "block_hash": vote.block_hash,
        "reason_code": vote.reason_code,
        "signature": vote.signature,
        "voted_at": now_ms,
    }


def vote_from_record(record: Mapping[str, Any]) -> Vote:
    block_hash = record["block_hash"] if record["block_hash"] is not None else ZERO_HASH
    if len(block_hash) != 32:
        raise RecordError(f"vote by {record['voter']}: block hash of {len(block_hash)} bytes",
                          code="vote-malformed")
    return Vote(
        str(record["voter"]),
        int(record["height"]),
        int(record["round"]),
        bytes(block_hash),
        str(record["kind"]),
        str(record["reason_code"] or ""),
        bytes(record["signature"]),
    )


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed-block record as read back: the block, its QC, and log positions."""

    block: Block
    qc: QuorumCertificate
    proposal_offset: int
    vote_offsets: tuple[int, ...]
    committer: str
    committed_at_ms: int

    @property
    def last_vote_offset(self) -> int:
        return max(self.vote_offsets) if self.vote_offsets else -1


def committed_record(
    block: Block,
    qc: QuorumCertificate,
    *,
    vote_offsets: Sequence[int],
    proposal_offset: int,
    committer: str,
    now_ms: int,
) -> dict[str, Any]:
    assert len(vote_offsets) == len(qc.votes)
    return {
        **_block_fields(block),
        "certificate": {
            "height": qc.height,
            "round": qc.round,
            "block_hash": qc.block_hash,
            "votes": [
                {"voter": vote.voter, "signature": vote.signature, "vote_offset": offset}
                for vote, offset in zip(qc.votes, vote_offsets, strict=True)
            ],
        },
        "committer": committer,
        "proposal_offset": proposal_offset,
        "committed_at": now_ms,
    }


def committed_from_record(record: Mapping[str, Any], *, block_bytes_max: int) -> Committed:
    """Parse only; the caller checks the certificate (ledger.block.check_certified_block)."""
    block = Block.parse(record["block"], block_bytes_max=block_bytes_max)
    _check_envelope(record, block, "committed block")
    certificate = record["certificate"]
    votes = tuple(
        Vote(
            str(item["voter"]),
            int(certificate["height"]),
            int(certificate["round"]),
            bytes(certificate["block_hash"]),
            "ack",
            "",
            bytes(item["signature"]),
        )
        for item in certificate["votes"]
    )
    qc = QuorumCertificate(
        int(certificate["height"]), int(certificate["round"]), bytes(certificate["block_hash"]),
        votes,
    )
    return Committed(
        block,
        qc,
        int(record["proposal_offset"]),
        tuple(int(item["vote_offset"]) for item in certificate["votes"]),
        str(record["committer"]),
        millis(record["committed_at"]),
    )


def rejected_record(
    rejection: Rejection,
    *,
    stage: str,
    institution: str,
    source_topic: str,
    block_hash: bytes | None,
    now_ms: int,
) -> dict[str, Any]:
    return {
        "txid": None if rejection.txid is None else bytes.fromhex(rejection.txid)[::-1],
        "stage": stage,
        "code": rejection.code,
        "message": rejection.message[:2000],
        "institution": institution,
        "submitter": rejection.submitter or None,
        "idempotency_key": rejection.idempotency_key or None,
        "block_hash": block_hash,
        "source_topic": source_topic,
        "source_partition": 0,
        "source_offset": rejection.offset,
        "rejected_at": now_ms,
    }


def status_record(
    *,
    institution: str,
    chain_id: str,
    height: int,
    head_hash: bytes,
    state_hash: bytes,
    consumer_lag: int,
    version: str,
    now_ms: int,
    round_: int,
    pending_txs: int,
) -> dict[str, Any]:
    return {
        "institution": institution,
        "chain_id": chain_id,
        "height": height,
        "head_hash": head_hash,
        "state_hash": state_hash,
        "consumer_lag": consumer_lag,
        "version": version,
        "reported_at": now_ms,
        "round": round_,
        "pending_txs": pending_txs,
    }

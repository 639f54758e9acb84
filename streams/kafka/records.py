"""Mapping between the core's types and the Avro event records of ``schemas/``.

Owns: one ``*_record`` function per event the node writes and one ``*_from_record``
per event it reads. A ``*_from_record`` function is the one place where every field
of that record type is checked against the range its use needs (heights and rounds
that pack into the core's u64/u32 fields, offsets, member ids in ASCII, reason codes,
byte lengths, no NUL or control characters in text) and where envelope copies are
checked against the canonical bytes they accompany. Anything out of range is a
``RecordError`` with a specific code (``RECORD_CODES``), never a crash further in:
what a ``*_from_record`` function returns can be handed to ``ledger/`` safely.
Encoding/decoding of the bytes themselves is ``streams.kafka.codec``'s.

"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.attestation import (
    REJECTED_DOMAIN_TAG,
    STATUS_DOMAIN_TAG,
    STATUS_DOMAIN_TAG_V3,
    check_commit_signature,
    check_record_signature,
    sign_commit,
    sign_record,
)
from ledger.block import (
    HASH_BYTES,
    MEMBER_ID_BYTES_MAX,
    QC_VOTES_MAX,
    REASON_CODE_BYTES_MAX,
    SIGNATURE_BYTES_MAX,
    Block,
    BlockHeader,
    QuorumCertificate,
    Vote,
    parse_block_reusing,
)
from ledger.envelope import BATCH_TXS_MAX, sign_batch, sign_envelope
from ledger.errors import ValidationError
from ledger.governance import MembershipChange, SignedChange
from ledger.hashing import hash_from_display_hex
from ledger.keys import PrivateKey, PublicKey
from ledger.membership import ChainParams, Genesis, Member
from ledger.selection import Rejection
from ledger.tx import TX_BYTES_MAX, Transaction

# Blocks a BlockCopies keeps: the copies of one height come close together.
BLOCK_COPIES_MAX = 4

# Ranges the fields' uses need. Heights are u64 in block headers and votes, rounds
# u32; the Avro types (long, int) are signed, so the non-negative half is the range.
HEIGHT_MAX = 2**63 - 1
ROUND_MAX = 2**31 - 1
# A log offset in a record: -1 means "not known to the writer"; Kafka offsets are
# signed 64-bit and the node adds 1 to them, so the top value is left out.
OFFSET_UNKNOWN = -1
OFFSET_MAX = 2**63 - 2
# Free text a submitter chooses (submitter id, idempotency key): Unicode without
# NUL or other control characters (PostgreSQL text refuses NUL), bounded.
SUBMITTER_CHARS_MAX = 128
IDEMPOTENCY_KEY_CHARS_MAX = 256
# The codes a RecordError carries (stable; docs/decisions/0050-no-record-stops-the-ledger.md).
RECORD_CODES = frozenset({
    "record-height-range", "record-round-range", "record-offset-range",
    "record-member-id", "record-reason-code", "record-hash-length",
    "record-signature-length", "record-text", "record-count-range",
    "record-time-range", "record-qc-votes", "proposal-envelope", "tx-oversized",
})


class RecordError(ValidationError):
    code = "record"


def millis(value: Any) -> int:
    """A timestamp-millis field as int ms (fastavro reads them as aware datetimes)."""
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    return int(value)


# --------------------------------------------------------------------- field checks


def _check_range(what: str, value: Any, low: int, high: int, code: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(f"{what} {value!r} is outside [{low}, {high}]", code=code)
    return value


def check_height(what: str, value: Any, *, low: int = 0) -> int:
    return _check_range(what, value, low, HEIGHT_MAX, "record-height-range")


def check_round(what: str, value: Any) -> int:
    return _check_range(what, value, 0, ROUND_MAX, "record-round-range")


def check_offset(what: str, value: Any) -> int:
    return _check_range(what, value, OFFSET_UNKNOWN, OFFSET_MAX, "record-offset-range")


def check_member_id(what: str, value: Any) -> str:
    """A member id as the core encodes it: 1..64 printable ASCII characters."""
    if (not isinstance(value, str) or not 0 < len(value) <= MEMBER_ID_BYTES_MAX
            or not value.isascii() or not value.isprintable()):
        raise RecordError(f"{what} {value[:80]!r} is not 1..{MEMBER_ID_BYTES_MAX} printable "
                          "ASCII characters" if isinstance(value, str) else f"{what} missing",
                          code="record-member-id")
    return value


def check_reason_code(value: Any) -> str:
    if (not isinstance(value, str) or len(value) > REASON_CODE_BYTES_MAX
            or not value.isascii() or not value.isprintable()):
        shown = value[:80] if isinstance(value, str) else value
        raise RecordError(f"reason code {shown!r} is not 0..{REASON_CODE_BYTES_MAX} printable "
                          "ASCII characters", code="record-reason-code")
    return value


def check_hash(what: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        size = len(value) if isinstance(value, bytes) else 0
        raise RecordError(f"{what} of {size} bytes, not {HASH_BYTES}",
                          code="record-hash-length")
    return value


def check_signature(what: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= SIGNATURE_BYTES_MAX:
        size = len(value) if isinstance(value, bytes) else 0
        raise RecordError(f"{what} of {size} bytes, not 1..{SIGNATURE_BYTES_MAX}",
                          code="record-signature-length")
    return value


# C0 controls, DEL and C1 controls (U+0000-U+001F, U+007F-U+009F).
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_text(what: str, value: Any, *, chars_max: int) -> str:
    """Free text: at most ``chars_max`` characters, none a control character (NUL...)."""
    if (not isinstance(value, str) or len(value) > chars_max
            or _CONTROL_CHARACTER.search(value) is not None):
        shown = value[:80] if isinstance(value, str) else value
        raise RecordError(f"{what} {shown!r} is over {chars_max} characters or holds a "
                          "control character", code="record-text")
    return value


def check_count(what: str, value: Any, high: int) -> int:
    return _check_range(what, value, 0, high, "record-count-range")


def check_millis(what: str, value: Any) -> int:
    """A timestamp-millis field as int ms, refused when it is not a real instant."""
    if isinstance(value, dt.datetime):
        return millis(value)
    return _check_range(what, value, 0, HEIGHT_MAX, "record-time-range")


# --------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class TxSubmission:
    """A TxSubmitted record whose fields passed their checks (the tx not yet parsed)."""

    raw_tx: bytes
    submitter: str
    idempotency_key: str


def tx_submission_from_record(record: Mapping[str, Any]) -> TxSubmission:
    raw = record["tx"]
    if not isinstance(raw, bytes) or len(raw) > TX_BYTES_MAX:
        size = len(raw) if isinstance(raw, bytes) else 0
        raise RecordError(f"transaction of {size} bytes exceeds {TX_BYTES_MAX}",
                          code="tx-oversized")
    return TxSubmission(
        raw,
        check_text("submitter", record["submitter"], chars_max=SUBMITTER_CHARS_MAX),
        check_text("idempotency key", record["idempotency_key"],
                   chars_max=IDEMPOTENCY_KEY_CHARS_MAX),
    )


def parse_submitted_tx(submission: TxSubmission) -> Transaction:
    """The transaction of a checked submission (``ValidationError`` if it does not parse)."""
    return Transaction.parse(submission.raw_tx)


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


@dataclass(frozen=True, slots=True)
class TxBatchSubmission:
    """A TxBatchSubmitted record whose fields passed their checks (the transactions
    not yet parsed, the signature not yet verified; decision 0112)."""

    raw_txs: tuple[bytes, ...]
    submitter: str
    idempotency_keys: tuple[str, ...]
    signature: bytes


def tx_batch_submission_from_record(record: Mapping[str, Any]) -> TxBatchSubmission:
    """The checked fields of a batch; ``RecordError`` (code ``envelope-batch-*``) when
    its shape is wrong: the batch is then refused as a whole."""
    raw_txs, keys = record["txs"], record["idempotency_keys"]
    if len(raw_txs) > BATCH_TXS_MAX or len(keys) > BATCH_TXS_MAX:
        raise RecordError(f"batch of {max(len(raw_txs), len(keys))} items exceeds "
                          f"{BATCH_TXS_MAX}", code="envelope-batch-too-many")
    if len(raw_txs) != len(keys):
        raise RecordError(f"batch of {len(raw_txs)} transactions carries {len(keys)} "
                          "idempotency keys", code="envelope-batch-malformed")
    for raw in raw_txs:
        if not isinstance(raw, bytes) or len(raw) > TX_BYTES_MAX:
            raise RecordError(f"a transaction of the batch exceeds {TX_BYTES_MAX} bytes",
                              code="envelope-batch-oversized")
    try:
        checked_keys = tuple(check_text("idempotency key", key,
                                        chars_max=IDEMPOTENCY_KEY_CHARS_MAX) for key in keys)
    except RecordError as error:
        raise RecordError(error.message, code="envelope-batch-malformed") from None
    return TxBatchSubmission(
        tuple(raw_txs),
        check_text("submitter", record["submitter"], chars_max=SUBMITTER_CHARS_MAX),
        checked_keys,
        bytes(record["signature"]),
    )


def signed_tx_batch_record(
    raw_txs: Sequence[bytes], *, key: PrivateKey, genesis_hash: bytes, submitter: str,
    idempotency_keys: Sequence[str], now_ms: int,
) -> dict[str, Any]:
    """A TxBatchSubmitted record signed once by the submitter (ledger.envelope)."""
    assert len(raw_txs) == len(idempotency_keys)
    return {
        "submitter": submitter,
        "txs": list(raw_txs),
        "idempotency_keys": list(idempotency_keys),
        "submitted_at": now_ms,
        "signature": sign_batch(key, genesis_hash, submitter,
                                list(zip(idempotency_keys, raw_txs, strict=True))),
    }


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


def _check_envelope_fields(record: Mapping[str, Any], what: str) -> None:
    """The envelope's own fields, before the block is parsed."""
    check_height(f"{what} height", record["height"], low=1)
    check_round(f"{what} round", record["round"])
    check_member_id(f"{what} proposer", record["proposer"])
    check_hash(f"{what} block hash", record["block_hash"])
    check_hash(f"{what} previous hash", record["prev_hash"])
    check_count(f"{what} tx count", record["tx_count"], ROUND_MAX)


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


def block_from_proposal(
    record: Mapping[str, Any],
    *,
    block_bytes_max: int,
    known_txs: Callable[[BlockHeader], Sequence[Transaction] | None] | None = None,
) -> Block:
    """The proposed block; ``known_txs`` (a node's pool) lets the parse reuse
    transactions already parsed, with the same result (ledger.block.parse_block_reusing)."""
    _check_envelope_fields(record, "proposal")
    check_millis("proposal time", record["proposed_at"])
    if known_txs is None:
        block = Block.parse(record["block"], block_bytes_max=block_bytes_max)
    else:
        block = parse_block_reusing(record["block"], known_txs, block_bytes_max=block_bytes_max)
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
    """A VoteCast record as a vote every core function can take (sign check, packing):
    height >= 1 and round in the u32 range, voter and reason code in printable ASCII."""
    voter = check_member_id("voter", record["voter"])
    return Vote(
        voter,
        check_height(f"vote by {voter}: height", record["height"], low=1),
        check_round(f"vote by {voter}: round", record["round"]),
        check_hash(f"vote by {voter}: block hash", record["block_hash"]),
        str(record["kind"]),
        check_reason_code(record["reason_code"]),
        check_signature(f"vote by {voter}: signature", record["signature"]),
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
    signature: bytes = b""  # the committer's (ledger.attestation); empty in version 1

    @property
    def last_vote_offset(self) -> int:
        return max(self.vote_offsets) if self.vote_offsets else -1

    def check_signature(self, genesis: Genesis, genesis_hash: bytes) -> None:
        """``AttestationError`` (``commit-*``) unless the committer signed this record."""
        check_commit_signature(
            genesis, genesis_hash, committer=self.committer, block_hash=self.block.hash,
            height=self.block.height, proposal_offset=self.proposal_offset,
            committed_at_ms=self.committed_at_ms, vote_offsets=self.vote_offsets,
            signature=self.signature)


def committed_record(
    block: Block,
    qc: QuorumCertificate,
    *,
    vote_offsets: Sequence[int],
    proposal_offset: int,
    committer: str,
    now_ms: int,
    key: PrivateKey | None = None,
    genesis_hash: bytes = b"",
) -> dict[str, Any]:
    """A BlockCommitted record, signed by ``key`` (the committer's identity key) over
    ``genesis_hash`` (ledger.attestation); unsigned without a key (tests of readers'
    refusals, version-1 behaviour)."""
    assert len(vote_offsets) == len(qc.votes)
    signature = b"" if key is None else sign_commit(
        key, genesis_hash, committer=committer, block_hash=block.hash, height=block.height,
        proposal_offset=proposal_offset, committed_at_ms=now_ms, vote_offsets=vote_offsets)
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
        "signature": signature,
    }


class BlockCopies:
    """The blocks parsed from the last few committed records, by their exact bytes.

    Every member publishes each committed height (decision 0051), so a reader of
    ``ledger.blocks.v1`` gets up to five copies of one block, usually one after the
    other; until a quorum of them is in, each is checked. ``parse`` returns the block
    already parsed from the very same bytes (and limit) instead of parsing them again:
    ``Block.parse`` is a function of its input, so the result is the same object a
    second parse would equal. Everything else about a copy (its certificate, signature,
    committer, offsets) is still read and checked per record (decision 0128).
    Bounded: ``entries_max`` blocks, the oldest dropped."""

    def __init__(self, entries_max: int = BLOCK_COPIES_MAX) -> None:
        self.entries_max = entries_max
        self._entries: list[tuple[bytes, int, Block]] = []
        self.reused = 0  # parses saved (for tests and benchmarks)

    def parse(self, raw: bytes, *, block_bytes_max: int) -> Block:
        for known_raw, known_max, block in reversed(self._entries):
            if known_max == block_bytes_max and len(known_raw) == len(raw) \
                    and known_raw == raw:
                self.reused += 1
                return block
        block = Block.parse(raw, block_bytes_max=block_bytes_max)
        self._entries.append((bytes(raw), block_bytes_max, block))
        if len(self._entries) > self.entries_max:
            del self._entries[0]
        return block


def committed_from_record(record: Mapping[str, Any], *, block_bytes_max: int,
                          copies: BlockCopies | None = None) -> Committed:
    """Parse and range-check; the caller checks the certificate
    (ledger.block.check_certified_block). ``copies``: reuse the block parsed from an
    identical copy read before (another member's record of the same block)."""
    _check_envelope_fields(record, "committed block")
    committer = check_member_id("committer", record["committer"])
    proposal_offset = check_offset("proposal offset", record["proposal_offset"])
    committed_at_ms = check_millis("commit time", record["committed_at"])
    qc, vote_offsets = _certificate_from_record(record["certificate"])
    if copies is None:
        block = Block.parse(record["block"], block_bytes_max=block_bytes_max)
    else:
        block = copies.parse(record["block"], block_bytes_max=block_bytes_max)
    _check_envelope(record, block, "committed block")
    signature = _optional_signature("committer signature", record.get("signature", b""))
    return Committed(block, qc, proposal_offset, vote_offsets, committer, committed_at_ms,
                     signature)


def _certificate_from_record(
    certificate: Mapping[str, Any],
) -> tuple[QuorumCertificate, tuple[int, ...]]:
    height = check_height("certificate height", certificate["height"], low=1)
    round_ = check_round("certificate round", certificate["round"])
    block_hash = check_hash("certificate block hash", certificate["block_hash"])
    items = certificate["votes"]
    if not 0 < len(items) <= QC_VOTES_MAX:
        raise RecordError(f"certificate with {len(items)} votes, not 1..{QC_VOTES_MAX}",
                          code="record-qc-votes")
    votes = tuple(
        Vote(check_member_id("certificate voter", item["voter"]), height, round_, block_hash,
             "ack", "", check_signature("certificate signature", item["signature"]))
        for item in items
    )
    offsets = tuple(check_offset("vote offset", item["vote_offset"]) for item in items)
    return QuorumCertificate(height, round_, block_hash, votes), offsets


def rejected_record(
    rejection: Rejection,
    *,
    stage: str,
    institution: str,
    source_topic: str,
    block_hash: bytes | None,
    now_ms: int,
    key: PrivateKey | None = None,
    genesis_hash: bytes = b"",
) -> dict[str, Any]:
    """A TxRejected record, signed by ``key`` (the rejecting member's identity key) over
    ``genesis_hash`` and its fields (ledger.attestation); unsigned without a key."""
    record: dict[str, Any] = {
        "txid": None if rejection.txid is None else hash_from_display_hex(rejection.txid),
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
    record["signature"] = b"" if key is None else sign_record(
        key, REJECTED_DOMAIN_TAG, genesis_hash, [record[name] for name in REJECTED_SIGNED])
    return record


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A TxRejected record whose fields passed their checks (hashes as sent: LE)."""

    txid: bytes | None
    stage: str
    code: str
    message: str
    institution: str
    submitter: str | None
    idempotency_key: str | None
    block_hash: bytes | None
    source_topic: str
    source_partition: int
    source_offset: int
    rejected_at_ms: int
    signature: bytes = b""  # the rejecting member's (ledger.attestation); empty in v1

    def check_signature(self, genesis: Genesis, genesis_hash: bytes) -> None:
        """``AttestationError`` (``rejection-*``) unless ``institution`` signed it."""
        check_record_signature(
            genesis, genesis_hash, domain_tag=REJECTED_DOMAIN_TAG, code_prefix="rejection",
            writer=self.institution, signature=self.signature,
            fields=[self.txid, self.stage, self.code, self.message, self.institution,
                    self.submitter, self.idempotency_key, self.block_hash, self.source_topic,
                    self.source_partition, self.source_offset, self.rejected_at_ms])


# TxRejected's fields in schema order, as signed (the signature excluded).
REJECTED_SIGNED = ("txid", "stage", "code", "message", "institution", "submitter",
                   "idempotency_key", "block_hash", "source_topic", "source_partition",
                   "source_offset", "rejected_at")


def _optional_hash(what: str, value: Any) -> bytes | None:
    return None if value is None else check_hash(what, value)


def _no_nul(what: str, value: Any, chars_max: int) -> str:
    """Text a node wrote about someone else's input: any character but NUL (which
    PostgreSQL text refuses), bounded."""
    if not isinstance(value, str) or "\x00" in value or len(value) > chars_max:
        shown = value[:80] if isinstance(value, str) else value
        raise RecordError(f"{what} {shown!r} holds a NUL byte or is over {chars_max} "
                          "characters", code="record-text")
    return value


REJECTION_MESSAGE_CHARS_MAX = 10_000  # writers cut at 2,000


def rejected_from_record(record: Mapping[str, Any]) -> RejectedRecord:
    """A TxRejected record checked field by field (the projector's input)."""
    submitter, key = record["submitter"], record["idempotency_key"]
    return RejectedRecord(
        _optional_hash("rejected txid", record["txid"]),
        str(record["stage"]),
        check_reason_code(record["code"]),
        _no_nul("rejection message", record["message"], REJECTION_MESSAGE_CHARS_MAX),
        check_member_id("rejecting institution", record["institution"]),
        None if submitter is None else _no_nul("submitter", submitter, SUBMITTER_CHARS_MAX),
        None if key is None else _no_nul("idempotency key", key, IDEMPOTENCY_KEY_CHARS_MAX),
        _optional_hash("rejected block hash", record["block_hash"]),
        _no_nul("source topic", record["source_topic"], 249),  # Kafka's topic name limit
        _check_range("source partition", record["source_partition"], 0, 2**31 - 1,
                     "record-offset-range"),
        check_offset("source offset", record["source_offset"]),
        check_millis("rejection time", record["rejected_at"]),
        _optional_signature("rejection signature", record.get("signature", b"")),
    )


def _optional_signature(what: str, value: Any) -> bytes:
    """Empty (a record of an older, unsigned version, which the codec resolves to the
    field's default, given in the schema as the string "") or a signature's length."""
    return b"" if value in (b"", "") else check_signature(what, value)


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
    key: PrivateKey | None = None,
    genesis_hash: bytes = b"",
    broker_outages: int = 0,
    broker_last_outage_ms: int = 0,
    condition: str = "",
) -> dict[str, Any]:
    """A NodeStatusReported record, signed by ``key`` (the reporting member's identity
    key) over ``genesis_hash`` and its fields; unsigned without a key. ``condition``:
    empty, or a code such as NODE_CONDITION_DISK_FULL (version 4)."""
    record: dict[str, Any] = {
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
        "broker_outages": broker_outages,
        "broker_last_outage_ms": broker_last_outage_ms,
        "condition": condition,
    }
    record["signature"] = b"" if key is None else sign_record(
        key, STATUS_DOMAIN_TAG, genesis_hash, [record[name] for name in STATUS_SIGNED])
    return record


# NodeStatusReported's fields in schema order, as signed (the signature excluded).
STATUS_SIGNED = ("institution", "chain_id", "height", "head_hash", "state_hash",
                 "consumer_lag", "version", "reported_at", "round", "pending_txs",
                 "broker_outages", "broker_last_outage_ms", "condition")
STATUS_SIGNED_V3 = STATUS_SIGNED[:10]


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A NodeStatusReported record whose fields passed their checks."""

    institution: str
    chain_id: str
    height: int
    head_hash: bytes
    state_hash: bytes
    consumer_lag: int
    version: str
    reported_at_ms: int
    round: int
    pending_txs: int
    signature: bytes = b""  # the reporting member's (ledger.attestation); empty before v3
    broker_outages: int = 0  # v4 (decision 0100)
    broker_last_outage_ms: int = 0
    condition: str = ""  # v4, e.g. "disk-full" (decision 0102); empty: none

    def check_signature(self, genesis: Genesis, genesis_hash: bytes) -> None:
        """``AttestationError`` (``status-*``) unless ``institution`` signed it: a
        version-4 report over every field, a version-3 one (no broker fields or
        condition, so they read 0 and empty) over the first ten under the v3 tag."""
        fields: list[str | bytes | int | None] = [
            self.institution, self.chain_id, self.height, self.head_hash, self.state_hash,
            self.consumer_lag, self.version, self.reported_at_ms, self.round,
            self.pending_txs]
        try:
            check_record_signature(
                genesis, genesis_hash, domain_tag=STATUS_DOMAIN_TAG, code_prefix="status",
                writer=self.institution, signature=self.signature,
                fields=[*fields, self.broker_outages, self.broker_last_outage_ms,
                        self.condition])
        except ValidationError as error:
            if error.code != "status-signature" or self.broker_outages or \
                    self.broker_last_outage_ms or self.condition:
                raise
            check_record_signature(
                genesis, genesis_hash, domain_tag=STATUS_DOMAIN_TAG_V3, code_prefix="status",
                writer=self.institution, signature=self.signature, fields=fields)


STATUS_TEXT_CHARS_MAX = 128
NODE_CONDITION_DISK_FULL = "disk-full"
CONDITION_CHARS_MAX = 64


def check_condition(value: Any) -> str:
    """A heartbeat's condition: empty, or a lower-case code of [a-z0-9-]."""
    if value in (None, ""):
        return ""
    if (not isinstance(value, str) or len(value) > CONDITION_CHARS_MAX
            or not all(c.isdigit() or c == "-" or "a" <= c <= "z" for c in value)):
        shown = value[:80] if isinstance(value, str) else value
        raise RecordError(f"node condition {shown!r} is not a code of at most "
                          f"{CONDITION_CHARS_MAX} characters [a-z0-9-]", code="record-text")
    return value


def status_from_record(record: Mapping[str, Any]) -> StatusReport:
    return StatusReport(
        check_member_id("reporting institution", record["institution"]),
        check_text("chain id", record["chain_id"], chars_max=STATUS_TEXT_CHARS_MAX),
        check_height("reported height", record["height"]),
        check_hash("reported head hash", record["head_hash"]),
        check_hash("reported state hash", record["state_hash"]),
        check_count("consumer lag", record["consumer_lag"], HEIGHT_MAX),
        check_text("version", record["version"], chars_max=STATUS_TEXT_CHARS_MAX),
        check_millis("report time", record["reported_at"]),
        check_round("reported round", record["round"]),
        check_count("pending txs", record["pending_txs"], HEIGHT_MAX),
        _optional_signature("status signature", record.get("signature", b"")),
        check_count("broker outages", record.get("broker_outages", 0), HEIGHT_MAX),
        check_count("broker outage ms", record.get("broker_last_outage_ms", 0), HEIGHT_MAX),
        check_condition(record.get("condition", "")),
    )


# --- governance announcements (MembershipChanged, decision 0061) ---------------------


def membership_changed_record(signed: SignedChange, *, chain_id: str, carried_height: int,
                              txid_le: bytes, writer: str, now_ms: int) -> dict[str, Any]:
    change = signed.change
    member = change.member
    params = change.params
    return {
        "change_id": change.change_id, "chain_id": chain_id, "sequence": change.sequence,
        "kind": change.kind, "member_id": change.member_id or None,
        "member": None if member is None else {
            "id": member.id, "name": member.name, "role": member.role,
            "public_key": member.public_key.sec, "may_issue": member.may_issue},
        "params": None if params is None else {
            "quorum": params.quorum, "block_interval_ms": params.block_interval_ms,
            "block_bytes_max": params.block_bytes_max, "block_txs_max": params.block_txs_max,
            "proposer_timeout_ms": params.proposer_timeout_ms},
        "effective_height": change.effective_height, "proposed_by": writer,
        "signatures": [{"member_id": m, "signature": s} for m, s in signed.signatures],
        "proposed_at": now_ms, "genesis_hash": change.genesis_hash,
        "carried_height": carried_height, "txid": txid_le,
    }


def signed_change_from_record(record: Mapping[str, Any]) -> tuple[SignedChange, int]:
    """The signed change an announcement states and the height that carried it; the
    change id must be the id of the fields (``record-governance`` otherwise)."""
    try:
        raw_member, raw_params = record["member"], record["params"]
        member = None if raw_member is None else Member(
            check_member_id("member.id", raw_member["id"]),
            check_text("member.name", raw_member["name"], chars_max=128),
            check_text("member.role", raw_member["role"], chars_max=128),
            PublicKey.parse(bytes(raw_member["public_key"])), bool(raw_member["may_issue"]))
        params = None if raw_params is None else ChainParams(
            *(check_count(name, raw_params[name], 2**31 - 1) for name in (
                "quorum", "block_interval_ms", "block_bytes_max", "block_txs_max",
                "proposer_timeout_ms")))
        change = MembershipChange(
            check_hash("genesis_hash", record["genesis_hash"]),
            check_count("sequence", record["sequence"], 2**63 - 1), str(record["kind"]),
            check_height("effective_height", record["effective_height"]),
            str(record["member_id"] or ""), member, params)
        signatures = tuple(
            (check_member_id("signatures.member_id", s["member_id"]),
             check_signature("signatures.signature", s["signature"]))
            for s in record["signatures"][:64])
        carried = check_height("carried_height", record["carried_height"])
    except (KeyError, TypeError, ValueError) as error:
        raise RecordError(f"MembershipChanged: {error!r}", code="record-governance") from None
    if bytes(record["change_id"]) != change.change_id:
        raise RecordError("MembershipChanged: change_id is not the id of the change",
                          code="record-governance")
    return SignedChange(change, signatures), carried

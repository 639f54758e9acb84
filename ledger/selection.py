"""Which transactions of a tx-log range a block contains: the deterministic selection.

Owns: ``Candidate`` (one record of ``ledger.tx.v1`` as intake saw it), ``Rejection``
and ``select_block_txs``. A block at height h covers the tx-log offsets
[tx_offset_start, tx_offset_end); it contains exactly the candidates of that range
that are valid, applied in log order, on the committed state — every other offset of
the range is rejected. The proposer runs this with the block limits to choose where
to cut; every validator runs it on the proposed range and acks only an identical
result. Since it is a pure function of (state, range), all honest nodes agree, and
every submitted transaction is decided exactly once (docs/decisions/0030).

"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, fields

from ledger.errors import ValidationError
from ledger.state import (
    BlockDelta,
    BlockOverlay,
    HeaderLike,
    LedgerRules,
    LedgerState,
    TxEffects,
    UtxoEntry,
    check_tx,
    delta_from_overlay,
    plain_payment_parts,
)
from ledger.tx import Transaction

# Block bytes outside the transactions: header (with the proposer id), tx count,
# proposer signature. Generous, so the proposer never cuts a block that is too big.
BLOCK_OVERHEAD_BYTES = 512


@dataclass(frozen=True, slots=True)
class Candidate:
    """One tx-log record. ``tx`` is None when the record did not decode; then, or when
    a decoded record is refused before any state check (its envelope), ``error_code``/
    ``error_message`` say why (a stateless, deterministic verdict)."""

    offset: int
    tx: Transaction | None
    submitter: str = ""
    idempotency_key: str = ""
    error_code: str = ""
    error_message: str = ""


# An accepted-so-far candidate built without the frozen dataclass's __init__ (one
# object.__setattr__ per field; decision 0116): intake makes one per transaction.
assert [f.name for f in fields(Candidate)] == [
    "offset", "tx", "submitter", "idempotency_key", "error_code", "error_message"]
_new_candidate = object.__new__
_set_offset = Candidate.__dict__["offset"].__set__
_set_tx = Candidate.__dict__["tx"].__set__
_set_submitter = Candidate.__dict__["submitter"].__set__
_set_idempotency_key = Candidate.__dict__["idempotency_key"].__set__
_set_error_code = Candidate.__dict__["error_code"].__set__
_set_error_message = Candidate.__dict__["error_message"].__set__


def unrefused_candidate(offset: int, tx: Transaction, submitter: str,
                        idempotency_key: str) -> Candidate:
    """``Candidate(offset, tx, submitter, idempotency_key)`` (no error), field for field."""
    candidate: Candidate = _new_candidate(Candidate)
    _set_offset(candidate, offset)
    _set_tx(candidate, tx)
    _set_submitter(candidate, submitter)
    _set_idempotency_key(candidate, idempotency_key)
    _set_error_code(candidate, "")
    _set_error_message(candidate, "")
    return candidate


@dataclass(frozen=True, slots=True)
class Rejection:
    offset: int
    txid: str | None
    submitter: str
    idempotency_key: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class BlockSelection:
    """The block's transactions, the range's rejections, and the range's end; plus
    what checking them produced, so the block's delta needs no second pass
    (``delta_for``)."""

    txs: tuple[Transaction, ...]
    rejections: tuple[Rejection, ...]
    tx_offset_end: int
    tx_bytes: int
    overlay: BlockOverlay
    spent_from_base: tuple[tuple[bytes, UtxoEntry], ...]
    spent_all: tuple[bytes, ...]

    def delta_for(self, state: LedgerState, header: HeaderLike) -> BlockDelta:
        """The state change of a block with exactly these transactions on ``state``
        (the state the selection ran on)."""
        return delta_from_overlay(
            state, header, self.overlay, self.spent_from_base, self.spent_all,
            tx_count=len(self.txs),
        )


def _rejection(candidate: Candidate, code: str, message: str) -> Rejection:
    tx = candidate.tx
    return Rejection(
        candidate.offset,
        None if tx is None else tx.txid,
        candidate.submitter,
        candidate.idempotency_key,
        code,
        message,
    )


def _is_committed(state: LedgerState, tx: Transaction) -> bool:
    """Some output of this very transaction is (or recently was) in the state."""
    return state.holds_any_of(tx.output_keys)


def _refused_before_checking(
    state: LedgerState,
    candidate: Candidate,
    seen_txids: AbstractSet[bytes],
    seen_keys: AbstractSet[tuple[str, str]],
) -> Rejection | None:
    """The rejection of a candidate that is malformed or refused at intake, already
    submitted (in the state or earlier in this range) or reuses an idempotency key of
    this range; else None."""
    tx = candidate.tx
    if tx is None or candidate.error_code:
        # Undecodable, or decoded but refused before any state check (an envelope not
        # signed by its submitter): rejected with its reason and its txid, first, so a
        # forged copy is never taken for a duplicate of the genuine record or vice versa.
        return _rejection(candidate, candidate.error_code or "malformed", candidate.error_message)
    if tx.hash_le in seen_txids or _is_committed(state, tx):
        return _rejection(candidate, "duplicate", f"tx {tx.txid} was already submitted")
    if candidate.idempotency_key and (candidate.submitter, candidate.idempotency_key) in seen_keys:
        return _rejection(
            candidate,
            "duplicate-idempotency-key",
            f"tx {tx.txid}: idempotency key {candidate.idempotency_key!r} of "
            f"{candidate.submitter} was already used in this block's range",
        )
    return None


def _overflows(txs_before: int, tx_bytes: int, bytes_budget: int | None,
               block_txs_max: int | None) -> bool:
    """Whether one more transaction, after ``txs_before`` and making ``tx_bytes`` in all,
    breaks the proposer's limits."""
    return ((bytes_budget is not None and tx_bytes > bytes_budget)
            or (block_txs_max is not None and txs_before >= block_txs_max))


def _batch_extents(candidates: Sequence[Candidate], block_bytes_max: int | None,
                   block_txs_max: int | None) -> dict[int, tuple[int, int]]:
    """Offset -> (transactions, bytes of parsed transactions) of every record holding
    more than one candidate (a batch, decision 0112), for a proposer (with limits):
    the range can end only between records, so it admits a batch whole or not at all."""
    extents: dict[int, tuple[int, int]] = {}
    if block_bytes_max is None and block_txs_max is None:
        return extents
    for first, second in itertools.pairwise(candidates):
        if first.offset == second.offset:
            extents.setdefault(first.offset, (1, _size(first)))
            count, size = extents[first.offset]
            extents[first.offset] = (count + 1, size + _size(second))
    return extents


def _admit_batch(offset: int, batches: dict[int, tuple[int, int]], admitted: int | None,
                 txs_before: int, tx_bytes: int, bytes_budget: int | None,
                 block_txs_max: int | None) -> int | None:
    """The offset of the batch admitted whole once the candidate at ``offset`` is
    reached (``admitted`` unchanged when it starts no batch), or None: the block is
    cut before this batch. A batch first in the block is always admitted (it fits any
    block by intake's limits)."""
    if offset not in batches or offset == admitted:
        return admitted
    count, size = batches[offset]
    if txs_before and _overflows(txs_before + count - 1, tx_bytes + size, bytes_budget,
                                 block_txs_max):
        return None
    return offset


def _size(candidate: Candidate) -> int:
    return 0 if candidate.tx is None else candidate.tx.size_bytes


_Entries = tuple[tuple[bytes, UtxoEntry], ...]


def _checked(state: LedgerState, candidate: Candidate, tx: Transaction, rules: LedgerRules,
             overlay: BlockOverlay, script_verified: Callable[[Transaction], bool] | None,
             strict: bool) -> tuple[_Entries, _Entries] | TxEffects | Rejection:
    """A candidate's spent and created entries when it is a plain payment or transfer
    checked in one pass (``plain_payment_parts``; decisions 0121, 0125, 0127), else its
    effects on the block so far or its rejection by ``check_tx``, which decides and
    names the error."""
    parts = plain_payment_parts(
        state, tx, overlay, scripts_checked=script_verified is not None and script_verified(tx))
    if parts is not None:
        return parts
    try:
        return check_tx(state, tx, rules, overlay=overlay, script_verified=script_verified,
                        strict=strict)
    except ValidationError as error:
        return _rejection(candidate, error.code, error.message)


def _fold(overlay: BlockOverlay, outcome: tuple[_Entries, _Entries] | TxEffects,
          spent_all: list[bytes], spent_from_base: list[tuple[bytes, UtxoEntry]]) -> None:
    """An accepted candidate into the block's overlay and spent lists."""
    if isinstance(outcome, tuple):  # a plain payment's entries (0127)
        overlay.absorb_plain(outcome[0], outcome[1], spent_all, spent_from_base)
    else:
        spent_all.extend([key for key, _ in outcome.spent])
        spent_from_base.extend(overlay.absorb(outcome))


def select_block_txs(
    state: LedgerState,
    candidates: Sequence[Candidate],
    rules: LedgerRules,
    *,
    range_end: int,
    block_bytes_max: int | None = None,
    block_txs_max: int | None = None,
    script_verified: Callable[[Transaction], bool] | None = None,
    strict: bool = True,
) -> BlockSelection:
    """Select from ``candidates`` (consecutive tx-log records, log order, a batch's all
    at its offset) up to ``range_end`` (the offset after the last record read). With
    limits (the proposer): stop before the first valid transaction (or batch) that would
    overflow the block; the range then ends at its offset. Without limits (a validator
    checking a proposed range): decide every candidate given."""
    assert all(a.offset <= b.offset for a, b in itertools.pairwise(candidates))
    batches = _batch_extents(candidates, block_bytes_max, block_txs_max)
    admitted: int | None = -1  # offset of the batch admitted whole: no cut inside it
    overlay = BlockOverlay()
    spent_from_base: list[tuple[bytes, UtxoEntry]] = []
    spent_all: list[bytes] = []
    txs: list[Transaction] = []
    rejections: list[Rejection] = []
    seen_txids: set[bytes] = set()
    seen_keys: set[tuple[str, str]] = set()
    tx_bytes = 0
    bytes_budget = None if block_bytes_max is None else block_bytes_max - BLOCK_OVERHEAD_BYTES
    end = range_end
    for candidate in candidates:
        if batches:  # (without batches _admit_batch returns ``admitted`` as it is)
            admitted = _admit_batch(candidate.offset, batches, admitted, len(txs), tx_bytes,
                                    bytes_budget, block_txs_max)
            if admitted is None:
                end = candidate.offset
                break
        tx = candidate.tx
        if (tx is None or candidate.error_code or tx.hash_le in seen_txids
                or state.holds_any_of(tx.output_keys)
                or (candidate.idempotency_key
                    and (candidate.submitter, candidate.idempotency_key) in seen_keys)):
            refused = _refused_before_checking(state, candidate, seen_txids, seen_keys)
            assert refused is not None  # it names the reason, in its order
            rejections.append(refused)
            continue
        outcome = _checked(state, candidate, tx, rules, overlay, script_verified, strict)
        if isinstance(outcome, Rejection):
            rejections.append(outcome)
            continue
        size = tx.size_bytes
        if candidate.offset != admitted and _overflows(len(txs), tx_bytes + size,
                                                       bytes_budget, block_txs_max):
            if not txs:
                # A valid tx larger than any block can be: decide it, never stall on it.
                rejections.append(_rejection(
                    candidate, "tx-too-large-for-block",
                    f"tx {tx.txid} of {size} bytes cannot fit in a block"))
                continue
            end = candidate.offset
            break
        _fold(overlay, outcome, spent_all, spent_from_base)
        seen_txids.add(tx.hash_le)
        if candidate.idempotency_key:
            seen_keys.add((candidate.submitter, candidate.idempotency_key))
        txs.append(tx)
        tx_bytes += size
    return BlockSelection(tuple(txs), tuple(rejections), end, tx_bytes, overlay,
                          tuple(spent_from_base), tuple(spent_all))

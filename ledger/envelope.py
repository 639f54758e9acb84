"""The signed transaction envelope: who submitted a transaction, provably.

Owns: the digest a submitter signs for a ``TxSubmitted`` record and the check every
node's intake applies to it. The submitter is a genesis member, which signs with its
identity key (the public key genesis lists for it), or a registered external system
(a back office, genesis ``submit_keys``), which signs with its own submit key, never
its member's identity key (decision 0061). A record whose signature is
missing, whose submitter is not a member, or whose signature does not verify under
the named member's key is refused with a code (``envelope-unsigned``,
``envelope-submitter-unknown``, ``envelope-signature``), so one member can neither
submit in another's name nor spend another's idempotency keys.

The digest (documented for clients in any language in docs/schemas.md)::

    SHA-256( "capital-ledger/TxSubmitted/v1"      29 ASCII bytes
             || genesis hash                        32 bytes, internal order
             || u16 big-endian length || submitter (UTF-8)
             || u16 big-endian length || idempotency key (UTF-8)
             || txid                                32 bytes, SHA-256d of the tx bytes,
                                                    internal order )

signed as a DER ECDSA secp256k1 signature with low S (BIP 62), as votes are.

A batch (``TxBatchSubmitted``, decision 0112) carries many transactions of one
submitter under one signature, over::

    SHA-256( "capital-ledger/TxBatchSubmitted/v1" 34 ASCII bytes
             || genesis hash                        32 bytes, internal order
             || u16 big-endian length || submitter (UTF-8)
             || u32 big-endian count of transactions
             || for each transaction, in the batch's order:
                u16 big-endian length || its idempotency key (UTF-8)
                || its txid                         32 bytes, internal order )

so one verification vouches for every transaction, its key and its place. The batch is
bounded (``BATCH_TXS_MAX`` transactions, ``BATCH_TX_BYTES_MAX`` bytes of transactions,
and never more than one block holds); a batch refused as a whole (its signature, its
submitter, its size, its shape) gets an ``envelope-*`` code for every transaction in
it, as a single record would; each transaction of a well-signed batch is then judged
on its own.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ledger.errors import ValidationError
from ledger.hashing import sha256d
from ledger.keys import PrivateKey, verify_der
from ledger.membership import Genesis

ENVELOPE_DOMAIN_TAG = b"capital-ledger/TxSubmitted/v1"
BATCH_DOMAIN_TAG = b"capital-ledger/TxBatchSubmitted/v1"
# One batch: at most this many transactions and bytes of transactions (and never more
# than a block of the chain holds, so a proposer can always take a batch whole).
BATCH_TXS_MAX = 1_000
BATCH_TX_BYTES_MAX = 1_000_000
# Block bytes outside its transactions, with room to spare (ledger.selection's
# BLOCK_OVERHEAD_BYTES plus the varint of the count).
BLOCK_MARGIN_BYTES = 1_024
HASH_BYTES = 32
FIELD_BYTES_MAX = 0xFFFF
SIGNATURE_BYTES_MAX = 73


class EnvelopeError(ValidationError):
    code = "envelope"


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > FIELD_BYTES_MAX:
        raise EnvelopeError(f"envelope field of {len(data)} bytes", code="envelope-field")
    return struct.pack(">H", len(data)) + data


def envelope_digest(genesis_hash: bytes, submitter: str, idempotency_key: str,
                    txid_le: bytes) -> bytes:
    """The 32 bytes the submitter signs."""
    assert len(genesis_hash) == HASH_BYTES and len(txid_le) == HASH_BYTES
    return hashlib.sha256(b"".join((ENVELOPE_DOMAIN_TAG, genesis_hash, _field(submitter),
                                    _field(idempotency_key), txid_le))).digest()


def sign_envelope(key: PrivateKey, genesis_hash: bytes, submitter: str, idempotency_key: str,
                  tx_bytes: bytes) -> bytes:
    """The submitter's signature over a transaction's envelope."""
    return key.sign(envelope_digest(genesis_hash, submitter, idempotency_key,
                                    sha256d(tx_bytes)))


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


def envelope_refusal(genesis: Genesis, genesis_hash: bytes, *, submitter: str,
                     idempotency_key: str, txid_le: bytes, signature: bytes) -> Refusal | None:
    """None when the envelope is signed by the member it names; else why not."""
    try:
        digest = envelope_digest(genesis_hash, submitter, idempotency_key, txid_le)
    except EnvelopeError as error:
        return Refusal(error.code, error.message)
    return _signature_refusal(genesis, submitter, signature, digest, "envelope")


def _submitter_sec(genesis: Genesis, submitter: str) -> bytes | Refusal:
    """The public key (SEC bytes) that signs ``submitter``'s envelopes, or why none."""
    member = genesis.member(submitter)
    registered = genesis.submit_key(submitter) if member is None else None
    if member is not None:
        return member.public_key.sec
    if registered is not None:
        return registered.public_key.sec
    return Refusal("envelope-submitter-unknown",
                   f"submitter {submitter[:64]!r} is neither a member of "
                   f"{genesis.chain_id} nor a registered system")


def _signature_refusal(genesis: Genesis, submitter: str, signature: bytes, digest: bytes,
                       what: str) -> Refusal | None:
    if not signature:
        return Refusal("envelope-unsigned", f"{what} of {submitter!r} carries no signature")
    sec = _submitter_sec(genesis, submitter)
    if isinstance(sec, Refusal):
        return sec
    if len(signature) > SIGNATURE_BYTES_MAX:
        return Refusal("envelope-signature", f"signature of {len(signature)} bytes")
    if not verify_der(sec, signature, digest):
        return Refusal("envelope-signature", f"the signature is not {submitter}'s over this {what}")
    return None


# ---------------------------------------------------------------- batches (decision 0112)


def batch_digest(genesis_hash: bytes, submitter: str,
                 items: Sequence[tuple[str, bytes]]) -> bytes:
    """The 32 bytes a submitter signs for a batch of (idempotency key, txid) items."""
    assert len(genesis_hash) == HASH_BYTES
    parts = [BATCH_DOMAIN_TAG, genesis_hash, _field(submitter), struct.pack(">I", len(items))]
    for idempotency_key, txid_le in items:
        assert len(txid_le) == HASH_BYTES
        parts.append(_field(idempotency_key))
        parts.append(txid_le)
    return hashlib.sha256(b"".join(parts)).digest()


def sign_batch(key: PrivateKey, genesis_hash: bytes, submitter: str,
               items: Sequence[tuple[str, bytes]]) -> bytes:
    """The submitter's one signature over a batch of (idempotency key, tx bytes)."""
    return key.sign(batch_digest(genesis_hash, submitter,
                                 [(k, sha256d(raw)) for k, raw in items]))


def batch_shape_refusal(genesis: Genesis, tx_sizes: Sequence[int]) -> Refusal | None:
    """None when a batch of transactions of these sizes is within the limits; else why
    not. The limits include a block's (the chain's genesis parameters): a proposer
    never cuts inside a batch, so every batch must fit one block."""
    count, size = len(tx_sizes), sum(tx_sizes)
    if count == 0:
        return Refusal("envelope-batch-empty", "batch holds no transactions")
    count_max = min(BATCH_TXS_MAX, genesis.params.block_txs_max)
    bytes_max = min(BATCH_TX_BYTES_MAX, genesis.params.block_bytes_max - BLOCK_MARGIN_BYTES)
    if count > count_max:
        return Refusal("envelope-batch-too-many",
                       f"batch of {count} transactions exceeds {count_max}")
    if size > bytes_max:
        return Refusal("envelope-batch-oversized",
                       f"batch of {size} transaction bytes exceeds {bytes_max}")
    return None


def batch_refusal(genesis: Genesis, genesis_hash: bytes, *, submitter: str,
                  items: Sequence[tuple[str, bytes]], signature: bytes) -> Refusal | None:
    """None when the batch of (idempotency key, txid) items is signed by the member or
    registered system it names; else why not (one verification for the batch)."""
    try:
        digest = batch_digest(genesis_hash, submitter, items)
    except EnvelopeError as error:
        return Refusal(error.code, error.message)
    return _signature_refusal(genesis, submitter, signature, digest, "batch")

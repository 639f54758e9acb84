"""Committed records signed by their committer, and the finality rule built on them.

Owns: the digest a node signs for each ``BlockCommitted`` record it writes, the check
of that signature, and ``FinalityTally`` — the rule a reader that may not read the
votes log (an external system's client, decision 0060) uses to know which block a
height decided: a block is final once ``quorum`` distinct members signed committed
records for it. Honest members commit only the block the votes log decided (decision
0050 §8), so a certified *losing* block (late acks after a timeout quorum, decision
0020) can gather such a set only if a quorum of members sign a lie — and a quorum of
liars could already certify anything. Why not the votes log in the client:
docs/decisions/0051-client-finality-and-signed-commits.md.

The digest (documented for other languages in docs/schemas.md)::

    SHA-256( "capital-ledger/BlockCommitted/v2"   32 ASCII bytes
             || genesis hash                        32 bytes, internal order
             || u16 big-endian length || committer (UTF-8)
             || block hash                          32 bytes, internal order
             || u64 big-endian height
             || i64 big-endian proposal_offset
             || i64 big-endian committed_at (ms since the Unix epoch)
             || u16 big-endian count || i64 big-endian vote_offset, each )

signed as a DER ECDSA secp256k1 signature with low S, as votes and envelopes are.
The certificate's acks sign themselves; the block hash covers every header field.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger.errors import ValidationError
from ledger.keys import PrivateKey, verify_der
from ledger.membership import Genesis

COMMIT_DOMAIN_TAG = b"capital-ledger/BlockCommitted/v2"
HASH_BYTES = 32
FIELD_BYTES_MAX = 0xFFFF
VOTE_OFFSETS_MAX = 0xFFFF
SIGNATURE_BYTES_MAX = 73
PENDING_BLOCKS_PER_HEIGHT_MAX = 8  # distinct candidate blocks tallied per height
PENDING_HEIGHTS_MAX = 4_096  # undecided heights tallied at once (oldest dropped)


class AttestationError(ValidationError):
    code = "commit-signature"


def commit_digest(genesis_hash: bytes, *, committer: str, block_hash: bytes, height: int,
                  proposal_offset: int, committed_at_ms: int,
                  vote_offsets: Sequence[int]) -> bytes:
    """The 32 bytes a committer signs for one BlockCommitted record."""
    assert len(genesis_hash) == HASH_BYTES and len(block_hash) == HASH_BYTES
    name = committer.encode("utf-8")
    if len(name) > FIELD_BYTES_MAX or len(vote_offsets) > VOTE_OFFSETS_MAX:
        raise AttestationError("committed record fields too long", code="commit-field")
    return hashlib.sha256(b"".join((
        COMMIT_DOMAIN_TAG, genesis_hash, struct.pack(">H", len(name)), name, block_hash,
        struct.pack(">Qqq", height, proposal_offset, committed_at_ms),
        struct.pack(">H", len(vote_offsets)),
        b"".join(struct.pack(">q", offset) for offset in vote_offsets),
    ))).digest()


def sign_commit(key: PrivateKey, genesis_hash: bytes, *, committer: str, block_hash: bytes,
                height: int, proposal_offset: int, committed_at_ms: int,
                vote_offsets: Sequence[int]) -> bytes:
    return key.sign(commit_digest(
        genesis_hash, committer=committer, block_hash=block_hash, height=height,
        proposal_offset=proposal_offset, committed_at_ms=committed_at_ms,
        vote_offsets=vote_offsets))


def check_commit_signature(genesis: Genesis, genesis_hash: bytes, *, committer: str,
                           block_hash: bytes, height: int, proposal_offset: int,
                           committed_at_ms: int, vote_offsets: Sequence[int],
                           signature: bytes) -> None:
    """Raises ``AttestationError`` unless ``signature`` is the named member's over the
    record: ``commit-unsigned`` (a version-1 record), ``commit-committer-unknown``,
    ``commit-signature``."""
    if not signature:
        raise AttestationError(f"committed record of {committer!r} carries no signature",
                               code="commit-unsigned")
    member = genesis.member(committer)
    if member is None:
        raise AttestationError(f"committer {committer[:64]!r} is not a member",
                               code="commit-committer-unknown")
    if len(signature) > SIGNATURE_BYTES_MAX:
        raise AttestationError(f"signature of {len(signature)} bytes", code="commit-signature")
    digest = commit_digest(genesis_hash, committer=committer, block_hash=block_hash,
                           height=height, proposal_offset=proposal_offset,
                           committed_at_ms=committed_at_ms, vote_offsets=vote_offsets)
    if not verify_der(member.public_key.sec, signature, digest):
        raise AttestationError(f"the signature is not {committer}'s over this record",
                               code="commit-signature")


@dataclass
class FinalityTally:
    """Signed committed records seen per height, until one block has ``quorum``
    distinct committers (or the quorum ``add`` is given: the one in force at that
    height, decision 0062). Feed only records whose signature and certificate checked
    against the membership in force at their height.
    Bounded: ``PENDING_HEIGHTS_MAX`` heights x ``PENDING_BLOCKS_PER_HEIGHT_MAX``
    blocks x the member count."""

    quorum: int
    # Members whose single signed commit is final for this reader: its own
    # institution's node, which takes the decided block from the votes log itself.
    trusted: frozenset[str] = frozenset()
    pending: dict[int, dict[bytes, set[str]]] = field(default_factory=dict)
    final: set[int] = field(default_factory=set)

    def add(self, height: int, block_hash: bytes, committer: str,
            quorum: int | None = None) -> bool:
        """True exactly once per height: when ``block_hash`` becomes final there.
        ``quorum``: the quorum in force at ``height`` (default: the tally's)."""
        if height in self.final:
            return False
        if committer in self.trusted:
            self.pending.pop(height, None)
            self.final.add(height)
            return True
        blocks = self.pending.setdefault(height, {})
        if block_hash not in blocks and len(blocks) >= PENDING_BLOCKS_PER_HEIGHT_MAX:
            return False  # only members sign: more candidates than this is a quorum of liars
        committers = blocks.setdefault(block_hash, set())
        committers.add(committer)
        if len(committers) < (self.quorum if quorum is None else quorum):
            if len(self.pending) > PENDING_HEIGHTS_MAX:
                del self.pending[min(self.pending)]
            return False
        del self.pending[height]
        self.final.add(height)
        return True

    def is_final(self, height: int) -> bool:
        return height in self.final


# --- rejections and heartbeats ---------------------------------------------------------
# ``TxRejected`` and ``NodeStatusReported`` are signed by the member that writes them
# over their fields in schema order (the signature field excluded), each encoded by
# type so no two field lists share an encoding:
#
#     SHA-256( domain tag || genesis hash (32)
#              || per field: 0x00 (null)
#                          | 0x01 || u32 big-endian length || UTF-8 (string)
#                          | 0x02 || u32 big-endian length || bytes (bytes)
#                          | 0x03 || i64 big-endian (int, long, timestamp-millis) )

REJECTED_DOMAIN_TAG = b"capital-ledger/TxRejected/v2"
STATUS_DOMAIN_TAG = b"capital-ledger/NodeStatusReported/v4"
STATUS_DOMAIN_TAG_V3 = b"capital-ledger/NodeStatusReported/v3"  # reports without the v4 fields
FIELD_VALUE_BYTES_MAX = 0xFFFFFFFF

SignedField = str | bytes | int | None


def _typed(value: SignedField) -> bytes:
    if value is None:
        return b"\x00"
    if isinstance(value, str):
        data = value.encode("utf-8")
        tag = b"\x01"
    elif isinstance(value, bytes):
        data, tag = value, b"\x02"
    else:
        assert isinstance(value, int) and not isinstance(value, bool)
        return b"\x03" + struct.pack(">q", value)
    if len(data) > FIELD_VALUE_BYTES_MAX:
        raise AttestationError(f"signed field of {len(data)} bytes", code="record-field")
    return tag + struct.pack(">I", len(data)) + data


def record_digest(domain_tag: bytes, genesis_hash: bytes,
                  fields: Sequence[SignedField]) -> bytes:
    """The 32 bytes a writer signs for one rejection or heartbeat record."""
    assert len(genesis_hash) == HASH_BYTES
    return hashlib.sha256(b"".join((domain_tag, genesis_hash,
                                    *(_typed(value) for value in fields)))).digest()


def sign_record(key: PrivateKey, domain_tag: bytes, genesis_hash: bytes,
                fields: Sequence[SignedField]) -> bytes:
    return key.sign(record_digest(domain_tag, genesis_hash, fields))


def check_record_signature(genesis: Genesis, genesis_hash: bytes, *, domain_tag: bytes,
                           code_prefix: str, writer: str, fields: Sequence[SignedField],
                           signature: bytes) -> None:
    """Raises ``AttestationError`` (``<code_prefix>-unsigned``, ``-writer-unknown``,
    ``-signature``) unless ``writer`` signed ``fields``."""
    if not signature:
        raise AttestationError(f"record of {writer[:64]!r} carries no signature",
                               code=f"{code_prefix}-unsigned")
    member = genesis.member(writer)
    if member is None:
        raise AttestationError(f"writer {writer[:64]!r} is not a member",
                               code=f"{code_prefix}-writer-unknown")
    if len(signature) > SIGNATURE_BYTES_MAX or not verify_der(
            member.public_key.sec, signature, record_digest(domain_tag, genesis_hash, fields)):
        raise AttestationError(f"the signature is not {writer}'s over this record",
                               code=f"{code_prefix}-signature")

"""Blocks, the Merkle root, consensus votes and quorum certificates.

Owns: ``BlockHeader`` and ``Block`` with their canonical serialization and bounded
parsing, ``merkle_root`` exactly as Bitcoin computes it, the proposer rotation rule
``proposer_for``, the structural checks of a proposed block (``check_block_*``),
signed ``Vote`` messages (ack / nack / timeout) and the ``QuorumCertificate`` that a
committed block carries. Everything here is a pure function of its arguments; which
block *commits* is decided in ``ledger.consensus``.

Byte orders: every hash is held in internal order (as SHA-256d returns it, as
Bitcoin stores it in outpoints and headers); ``*_hex`` properties show it reversed,
as Bitcoin displays block hashes and txids.

"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ledger.errors import BlockError, ConsensusError, DecodeError, QuorumError
from ledger.hashing import display_hex, sha256d
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.serialization import ByteReader, compact_size, var_bytes
from ledger.tx import Transaction

BLOCK_VERSION = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
MEMBER_ID_BYTES_MAX = 64  # institution ids are short ASCII names
REASON_CODE_BYTES_MAX = 64  # a ValidationError.code
SIGNATURE_BYTES_MAX = 73  # DER ECDSA over secp256k1, at most 72 bytes (+1 slack)
TX_BYTES_MIN = 60  # smallest legacy tx: 1 input, 0 outputs, empty script (bounds tx counts)
# Hard ceiling for parsing a block whatever genesis says (genesis may lower it).
BLOCK_BYTES_LIMIT = 32_000_000
QC_VOTES_MAX = 256  # more voters than any membership we support

VOTE_DOMAIN_TAG = b"capital-ledger/vote/v1"

VOTE_ACK = "ack"
VOTE_NACK = "nack"
VOTE_TIMEOUT = "timeout"
_VOTE_KIND_TO_BYTE = {VOTE_ACK: 1, VOTE_NACK: 2, VOTE_TIMEOUT: 3}
_VOTE_BYTE_TO_KIND = {value: key for key, value in _VOTE_KIND_TO_BYTE.items()}


_sha256 = hashlib.sha256


def merkle_root(hashes_le: Sequence[bytes]) -> bytes:
    """Bitcoin's Merkle root over txids in internal byte order.

    Odd levels duplicate their last hash (Bitcoin's rule, including its CVE-2012-2459
    ambiguity, which ``check_block_context_free`` closes by refusing duplicate txids).
    One hash is its own root; no hashes give 32 zero bytes.
    """
    if not hashes_le:
        return ZERO_HASH
    level = list(hashes_le)
    assert set(map(len, level)) == {HASH_BYTES}
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        # sha256d of each pair, inlined: one Python step per pair
        level = [_sha256(_sha256(left + right).digest()).digest()
                 for left, right in zip(level[0::2], level[1::2], strict=True)]
    return level[0]


def proposer_for(genesis: Genesis, height: int, round_: int) -> str:
    """The member eligible to propose at (height, round): rotation in genesis order."""
    assert height >= 0 and round_ >= 0
    members = genesis.members
    return members[(height + round_) % len(members)].id


def _encode_member_id(member_id: str) -> bytes:
    raw = member_id.encode("utf-8")
    assert 0 < len(raw) <= MEMBER_ID_BYTES_MAX, f"member id {member_id!r} out of bounds"
    return var_bytes(raw)


def _read_member_id(reader: ByteReader, what: str) -> str:
    raw = reader.read_var_bytes(MEMBER_ID_BYTES_MAX)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"{what}: member id is not UTF-8", code="member-id") from None
    if not text:
        raise DecodeError(f"{what}: empty member id", code="member-id")
    return text


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A block header; ``prev_hash`` and ``merkle_root`` in internal byte order."""

    version: int
    height: int
    prev_hash: bytes
    merkle_root: bytes
    time_ms: int
    proposer: str
    round: int
    shard: int = 0
    # The block covers exactly the tx-log offsets [tx_offset_start, tx_offset_end) of
    # partition ``shard`` of ledger.tx.v1: every offset in the range is decided by this
    # block (included, or rejected by the deterministic selection). See decision 0030.
    tx_offset_start: int = 0
    tx_offset_end: int = 0
    # SHA-256d of the canonical bytes, computed once (headers are immutable and their
    # hash is looked up on every vote, proposal and commit).
    _hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert 0 <= self.tx_offset_start <= self.tx_offset_end <= 0xFFFFFFFFFFFFFFFF
        assert 0 <= self.version <= 0xFFFFFFFF
        assert 0 <= self.height <= 0xFFFFFFFFFFFFFFFF
        assert len(self.prev_hash) == HASH_BYTES and len(self.merkle_root) == HASH_BYTES
        assert 0 <= self.time_ms <= 0xFFFFFFFFFFFFFFFF
        assert 0 <= self.round <= 0xFFFFFFFF and 0 <= self.shard <= 0xFFFFFFFF
        object.__setattr__(self, "_hash", sha256d(self.serialize()))

    def serialize(self) -> bytes:
        """Canonical bytes: fixed-width little-endian ints, length-prefixed proposer."""
        return b"".join(
            (
                struct.pack("<IQ", self.version, self.height),
                self.prev_hash,
                self.merkle_root,
                struct.pack("<Q", self.time_ms),
                _encode_member_id(self.proposer),
                struct.pack("<IIQQ", self.round, self.shard, self.tx_offset_start,
                            self.tx_offset_end),
            )
        )

    @classmethod
    def read(cls, reader: ByteReader) -> BlockHeader:
        version, height = struct.unpack("<IQ", reader.read(12))
        prev_hash = reader.read(HASH_BYTES)
        root = reader.read(HASH_BYTES)
        time_ms = reader.read_u64()
        proposer = _read_member_id(reader, "block header")
        round_, shard, start, end = struct.unpack("<IIQQ", reader.read(24))
        if start > end:
            raise DecodeError("block header: tx offset range ends before it starts",
                              code="block-tx-range")
        return cls(version, height, prev_hash, root, time_ms, proposer, round_, shard, start, end)

    @classmethod
    def parse(cls, raw: bytes) -> BlockHeader:
        reader = ByteReader(raw, "block header")
        header = cls.read(reader)
        reader.finish()
        return header

    @property
    def hash(self) -> bytes:
        """SHA-256d of the canonical bytes, internal order (what the proposer signs)."""
        return self._hash

    @property
    def hash_hex(self) -> str:
        """The block hash as displayed (byte-reversed hex, like Bitcoin)."""
        return display_hex(self.hash)


@dataclass(frozen=True, slots=True)
class Block:
    """A proposed or committed block: header, transactions, the proposer's signature."""

    header: BlockHeader
    txs: tuple[Transaction, ...]
    proposer_signature: bytes
    # Derived values computed once (size; the membership the context-free checks
    # passed against): the fields are immutable, so they cannot go stale.
    _cache: dict[str, object] = field(default_factory=dict, init=False, compare=False,
                                      repr=False)

    @property
    def hash(self) -> bytes:
        return self.header.hash

    @property
    def hash_hex(self) -> str:
        return self.header.hash_hex

    @property
    def height(self) -> int:
        return self.header.height

    def serialize(self) -> bytes:
        parts = [self.header.serialize(), compact_size(len(self.txs))]
        parts.extend(tx.serialize() for tx in self.txs)
        parts.append(var_bytes(self.proposer_signature))
        return b"".join(parts)

    @property
    def size_bytes(self) -> int:
        """``len(self.serialize())`` without building the bytes (checked per proposal)."""
        size = self._cache.get("size_bytes")
        if size is None:
            size = (
                len(self.header.serialize())
                + len(compact_size(len(self.txs)))
                + sum([tx.size_bytes for tx in self.txs])  # len(tx.serialize()), stored
                + len(var_bytes(self.proposer_signature))
            )
            self._cache["size_bytes"] = size
        assert isinstance(size, int)
        return size

    @classmethod
    def parse(cls, raw: bytes, *, block_bytes_max: int = BLOCK_BYTES_LIMIT) -> Block:
        """Parse exactly one block; oversized, truncated or trailing input raises."""
        limit = min(block_bytes_max, BLOCK_BYTES_LIMIT)
        if len(raw) > limit:
            raise BlockError(
                f"block of {len(raw)} bytes exceeds the limit of {limit}",
                code="block-oversized",
            )
        reader = ByteReader(raw, "block")
        header = BlockHeader.read(reader)
        count = reader.read_compact_size(max(0, reader.remaining // TX_BYTES_MIN))
        txs = []
        for _ in range(count):
            # ``read`` keeps the exact bytes read, so the txid is never computed from a
            # re-serialization (the careful path sets them here).
            start = reader.position
            tx = Transaction.read(reader)
            if "serialized" not in tx._cache:
                tx._cache["serialized"] = raw[start : reader.position]
            txs.append(tx)
        signature = reader.read_var_bytes(SIGNATURE_BYTES_MAX)
        reader.finish()
        return cls(header, tuple(txs), signature)


# Known transactions are looked up by their first bytes (version, input count, first
# prevout): few transactions share them (double spends), and each candidate is then
# compared in full.
KNOWN_TX_PREFIX_BYTES = 41


def parse_block_reusing(
    raw: bytes,
    known_txs: Callable[[BlockHeader], Sequence[Transaction] | None],
    *,
    block_bytes_max: int = BLOCK_BYTES_LIMIT,
) -> Block:
    """``Block.parse(raw)``, reusing transactions parsed before (a node's pool).

    ``known_txs(header)`` gives transactions the block may hold (None: none). Where the
    block's bytes at a transaction's position start with a known transaction's exact
    bytes, that is the transaction ``Block.parse`` would read there (parsing is
    deterministic and a transaction's encoding delimits itself), so the known object is
    taken; any other transaction is read there as ``Block.parse`` reads it. On any
    decoding error the whole block is parsed the usual way, so the result and every
    error are ``Block.parse``'s (decision 0110)."""
    block = _parse_known(raw, known_txs, block_bytes_max)
    return block if block is not None else Block.parse(raw, block_bytes_max=block_bytes_max)


def _known_index(txs: Sequence[Transaction]) -> dict[bytes, list[int]]:
    """First bytes -> positions in ``txs`` of the transactions starting with them."""
    index: dict[bytes, list[int]] = {}
    for position, tx in enumerate(txs):
        index.setdefault(tx.serialize()[:KNOWN_TX_PREFIX_BYTES], []).append(position)
    return index


def _known_at(raw: bytes, position: int, known: Sequence[Transaction],
              index: dict[bytes, list[int]]) -> int:
    """The position in ``known`` of a transaction whose exact bytes start ``raw`` at
    ``position``, or -1."""
    for candidate in index.get(raw[position:position + KNOWN_TX_PREFIX_BYTES], ()):
        if raw.startswith(known[candidate].serialize(), position):
            return candidate
    return -1


def _parse_known(
    raw: bytes,
    known_txs: Callable[[BlockHeader], Sequence[Transaction] | None],
    block_bytes_max: int,
) -> Block | None:
    if len(raw) > min(block_bytes_max, BLOCK_BYTES_LIMIT):
        return None
    try:
        reader = ByteReader(raw, "block")
        header = BlockHeader.read(reader)
        known = known_txs(header)
        if not known:
            return None
        index: dict[bytes, list[int]] | None = None
        count = reader.read_compact_size(max(0, reader.remaining // TX_BYTES_MIN))
        txs: list[Transaction] = []
        expected = 0
        for _ in range(count):
            position = reader.position
            # A block holds its range's pooled transactions in log order (the rejected
            # ones left out): the one after the last match is tried first, the index
            # (built only when needed) finds any other.
            if expected < len(known) and raw.startswith(known[expected].serialize(), position):
                found = expected
            else:
                if index is None:
                    index = _known_index(known)
                found = _known_at(raw, position, known, index)
            if found < 0:
                txs.append(Transaction.read(reader))
                continue
            tx = known[found]
            reader.skip(tx.size_bytes)
            txs.append(tx)
            expected = found + 1
        signature = reader.read_var_bytes(SIGNATURE_BYTES_MAX)
        reader.finish()
    except DecodeError:
        return None
    return Block(header, tuple(txs), signature)


def make_block(
    key: PrivateKey,
    *,
    height: int,
    prev_hash: bytes,
    time_ms: int,
    proposer: str,
    round_: int,
    txs: Sequence[Transaction],
    shard: int = 0,
    tx_offset_start: int = 0,
    tx_offset_end: int = 0,
) -> Block:
    """Build and sign a block (the proposer signs ``header.hash`` with its identity key)."""
    header = BlockHeader(
        BLOCK_VERSION,
        height,
        prev_hash,
        merkle_root([tx.hash_le for tx in txs]),
        time_ms,
        proposer,
        round_,
        shard,
        tx_offset_start,
        tx_offset_end,
    )
    return Block(header, tuple(txs), key.sign(header.hash))


def check_block_context_free(block: Block, genesis: Genesis) -> None:
    """Checks that need no chain context: version, proposer eligibility and signature,
    non-empty, size and tx count limits, no duplicate txids, Merkle root.

    The signature comes before eligibility, so evidence never blames a member for a
    block it did not sign, and before the per-tx work, so junk is refused early.
    A block that passed against this very ``genesis`` object passes again without
    the work (an audit checks each block as the chain and as the votes' observer).
    """
    if block._cache.get("context_free_ok") is genesis:
        return
    header = block.header
    if header.version != BLOCK_VERSION:
        raise BlockError(
            f"block {block.hash_hex}: unknown version {header.version}", code="block-version"
        )
    member = genesis.member(header.proposer)
    if member is None:
        raise BlockError(
            f"block {block.hash_hex}: proposer {header.proposer!r} is not a member",
            code="block-unknown-proposer",
        )
    if not member.public_key.verify(block.proposer_signature, block.hash):
        raise BlockError(
            f"block {block.hash_hex}: proposer signature of {header.proposer} does not verify",
            code="block-proposer-signature",
        )
    eligible = proposer_for(genesis, header.height, header.round)
    if header.proposer != eligible:
        raise BlockError(
            f"block {block.hash_hex}: {header.proposer} proposed at height {header.height} "
            f"round {header.round}, where {eligible} is the proposer",
            code="block-wrong-proposer",
        )
    if not block.txs and header.tx_offset_end == header.tx_offset_start:
        # A block without transactions is allowed only to decide a tx-log range whose
        # every record was rejected; otherwise it would be a block about nothing.
        raise BlockError(f"block {block.hash_hex} has no transactions", code="block-empty")
    params = genesis.params
    if len(block.txs) > params.block_txs_max:
        raise BlockError(
            f"block {block.hash_hex}: {len(block.txs)} txs exceed {params.block_txs_max}",
            code="block-too-many-txs",
        )
    size = block.size_bytes
    if size > params.block_bytes_max:
        raise BlockError(
            f"block {block.hash_hex}: {size} bytes exceed {params.block_bytes_max}",
            code="block-oversized",
        )
    hashes = [tx.hash_le for tx in block.txs]
    if len(set(hashes)) != len(hashes):
        seen: set[bytes] = set()
        for tx_hash in hashes:
            if tx_hash in seen:
                raise BlockError(
                    f"block {block.hash_hex}: tx {display_hex(tx_hash)} appears twice",
                    code="block-duplicate-tx",
                )
            seen.add(tx_hash)
    if merkle_root(hashes) != header.merkle_root:
        raise BlockError(
            f"block {block.hash_hex}: Merkle root does not match its transactions",
            code="block-merkle",
        )
    block._cache["context_free_ok"] = genesis


def check_block_links(block: Block, *, prev_hash: bytes, height: int) -> None:
    """The block extends the given head: right height, right previous hash."""
    header = block.header
    if header.height != height:
        raise BlockError(
            f"block {block.hash_hex}: height {header.height}, expected {height}",
            code="block-height",
        )
    if header.prev_hash != prev_hash:
        raise BlockError(
            f"block {block.hash_hex}: previous hash {display_hex(header.prev_hash)} is not "
            f"the head {display_hex(prev_hash)}",
            code="block-prev-hash",
        )


def check_block_structure(
    block: Block, genesis: Genesis, *, prev_hash: bytes, height: int
) -> None:
    """Every structural rule of a block at ``height`` on top of ``prev_hash``.

    Transaction validity (scripts, double spends, assets) is ``ledger.state``'s job.
    """
    check_block_links(block, prev_hash=prev_hash, height=height)
    check_block_context_free(block, genesis)


# --------------------------------------------------------------------------- votes


def vote_message(
    genesis_hash: bytes,
    *,
    kind: str,
    voter: str,
    height: int,
    round_: int,
    block_hash: bytes,
    reason_code: str,
) -> bytes:
    """The 32-byte digest a vote signs: domain tag, chain id (genesis hash), kind,
    voter, height, round, block hash (zeros for timeout), reason code."""
    assert len(genesis_hash) == HASH_BYTES and len(block_hash) == HASH_BYTES
    return sha256d(
        b"".join(
            (
                VOTE_DOMAIN_TAG,
                genesis_hash,
                bytes([_VOTE_KIND_TO_BYTE[kind]]),
                _encode_member_id(voter),
                struct.pack("<QI", height, round_),
                block_hash,
                var_bytes(reason_code.encode("ascii")),
            )
        )
    )


@dataclass(frozen=True, slots=True)
class Vote:
    """A member's signed vote: ``ack``/``nack`` on a block of (height, round), or
    ``timeout`` for (height, round) (then ``block_hash`` is 32 zero bytes)."""

    voter: str
    height: int
    round: int
    block_hash: bytes
    kind: str
    reason_code: str
    signature: bytes

    @property
    def ack(self) -> bool:
        return self.kind == VOTE_ACK

    @property
    def is_timeout(self) -> bool:
        return self.kind == VOTE_TIMEOUT

    def message(self, genesis_hash: bytes) -> bytes:
        return vote_message(
            genesis_hash,
            kind=self.kind,
            voter=self.voter,
            height=self.height,
            round_=self.round,
            block_hash=self.block_hash,
            reason_code=self.reason_code,
        )

    def serialize(self) -> bytes:
        return b"".join(
            (
                bytes([_VOTE_KIND_TO_BYTE[self.kind]]),
                _encode_member_id(self.voter),
                struct.pack("<QI", self.height, self.round),
                self.block_hash,
                var_bytes(self.reason_code.encode("ascii")),
                var_bytes(self.signature),
            )
        )

    @classmethod
    def read(cls, reader: ByteReader) -> Vote:
        kind = _VOTE_BYTE_TO_KIND.get(reader.read_u8())
        if kind is None:
            raise DecodeError("vote: unknown kind byte", code="vote-kind")
        voter = _read_member_id(reader, "vote")
        height, round_ = struct.unpack("<QI", reader.read(12))
        block_hash = reader.read(HASH_BYTES)
        reason_raw = reader.read_var_bytes(REASON_CODE_BYTES_MAX)
        if not reason_raw.isascii():
            raise DecodeError("vote: reason code is not ASCII", code="vote-reason")
        signature = reader.read_var_bytes(SIGNATURE_BYTES_MAX)
        return cls(voter, height, round_, block_hash, kind, reason_raw.decode("ascii"), signature)

    @classmethod
    def parse(cls, raw: bytes) -> Vote:
        reader = ByteReader(raw, "vote")
        vote = cls.read(reader)
        reader.finish()
        return vote


def sign_vote(
    key: PrivateKey,
    genesis_hash: bytes,
    *,
    voter: str,
    height: int,
    round_: int,
    kind: str,
    block_hash: bytes = ZERO_HASH,
    reason_code: str = "",
) -> Vote:
    """A signed vote. Acks and timeouts carry no reason; a nack must carry one."""
    assert kind in _VOTE_KIND_TO_BYTE
    assert (kind == VOTE_NACK) == bool(reason_code)
    assert kind != VOTE_TIMEOUT or block_hash == ZERO_HASH
    assert len(reason_code) <= REASON_CODE_BYTES_MAX and reason_code.isascii()
    message = vote_message(
        genesis_hash,
        kind=kind,
        voter=voter,
        height=height,
        round_=round_,
        block_hash=block_hash,
        reason_code=reason_code,
    )
    return Vote(voter, height, round_, block_hash, kind, reason_code, key.sign(message))


def check_vote(vote: Vote, genesis: Genesis, *, genesis_hash: bytes | None = None) -> None:
    """A well-formed vote by a member whose signature verifies over this chain's id.

    ``genesis_hash`` may be passed to save recomputing ``genesis.hash_le`` per vote.
    """
    if vote.kind not in _VOTE_KIND_TO_BYTE:
        raise ConsensusError(f"vote by {vote.voter}: unknown kind {vote.kind!r}",
                             code="vote-malformed")
    if len(vote.block_hash) != HASH_BYTES:
        raise ConsensusError(f"vote by {vote.voter}: block hash of {len(vote.block_hash)} bytes",
                             code="vote-malformed")
    if (vote.kind == VOTE_NACK) != bool(vote.reason_code) or (
        vote.kind == VOTE_TIMEOUT and vote.block_hash != ZERO_HASH
    ):
        raise ConsensusError(
            f"{vote.kind} vote by {vote.voter} at height {vote.height} round {vote.round}: "
            "reason code or block hash inconsistent with its kind",
            code="vote-malformed",
        )
    member = genesis.member(vote.voter)
    if member is None:
        raise ConsensusError(f"vote by {vote.voter!r}, who is not a member",
                             code="vote-unknown-voter")
    chain_id = genesis.hash_le if genesis_hash is None else genesis_hash
    if not member.public_key.verify(vote.signature, vote.message(chain_id)):
        raise ConsensusError(
            f"{vote.kind} vote claiming {vote.voter} at height {vote.height} round "
            f"{vote.round}: signature does not verify",
            code="vote-forged",
        )


# ---------------------------------------------------------------- quorum certificate


@dataclass(frozen=True, slots=True)
class QuorumCertificate:
    """The member acks that committed a block: at least ``quorum`` distinct voters."""

    height: int
    round: int
    block_hash: bytes
    votes: tuple[Vote, ...]

    @property
    def voters(self) -> tuple[str, ...]:
        return tuple(vote.voter for vote in self.votes)

    def serialize(self) -> bytes:
        parts = [
            struct.pack("<QI", self.height, self.round),
            self.block_hash,
            compact_size(len(self.votes)),
        ]
        parts.extend(vote.serialize() for vote in self.votes)
        return b"".join(parts)

    @classmethod
    def read(cls, reader: ByteReader) -> QuorumCertificate:
        height, round_ = struct.unpack("<QI", reader.read(12))
        block_hash = reader.read(HASH_BYTES)
        count = reader.read_compact_size(QC_VOTES_MAX)
        votes = tuple(Vote.read(reader) for _ in range(count))
        return cls(height, round_, block_hash, votes)

    @classmethod
    def parse(cls, raw: bytes) -> QuorumCertificate:
        reader = ByteReader(raw, "quorum certificate")
        qc = cls.read(reader)
        reader.finish()
        return qc


def check_quorum_certificate(
    qc: QuorumCertificate,
    genesis: Genesis,
    block_hash: bytes,
    *,
    genesis_hash: bytes | None = None,
) -> None:
    """The QC proves that a quorum of distinct members acked ``block_hash``.

    Note: a QC proves a majority judged the block valid; which block of a height is
    *committed* is decided by the votes-log order (docs/decisions/0020).
    """
    if qc.block_hash != block_hash:
        raise QuorumError(
            f"quorum certificate is for block {display_hex(qc.block_hash)}, "
            f"not {display_hex(block_hash)}",
            code="qc-wrong-block",
        )
    chain_id = genesis.hash_le if genesis_hash is None else genesis_hash
    voters: set[str] = set()
    for vote in qc.votes:
        if (vote.kind, vote.height, vote.round, vote.block_hash) != (
            VOTE_ACK, qc.height, qc.round, qc.block_hash
        ):
            raise QuorumError(
                f"quorum certificate at height {qc.height}: {vote.kind} vote by {vote.voter} "
                f"for height {vote.height} round {vote.round} does not match",
                code="qc-vote-mismatch",
            )
        if vote.voter in voters:
            raise QuorumError(
                f"quorum certificate at height {qc.height}: {vote.voter} counted twice",
                code="qc-duplicate-voter",
            )
        try:
            check_vote(vote, genesis, genesis_hash=chain_id)
        except ConsensusError as error:
            raise QuorumError(
                f"quorum certificate at height {qc.height}: {error.message}",
                code="qc-vote-invalid",
            ) from None
        voters.add(vote.voter)
    if len(voters) < genesis.params.quorum:
        raise QuorumError(
            f"quorum certificate at height {qc.height}: {len(voters)} acks, "
            f"quorum is {genesis.params.quorum}",
            code="qc-too-few-votes",
        )


def check_certified_block(
    block: Block, qc: QuorumCertificate, genesis: Genesis, *, genesis_hash: bytes | None = None
) -> None:
    """A committed record: the QC matches the block's hash, height and round, and holds."""
    if (qc.height, qc.round) != (block.header.height, block.header.round):
        raise QuorumError(
            f"quorum certificate for height {qc.height} round {qc.round} attached to block "
            f"{block.hash_hex} at height {block.header.height} round {block.header.round}",
            code="qc-vote-mismatch",
        )
    check_quorum_certificate(qc, genesis, block.hash, genesis_hash=genesis_hash)


def serialize_certified_block(block: Block, qc: QuorumCertificate) -> bytes:
    """The committed-block record (``ledger.blocks.v1`` payload): block, then its QC."""
    return var_bytes(qc.serialize()) + block.serialize()


def parse_certified_block(
    raw: bytes, *, block_bytes_max: int = BLOCK_BYTES_LIMIT
) -> tuple[Block, QuorumCertificate]:
    """Inverse of ``serialize_certified_block``; checks nothing but the encoding."""
    reader = ByteReader(raw, "certified block")
    qc = QuorumCertificate.parse(reader.read_var_bytes(QC_VOTES_MAX * 256))
    block = Block.parse(raw[reader.position :], block_bytes_max=block_bytes_max)
    return block, qc

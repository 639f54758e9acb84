"""A node's state snapshot: its byte format, its signature and its verification.

Owns: ``encode_snapshot`` (a ``LedgerState`` plus the committed record of its head
block and where that record ends in the node's chain copy -> bytes) and
``decode_snapshot`` (bytes -> a verified ``Snapshot`` or ``SnapshotError`` with a
``snapshot-*`` code). File I/O, the schedule and the fall-back to a full replay live in
``streams/node/snapshots.py``; the guarantee is written down in
docs/decisions/0101-node-snapshots.md.

Layout (integers little-endian, ``var`` = CompactSize length + bytes)::

    magic             8   b"CLSNAP\\x00\\x01"
    genesis hash     32   the chain the snapshot belongs to
    institution     var   UTF-8: whose node wrote it (and signed it)
    height            8   u64
    head hash        32   hash of the block at ``height`` (genesis hash at 0)
    state hash       32   ledger.state state hash after ``height``
    chain copy end    8   u64: byte offset in chain.dat right after the head record
    head record     var   the chain copy's record of block ``height`` (empty at 0)
    native total      8   u64
    bindings          CompactSize n, n x (var asset id ASCII, 32 definition hash)
    supply            CompactSize n, n x (var asset id ASCII, u64 quantity)
    utxos             CompactSize n, n x ledger.state.entry_bytes(key, entry)
    spent journal     CompactSize n, n x (u64 height, CompactSize k, k x 36-byte key)
    signature         n   DER ECDSA of the writer's member key over
                          SHA-256(SNAPSHOT_DOMAIN_TAG || every byte above)
    signature length  1   n (at most 73)
    digest           32   SHA-256 of every byte above (catches truncation, bit flips)

Verification (``decode_snapshot``): digest, magic, chain, signature by the named
member, every field in range, then the multiset accumulator is recomputed from the
entries and the state hash derived from it must equal the recorded one. What that
does and does not prove is in decision 0101.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from dataclasses import dataclass

from ledger.errors import ValidationError
from ledger.keys import PrivateKey, verify_der
from ledger.membership import Genesis
from ledger.serialization import ByteReader, compact_size, var_bytes
from ledger.state import (
    OUTPOINT_KEY_BYTES,
    VALUE_MAX,
    LedgerState,
    UtxoEntry,
    entry_bytes,
)

SNAPSHOT_MAGIC = b"CLSNAP\x00\x01"
SNAPSHOT_DOMAIN_TAG = b"capital-ledger/NodeSnapshot/v1"
HASH_BYTES = 32
DIGEST_BYTES = 32
SIGNATURE_BYTES_MAX = 73
INSTITUTION_BYTES_MAX = 64
HEAD_RECORD_BYTES_MAX = 16 * 1024 * 1024  # streams.node.chainstore.RECORD_BYTES_MAX
ASSET_ID_BYTES_MAX = 256
SCRIPT_BYTES_MAX = 10_000  # Bitcoin's script size limit
ASSETS_MAX = 1_000_000
UTXOS_MAX = 200_000_000
JOURNAL_BLOCKS_MAX = 10_000
JOURNAL_KEYS_PER_BLOCK_MAX = 1_000_000
SNAPSHOT_BYTES_MIN = len(SNAPSHOT_MAGIC) + HASH_BYTES + DIGEST_BYTES
_U64 = struct.Struct("<Q")
_ENTRY_TAIL = struct.Struct("<QQ")


class SnapshotError(ValidationError):
    """A snapshot that must not be used; ``code`` says why (``snapshot-*``)."""

    code = "snapshot"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A verified snapshot: the state it holds and where the chain copy resumes."""

    institution: str
    state: LedgerState
    state_hash: bytes
    chain_copy_end: int
    head_record: bytes


def encode_snapshot(
    state: LedgerState,
    *,
    genesis_hash: bytes,
    institution: str,
    key: PrivateKey,
    chain_copy_end: int,
    head_record: bytes,
) -> bytes:
    """The snapshot bytes of ``state`` (not consumed; it may be a ``copy()``)."""
    assert len(genesis_hash) == HASH_BYTES and chain_copy_end >= 0
    assert len(head_record) <= HEAD_RECORD_BYTES_MAX
    assert (state.height == 0) == (not head_record)
    parts = [
        SNAPSHOT_MAGIC,
        genesis_hash,
        var_bytes(institution.encode("utf-8")),
        _U64.pack(state.height),
        state.head_hash,
        state.state_hash,
        _U64.pack(chain_copy_end),
        var_bytes(head_record),
        _U64.pack(state.native_total),
    ]
    parts.extend(_encode_tables(state))
    body = b"".join(parts)
    signature = key.sign(_signed_digest(body))
    signed = body + signature + bytes([len(signature)])
    return signed + hashlib.sha256(signed).digest()


def _encode_tables(state: LedgerState) -> list[bytes]:
    # The state's own tables, read directly: this module is the state's serialization.
    bindings = state._bindings
    supply = state._supply
    utxos = state._utxos
    journal = state._spent_journal
    parts = [compact_size(len(bindings))]
    parts.extend(var_bytes(asset.encode("ascii")) + digest for asset, digest in bindings.items())
    parts.append(compact_size(len(supply)))
    parts.extend(var_bytes(asset.encode("ascii")) + _U64.pack(quantity)
                 for asset, quantity in supply.items())
    parts.append(compact_size(len(utxos)))
    parts.extend(entry_bytes(key, entry) for key, entry in utxos.items())
    parts.append(compact_size(len(journal)))
    for height, keys in journal:
        parts.append(_U64.pack(height) + compact_size(len(keys)) + b"".join(keys))
    return parts


def _signed_digest(body: bytes) -> bytes:
    return hashlib.sha256(SNAPSHOT_DOMAIN_TAG + body).digest()


def decode_snapshot(data: bytes, genesis: Genesis) -> Snapshot:
    """The verified snapshot in ``data``, or ``SnapshotError``:

    ``snapshot-truncated`` (shorter than any snapshot), ``snapshot-digest`` (content
    hash differs: truncated or altered), ``snapshot-format`` (magic, version or a field
    out of range), ``snapshot-chain`` (another chain), ``snapshot-signer`` (not a
    member), ``snapshot-signature`` (not signed by that member),
    ``snapshot-state-hash`` (the entries do not hash to the recorded state hash).
    """
    if len(data) < SNAPSHOT_BYTES_MIN:
        raise SnapshotError(f"{len(data)} bytes: shorter than any snapshot",
                            code="snapshot-truncated")
    signed, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if hashlib.sha256(signed).digest() != digest:
        raise SnapshotError("content hash mismatch: truncated or altered",
                            code="snapshot-digest")
    if data[: len(SNAPSHOT_MAGIC)] != SNAPSHOT_MAGIC:
        raise SnapshotError("not a version-1 node snapshot", code="snapshot-format")
    if data[len(SNAPSHOT_MAGIC) : len(SNAPSHOT_MAGIC) + HASH_BYTES] != genesis.hash_le:
        raise SnapshotError("snapshot of another chain", code="snapshot-chain")
    try:
        return _decode_verified(signed, genesis)
    except SnapshotError:
        raise
    except (ValidationError, UnicodeDecodeError, ValueError) as error:
        raise SnapshotError(f"malformed snapshot: {error}", code="snapshot-format") from None


def _decode_verified(signed: bytes, genesis: Genesis) -> Snapshot:
    reader = ByteReader(signed, "snapshot")
    reader.read(len(SNAPSHOT_MAGIC) + HASH_BYTES)
    institution = reader.read_var_bytes(INSTITUTION_BYTES_MAX).decode("utf-8")
    height = reader.read_u64()
    head_hash = reader.read(HASH_BYTES)
    state_hash = reader.read(HASH_BYTES)
    chain_copy_end = reader.read_u64()
    head_record = reader.read_var_bytes(HEAD_RECORD_BYTES_MAX)
    native_total = reader.read_u64()
    tables_at = reader.position
    signature_at = len(signed) - 1 - signed[-1]
    if not 0 < signed[-1] <= SIGNATURE_BYTES_MAX or signature_at < tables_at:
        raise SnapshotError("signature length out of range", code="snapshot-format")
    _check_signature(genesis, institution, signed[:signature_at], signed[signature_at:-1])
    if (height == 0) != (not head_record) or native_total > VALUE_MAX:
        raise SnapshotError("head record or native total out of range", code="snapshot-format")
    state = _decode_tables(signed[tables_at:signature_at], height=height, head_hash=head_hash,
                           native_total=native_total)
    if state.state_hash != state_hash:
        raise SnapshotError(
            f"the entries hash to state hash {state.state_hash[::-1].hex()}, "
            f"the snapshot records {state_hash[::-1].hex()}",
            code="snapshot-state-hash",
        )
    return Snapshot(institution, state, state_hash, chain_copy_end, head_record)


def _check_signature(genesis: Genesis, institution: str, body: bytes, signature: bytes) -> None:
    member = genesis.member(institution)
    if member is None:
        raise SnapshotError(f"written by {institution[:64]!r}, not a member",
                            code="snapshot-signer")
    if not verify_der(member.public_key.sec, signature, _signed_digest(body)):
        raise SnapshotError(f"not signed by {institution}'s key", code="snapshot-signature")


def _decode_tables(raw: bytes, *, height: int, head_hash: bytes,
                   native_total: int) -> LedgerState:
    reader = ByteReader(raw, "snapshot tables")
    bindings: dict[str, bytes] = {}
    for _ in range(reader.read_compact_size(ASSETS_MAX)):
        asset = _read_asset(reader)
        bindings[asset] = reader.read(HASH_BYTES)
    supply: dict[str, int] = {}
    for _ in range(reader.read_compact_size(ASSETS_MAX)):
        asset = _read_asset(reader)
        supply[asset] = reader.read_u64()
    utxos = _read_utxos(reader)
    journal: deque[tuple[int, tuple[bytes, ...]]] = deque()
    recent: dict[bytes, int] = {}
    for _ in range(reader.read_compact_size(JOURNAL_BLOCKS_MAX)):
        spent_height = reader.read_u64()
        count = reader.read_compact_size(JOURNAL_KEYS_PER_BLOCK_MAX)
        block = reader.read(count * OUTPOINT_KEY_BYTES)
        keys = tuple(block[i : i + OUTPOINT_KEY_BYTES]
                     for i in range(0, len(block), OUTPOINT_KEY_BYTES))
        journal.append((spent_height, keys))
        for key in keys:
            recent[key] = spent_height
    reader.finish()
    unverified = LedgerState(height=height, head_hash=head_hash, utxos=utxos, bindings=bindings,
                             supply=supply, accumulator=0, native_total=native_total,
                             script_index=None, spent_recent=recent, spent_journal=journal)
    return LedgerState(height=height, head_hash=head_hash, utxos=utxos, bindings=bindings,
                       supply=supply, accumulator=unverified.recompute_accumulator(),
                       native_total=native_total, script_index=None, spent_recent=recent,
                       spent_journal=journal)


def _read_asset(reader: ByteReader) -> str:
    raw = reader.read_var_bytes(ASSET_ID_BYTES_MAX)
    if not raw.isascii():
        raise SnapshotError("asset id is not ASCII", code="snapshot-format")
    return raw.decode("ascii")


def _read_utxos(reader: ByteReader) -> dict[bytes, UtxoEntry]:
    utxos: dict[bytes, UtxoEntry] = {}
    interned: dict[str, str] = {}
    for _ in range(reader.read_compact_size(UTXOS_MAX)):
        key = reader.read(OUTPOINT_KEY_BYTES)
        value = reader.read_i64()
        script = reader.read_var_bytes(SCRIPT_BYTES_MAX)
        asset_raw = reader.read_var_bytes(ASSET_ID_BYTES_MAX)
        quantity, created = _ENTRY_TAIL.unpack(reader.read(_ENTRY_TAIL.size))
        if not 0 <= value <= VALUE_MAX or key in utxos or not asset_raw.isascii():
            raise SnapshotError("unspent output out of range or repeated",
                                code="snapshot-format")
        asset: str | None = None
        if asset_raw:
            text = asset_raw.decode("ascii")
            asset = interned.setdefault(text, text)  # one string per asset id, as the state
        utxos[key] = UtxoEntry(value, script, asset, quantity, created)
    return utxos

"""A node's state snapshot: its byte format, its signature and its verification.

Owns: ``encode_snapshot`` (a ``LedgerState`` plus the committed record of its head
block and where that record ends in the node's chain copy -> bytes) and
``decode_snapshot`` (bytes -> a verified ``Snapshot`` or ``SnapshotError`` with a
``snapshot-*`` code). File I/O, the schedule and the fall-back to a full replay live in
``streams/node/snapshots.py``; the guarantee is written down in
docs/decisions/0101-node-snapshots.md.

Layout (integers little-endian, ``var`` = CompactSize length + bytes)::

    magic             8   b"CLSNAP\\x00\\x02" (version 2; version 1: b"CLSNAP\\x00\\x01")
    genesis hash     32   the chain the snapshot belongs to
    institution     var   UTF-8: whose node wrote it (and signed it)
    height            8   u64
    head hash        32   hash of the block at ``height`` (genesis hash at 0)
    state hash       32   ledger.state state hash after ``height``
    chain copy end    8   u64: byte offset in chain.dat right after the head record
    head record     var   the chain copy's record of block ``height`` (empty at 0)
    native total      8   u64
    schedule              (version 2 only) the membership schedule of decision 0061:
                          u64 sequence, 32 digest, CompactSize n, then the n epochs
                          after genesis, each: u64 start height, 32 change id,
                          5 x u32 params (quorum, block interval ms, block bytes max,
                          block txs max, proposer timeout ms), CompactSize m members,
                          m x (var id, var name, var role, var SEC key, u8 may issue)
    bindings          CompactSize n, n x (var asset id ASCII, 32 definition hash)
    supply            CompactSize n, n x (var asset id ASCII, u64 quantity)
    utxos             CompactSize n, n x ledger.state.entry_bytes(key, entry)
    spent journal     CompactSize n, n x (u64 height, CompactSize k, k x 36-byte key)
    signature         n   DER ECDSA of the writer's member key over
                          SHA-256(domain tag of the version || every byte above)
    signature length  1   n (at most 73)
    digest           32   SHA-256 of every byte above (catches truncation, bit flips)

Verification (``decode_snapshot``): digest, magic and version, chain, signature by the
named member (the member in force at the snapshot's height, so a rotated key signs),
every field in range, the schedule rebuilt epoch by epoch under governance's bounds
with its digest recomputed from the change ids, then the multiset accumulator is
recomputed from the entries and the state hash derived from it and from the schedule's
digest must equal the recorded one. A version-1 snapshot (written only while no
governance change was applied) loads with the genesis schedule. What that does and
does not prove: decisions 0101 and 0103.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from dataclasses import dataclass

from ledger.errors import ValidationError
from ledger.governance import (
    ACTIVATION_DELAY_MAX_HEIGHTS,
    MEMBER_ID_BYTES_MAX,
    MEMBERS_MAX,
    MEMBERS_MIN,
    NULL_TXID,
    PARAM_RANGES,
    TEXT_BYTES_MAX,
    Epoch,
    MembershipSchedule,
    schedule_from_genesis,
)
from ledger.hashing import sha256d
from ledger.keys import PrivateKey, PublicKey, verify_der
from ledger.membership import ChainParams, Genesis, GenesisError, Member
from ledger.serialization import ByteReader, compact_size, var_bytes
from ledger.state import (
    OUTPOINT_KEY_BYTES,
    VALUE_MAX,
    LedgerState,
    UtxoEntry,
    entry_bytes,
)

SNAPSHOT_MAGIC_PREFIX = b"CLSNAP\x00"
SNAPSHOT_VERSION = 2  # written; version 1 (no schedule) still loads
SNAPSHOT_VERSIONS = (1, 2)
SNAPSHOT_MAGIC = SNAPSHOT_MAGIC_PREFIX + bytes([SNAPSHOT_VERSION])
# Each version signs under its own tag, so bytes of one can never verify as the other.
SNAPSHOT_DOMAIN_TAGS = {1: b"capital-ledger/NodeSnapshot/v1",
                        2: b"capital-ledger/NodeSnapshot/v2"}
SNAPSHOT_DOMAIN_TAG = SNAPSHOT_DOMAIN_TAGS[SNAPSHOT_VERSION]
# Every applied change adds an epoch; far more than a chain's lifetime of governance.
EPOCHS_MAX = 100_000
PUBLIC_KEY_BYTES_MAX = 65
_PARAMS = struct.Struct("<IIIII")
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
    """A verified snapshot: the state it holds (its ``schedule`` included) and where the
    chain copy resumes; ``version`` of the format it was read from."""

    institution: str
    state: LedgerState
    state_hash: bytes
    chain_copy_end: int
    head_record: bytes
    version: int = SNAPSHOT_VERSION


def encode_snapshot(
    state: LedgerState,
    *,
    genesis_hash: bytes,
    institution: str,
    key: PrivateKey,
    chain_copy_end: int,
    head_record: bytes,
    version: int = SNAPSHOT_VERSION,
) -> bytes:
    """The snapshot bytes of ``state`` (not consumed; it may be a ``copy()``).

    Version 2 carries ``state.schedule`` (the genesis schedule when it is None);
    version 1 is kept for a state under the genesis membership only."""
    assert len(genesis_hash) == HASH_BYTES and chain_copy_end >= 0
    assert len(head_record) <= HEAD_RECORD_BYTES_MAX
    assert (state.height == 0) == (not head_record)
    assert version in SNAPSHOT_VERSIONS
    schedule = state.schedule
    assert version == 2 or schedule is None or not schedule.sequence, "v1 has no schedule"
    parts = [
        SNAPSHOT_MAGIC_PREFIX + bytes([version]),
        genesis_hash,
        var_bytes(institution.encode("utf-8")),
        _U64.pack(state.height),
        state.head_hash,
        state.state_hash,
        _U64.pack(chain_copy_end),
        var_bytes(head_record),
        _U64.pack(state.native_total),
    ]
    if version == 2:
        parts.append(encode_schedule(schedule, genesis_hash))
    parts.extend(_encode_tables(state))
    body = b"".join(parts)
    signature = key.sign(_signed_digest(version, body))
    signed = body + signature + bytes([len(signature)])
    return signed + hashlib.sha256(signed).digest()


def encode_schedule(schedule: MembershipSchedule | None, genesis_hash: bytes) -> bytes:
    """The schedule section: sequence, digest and every epoch after genesis."""
    if schedule is None:
        return _U64.pack(0) + NULL_TXID + compact_size(0)
    assert schedule.genesis_hash == genesis_hash
    parts = [_U64.pack(schedule.sequence), schedule.digest,
             compact_size(len(schedule.epochs) - 1)]
    for epoch in schedule.epochs[1:]:
        params = epoch.view.params
        parts += [_U64.pack(epoch.start_height), epoch.change_id,
                  _PARAMS.pack(params.quorum, params.block_interval_ms, params.block_bytes_max,
                               params.block_txs_max, params.proposer_timeout_ms),
                  compact_size(len(epoch.view.members))]
        parts += [var_bytes(m.id.encode()) + var_bytes(m.name.encode())
                  + var_bytes(m.role.encode()) + var_bytes(m.public_key.sec)
                  + (b"\x01" if m.may_issue else b"\x00") for m in epoch.view.members]
    return b"".join(parts)


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


def _signed_digest(version: int, body: bytes) -> bytes:
    return hashlib.sha256(SNAPSHOT_DOMAIN_TAGS[version] + body).digest()


def decode_snapshot(data: bytes, genesis: Genesis, *,
                    signer_keys: tuple[PublicKey, ...] = ()) -> Snapshot:
    """The verified snapshot in ``data``, or ``SnapshotError``:

    ``snapshot-truncated`` (shorter than any snapshot), ``snapshot-digest`` (content
    hash differs: truncated or altered), ``snapshot-format`` (magic or a field out of
    range), ``snapshot-version`` (a snapshot format this code does not know),
    ``snapshot-chain`` (another chain), ``snapshot-signer`` (not a member),
    ``snapshot-signature`` (signed neither by that member's genesis key nor by one of
    ``signer_keys``, the keys the caller trusts: a node passes its own, which may be a
    rotated one), ``snapshot-schedule`` (the membership schedule is out of governance's
    bounds or its digest differs), ``snapshot-state-hash`` (the entries and the
    schedule do not hash to the recorded state hash).
    """
    if len(data) < SNAPSHOT_BYTES_MIN:
        raise SnapshotError(f"{len(data)} bytes: shorter than any snapshot",
                            code="snapshot-truncated")
    signed, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if hashlib.sha256(signed).digest() != digest:
        raise SnapshotError("content hash mismatch: truncated or altered",
                            code="snapshot-digest")
    if data[: len(SNAPSHOT_MAGIC_PREFIX)] != SNAPSHOT_MAGIC_PREFIX:
        raise SnapshotError("not a node snapshot", code="snapshot-format")
    version = data[len(SNAPSHOT_MAGIC_PREFIX)]
    if version not in SNAPSHOT_VERSIONS:
        raise SnapshotError(f"snapshot format version {version}; this node reads "
                            f"{', '.join(map(str, SNAPSHOT_VERSIONS))}", code="snapshot-version")
    if data[len(SNAPSHOT_MAGIC) : len(SNAPSHOT_MAGIC) + HASH_BYTES] != genesis.hash_le:
        raise SnapshotError("snapshot of another chain", code="snapshot-chain")
    try:
        return _decode_verified(signed, genesis, version, signer_keys)
    except SnapshotError:
        raise
    except (ValidationError, UnicodeDecodeError, ValueError) as error:
        raise SnapshotError(f"malformed snapshot: {error}", code="snapshot-format") from None


def _decode_verified(signed: bytes, genesis: Genesis, version: int,
                     signer_keys: tuple[PublicKey, ...]) -> Snapshot:
    reader = ByteReader(signed, "snapshot")
    reader.read(len(SNAPSHOT_MAGIC) + HASH_BYTES)
    institution = reader.read_var_bytes(INSTITUTION_BYTES_MAX).decode("utf-8")
    height = reader.read_u64()
    head_hash = reader.read(HASH_BYTES)
    state_hash = reader.read(HASH_BYTES)
    chain_copy_end = reader.read_u64()
    head_record = reader.read_var_bytes(HEAD_RECORD_BYTES_MAX)
    native_total = reader.read_u64()
    schedule_at = reader.position
    signature_at = len(signed) - 1 - signed[-1]
    if not 0 < signed[-1] <= SIGNATURE_BYTES_MAX or signature_at < schedule_at:
        raise SnapshotError("signature length out of range", code="snapshot-format")
    _check_signature(genesis, institution, signed[:signature_at], signed[signature_at:-1],
                     version, signer_keys)
    if (height == 0) != (not head_record) or native_total > VALUE_MAX:
        raise SnapshotError("head record or native total out of range", code="snapshot-format")
    rest = ByteReader(signed[schedule_at:signature_at], "snapshot schedule and tables")
    schedule = (decode_schedule(rest, genesis, height=height) if version == 2
                else schedule_from_genesis(genesis))
    state = _decode_tables(rest, height=height, head_hash=head_hash,
                           native_total=native_total, schedule=schedule)
    if state.state_hash != state_hash:
        raise SnapshotError(
            f"the entries hash to state hash {state.state_hash[::-1].hex()}, "
            f"the snapshot records {state_hash[::-1].hex()}",
            code="snapshot-state-hash",
        )
    return Snapshot(institution, state, state_hash, chain_copy_end, head_record, version)


def _check_signature(genesis: Genesis, institution: str, body: bytes, signature: bytes,
                     version: int, signer_keys: tuple[PublicKey, ...]) -> None:
    member = genesis.member(institution)
    if member is None and not signer_keys:
        raise SnapshotError(f"written by {institution[:64]!r}, not a member",
                            code="snapshot-signer")
    digest = _signed_digest(version, body)
    keys = [*([] if member is None else [member.public_key]), *signer_keys]
    if not any(verify_der(key.sec, signature, digest) for key in keys):
        raise SnapshotError(f"not signed by {institution}'s key", code="snapshot-signature")


def decode_schedule(reader: ByteReader, genesis: Genesis, *, height: int) -> MembershipSchedule:
    """The schedule section read back and rebuilt from ``genesis`` epoch by epoch, each
    membership checked against governance's bounds (``snapshot-schedule``)."""
    sequence = reader.read_u64()
    recorded_digest = reader.read(HASH_BYTES)
    count = reader.read_compact_size(EPOCHS_MAX)
    epochs = [Epoch(0, genesis)]
    digest = NULL_TXID
    for _ in range(count):
        start_height = reader.read_u64()
        change_id = reader.read(HASH_BYTES)
        if not epochs[-1].start_height < start_height <= height + ACTIVATION_DELAY_MAX_HEIGHTS:
            raise SnapshotError(f"epoch from height {start_height} after one from "
                                f"{epochs[-1].start_height}, at height {height}",
                                code="snapshot-schedule")
        epochs.append(Epoch(start_height, _read_view(reader, epochs[-1].view), change_id))
        digest = sha256d(digest + change_id)
    if sequence != count or digest != recorded_digest:
        raise SnapshotError(f"schedule of {count} changes records sequence {sequence} and a "
                            "digest its change ids do not give", code="snapshot-schedule")
    return MembershipSchedule(genesis.hash_le, tuple(epochs), sequence, digest)


def _read_view(reader: ByteReader, previous: Genesis) -> Genesis:
    """One epoch's membership, as ``ledger.governance.amended_view`` would have made it
    from ``previous`` (the same chain fields, submit keys of remaining members)."""
    quorum, interval_ms, bytes_max, txs_max, timeout_ms = _PARAMS.unpack(reader.read(_PARAMS.size))
    members = tuple(_read_member(reader)
                    for _ in range(reader.read_compact_size(MEMBERS_MAX)))
    base = previous.params
    params = ChainParams(quorum, interval_ms, bytes_max, txs_max, timeout_ms,
                         base.p2pkh_version, base.p2sh_version)
    for name, (low, high) in PARAM_RANGES.items():
        if not low <= getattr(params, name) <= high:
            raise SnapshotError(f"schedule: {name} {getattr(params, name)} out of range",
                                code="snapshot-schedule")
    keys = [m.public_key.compressed().sec for m in members]
    if len(members) < MEMBERS_MIN or len(set(keys)) != len(keys):
        raise SnapshotError("schedule: members out of bounds or sharing a key",
                            code="snapshot-schedule")
    try:
        return Genesis(previous.chain_id, previous.time_ms, members, params,
                       previous.allocations,
                       tuple(k for k in previous.submit_keys
                             if any(m.id == k.member for m in members)))
    except GenesisError as error:
        raise SnapshotError(f"schedule: {error.message}", code="snapshot-schedule") from None


def _read_member(reader: ByteReader) -> Member:
    member_id = reader.read_var_bytes(MEMBER_ID_BYTES_MAX).decode("utf-8")
    name = reader.read_var_bytes(TEXT_BYTES_MAX).decode("utf-8")
    role = reader.read_var_bytes(TEXT_BYTES_MAX).decode("utf-8")
    key = PublicKey.parse(reader.read_var_bytes(PUBLIC_KEY_BYTES_MAX))
    may_issue = reader.read_u8()
    if may_issue > 1 or not member_id:
        raise SnapshotError("schedule: member entry out of range", code="snapshot-schedule")
    return Member(member_id, name, role, key, may_issue=may_issue == 1)


def _decode_tables(reader: ByteReader, *, height: int, head_hash: bytes, native_total: int,
                   schedule: MembershipSchedule) -> LedgerState:
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
                       spent_journal=journal, schedule=schedule)


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

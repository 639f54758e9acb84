"""Governance: membership and parameter changes signed by a majority of the members.

Owns: ``MembershipChange`` (what changes, from which height) and its canonical bytes
and id, ``SignedChange`` (a change plus member signatures over its id), the
governance transaction that carries a signed change inside a block, the rules that
accept or refuse a change (``check_signed_change``), and ``MembershipSchedule``: the
membership and chain parameters in force at every height, as genesis set them and
committed changes amended them.

Why a transaction in a block (docs/decisions/0061): the block that carries a change
is decided by consensus like any other, so every node, the projector, the audit
replay and a proof verifier learn the change at the same height from the chain
itself, and a restarted node rebuilds the schedule from its own chain copy. A change
takes effect at its stated ``effective_height``, which must be at least
``ACTIVATION_DELAY_MIN_HEIGHTS`` above the block that carries it: a node whose votes
log runs ahead of its block bodies still knows the membership of every height it
counts votes for (the consensus machine never counts votes further ahead).

The membership in force at a height is handed out as a ``Genesis`` (same chain id,
time and allocations; amended members and parameters), so the checks of blocks,
votes and certificates in ``ledger.block`` apply unchanged. Callers must pass the
chain's real genesis hash to those checks: an amended view hashes differently.

Pure: no I/O, no clock. Imports the core only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger.errors import ValidationError
from ledger.hashing import sha256d
from ledger.keys import PrivateKey, PublicKey
from ledger.membership import ChainParams, Genesis, GenesisError, Member
from ledger.serialization import ByteReader, compact_size, var_bytes
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

GOVERNANCE_TX_VERSION = 0x47564F31  # "GVO1": no payment transaction uses this version
CHANGE_TAG = b"capital-ledger/governance/v1"
# The governance transaction's single output: OP_RETURN, push of this marker.
MARKER = b"capledger-governance"
MARKER_SCRIPT = bytes([0x6A, len(MARKER)]) + MARKER
NULL_TXID = bytes(32)
NULL_INDEX = 0xFFFFFFFF
# A change activates at least this many heights above the block that carries it (see
# the module docstring) and at most this many, so a change cannot lie in wait.
ACTIVATION_DELAY_MIN_HEIGHTS = 16
ACTIVATION_DELAY_MAX_HEIGHTS = 1_000_000
MEMBERS_MAX = 64
MEMBERS_MIN = 1
PAYLOAD_BYTES_MAX = 9_000  # below a script's 10,000-byte limit
TEXT_BYTES_MAX = 128
MEMBER_ID_BYTES_MAX = 64
SIGNATURE_BYTES_MAX = 73
# Bounds of the parameters a change may set (inclusive).
PARAM_RANGES: dict[str, tuple[int, int]] = {
    "block_interval_ms": (10, 60_000),
    "block_bytes_max": (1_000, 32_000_000),
    "block_txs_max": (1, 1_000_000),
    "proposer_timeout_ms": (100, 600_000),
}

KIND_ADD = "add_member"
KIND_REMOVE = "remove_member"
KIND_ROTATE = "rotate_key"
KIND_PARAMS = "change_params"
KINDS = (KIND_ADD, KIND_REMOVE, KIND_ROTATE, KIND_PARAMS)


class GovernanceError(ValidationError):
    code = "governance"


# ------------------------------------------------------------------------ the change


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """One change. ``member``: the joining member (add) or the member with its new key
    (rotate); ``member_id``: who joins, leaves or rotates; ``params``: the complete new
    parameter set (change_params; the address version bytes stay as genesis set them).
    """

    genesis_hash: bytes
    sequence: int
    kind: str
    effective_height: int
    member_id: str = ""
    member: Member | None = None
    params: ChainParams | None = None

    def canonical_bytes(self) -> bytes:
        parts = [
            var_bytes(CHANGE_TAG),
            self.genesis_hash,
            struct.pack("<QQ", self.sequence, self.effective_height),
            var_bytes(self.kind.encode()),
            var_bytes(self.member_id.encode()),
        ]
        if self.member is None:
            parts.append(b"\x00")
        else:
            m = self.member
            parts += [b"\x01", var_bytes(m.id.encode()), var_bytes(m.name.encode()),
                      var_bytes(m.role.encode()), var_bytes(m.public_key.sec),
                      b"\x01" if m.may_issue else b"\x00"]
        if self.params is None:
            parts.append(b"\x00")
        else:
            p = self.params
            parts += [b"\x01", struct.pack("<IIIII", p.quorum, p.block_interval_ms,
                                           p.block_bytes_max, p.block_txs_max,
                                           p.proposer_timeout_ms)]
        return b"".join(parts)

    @property
    def change_id(self) -> bytes:
        """What members sign: sha256d of the canonical bytes (which name the chain)."""
        return sha256d(self.canonical_bytes())

    @classmethod
    def read(cls, reader: ByteReader) -> MembershipChange:
        if reader.read_var_bytes(len(CHANGE_TAG)) != CHANGE_TAG:
            raise GovernanceError("not a governance change", code="governance-malformed")
        genesis_hash = reader.read(32)
        sequence, effective_height = struct.unpack("<QQ", reader.read(16))
        kind = _read_text(reader, MEMBER_ID_BYTES_MAX)
        member_id = _read_text(reader, MEMBER_ID_BYTES_MAX)
        member = _read_member(reader) if _read_flag(reader) else None
        params = None
        if _read_flag(reader):
            quorum, interval, size, count, timeout = struct.unpack("<IIIII", reader.read(20))
            params = ChainParams(quorum, interval, size, count, timeout)
        return cls(genesis_hash, sequence, kind, effective_height, member_id, member, params)


def _read_text(reader: ByteReader, limit: int) -> str:
    try:
        return reader.read_var_bytes(limit).decode("utf-8")
    except UnicodeDecodeError:
        raise GovernanceError("text field is not UTF-8", code="governance-malformed") from None


def _read_flag(reader: ByteReader) -> bool:
    flag = reader.read_u8()
    if flag > 1:
        raise GovernanceError(f"presence flag {flag}", code="governance-malformed")
    return flag == 1


def _read_member(reader: ByteReader) -> Member:
    member_id = _read_text(reader, MEMBER_ID_BYTES_MAX)
    name = _read_text(reader, TEXT_BYTES_MAX)
    role = _read_text(reader, TEXT_BYTES_MAX)
    sec = reader.read_var_bytes(65)
    try:
        key = PublicKey.parse(sec)
    except ValidationError:
        raise GovernanceError(f"member {member_id!r}: public key does not parse",
                              code="governance-malformed") from None
    return Member(member_id, name, role, key, may_issue=_read_flag(reader))


@dataclass(frozen=True, slots=True)
class SignedChange:
    """A change and its approvals: (member id, DER signature over ``change_id``)."""

    change: MembershipChange
    signatures: tuple[tuple[str, bytes], ...] = ()

    def serialize(self) -> bytes:
        parts = [self.change.canonical_bytes(), compact_size(len(self.signatures))]
        for member_id, signature in self.signatures:
            parts += [var_bytes(member_id.encode()), var_bytes(signature)]
        return b"".join(parts)

    @classmethod
    def parse(cls, raw: bytes) -> SignedChange:
        if len(raw) > PAYLOAD_BYTES_MAX:
            raise GovernanceError(f"governance payload of {len(raw)} bytes",
                                  code="governance-malformed")
        try:
            reader = ByteReader(raw, "governance change")
            change = MembershipChange.read(reader)
            count = reader.read_compact_size(MEMBERS_MAX)
            signatures = tuple(
                (_read_text(reader, MEMBER_ID_BYTES_MAX),
                 reader.read_var_bytes(SIGNATURE_BYTES_MAX))
                for _ in range(count)
            )
            reader.finish()
        except GovernanceError:
            raise
        except ValidationError as error:
            raise GovernanceError(f"governance change does not decode: {error.message}",
                                  code="governance-malformed") from None
        return cls(change, signatures)

    def signed_by(self, member_id: str, key: PrivateKey) -> SignedChange:
        """This change with ``member_id``'s signature added (replacing an earlier one)."""
        kept = tuple(s for s in self.signatures if s[0] != member_id)
        return SignedChange(self.change, (*kept, (member_id, key.sign(self.change.change_id))))


# --------------------------------------------------------------- the carrying transaction


def is_governance_tx(tx: Transaction) -> bool:
    return tx.version == GOVERNANCE_TX_VERSION


def governance_tx(signed: SignedChange) -> Transaction:
    """The transaction that carries ``signed`` into a block: one null-outpoint input
    whose scriptSig is the serialized signed change, one OP_RETURN marker output of
    value 0. It spends and creates nothing; its txid names the submission."""
    payload = signed.serialize()
    assert len(payload) <= PAYLOAD_BYTES_MAX, "too many signatures for one change"
    txin = TxIn(OutPoint(NULL_TXID, NULL_INDEX), payload)
    return Transaction(GOVERNANCE_TX_VERSION, (txin,), (TxOut(0, MARKER_SCRIPT),), 0)


def change_from_tx(tx: Transaction) -> SignedChange:
    """The signed change a governance transaction carries; refuses any other shape."""
    if (
        not is_governance_tx(tx)
        or len(tx.inputs) != 1
        or tx.inputs[0].prevout.txid_le != NULL_TXID
        or tx.inputs[0].prevout.index != NULL_INDEX
        or len(tx.outputs) != 1
        or tx.outputs[0] != TxOut(0, MARKER_SCRIPT)
        or tx.lock_time != 0
    ):
        raise GovernanceError(f"tx {tx.txid}: not a well-formed governance transaction",
                              code="governance-malformed")
    return SignedChange.parse(tx.inputs[0].script_sig)


# ------------------------------------------------------------------------ the schedule


@dataclass(frozen=True, slots=True)
class Epoch:
    """The membership in force from ``start_height`` on (until the next epoch)."""

    start_height: int
    view: Genesis
    change_id: bytes = NULL_TXID


@dataclass(frozen=True, slots=True)
class MembershipSchedule:
    """Membership and parameters by height: genesis, then each committed change from
    its effective height. ``sequence``: the last change applied (0: none)."""

    genesis_hash: bytes
    epochs: tuple[Epoch, ...]
    sequence: int = 0
    digest: bytes = field(default=NULL_TXID)

    def at(self, height: int) -> Genesis:
        """The membership in force at ``height`` as known from the blocks applied."""
        for epoch in reversed(self.epochs):
            if epoch.start_height <= height:
                return epoch.view
        return self.epochs[0].view

    @property
    def latest(self) -> Genesis:
        return self.epochs[-1].view

    @property
    def genesis(self) -> Genesis:
        return self.epochs[0].view


def schedule_from_genesis(genesis: Genesis,
                          genesis_hash: bytes | None = None) -> MembershipSchedule:
    chain = genesis.hash_le if genesis_hash is None else genesis_hash
    return MembershipSchedule(chain, (Epoch(0, genesis),))


def _amended_members(view: Genesis, change: MembershipChange) -> tuple[Member, ...]:
    members = view.members
    if change.kind == KIND_ADD:
        member = change.member
        if member is None or member.id != change.member_id:
            raise GovernanceError("add_member needs the member entry with member_id",
                                  code="governance-malformed")
        if view.member(member.id) is not None:
            raise GovernanceError(f"{member.id} is already a member",
                                  code="governance-member-exists")
        if not member.id or len(member.id.encode()) > MEMBER_ID_BYTES_MAX:
            raise GovernanceError("member id empty or too long", code="governance-malformed")
        return (*members, member)
    if view.member(change.member_id) is None:
        raise GovernanceError(f"{change.member_id!r} is not a member",
                              code="governance-member-unknown")
    if change.kind == KIND_REMOVE:
        return tuple(m for m in members if m.id != change.member_id)
    new = change.member
    old = view.member(change.member_id)
    if new is None or old is None or (new.id, new.name, new.role, new.may_issue) != (
        old.id, old.name, old.role, old.may_issue
    ):
        raise GovernanceError("rotate_key changes only the key of member_id",
                              code="governance-malformed")
    return tuple(new if m.id == new.id else m for m in members)


def _check_params(params: ChainParams, member_count: int) -> None:
    for name, (low, high) in PARAM_RANGES.items():
        value = getattr(params, name)
        if not low <= value <= high:
            raise GovernanceError(f"{name} {value} outside {low}..{high}",
                                  code="governance-params")
    if not member_count // 2 < params.quorum <= member_count:
        raise GovernanceError(
            f"quorum {params.quorum} is not a majority of {member_count} members",
            code="governance-params",
        )


def amended_view(view: Genesis, change: MembershipChange) -> Genesis:
    """The membership ``change`` makes of ``view``; refuses an impossible change.

    Adding or removing a member sets the quorum to the simple majority of the new
    membership; change_params sets the parameters it states (quorum included).
    """
    if change.kind not in KINDS:
        raise GovernanceError(f"unknown change kind {change.kind!r}",
                              code="governance-malformed")
    if change.kind == KIND_PARAMS:
        if change.params is None or change.member is not None or change.member_id:
            raise GovernanceError("change_params carries only params",
                                  code="governance-malformed")
        members = view.members
        old = view.params
        params = ChainParams(change.params.quorum, change.params.block_interval_ms,
                             change.params.block_bytes_max, change.params.block_txs_max,
                             change.params.proposer_timeout_ms, old.p2pkh_version,
                             old.p2sh_version)
    else:
        if change.params is not None:
            raise GovernanceError("a membership change carries no params",
                                  code="governance-malformed")
        members = _amended_members(view, change)
        majority = len(members) // 2 + 1
        params = ChainParams(majority, *_operational(view.params))
    if not MEMBERS_MIN <= len(members) <= MEMBERS_MAX:
        raise GovernanceError(f"{len(members)} members outside {MEMBERS_MIN}..{MEMBERS_MAX}",
                              code="governance-members-bounds")
    keys = [m.public_key.compressed().sec for m in members]
    if len(set(keys)) != len(keys):
        raise GovernanceError("two members would share one key", code="governance-key-reused")
    _check_params(params, len(members))
    try:
        return Genesis(view.chain_id, view.time_ms, members, params, view.allocations,
                       tuple(k for k in view.submit_keys if any(m.id == k.member
                                                                 for m in members)))
    except GenesisError as error:  # pragma: no cover - the checks above come first
        raise GovernanceError(error.message, code="governance-params") from None


def _operational(params: ChainParams) -> tuple[int, int, int, int, int, int]:
    return (params.block_interval_ms, params.block_bytes_max, params.block_txs_max,
            params.proposer_timeout_ms, params.p2pkh_version, params.p2sh_version)


def check_signatures(signed: SignedChange, signers: Genesis) -> tuple[str, ...]:
    """Every signature is by a distinct member of ``signers`` and verifies over the
    change id, and there are at least ``signers``' quorum of them (a majority)."""
    change_id = signed.change.change_id
    seen: list[str] = []
    for member_id, signature in signed.signatures:
        member = signers.member(member_id)
        if member is None:
            raise GovernanceError(f"signature by {member_id!r}, who is not a member",
                                  code="governance-signer-unknown")
        if member_id in seen:
            raise GovernanceError(f"{member_id} signed twice", code="governance-duplicate-signer")
        if not member.public_key.verify(signature, change_id):
            raise GovernanceError(f"signature of {member_id} does not verify",
                                  code="governance-signature-invalid")
        seen.append(member_id)
    if len(seen) < signers.params.quorum:
        raise GovernanceError(
            f"signed by {len(seen)} of {len(signers.members)} members; "
            f"{signers.params.quorum} needed",
            code="governance-minority",
        )
    return tuple(seen)


def check_signed_change(schedule: MembershipSchedule, signed: SignedChange, *,
                        height: int) -> Genesis:
    """Accept ``signed`` in the block at ``height`` or raise; return the new view.

    The signers are the members in force just before the change (the latest epoch:
    the current membership when no other change is pending).
    """
    change = signed.change
    if change.genesis_hash != schedule.genesis_hash:
        raise GovernanceError("change signed for another chain", code="governance-chain")
    if change.sequence != schedule.sequence + 1:
        raise GovernanceError(
            f"change number {change.sequence}; the next is {schedule.sequence + 1}",
            code="governance-sequence",
        )
    latest_start = schedule.epochs[-1].start_height
    earliest = max(height + ACTIVATION_DELAY_MIN_HEIGHTS, latest_start + 1)
    if not earliest <= change.effective_height <= height + ACTIVATION_DELAY_MAX_HEIGHTS:
        raise GovernanceError(
            f"effective height {change.effective_height} in a block at height {height}: "
            f"must be {earliest}..{height + ACTIVATION_DELAY_MAX_HEIGHTS}",
            code="governance-activation",
        )
    signers = schedule.latest
    view = amended_view(signers, change)
    check_signatures(signed, signers)
    return view


def apply_signed_change(schedule: MembershipSchedule, signed: SignedChange, *,
                        height: int) -> MembershipSchedule:
    """The schedule once the block at ``height`` carrying ``signed`` is committed."""
    view = check_signed_change(schedule, signed, height=height)
    change = signed.change
    return MembershipSchedule(
        schedule.genesis_hash,
        (*schedule.epochs, Epoch(change.effective_height, view, change.change_id)),
        change.sequence,
        sha256d(schedule.digest + change.change_id),
    )


def schedule_after_block(schedule: MembershipSchedule, height: int,
                         txs: Sequence[Transaction]) -> tuple[MembershipSchedule, tuple[str, ...]]:
    """The schedule after a committed block: its governance transactions applied in
    order. A committed block's changes were validated by a quorum; one that does not
    apply here (only a faulty majority could commit it) is skipped, and its txid
    returned, so every replica still computes the same schedule."""
    skipped: list[str] = []
    for tx in txs:
        if not is_governance_tx(tx):
            continue
        try:
            schedule = apply_signed_change(schedule, change_from_tx(tx), height=height)
        except GovernanceError:
            skipped.append(tx.txid)
    return schedule, tuple(skipped)


def envelope_views(schedule: MembershipSchedule, next_height: int) -> tuple[Genesis, ...]:
    """The memberships whose keys sign transaction envelopes read while ``next_height``
    is the next height to commit (decision 0062): the one in force there, then the
    latest scheduled one when it differs. A rotated member may sign with its new key
    from the block that carries the change, and with its old key until the change is in
    force; an added member may submit from that block; a removed one until it leaves."""
    in_force = schedule.at(next_height)
    latest = schedule.latest
    return (in_force,) if latest is in_force else (in_force, latest)


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """One epoch as a reader outside the chain stores it (the projection's ``membership``
    row, decision 0062): from ``start_height``, these members (id, SEC public key) in
    rotation order and these parameters (quorum, interval, bytes, txs, timeout)."""

    start_height: int
    members: tuple[tuple[str, bytes], ...]
    params: tuple[int, int, int, int, int]


def schedule_from_epochs(genesis: Genesis, genesis_hash: bytes,
                         records: Sequence[EpochRecord]) -> MembershipSchedule:
    """The schedule a reader rebuilds from stored epochs (decision 0062), checked: the
    first is genesis' own membership at height 0, start heights increase, every
    membership is 1..64 members with distinct keys and a majority quorum. Members keep
    the name, role and issuing right of their last entry (an added member: its id, no
    issuing right). Only the membership by height is meaningful: ``sequence`` counts the
    changes, the digest is not the chain's (it never enters a state hash)."""
    if not records:
        return schedule_from_genesis(genesis, genesis_hash)
    first = records[0]
    if first.start_height != 0 or first.members != tuple(
            (m.id, m.public_key.sec) for m in genesis.members):
        raise GovernanceError("the first stored epoch is not this genesis' membership",
                              code="governance-epochs")
    epochs = [Epoch(0, genesis)]
    known = {m.id: m for m in genesis.members}
    for record in records[1:]:
        if record.start_height <= epochs[-1].start_height:
            raise GovernanceError(f"epoch at height {record.start_height} is out of order",
                                  code="governance-epochs")
        view = _stored_view(epochs[-1].view, record, known)
        known.update({m.id: m for m in view.members})
        epochs.append(Epoch(record.start_height, view))
    return MembershipSchedule(genesis_hash, tuple(epochs), len(epochs) - 1)


def _stored_view(previous: Genesis, record: EpochRecord, known: dict[str, Member]) -> Genesis:
    members = []
    for member_id, sec in record.members:
        try:
            key = PublicKey.parse(sec)
        except ValidationError:
            raise GovernanceError(f"epoch at height {record.start_height}: key of "
                                  f"{member_id!r} does not parse",
                                  code="governance-epochs") from None
        old = known.get(member_id)
        members.append(Member(member_id, member_id, "member", key) if old is None else
                       Member(member_id, old.name, old.role, key, old.may_issue))
    keys = [m.public_key.compressed().sec for m in members]
    if not MEMBERS_MIN <= len(members) <= MEMBERS_MAX or len(set(keys)) != len(keys):
        raise GovernanceError(f"epoch at height {record.start_height}: {len(members)} "
                              "members or a shared key", code="governance-epochs")
    old_params = previous.params
    params = ChainParams(*record.params, old_params.p2pkh_version, old_params.p2sh_version)
    try:
        return Genesis(previous.chain_id, previous.time_ms, tuple(members), params,
                       previous.allocations,
                       tuple(k for k in previous.submit_keys
                             if any(m.id == k.member for m in members)))
    except GenesisError as error:
        raise GovernanceError(f"epoch at height {record.start_height}: {error.message}",
                              code="governance-epochs") from None


def membership_summary(view: Genesis) -> dict[str, object]:
    """A JSON-ready description of a membership (status output, proofs, the projection)."""
    params = view.params
    return {
        "members": [{"id": m.id, "public_key": m.public_key.sec.hex()} for m in view.members],
        "quorum": params.quorum,
        "block_interval_ms": params.block_interval_ms,
        "block_bytes_max": params.block_bytes_max,
        "block_txs_max": params.block_txs_max,
        "proposer_timeout_ms": params.proposer_timeout_ms,
    }

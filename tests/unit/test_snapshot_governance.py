"""Snapshots carry the membership schedule (decision 0103): a snapshot written after a
key rotation, a removal, an addition and a pending parameter change round-trips to the
same schedule and state hash; version-1 snapshots still load (with the genesis
schedule); an unknown version, a schedule whose digest or bounds do not check, or a
signature by a key neither the genesis nor the caller trusts is refused with its code.
Pure: the core only.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from ledger.governance import (
    ACTIVATION_DELAY_MIN_HEIGHTS,
    KIND_ADD,
    KIND_PARAMS,
    KIND_REMOVE,
    KIND_ROTATE,
    MembershipChange,
    MembershipSchedule,
    SignedChange,
    apply_signed_change,
    schedule_from_genesis,
)
from ledger.hashing import sha256d
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, ChainParams, Genesis, Member
from ledger.serialization import compact_size, var_bytes
from ledger.snapshot import (
    SNAPSHOT_DOMAIN_TAGS,
    SnapshotError,
    decode_snapshot,
    encode_schedule,
    encode_snapshot,
)
from ledger.state import LedgerState, state_from_genesis

pytestmark = pytest.mark.unit

KEYS = {n: PrivateKey(hashlib.sha256(b"snap-gov/" + n.encode()).digest()) for n in INSTITUTION_IDS}
ROTATED = PrivateKey(hashlib.sha256(b"snap-gov/rotated").digest())
NEWCOMER = PrivateKey(hashlib.sha256(b"snap-gov/newcomer").digest())
GENESIS = Genesis("capital-ledger-snap-gov", 0,
                  tuple(Member(n, n, "member", KEYS[n].public_key) for n in INSTITUTION_IDS),
                  ChainParams(quorum=3, block_interval_ms=100, proposer_timeout_ms=1_000),
                  ((b"\x51", 5_000),))
GENESIS_HASH = GENESIS.hash_le
WRITER = "koscom"  # rotates its key
HEIGHT = 40  # of the snapshot
HEAD_RECORD = b"head record (checked by the node's anchor, not here)"


def _signed(change: MembershipChange, signers: dict[str, PrivateKey]) -> SignedChange:
    signed = SignedChange(change)
    for member_id, key in signers.items():
        signed = signed.signed_by(member_id, key)
    return signed


def governed_schedule() -> MembershipSchedule:
    """Rotation of koscom (in force at 17), removal of securities-b (at 30), addition
    of a newcomer (at 41) and a parameter change (at 60): the last two pending at
    HEIGHT."""
    majority = {n: KEYS[n] for n in ("otc-operator", "surveillance", "securities-a")}
    delay = ACTIVATION_DELAY_MIN_HEIGHTS
    steps = [
        (1, KIND_ROTATE, 1 + delay, WRITER, Member(WRITER, WRITER, "member", ROTATED.public_key),
         None),
        (10, KIND_REMOVE, 30, "securities-b", None, None),
        (25, KIND_ADD, 25 + delay, "newcomer",
         Member("newcomer", "Newcomer", "broker", NEWCOMER.public_key, may_issue=True), None),
        (30, KIND_PARAMS, 60, "", None, ChainParams(3, 200, 1_000_000, 5_000, 2_000)),
    ]
    schedule = schedule_from_genesis(GENESIS)
    for sequence, (carried, kind, effective, member_id, member, params) in enumerate(steps, 1):
        change = MembershipChange(GENESIS_HASH, sequence, kind, effective, member_id, member,
                                  params)
        schedule = apply_signed_change(schedule, _signed(change, majority), height=carried)
    return schedule


def state_at(schedule: MembershipSchedule | None) -> LedgerState:
    genesis_state = state_from_genesis(GENESIS_HASH, GENESIS.allocations)
    return LedgerState(height=HEIGHT, head_hash=bytes(range(32)),
                       utxos=dict(genesis_state._utxos), bindings={}, supply={},
                       accumulator=genesis_state.accumulator,
                       native_total=genesis_state.native_total, script_index=None,
                       spent_recent={}, spent_journal=genesis_state._spent_journal,
                       schedule=schedule)


def snapshot_of(state: LedgerState, *, key: PrivateKey = ROTATED, version: int = 2) -> bytes:
    return encode_snapshot(state, genesis_hash=GENESIS_HASH, institution=WRITER, key=key,
                           chain_copy_end=1234, head_record=HEAD_RECORD, version=version)


def test_the_schedule_round_trips_with_pending_changes_and_their_heights() -> None:
    schedule = governed_schedule()
    state = state_at(schedule)
    snapshot = decode_snapshot(snapshot_of(state), GENESIS,
                               signer_keys=(ROTATED.public_key,))
    loaded = snapshot.state.schedule
    assert loaded is not None and snapshot.version == 2
    assert (loaded.sequence, loaded.digest) == (schedule.sequence, schedule.digest)
    assert [(e.start_height, e.change_id, e.view) for e in loaded.epochs] == \
        [(e.start_height, e.change_id, e.view) for e in schedule.epochs]
    assert snapshot.state_hash == state.state_hash == snapshot.state.state_hash
    # in force at the snapshot's height, and pending with their heights
    assert loaded.at(HEIGHT).member(WRITER).public_key == ROTATED.public_key  # type: ignore[union-attr]
    assert loaded.at(HEIGHT).member("securities-b") is None
    assert loaded.at(41).member("newcomer") is not None and loaded.at(41).params.quorum == 3
    assert loaded.at(60).params.block_interval_ms == 200
    assert loaded.at(60).params.p2sh_version == GENESIS.params.p2sh_version


def test_a_schedule_whose_digest_its_change_ids_do_not_give_is_refused() -> None:
    """The last change dropped but the digest not recomputed (re-signed, so only the
    schedule check can catch it)."""
    schedule = governed_schedule()
    shorter = MembershipSchedule(schedule.genesis_hash, schedule.epochs[:-1],
                                 schedule.sequence - 1,
                                 hashlib.sha256(b"unused").digest())
    full = snapshot_of(state_at(schedule))
    old_section = encode_schedule(schedule, GENESIS_HASH)
    assert old_section in full
    tampered_digest = _with_schedule(full, old_section, encode_schedule(shorter, GENESIS_HASH))
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(tampered_digest, GENESIS, signer_keys=(ROTATED.public_key,))
    assert caught.value.code == "snapshot-schedule"  # sequence and digest do not match


def _with_schedule(data: bytes, old: bytes, new: bytes) -> bytes:
    signed = data[:-32]
    body = signed[: len(signed) - 1 - signed[-1]].replace(old, new)
    signature = ROTATED.sign(hashlib.sha256(SNAPSHOT_DOMAIN_TAGS[2] + body).digest())
    resigned = body + signature + bytes([len(signature)])
    return resigned + hashlib.sha256(resigned).digest()


def test_a_consistent_but_different_schedule_fails_the_state_hash() -> None:
    """A whole schedule swapped for another self-consistent one (fewer changes, its
    own digest) is caught by the state hash, which covers the schedule's digest."""
    schedule = governed_schedule()
    shorter = MembershipSchedule(schedule.genesis_hash, schedule.epochs[:-1],
                                 schedule.sequence - 1, _digest_of(schedule.epochs[1:-1]))
    swapped = _with_schedule(snapshot_of(state_at(schedule)),
                             encode_schedule(schedule, GENESIS_HASH),
                             encode_schedule(shorter, GENESIS_HASH))
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(swapped, GENESIS, signer_keys=(ROTATED.public_key,))
    assert caught.value.code == "snapshot-state-hash"


def _digest_of(epochs: tuple[object, ...]) -> bytes:
    digest = bytes(32)
    for epoch in epochs:
        digest = sha256d(digest + epoch.change_id)  # type: ignore[attr-defined]
    return digest


@pytest.mark.parametrize("damage", ["start-not-increasing", "too-far-ahead", "no-members",
                                    "shared-key", "minority-quorum", "param-range"])
def test_a_schedule_out_of_bounds_is_refused(damage: str) -> None:
    schedule = governed_schedule()
    section = encode_schedule(schedule, GENESIS_HASH)
    bad = bytearray(section)
    first_epoch = 8 + 32 + 1
    members_at = first_epoch + 8 + 32 + 20
    if damage == "start-not-increasing":
        bad[first_epoch : first_epoch + 8] = struct.pack("<Q", 0)
    elif damage == "too-far-ahead":
        bad[first_epoch : first_epoch + 8] = struct.pack("<Q", HEIGHT + 2_000_000)
    elif damage == "minority-quorum":
        bad[first_epoch + 40 : first_epoch + 44] = struct.pack("<I", 2)
    elif damage == "param-range":
        bad[first_epoch + 44 : first_epoch + 48] = struct.pack("<I", 1)  # 1 ms interval
    else:
        members = list(schedule.epochs[1].view.members)
        old_members = compact_size(len(members)) + b"".join(map(_member_bytes, members))
        assert bytes(section[members_at : members_at + len(old_members)]) == old_members
        if damage == "no-members":
            members = []
        else:  # a fifth member holding the first one's key
            members[-1] = Member("twin", "twin", "member", members[0].public_key)
        new_members = compact_size(len(members)) + b"".join(map(_member_bytes, members))
        bad = bytearray(section[:members_at] + new_members
                        + section[members_at + len(old_members):])
    data = _with_schedule(snapshot_of(state_at(schedule)), section, bytes(bad))
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(data, GENESIS, signer_keys=(ROTATED.public_key,))
    assert caught.value.code == "snapshot-schedule", caught.value


def _member_bytes(member: Member) -> bytes:
    return (var_bytes(member.id.encode()) + var_bytes(member.name.encode())
            + var_bytes(member.role.encode()) + var_bytes(member.public_key.sec)
            + (b"\x01" if member.may_issue else b"\x00"))


def test_a_version_one_snapshot_still_loads_with_the_genesis_schedule() -> None:
    state = state_at(None)
    data = snapshot_of(state, key=KEYS[WRITER], version=1)
    assert data.startswith(b"CLSNAP\x00\x01")
    snapshot = decode_snapshot(data, GENESIS)
    assert snapshot.version == 1 and snapshot.state_hash == state.state_hash
    assert snapshot.state.schedule is not None and snapshot.state.schedule.sequence == 0
    assert snapshot.state.schedule.latest == GENESIS


def test_an_unknown_version_is_refused_with_its_own_code() -> None:
    data = snapshot_of(state_at(governed_schedule()))
    signed = b"CLSNAP\x00\x03" + data[8:-32]
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(signed + hashlib.sha256(signed).digest(), GENESIS)
    assert caught.value.code == "snapshot-version"


def test_a_rotated_key_signs_only_when_the_caller_trusts_it() -> None:
    """The genesis key of the member always verifies; a rotated key only when the caller
    (the node, holding that key) passes it: the snapshot's own schedule cannot vouch
    for the key that signs it."""
    data = snapshot_of(state_at(governed_schedule()))
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(data, GENESIS)
    assert caught.value.code == "snapshot-signature"
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(data, GENESIS, signer_keys=(NEWCOMER.public_key,))
    assert caught.value.code == "snapshot-signature"
    by_genesis_key = snapshot_of(state_at(governed_schedule()), key=KEYS[WRITER])
    assert decode_snapshot(by_genesis_key, GENESIS).state.schedule == \
        decode_snapshot(data, GENESIS, signer_keys=(ROTATED.public_key,)).state.schedule

"""Unit tests of ledger.governance and of its use by the state and the consensus
machine: a change needs a majority of the current members, applies from its stated
height, and every replica computes the same membership at every height."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from ledger.block import Block, make_block, proposer_for, sign_vote
from ledger.consensus import (
    Commit,
    ConsensusConfig,
    ConsensusState,
    ProposalReceived,
    RecordEvidence,
    VoteReceived,
    initial_state,
    step,
)
from ledger.errors import ValidationError
from ledger.governance import (
    ACTIVATION_DELAY_MIN_HEIGHTS,
    KIND_ADD,
    KIND_PARAMS,
    KIND_REMOVE,
    KIND_ROTATE,
    GovernanceError,
    MembershipChange,
    SignedChange,
    apply_signed_change,
    change_from_tx,
    governance_tx,
    is_governance_tx,
    schedule_after_block,
    schedule_from_genesis,
)
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, ChainParams, Genesis, Member
from ledger.state import LedgerRules, state_from_genesis, validate_block
from ledger.tx import Transaction

pytestmark = pytest.mark.unit

KEYS = {n: PrivateKey(hashlib.sha256(b"gov-key/" + n.encode()).digest()) for n in INSTITUTION_IDS}
NEW_KEY = PrivateKey(hashlib.sha256(b"gov-key/rotated").digest())
NEWCOMER_KEY = PrivateKey(hashlib.sha256(b"gov-key/newcomer").digest())
PARAMS = ChainParams(quorum=3, block_interval_ms=100, proposer_timeout_ms=1_000)
GENESIS = Genesis("capital-ledger-gov", 0,
                  tuple(Member(n, n, "member", KEYS[n].public_key) for n in INSTITUTION_IDS),
                  PARAMS)
GENESIS_HASH = GENESIS.hash_le
E = 1 + ACTIVATION_DELAY_MIN_HEIGHTS  # earliest effective height for a change in block 1


def change(kind: str = KIND_ROTATE, *, sequence: int = 1, effective: int = E,
           member_id: str = "koscom", key: PrivateKey = NEW_KEY,
           params: ChainParams | None = None) -> MembershipChange:
    member = None
    if kind == KIND_ROTATE:
        member = Member(member_id, member_id, "member", key.public_key)
    elif kind == KIND_ADD:
        member = Member(member_id, "Newcomer", "member", key.public_key)
    return MembershipChange(GENESIS_HASH, sequence, kind, effective,
                            "" if kind == KIND_PARAMS else member_id, member, params)


def signed_by(c: MembershipChange, *signers: str) -> SignedChange:
    signed = SignedChange(c)
    for signer in signers:
        signed = signed.signed_by(signer, KEYS[signer])
    return signed


MAJORITY = ("otc-operator", "surveillance", "securities-a")
SCHEDULE = schedule_from_genesis(GENESIS)


# ------------------------------------------------------------------------ encoding


def test_signed_change_round_trips_through_its_transaction() -> None:
    signed = signed_by(change(), *MAJORITY)
    tx = governance_tx(signed)
    parsed = Transaction.parse(tx.serialize())
    assert is_governance_tx(parsed) and change_from_tx(parsed) == signed
    assert SignedChange.parse(signed.serialize()) == signed


def test_change_id_covers_every_field_and_the_chain() -> None:
    base = change()
    variants = [dataclasses.replace(base, sequence=2),
                dataclasses.replace(base, effective_height=E + 1),
                dataclasses.replace(base, genesis_hash=bytes(32)),
                change(key=NEWCOMER_KEY), change(KIND_REMOVE)]
    assert len({v.change_id for v in [base, *variants]}) == 1 + len(variants)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 40, b"\xff" * 9_001])
def test_malformed_payload_is_refused_with_a_code(payload: bytes) -> None:
    with pytest.raises(GovernanceError) as caught:
        SignedChange.parse(payload)
    assert caught.value.code == "governance-malformed"


# ------------------------------------------------------------------------ the rules


def test_rotation_signed_by_a_majority_applies_from_its_height() -> None:
    after = apply_signed_change(SCHEDULE, signed_by(change(), *MAJORITY), height=1)
    assert after.at(E - 1).member("koscom").public_key == KEYS["koscom"].public_key  # type: ignore[union-attr]
    assert after.at(E).member("koscom").public_key == NEW_KEY.public_key  # type: ignore[union-attr]
    assert after.sequence == 1 and after.digest != SCHEDULE.digest


def test_removal_lowers_the_quorum_and_addition_raises_it() -> None:
    removed = apply_signed_change(SCHEDULE, signed_by(change(KIND_REMOVE, member_id="securities-b"),
                                                      *MAJORITY), height=1)
    view = removed.at(E)
    assert len(view.members) == 4 and view.params.quorum == 3
    assert view.member("securities-b") is None and removed.at(E - 1).member("securities-b")
    added = apply_signed_change(
        removed, signed_by(change(KIND_ADD, sequence=2, effective=E + 1,
                                  member_id="securities-c", key=NEWCOMER_KEY), *MAJORITY),
        height=2)
    assert [m.id for m in added.at(E + 1).members][-1] == "securities-c"
    assert added.at(E + 1).params.quorum == 3  # 5 members again


@pytest.mark.parametrize(
    ("signed", "height", "code"),
    [
        (signed_by(change(), "otc-operator", "surveillance"), 1, "governance-minority"),
        (SignedChange(change(), (*signed_by(change(), *MAJORITY).signatures,
                                 signed_by(change(), "otc-operator").signatures[0])), 1,
         "governance-duplicate-signer"),
        (SignedChange(change(), (("outsider", NEW_KEY.sign(change().change_id)),)), 1,
         "governance-signer-unknown"),
        (SignedChange(change(), (("koscom", NEW_KEY.sign(change().change_id)),)), 1,
         "governance-signature-invalid"),
        (signed_by(change(sequence=2), *MAJORITY), 1, "governance-sequence"),
        (signed_by(change(effective=E - 1), *MAJORITY), 1, "governance-activation"),
        (signed_by(dataclasses.replace(change(), genesis_hash=bytes(32)), *MAJORITY), 1,
         "governance-chain"),
        (signed_by(change(KIND_REMOVE, member_id="nobody"), *MAJORITY), 1,
         "governance-member-unknown"),
        (signed_by(change(key=KEYS["surveillance"]), *MAJORITY), 1, "governance-key-reused"),
        (signed_by(change(KIND_ADD, member_id="koscom", key=NEWCOMER_KEY), *MAJORITY), 1,
         "governance-member-exists"),
        (signed_by(change(KIND_PARAMS, params=ChainParams(2)), *MAJORITY), 1,
         "governance-params"),
        (signed_by(change(KIND_PARAMS, params=ChainParams(3, block_interval_ms=1)),
                   *MAJORITY), 1, "governance-params"),
    ],
)
def test_bad_changes_are_refused_with_their_code(signed: SignedChange, height: int,
                                                 code: str) -> None:
    with pytest.raises(GovernanceError) as caught:
        apply_signed_change(SCHEDULE, signed, height=height)
    assert caught.value.code == code


def test_a_pending_change_is_signed_by_the_membership_it_amends() -> None:
    """The second change is checked against the membership after the first: a removed
    member's signature no longer counts, a rotated member signs with its new key."""
    first = apply_signed_change(SCHEDULE, signed_by(change(), *MAJORITY), height=1)
    second = change(KIND_PARAMS, sequence=2, effective=E + 5,
                    params=ChainParams(4, block_interval_ms=50, proposer_timeout_ms=2_000))
    old_key = signed_by(second, "otc-operator", "surveillance").signed_by("koscom", KEYS["koscom"])
    with pytest.raises(GovernanceError) as caught:
        apply_signed_change(first, old_key, height=2)
    assert caught.value.code == "governance-signature-invalid"
    new_key = signed_by(second, "otc-operator", "surveillance").signed_by("koscom", NEW_KEY)
    after = apply_signed_change(first, new_key, height=2)
    assert after.at(E + 5).params.quorum == 4 and after.at(E + 5).params.block_interval_ms == 50


def test_schedule_after_block_skips_what_does_not_apply() -> None:
    good = governance_tx(signed_by(change(), *MAJORITY))
    bad = governance_tx(signed_by(change(sequence=7), *MAJORITY))
    after, skipped = schedule_after_block(SCHEDULE, 1, [bad, good])
    assert after.sequence == 1 and skipped == (bad.txid,)


# ------------------------------------------------------------------------ the state


def test_state_validates_a_governance_block_and_its_hash_records_the_change() -> None:
    state = state_from_genesis(GENESIS_HASH, (), schedule=SCHEDULE)
    before = state.state_hash
    assert before == state_from_genesis(GENESIS_HASH, ()).state_hash  # unchanged without one
    good = block(1, [governance_tx(signed_by(change(), *MAJORITY))])
    delta = validate_block(state, good, LedgerRules())
    assert delta.schedule is not None and delta.schedule.sequence == 1
    minority = block(1, [governance_tx(signed_by(change(), "otc-operator"))])
    with pytest.raises(ValidationError) as caught:
        validate_block(state, minority, LedgerRules())
    assert caught.value.code == "governance-minority"
    without = state_from_genesis(GENESIS_HASH, ())
    with pytest.raises(ValidationError) as unavailable:
        validate_block(without, good, LedgerRules())
    assert unavailable.value.code == "governance-unavailable"


# ------------------------------------------------------------------------ consensus


def block(height: int, txs: list[Transaction], prev: bytes = GENESIS_HASH,
          view: Genesis = GENESIS, keys: dict[str, PrivateKey] = KEYS) -> Block:
    proposer = proposer_for(view, height, 0)
    return make_block(keys[proposer], height=height, prev_hash=prev, time_ms=height,
                      proposer=proposer, round_=0, txs=txs)


def filler(n: int) -> Transaction:
    from ledger.tx import OutPoint, TxIn, TxOut
    return Transaction(1, (TxIn(OutPoint(hashlib.sha256(n.to_bytes(4, "little")).digest(), 0),
                                b"\x51"),), (TxOut(0, b"\x51"),))


def commit_height(state: ConsensusState, b: Block, voters: dict[str, PrivateKey]
                  ) -> tuple[ConsensusState, list[object]]:
    actions: list[object] = []
    state, out = step(state, ProposalReceived(b))
    actions += out
    for voter, key in voters.items():
        v = sign_vote(key, GENESIS_HASH, voter=voter, height=b.height, round_=0, kind="ack",
                      block_hash=b.hash)
        state, out = step(state, VoteReceived(v))
        actions += out
    return state, actions


def run_to(state: ConsensusState, last: int, voters: dict[str, PrivateKey],
           keys: dict[str, PrivateKey]) -> ConsensusState:
    while state.committed_height < last:
        height = state.committed_height + 1
        b = block(height, [filler(height)], state.head_hash, state.view(height), keys)
        state, _ = commit_height(state, b, voters)
        assert state.committed_height == height
    return state


def test_consensus_refuses_the_old_key_after_a_rotation() -> None:
    state = initial_state(ConsensusConfig(GENESIS, None, GENESIS_HASH), now_ms=0)
    carrier = block(1, [governance_tx(signed_by(change(), *MAJORITY))])
    state, actions = commit_height(state, carrier, {v: KEYS[v] for v in MAJORITY})
    assert any(isinstance(a, Commit) for a in actions) and state.schedule is not None
    assert state.schedule.sequence == 1
    state = run_to(state, E - 1, {v: KEYS[v] for v in MAJORITY}, KEYS)
    rotated = {**KEYS, "koscom": NEW_KEY}
    b = block(E, [filler(E)], state.head_hash, state.view(E), rotated)
    old = {"koscom": KEYS["koscom"], "otc-operator": KEYS["otc-operator"],
           "surveillance": KEYS["surveillance"]}
    state, actions = commit_height(state, b, old)
    kinds = [a.kind for a in actions if isinstance(a, RecordEvidence)]
    assert kinds == ["vote-forged"] and state.committed_height == E - 1
    state, actions = commit_height(state, b, {"koscom": NEW_KEY})
    assert state.committed_height == E  # koscom's new key completes the quorum


def test_consensus_quorum_follows_a_removal() -> None:
    state = initial_state(ConsensusConfig(GENESIS, None, GENESIS_HASH), now_ms=0)
    removal = signed_by(change(KIND_REMOVE, member_id="securities-b"), *MAJORITY)
    state, _ = commit_height(state, block(1, [governance_tx(removal)]),
                             {v: KEYS[v] for v in MAJORITY})
    state = run_to(state, E - 1, {v: KEYS[v] for v in MAJORITY}, KEYS)
    view = state.view(E)
    assert len(view.members) == 4 and view.params.quorum == 3
    b = block(E, [filler(E)], state.head_hash, view)
    state, actions = commit_height(state, b, {"securities-b": KEYS["securities-b"],
                                              "koscom": KEYS["koscom"],
                                              "otc-operator": KEYS["otc-operator"]})
    kinds = [a.kind for a in actions if isinstance(a, RecordEvidence)]
    assert kinds == ["vote-unknown-voter"] and state.committed_height == E - 1
    state, _ = commit_height(state, b, {"securities-a": KEYS["securities-a"]})
    assert state.committed_height == E


def test_votes_beyond_the_known_membership_wait_in_log_order() -> None:
    """Decided heights without bodies: votes for a height whose membership is not final
    are held, then counted in order once the bodies commit."""
    state = initial_state(ConsensusConfig(GENESIS, None, GENESIS_HASH), now_ms=0)
    voters = {v: KEYS[v] for v in MAJORITY}
    blocks: list[Block] = []
    prev = GENESIS_HASH
    for height in range(1, ACTIVATION_DELAY_MIN_HEIGHTS + 3):
        b = block(height, [filler(height)], prev)
        blocks.append(b)
        prev = b.hash
        for voter, key in voters.items():
            v = sign_vote(key, GENESIS_HASH, voter=voter, height=height, round_=0,
                          kind="ack", block_hash=b.hash)
            state, _ = step(state, VoteReceived(v))
    assert state.held_votes and state.decided_full
    assert state.vote_height == ACTIVATION_DELAY_MIN_HEIGHTS + 1
    for b in blocks:
        state, _ = step(state, ProposalReceived(b))
    assert state.committed_height == len(blocks) and not state.held_votes

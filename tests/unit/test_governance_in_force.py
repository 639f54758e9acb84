"""Unit tests of the readers that follow the membership in force at each height
(decision 0062): the schedule rebuilt from the projection's ``membership`` rows, the
consensus-evidence observer judging votes by it, the envelope keys intake accepts and
the client's finality quorum."""

from __future__ import annotations

import json

import pytest

from ledger.attestation import FinalityTally
from ledger.block import sign_vote
from ledger.governance import (
    KIND_ADD,
    KIND_REMOVE,
    EpochRecord,
    GovernanceError,
    MembershipSchedule,
    apply_signed_change,
    envelope_views,
    schedule_from_epochs,
)
from ledger.keys import PrivateKey
from ledger.state import state_from_genesis
from ledger.tx import Transaction
from streams.kafka import codec
from streams.kafka.logio import LogRecord
from streams.kafka.records import signed_tx_submitted_record, vote_record
from streams.node.intake import Verifier, envelope_lookup, intake_records
from streams.projections.consensus_evidence import (
    EvidenceProjector,
    epoch_record,
    membership_known_through,
    observe,
    observer,
)
from streams.projections.projector import membership_row
from tests.unit.test_governance import (
    GENESIS,
    GENESIS_HASH,
    KEYS,
    MAJORITY,
    NEW_KEY,
    NEWCOMER_KEY,
    SCHEDULE,
    E,
    change,
    filler,
    signed_by,
)

pytestmark = pytest.mark.unit

ROTATED = apply_signed_change(SCHEDULE, signed_by(change(), *MAJORITY), height=1)
HEAD = bytes(range(32))


def rows_of(schedule: MembershipSchedule) -> list[EpochRecord]:
    """The epochs as the projector writes them and the evidence projector reads them."""
    rows = []
    for epoch in schedule.epochs:
        row = membership_row(epoch.view, start_height=epoch.start_height)
        rows.append(epoch_record((row.start_height, json.loads(row.members), *row.params)))
    return rows


def grown() -> MembershipSchedule:
    """Rotation from E, newcomer added from E + 5, securities-b removed from E + 9."""
    added = apply_signed_change(ROTATED, signed_by(
        change(KIND_ADD, sequence=2, effective=E + 5, member_id="newcomer", key=NEWCOMER_KEY),
        *MAJORITY), height=2)
    # the rotated koscom signs with its new key from here
    removal = change(KIND_REMOVE, sequence=3, effective=E + 9, member_id="securities-b")
    signed = signed_by(removal, "otc-operator", "surveillance", "securities-a")
    signed = signed.signed_by("koscom", NEW_KEY)
    return apply_signed_change(added, signed, height=3)


# ------------------------------------------------------------- the stored schedule


def test_schedule_from_the_membership_rows_equals_the_chains() -> None:
    chain = grown()
    stored = schedule_from_epochs(GENESIS, GENESIS_HASH, rows_of(chain))
    for height in (0, 1, E - 1, E, E + 4, E + 5, E + 8, E + 9, E + 100):
        ours, theirs = stored.at(height), chain.at(height)
        assert [(m.id, m.public_key) for m in ours.members] == [
            (m.id, m.public_key) for m in theirs.members], height
        assert ours.params == theirs.params
    assert stored.sequence == 3 and stored.at(E).member("koscom").public_key == NEW_KEY.public_key  # type: ignore[union-attr]
    assert schedule_from_epochs(GENESIS, GENESIS_HASH, []).at(E) is GENESIS


@pytest.mark.parametrize("damage", ["foreign-genesis", "order", "key", "quorum", "shared"])
def test_damaged_membership_rows_are_refused(damage: str) -> None:
    rows = rows_of(grown())
    first, second = rows[0], rows[1]
    if damage == "foreign-genesis":
        rows[0] = EpochRecord(0, second.members, first.params)
    elif damage == "order":
        rows[2] = EpochRecord(second.start_height, rows[2].members, rows[2].params)
    elif damage == "key":
        rows[1] = EpochRecord(second.start_height, (("koscom", b"\x02" + bytes(32)),),
                              (1, *second.params[1:]))
    elif damage == "quorum":
        rows[1] = EpochRecord(second.start_height, second.members, (2, *second.params[1:]))
    else:
        rows[1] = EpochRecord(second.start_height, (*second.members, ("x", second.members[0][1])),
                              second.params)
    with pytest.raises(GovernanceError) as refused:
        schedule_from_epochs(GENESIS, GENESIS_HASH, rows)
    assert refused.value.code == "governance-epochs"


def test_a_row_that_does_not_decode_is_refused() -> None:
    with pytest.raises(GovernanceError):
        epoch_record((5, [{"id": "a"}], 3, 1, 1, 1, 1))
    assert membership_known_through(40) == 56


# ----------------------------------------------------------- consensus evidence


def vote(voter: str, key: PrivateKey, height: int, block: bytes = HEAD) -> LogRecord:
    signed = sign_vote(key, GENESIS_HASH, voter=voter, height=height, round_=0, kind="ack",
                       block_hash=block)
    return LogRecord(0, None, codec.encode("VoteCast", vote_record(signed, now_ms=1)), 0)


def test_the_observer_judges_each_vote_by_the_membership_in_force() -> None:
    machine = observer(GENESIS, E - 1, HEAD, ROTATED)
    machine, new_key = observe(machine, vote("koscom", NEW_KEY, E))
    assert new_key.row.evidence is None
    machine, _ = observe(machine, vote("otc-operator", KEYS["otc-operator"], E))
    machine, third = observe(machine, vote("surveillance", KEYS["surveillance"], E))
    assert third.decided == (E, HEAD) and machine.schedule is ROTATED  # kept after the reset
    machine, retired = observe(machine, vote("koscom", KEYS["koscom"], E + 1))
    _, outsider = observe(machine, vote("newcomer", NEWCOMER_KEY, E + 1))
    assert (retired.row.evidence, outsider.row.evidence) == ("vote-forged", "vote-unknown-voter")
    # before the change's height the old key is the member's, the new one a forgery
    before = observer(GENESIS, E - 2, HEAD, ROTATED)
    assert observe(before, vote("koscom", KEYS["koscom"], E - 1))[1].row.evidence is None
    assert observe(before, vote("koscom", NEW_KEY, E - 1))[1].row.evidence == "vote-forged"
    # the genesis membership alone (what the table used to start from): a false alarm
    genesis_only = observer(GENESIS, E - 1, HEAD)
    assert observe(genesis_only, vote("koscom", NEW_KEY, E))[1].row.evidence == "vote-forged"


async def test_votes_past_the_known_membership_wait_for_the_projection() -> None:
    projector = EvidenceProjector(GENESIS, bootstrap="unused:9092", dsn="unused")
    machine = observer(GENESIS, 20, HEAD, ROTATED)
    records = [vote("koscom", NEW_KEY, 21)]
    written = await projector._batch(None, machine, records, known=20)  # type: ignore[arg-type]
    assert written is None and projector.stats.waiting and projector._buffer == records


# ------------------------------------------------------------------- envelopes


def test_envelope_keys_follow_the_schedule() -> None:
    def keys(next_height: int) -> set[tuple[str, bytes]]:
        return {(m.id, m.public_key.sec) for view in envelope_views(grown(), next_height)
                for m in view.members}

    early = keys(2)  # every change committed, none in force yet
    assert ("koscom", KEYS["koscom"].public_key.sec) in early
    assert ("koscom", NEW_KEY.public_key.sec) in early  # usable from the carrying block
    assert ("newcomer", NEWCOMER_KEY.public_key.sec) in early
    late = keys(E + 9)
    assert ("koscom", KEYS["koscom"].public_key.sec) not in late  # retired
    assert "securities-b" not in {member for member, _ in late}
    assert len(envelope_views(SCHEDULE, 5)) == 1


def submitted(offset: int, submitter: str, key: PrivateKey) -> LogRecord:
    value = codec.encode("TxSubmitted", signed_tx_submitted_record(
        filler(offset).serialize(), key=key, genesis_hash=GENESIS_HASH, submitter=submitter,
        idempotency_key=f"k{offset}", now_ms=1))
    return LogRecord(offset, None, value, 0)


def test_intake_accepts_rotated_and_added_members_in_their_own_name() -> None:
    state = state_from_genesis(GENESIS_HASH, (), schedule=grown())
    assert len(envelope_lookup(GENESIS, state)) == 2
    records = [submitted(0, "koscom", NEW_KEY), submitted(1, "koscom", KEYS["koscom"]),
               submitted(2, "newcomer", NEWCOMER_KEY), submitted(3, "newcomer", NEW_KEY),
               submitted(4, "stranger", NEWCOMER_KEY)]
    outcomes = intake_records(records, genesis=GENESIS, genesis_hash=GENESIS_HASH, state=state,
                              pending_outputs={}, verifier=Verifier(1))
    codes = [o.candidate.error_code if o.candidate else "none" for o in outcomes]
    assert codes == ["", "", "", "envelope-signature", "envelope-submitter-unknown"]
    genesis_state = state_from_genesis(GENESIS_HASH, ())  # no schedule: genesis keys only
    refused = intake_records(records[:1], genesis=GENESIS, genesis_hash=GENESIS_HASH,
                             state=genesis_state, pending_outputs={}, verifier=Verifier(1))
    assert refused[0].candidate is not None
    assert refused[0].candidate.error_code == "envelope-signature"


# --------------------------------------------------------------------- finality


def test_finality_counts_against_the_quorum_in_force() -> None:
    tally = FinalityTally(3)
    block = b"\x01" * 32
    assert not tally.add(7, block, "a", quorum=4)
    assert not any(tally.add(7, block, who, quorum=4) for who in ("b", "c"))
    assert tally.add(7, block, "d", quorum=4)  # 4 of 6 members, not the genesis 3
    assert not tally.add(8, block, "a", quorum=2) and tally.add(8, block, "b", quorum=2)
    assert tally.add(9, block, "a") is False and tally.is_final(7)


# --------------------------------------------------------------------- issuance


def test_a_member_added_as_issuer_issues_from_its_height() -> None:
    from ledger.governance import Epoch
    from ledger.membership import ChainParams, Genesis, Member
    from ledger.state import LedgerRules, apply_block, rules_in_force
    from tests.unit.test_state import (
        ALICE,
        ALLOCATIONS,
        BOND,
        ISSUER,
        MALLORY,
        asset_id,
        block_on,
        build_marker,
        gen_out,
        refused,
        spend,
        spk,
    )
    from tests.unit.test_state import (
        GENESIS_HASH as STATE_GENESIS,
    )

    founders = tuple(Member(f"m{i}", f"M{i}", "broker", key.public_key, may_issue=key is ISSUER)
                     for i, key in enumerate((ISSUER, ALICE)))
    genesis = Genesis("issuers", 0, founders, ChainParams(quorum=2))
    joined = Genesis("issuers", 0, (*founders, Member("m2", "M2", "broker",
                                                      MALLORY.public_key, may_issue=True)),
                     ChainParams(quorum=2))
    rules = LedgerRules.from_genesis(genesis)
    schedule = MembershipSchedule(STATE_GENESIS, (Epoch(0, genesis), Epoch(2, joined)))
    state = state_from_genesis(STATE_GENESIS, ALLOCATIONS, schedule=schedule)

    def newcomer_issues() -> Transaction:
        return spend(state, [gen_out(3)], [(spk(MALLORY), 0),
                                           (build_marker([10], BOND.reference()), 0),
                                           (spk(MALLORY), 100)])

    error = refused(state, [newcomer_issues()], rules)  # height 1: not a member yet
    assert error.code == "asset-issuer-not-member"
    state = apply_block(state, block_on(state, [spend(state, [gen_out(1)],
                                                      [(spk(ALICE), 5_000)])]), rules)
    state = apply_block(state, block_on(state, [newcomer_issues()]), rules)  # height 2
    assert state.height == 2 and state.supply(asset_id(spk(MALLORY))) == 10
    assert rules_in_force(rules, genesis) is rules  # nothing to add: the same rules
    assert spk(MALLORY) in rules_in_force(rules, joined).issuer_scripts

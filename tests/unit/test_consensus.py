"""Unit tests of ledger.consensus: the state machine's rules, one at a time."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.block import Block, QuorumCertificate, Vote, make_block, proposer_for, sign_vote
from ledger.consensus import (
    PROPOSALS_BUFFERED_MAX,
    Action,
    CastVote,
    CertifiedBlockReceived,
    Commit,
    ConsensusConfig,
    ConsensusState,
    EnterRound,
    Event,
    ProposalReceived,
    ProposalValidated,
    Propose,
    RecordEvidence,
    Tick,
    TxPoolChanged,
    ValidateProposal,
    VoteReceived,
    initial_state,
    should_cut_block,
    step,
    wake_at_ms,
)
from ledger.governance import ACTIVATION_DELAY_MIN_HEIGHTS
from ledger.hashing import sha256d
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, ChainParams, Genesis, Member
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

KEYS = {name: PrivateKey(hashlib.sha256(b"unit-key/" + name.encode()).digest())
        for name in INSTITUTION_IDS}
OUTSIDER = PrivateKey(hashlib.sha256(b"unit-key/outsider").digest())
PARAMS = ChainParams(quorum=3, block_interval_ms=100, proposer_timeout_ms=1_000,
                     block_txs_max=50, block_bytes_max=100_000)
GENESIS = Genesis("capital-ledger-unit", 0,
                  tuple(Member(n, n, "member", KEYS[n].public_key) for n in INSTITUTION_IDS),
                  PARAMS)
GENESIS_HASH = GENESIS.hash_le
P1 = proposer_for(GENESIS, 1, 0)  # surveillance: proposer of height 1, round 0
P1R1 = proposer_for(GENESIS, 1, 1)
ME = "securities-b"
assert ME not in (P1, P1R1)


def tx(n: int) -> Transaction:
    return Transaction(1, (TxIn(OutPoint(sha256d(n.to_bytes(4, "little")), 0), b"\x51"),),
                       (TxOut(0, b"\x51"),))


def block(height: int = 1, round_: int = 0, prev: bytes = GENESIS_HASH, n: int = 1,
          proposer: str | None = None, key: PrivateKey | None = None) -> Block:
    proposer = proposer or proposer_for(GENESIS, height, round_)
    return make_block(key or KEYS[proposer], height=height, prev_hash=prev, time_ms=5,
                      proposer=proposer, round_=round_, txs=[tx(n), tx(n + 1)])


def vote(voter: str, kind: str, height: int = 1, round_: int = 0,
         block_hash: bytes = bytes(32), reason: str = "") -> Vote:
    return sign_vote(KEYS[voter], GENESIS_HASH, voter=voter, height=height, round_=round_,
                     kind=kind, block_hash=block_hash, reason_code=reason)


def machine(me: str | None = ME) -> ConsensusState:
    return initial_state(ConsensusConfig(GENESIS, me, GENESIS_HASH), now_ms=0)


def run(state: ConsensusState, *events: Event) -> tuple[ConsensusState, list[Action]]:
    actions: list[Action] = []
    for event in events:
        state, new = step(state, event)
        actions.extend(new)
    return state, actions


def of(kind: type, actions: list[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def acks(b: Block, voters: tuple[str, ...]) -> list[Event]:
    return [VoteReceived(vote(v, "ack", b.height, b.header.round, b.hash)) for v in voters]


def timeouts(voters: tuple[str, ...], height: int = 1, round_: int = 0) -> list[Event]:
    return [VoteReceived(vote(v, "timeout", height, round_)) for v in voters]


POOL = TxPoolChanged(pending_tx_count=2, pending_bytes=200, oldest_pending_ms=0)


# --------------------------------------------------------------------- block cut rule


@pytest.mark.parametrize(
    ("now_ms", "count", "size", "oldest", "expected"),
    [
        (1_000, 0, 0, None, False),  # never an empty block
        (50, 1, 100, 0, False),  # a lone tx waits for the interval
        (100, 1, 100, 0, True),  # ... and no longer
        (10, 1, 100_000, 0, True),  # the pool fills a block by bytes: cut at once
        (10, 50, 5_000, 0, True),  # ... or by tx count
        (150, 3, 300, 100, False),  # the interval counts from the oldest pending tx
    ],
)
def test_should_cut_block(now_ms: int, count: int, size: int, oldest: int | None,
                          expected: bool) -> None:
    assert should_cut_block(now_ms=now_ms, pending_tx_count=count, pending_bytes=size,
                            oldest_pending_ms=oldest, params=PARAMS) is expected


def test_only_the_eligible_proposer_proposes_after_the_interval() -> None:
    proposer, _ = run(machine(P1), POOL)
    proposer, early = run(proposer, Tick(50))
    assert not of(Propose, early)
    proposer, actions = run(proposer, Tick(100))
    assert of(Propose, actions) == [Propose(1, 0, GENESIS_HASH)]
    _, again = run(proposer, Tick(200))
    assert not of(Propose, again)  # once per round
    _, other = run(machine(ME), POOL, Tick(100))
    assert not of(Propose, other)


# ------------------------------------------------------------------ the happy path


def test_validate_vote_commit() -> None:
    b = block()
    state, actions = run(machine(), ProposalReceived(b))
    assert of(ValidateProposal, actions) == [ValidateProposal(b)]
    state, actions = run(state, ProposalValidated(1, 0, b.hash, None))
    assert of(CastVote, actions) == [CastVote(1, 0, "ack", b.hash)]
    votes = acks(b, ("otc-operator", "surveillance", "securities-a", ME))
    state, actions = run(state, *votes[:2])
    assert not of(Commit, actions)
    state, actions = run(state, votes[2])
    commits = of(Commit, actions)
    assert len(commits) == 1
    commit = commits[0]
    assert isinstance(commit, Commit) and commit.block == b
    assert commit.qc.voters == ("otc-operator", "surveillance", "securities-a")
    assert EnterRound(2, 0) in actions
    assert (state.committed_height, state.head_hash, state.vote_height) == (1, b.hash, 2)
    state, late = run(state, votes[3])  # a late fourth ack changes nothing
    assert not late and state.committed_height == 1


def test_next_proposer_waits_for_the_pool_after_a_commit() -> None:
    """The commit of height h and the proposal of h+1 must not use the pool figures of
    before the commit: they still count the txs the committed block just decided."""
    b = block()
    p2 = proposer_for(GENESIS, 2, 0)
    state = initial_state(ConsensusConfig(GENESIS, p2, GENESIS_HASH), now_ms=0)
    state, _ = run(state, POOL, Tick(500), ProposalReceived(b),
                   ProposalValidated(1, 0, b.hash, None))
    others = tuple(m for m in INSTITUTION_IDS if m != p2)[:3]
    state, actions = run(state, *acks(b, others))
    assert of(Commit, actions) and not of(Propose, actions)
    assert not state.my_proposed
    state, actions = run(state, TxPoolChanged(1, 100, 400))
    assert of(Propose, actions) == [Propose(2, 0, b.hash)]


def test_a_proposal_that_arrived_gets_a_full_timeout_for_validation() -> None:
    """The round timer detects a silent proposer; once the proposal is here, a slow
    validation must not be abandoned at the round's original deadline."""
    b = block()
    state, actions = run(machine(), POOL, Tick(0), Tick(1_000), ProposalReceived(b))
    assert of(ValidateProposal, actions) and not of(CastVote, actions)
    state, actions = run(state, Tick(1_500))  # past the silent-proposer deadline (1,100)
    assert not of(CastVote, actions)
    state, actions = run(state, Tick(2_000))  # a full timeout after the proposal arrived
    assert of(CastVote, actions) == [CastVote(1, 0, "timeout", bytes(32))]


def test_nack_carries_the_reason_and_duplicates_are_harmless() -> None:
    b = block()
    state, _ = run(machine(), ProposalReceived(b), ProposalReceived(b))
    state, actions = run(state, ProposalValidated(1, 0, b.hash, "double-spend"))
    assert of(CastVote, actions) == [CastVote(1, 0, "nack", b.hash, "double-spend")]
    same = acks(b, ("otc-operator",))[0]
    state, actions = run(state, same, same, same)
    assert not of(RecordEvidence, actions) and len(state.ack_votes) == 1


def test_proposal_with_wrong_links_is_nacked_without_asking_the_shell() -> None:
    b = block(prev=b"\x01" * 32)
    _, actions = run(machine(), ProposalReceived(b))
    assert not of(ValidateProposal, actions)
    assert of(CastVote, actions) == [CastVote(1, 0, "nack", b.hash, "block-prev-hash")]


# ----------------------------------------------------------- timeouts, view change


def test_timeout_then_no_ack_then_round_change() -> None:
    state, _ = run(machine(), POOL)
    deadline = PARAMS.block_interval_ms + PARAMS.proposer_timeout_ms
    state, actions = run(state, Tick(deadline - 1))
    assert not of(CastVote, actions)
    state, actions = run(state, Tick(deadline))
    assert of(CastVote, actions) == [CastVote(1, 0, "timeout", bytes(32))]
    # The proposal arrives late: this node no longer acks round 0.
    b = block()
    state, actions = run(state, ProposalReceived(b), ProposalValidated(1, 0, b.hash, None))
    assert not of(CastVote, actions) and not of(ValidateProposal, actions)
    state, actions = run(state, *timeouts(("otc-operator", "koscom", ME)))
    assert EnterRound(1, 1) in actions and state.vote_round == 1
    # Round 1's timer is longer (backoff), so a slow network eventually fits in a round.
    state, actions = run(state, Tick(2 * deadline + PARAMS.proposer_timeout_ms - 1))
    assert not of(CastVote, actions)


def test_no_timer_without_work() -> None:
    _, actions = run(machine(), Tick(10**9))
    assert not actions


def test_timeout_quorum_first_closes_the_round_for_its_acks() -> None:
    """Commit rule: acks of a round whose timeout quorum came earlier never commit."""
    b = block()
    events = [ProposalReceived(b), *timeouts(("otc-operator", "surveillance", "securities-a")),
              *acks(b, ("koscom", "securities-b", "otc-operator"))]
    state, actions = run(machine(None), *events)
    assert not of(Commit, actions) and (state.vote_height, state.vote_round) == (1, 1)
    # The same votes with the acks first: the block commits.
    reordered = [events[0], *events[4:], *events[1:4]]
    state, actions = run(machine(None), *reordered)
    assert len(of(Commit, actions)) == 1 and state.vote_height == 2


def test_a_dead_round_times_out_at_once() -> None:
    b = block()
    state, _ = run(machine(), ProposalReceived(b))
    nacks = [VoteReceived(vote(v, "nack", 1, 0, b.hash, "script-sig-verify"))
             for v in ("otc-operator", "securities-a", "securities-b")]
    state, actions = run(state, *nacks[:2])
    assert not of(CastVote, actions)
    state, actions = run(state, nacks[2])  # 3 nacks: 2 members left, quorum is 3
    assert of(CastVote, actions) == [CastVote(1, 0, "timeout", bytes(32))]


def test_next_round_proposal_from_next_proposer_commits() -> None:
    b0, b1 = block(), block(round_=1, n=10)
    state, _ = run(machine(), POOL, ProposalReceived(b0),
                   *timeouts(("otc-operator", "surveillance", "securities-a")))
    assert state.proposals == ()  # round 0's proposal can no longer commit: pruned
    state, actions = run(state, ProposalReceived(b1), ProposalValidated(1, 1, b1.hash, None))
    assert CastVote(1, 1, "ack", b1.hash) in actions
    stale = acks(b0, ("koscom", ME, "otc-operator"))
    state, actions = run(state, *stale)
    assert not of(Commit, actions)
    _, actions = run(state, *acks(b1, ("koscom", ME, "otc-operator")))
    commit = of(Commit, actions)[0]
    assert isinstance(commit, Commit) and commit.block == b1 and commit.qc.round == 1


# ---------------------------------------------------------------- bad behaviour


def evidence_kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, RecordEvidence)]


def test_forged_and_unknown_votes_are_evidence_and_never_count() -> None:
    b = block()
    forged = [VoteReceived(sign_vote(OUTSIDER, GENESIS_HASH, voter=v, height=1, round_=0,
                                     kind="ack", block_hash=b.hash))
              for v in ("otc-operator", "surveillance", "securities-a")]
    stranger = VoteReceived(sign_vote(OUTSIDER, GENESIS_HASH, voter="mallory", height=1,
                                      round_=0, kind="timeout"))
    state, actions = run(machine(None), ProposalReceived(b), *forged, stranger)
    assert evidence_kinds(actions) == ["vote-forged"] * 3 + ["vote-unknown-voter"]
    assert not of(Commit, actions) and state.ack_votes == ()


def test_double_vote_and_vote_after_timeout_and_vote_ahead() -> None:
    b, other = block(), block(n=50)
    events = [
        *acks(b, ("otc-operator",)),
        VoteReceived(vote("otc-operator", "ack", 1, 0, other.hash)),
        *timeouts(("securities-a",)),
        VoteReceived(vote("securities-a", "ack", 1, 0, b.hash)),
        VoteReceived(vote("securities-b", "ack", 1, 4, b.hash)),
        VoteReceived(vote("securities-b", "ack", 7, 0, b.hash)),
    ]
    state, actions = run(machine(None), *events)
    assert evidence_kinds(actions) == [
        "double-vote", "vote-after-timeout", "vote-ahead-of-log", "vote-ahead-of-log"]
    assert [v.voter for v in state.ack_votes] == ["otc-operator"]


def test_proposals_from_the_wrong_member_or_forged_are_refused() -> None:
    wrong = block(proposer=ME)  # securities-b is not the proposer of (1, 0)
    forged = block(key=OUTSIDER)
    state, actions = run(machine(), ProposalReceived(wrong), ProposalReceived(forged))
    assert evidence_kinds(actions) == ["block-wrong-proposer", "block-proposer-signature"]
    assert not of(ValidateProposal, actions) and state.proposals == ()


def test_equivocation_first_counts() -> None:
    first, second = block(), block(n=30)
    state, actions = run(machine(), ProposalReceived(first), ProposalReceived(second))
    assert evidence_kinds(actions) == ["proposal-equivocation"]
    assert of(ValidateProposal, actions) == [ValidateProposal(first)]
    assert state.proposals == (first,)


# ------------------------------------------------- log lag, bodies, bounded memory


def test_votes_decide_before_the_body_arrives() -> None:
    b1 = block()
    b2 = block(height=2, prev=b1.hash)
    voters = ("otc-operator", "surveillance", "securities-a")
    state, actions = run(machine(), *acks(b1, voters), *acks(b2, voters))
    assert not of(Commit, actions) and state.vote_height == 3 and len(state.decided) == 2
    assert not state.is_current
    state, actions = run(state, ProposalReceived(b2))
    assert not of(Commit, actions)  # height 1 first
    state, actions = run(state, ProposalReceived(b1))
    assert [a.block.height for a in actions if isinstance(a, Commit)] == [1, 2]
    assert state.committed_height == 2 and state.is_current


def test_certified_block_supplies_a_missing_body() -> None:
    b1 = block()
    voters = ("otc-operator", "surveillance", "securities-a")
    state, _ = run(machine(), *acks(b1, voters))
    qc = state.decided[0].qc
    bad_qc = QuorumCertificate(1, 0, b1.hash, qc.votes[:2])
    state, actions = run(state, CertifiedBlockReceived(b1, bad_qc))
    assert evidence_kinds(actions) == ["qc-too-few-votes"] and state.committed_height == 0
    state, actions = run(state, CertifiedBlockReceived(b1, qc))
    assert of(Commit, actions) == [Commit(b1, qc)]


def test_proposal_buffer_is_bounded() -> None:
    state = machine()
    for height in range(2, 2 + PROPOSALS_BUFFERED_MAX + 10):
        state, _ = run(state, ProposalReceived(block(height=height, prev=b"\x02" * 32)))
        assert len(state.proposals) <= PROPOSALS_BUFFERED_MAX
    # The lowest heights are kept: they are the ones needed next; none beyond the
    # heights whose membership is final (governance, decision 0061).
    assert state.proposals[0].height == 2
    assert state.proposals[-1].height == min(
        1 + PROPOSALS_BUFFERED_MAX, ACTIVATION_DELAY_MIN_HEIGHTS
    )


def test_observer_never_acts() -> None:
    b = block()
    _, actions = run(machine(None), POOL, Tick(10**6), ProposalReceived(b),
                     ProposalValidated(1, 0, b.hash, None))
    assert not of(CastVote, actions) and not of(Propose, actions)
    assert not of(ValidateProposal, actions)


def test_a_restarted_node_learns_its_own_votes_from_the_log() -> None:
    state, _ = run(machine(), POOL, *timeouts((ME,)))
    assert state.my_timed_out
    _, actions = run(state, Tick(10**6))
    assert not of(CastVote, actions)  # no second timeout vote for the same round


# ------------------------------------------------------------------ determinism


def scripted_log() -> tuple[list[Block], list[Vote]]:
    """Three heights; height 2 needs a view change; forged and duplicate votes mixed in."""
    b1 = block()
    b2_dead = block(height=2, prev=b1.hash, n=20)
    b2 = block(height=2, round_=1, prev=b1.hash, n=30)
    b3 = block(height=3, prev=b2.hash, n=40)
    ids = INSTITUTION_IDS
    votes = [
        vote(ids[0], "ack", 1, 0, b1.hash), vote(ids[1], "ack", 1, 0, b1.hash),
        vote(ids[1], "ack", 1, 0, b1.hash), vote(ids[3], "ack", 1, 0, b1.hash),
        sign_vote(OUTSIDER, GENESIS_HASH, voter=ids[2], height=2, round_=0, kind="ack",
                  block_hash=b2_dead.hash),
        vote(ids[2], "nack", 2, 0, b2_dead.hash, "double-spend"),
        vote(ids[0], "timeout", 2, 0), vote(ids[2], "timeout", 2, 0),
        vote(ids[4], "ack", 2, 0, b2_dead.hash), vote(ids[4], "timeout", 2, 0),
        vote(ids[3], "ack", 2, 0, b2_dead.hash),  # round 0 closed: not counted
        vote(ids[1], "ack", 2, 1, b2.hash), vote(ids[2], "ack", 2, 1, b2.hash),
        vote(ids[0], "ack", 2, 1, b2.hash),
        vote(ids[4], "ack", 3, 0, b3.hash), vote(ids[0], "ack", 3, 0, b3.hash),
        vote(ids[2], "ack", 3, 0, b3.hash),
    ]
    return [b1, b2_dead, b2, b3], votes


SCRIPTED_BLOCKS, SCRIPTED_VOTES = scripted_log()


def test_scripted_log_commits_the_expected_chain() -> None:
    events: list[Event] = [ProposalReceived(b) for b in SCRIPTED_BLOCKS]
    events += [VoteReceived(v) for v in SCRIPTED_VOTES]
    _, actions = run(machine(None), *events)
    committed = [a.block for a in actions if isinstance(a, Commit)]
    assert committed == [SCRIPTED_BLOCKS[0], SCRIPTED_BLOCKS[2], SCRIPTED_BLOCKS[3]]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_interleaving_of_the_two_logs_gives_the_same_commits(data: st.DataObject) -> None:
    """Proposals and votes are separate topics with no order between them: whatever
    the interleaving (and the clock ticks in between), the commits are the same."""
    proposals = [ProposalReceived(b) for b in SCRIPTED_BLOCKS]
    votes = [VoteReceived(v) for v in SCRIPTED_VOTES]
    merged: list[Event] = []
    while proposals or votes:
        take_vote = bool(votes) and (not proposals or data.draw(st.booleans()))
        merged.append(votes.pop(0) if take_vote else proposals.pop(0))
        if data.draw(st.booleans()):
            merged.append(Tick(data.draw(st.integers(0, 10_000))))
    for me in (None, ME):
        _, actions = run(machine(me), *merged)
        committed = [a.block.hash for a in actions if isinstance(a, Commit)]
        assert committed == [SCRIPTED_BLOCKS[i].hash for i in (0, 2, 3)]


def test_wake_at_ms_says_when_a_tick_matters() -> None:
    proposer, _ = run(machine(P1), Tick(1_000), TxPoolChanged(1, 100, 990))
    assert wake_at_ms(proposer) == 990 + PARAMS.block_interval_ms  # cut time first
    proposer, actions = run(proposer, Tick(wake_at_ms(proposer) or 0))
    assert of(Propose, actions)
    timeout_at = 1_000 + PARAMS.block_interval_ms + PARAMS.proposer_timeout_ms
    assert wake_at_ms(proposer) == timeout_at
    _, actions = run(proposer, Tick(timeout_at))
    assert of(CastVote, actions) == [CastVote(1, 0, "timeout", bytes(32))]
    assert wake_at_ms(machine()) is None  # nothing pending: only a log event can matter
    assert wake_at_ms(machine(None)) is None

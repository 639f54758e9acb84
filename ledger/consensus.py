"""The consensus state machine of one node: a pure function of the logs it reads.

Owns: ``ConsensusState`` (frozen), the input events, the output actions, ``step``
(``(state, event) -> (state, actions)``), the block-cut rule ``should_cut_block`` and
``initial_state``. Nothing here reads a clock, a socket or randomness: the shell
feeds the events in the order it reads them and carries out the actions. The rules
are written down in docs/decisions/0020-consensus-rules.md.

How the shell drives it (one machine per node; an auditor may run one with
``me=None`` to replay without voting):

* ``ledger.proposals.v1`` records  -> ``ProposalReceived(block)``, in log order;
* ``ledger.votes.v1`` records      -> ``VoteReceived(vote)``, in log order;
* ``ledger.blocks.v1`` records     -> ``CertifiedBlockReceived(block, qc)`` (optional:
  supplies the body of a block the votes already decided, if the proposal was missed);
* its local clock, periodically    -> ``Tick(now_ms)`` (the only source of time);
* its view of ``ledger.tx.v1``     -> ``TxPoolChanged(...)`` (txs submitted, not yet
  committed) whenever it changes;
* its answer to ``ValidateProposal`` -> ``ProposalValidated(...)`` (the result of
  ``ledger.state.apply_block`` on its committed state: ``None`` or the error code).

Actions, to carry out in the order returned:

* ``EnterRound(h, r)``: informational (logs, metrics);
* ``Propose(h, r, prev_hash)``: this node is the proposer; build a block from the pool
  (``ledger.block.make_block``, round ``r``, on ``prev_hash``) and publish it to the
  proposals log (or nothing, if the pool turned out empty; the round then times out);
* ``ValidateProposal(block)``: validate against the committed state; reply with
  ``ProposalValidated``;
* ``CastVote(h, r, kind, block_hash, reason_code)``: sign it with ``ledger.block.sign_vote``
  and publish it to the votes log;
* ``Commit(block, qc)``: apply the block to the state (in order: it extends the previous
  commit), store it with its QC, publish the committed record, then feed
  ``TxPoolChanged`` with the pool as it is after the commit (the machine forgets the
  pool figures at each commit, so it never proposes from transactions already decided);
* ``RecordEvidence(kind, member, detail)``: a protocol violation to record.

Determinism: *decisions* (which block commits at each height, which round each height
is in) depend only on the votes-log order, so every node and every replay from offset 0
reach the same ones. A node's own *behaviour* (when it proposes, votes, times out)
depends on its clock and its pool, which is what view change needs.

"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ledger.block import (
    VOTE_ACK,
    VOTE_NACK,
    VOTE_TIMEOUT,
    ZERO_HASH,
    Block,
    QuorumCertificate,
    Vote,
    check_block_context_free,
    check_block_links,
    check_certified_block,
    check_vote,
    proposer_for,
)
from ledger.errors import ValidationError
from ledger.governance import (
    ACTIVATION_DELAY_MIN_HEIGHTS,
    MembershipSchedule,
    schedule_after_block,
    schedule_from_genesis,
)
from ledger.membership import ChainParams, Genesis

# Proposals kept for heights not yet committed (each up to block_bytes_max). When full,
# the highest (height, round) is dropped first: the lowest are the ones needed next.
# The shell should pause the proposals consumer while ``state.proposals_full``.
PROPOSALS_BUFFERED_MAX = 16
# Heights decided by the votes log whose block body has not arrived yet.
DECIDED_PENDING_MAX = 64
# The proposer timeout grows with the round (1x, 2x, ... up to this factor), so that a
# round eventually outlasts whatever delay the network has (partial synchrony).
ROUND_TIMEOUT_FACTOR_MAX = 8
# Governance (docs/decisions/0061): the membership of height h is known once the block
# at h - ACTIVATION_DELAY_MIN_HEIGHTS is committed. The machine counts votes only for
# heights it knows the membership of; votes read beyond that wait here, in log order,
# until commits catch up (the shell pauses the votes consumer while ``decided_full``,
# so only batches already read can land here). Beyond this bound a vote is dropped
# with evidence: the node may then stall until restarted, it never decides wrongly.
HELD_VOTES_MAX = 8_192
# Decided heights may run ahead of committed ones by at most this much.
DECIDED_WINDOW = min(DECIDED_PENDING_MAX, ACTIVATION_DELAY_MIN_HEIGHTS - 1)


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True, slots=True)
class ConsensusConfig:
    """Fixed inputs: membership and parameters, this node's id (None: observer)."""

    genesis: Genesis
    me: str | None
    genesis_hash: bytes = field(default=b"")

    def __post_init__(self) -> None:
        if not self.genesis_hash:
            object.__setattr__(self, "genesis_hash", self.genesis.hash_le)
        assert len(self.genesis_hash) == 32
        # ``me`` need not be a genesis member: a member added by governance runs as an
        # observer until its membership is in force.

    @property
    def params(self) -> ChainParams:
        return self.genesis.params

    @property
    def quorum(self) -> int:
        return self.genesis.params.quorum

    @property
    def member_count(self) -> int:
        return len(self.genesis.members)


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Tick:
    """The node's local clock (ms). Never goes backwards in effect (max is kept)."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class TxPoolChanged:
    """Submitted, not yet committed transactions as the node sees them.

    ``oldest_pending_ms``: local time the oldest pending tx was first seen (same clock
    as ``Tick``), ``None`` when the pool is empty.
    """

    pending_tx_count: int
    pending_bytes: int
    oldest_pending_ms: int | None


@dataclass(frozen=True, slots=True)
class ProposalReceived:
    block: Block


@dataclass(frozen=True, slots=True)
class ProposalValidated:
    """The shell's answer to ``ValidateProposal``: ``error_code`` None when valid."""

    height: int
    round: int
    block_hash: bytes
    error_code: str | None


@dataclass(frozen=True, slots=True)
class VoteReceived:
    vote: Vote


@dataclass(frozen=True, slots=True)
class CertifiedBlockReceived:
    """A committed record from the blocks log; used only as the body of a block the
    votes log already decided (decisions never come from it)."""

    block: Block
    qc: QuorumCertificate


Event = (
    Tick | TxPoolChanged | ProposalReceived | ProposalValidated | VoteReceived
    | CertifiedBlockReceived
)


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class EnterRound:
    height: int
    round: int


@dataclass(frozen=True, slots=True)
class Propose:
    height: int
    round: int
    prev_hash: bytes


@dataclass(frozen=True, slots=True)
class ValidateProposal:
    block: Block


@dataclass(frozen=True, slots=True)
class CastVote:
    """A vote to sign and publish; ``kind`` is ack, nack or timeout."""

    height: int
    round: int
    kind: str
    block_hash: bytes
    reason_code: str = ""


@dataclass(frozen=True, slots=True)
class Commit:
    block: Block
    qc: QuorumCertificate


@dataclass(frozen=True, slots=True)
class RecordEvidence:
    """A protocol violation: ``kind`` is a stable code, ``member`` the member named."""

    kind: str
    member: str
    detail: str


Action = EnterRound | Propose | ValidateProposal | CastVote | Commit | RecordEvidence


# ------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Decision:
    """A height decided by the votes log, waiting for its block body to commit."""

    height: int
    round: int
    block_hash: bytes
    qc: QuorumCertificate


@dataclass(frozen=True, slots=True)
class ConsensusState:
    """Everything the machine needs; bounded (only the current height and round).

    ``committed_height``/``head_hash``: the last block committed by this node.
    ``vote_height``/``vote_round``: where the votes log is (>= committed_height + 1;
    greater while decided blocks wait for their bodies in ``decided``).
    ``ack_votes``: counted acks of the current (vote_height, vote_round), log order.
    ``my_*`` flags: what this node did in the current round.
    """

    config: ConsensusConfig
    now_ms: int
    committed_height: int
    head_hash: bytes
    vote_height: int
    vote_round: int = 0
    decided: tuple[Decision, ...] = ()
    ack_votes: tuple[Vote, ...] = ()
    nack_votes: tuple[Vote, ...] = ()
    timeout_voters: frozenset[str] = frozenset()
    proposals: tuple[Block, ...] = ()
    pending_tx_count: int = 0
    pending_bytes: int = 0
    oldest_pending_ms: int | None = None
    timer_armed_ms: int | None = None
    proposal_seen_ms: int | None = None
    my_proposed: bool = False
    my_validation_requested: bool = False
    my_voted: bool = False
    my_timed_out: bool = False
    schedule: MembershipSchedule | None = None  # set by initial_state
    held_votes: tuple[Vote, ...] = ()

    def view(self, height: int) -> Genesis:
        """The membership and parameters in force at ``height`` (ledger.governance)."""
        assert self.schedule is not None, "state not made by initial_state"
        return self.schedule.at(height)

    @property
    def knows_vote_height(self) -> bool:
        """The membership of the votes log's current height is final (see
        ``DECIDED_WINDOW``): no block still to commit can change it."""
        return self.vote_height <= self.committed_height + ACTIVATION_DELAY_MIN_HEIGHTS

    @property
    def is_current(self) -> bool:
        """True when this node has committed every decided height and can take part."""
        return self.vote_height == self.committed_height + 1

    @property
    def nack_voters(self) -> frozenset[str]:
        return frozenset(vote.voter for vote in self.nack_votes)

    @property
    def proposals_full(self) -> bool:
        return len(self.proposals) >= PROPOSALS_BUFFERED_MAX

    @property
    def decided_full(self) -> bool:
        """The shell should pause the votes consumer while this holds."""
        return len(self.decided) >= DECIDED_WINDOW or bool(self.held_votes)

    def proposal_at(self, height: int, round_: int) -> Block | None:
        for block in self.proposals:
            if block.header.height == height and block.header.round == round_:
                return block
        return None


def initial_state(
    config: ConsensusConfig,
    *,
    now_ms: int,
    committed_height: int = 0,
    head_hash: bytes | None = None,
    schedule: MembershipSchedule | None = None,
) -> ConsensusState:
    """A machine at genesis, or resuming on a verified local chain copy.

    When resuming at ``committed_height`` > 0, the shell must feed the votes log from
    just after the vote that decided that height (stored with the committed record),
    and pass the membership schedule its chain copy left (``LedgerState.schedule``).
    """
    if schedule is None:
        schedule = schedule_from_genesis(config.genesis, config.genesis_hash)
    head = config.genesis_hash if head_hash is None else head_hash
    assert committed_height >= 0 and len(head) == 32
    return ConsensusState(
        config=config,
        now_ms=now_ms,
        committed_height=committed_height,
        head_hash=head,
        vote_height=committed_height + 1,
        schedule=schedule,
    )


def should_cut_block(
    *,
    now_ms: int,
    pending_tx_count: int,
    pending_bytes: int,
    oldest_pending_ms: int | None,
    params: ChainParams,
) -> bool:
    """The proposer's block-cut rule (asked only once its round is open).

    Never an empty block. Cut at once when the pool fills a block (bytes or count);
    otherwise when the oldest pending tx has waited ``block_interval_ms`` (a batch
    timeout, as Fabric's orderer cuts: a lone tx waits at most one interval, and under
    load every block is cut as soon as the previous one commits).
    """
    if pending_tx_count <= 0:
        return False
    if pending_bytes >= params.block_bytes_max or pending_tx_count >= params.block_txs_max:
        return True
    assert oldest_pending_ms is not None
    return now_ms >= oldest_pending_ms + params.block_interval_ms


def wake_at_ms(state: ConsensusState) -> int | None:
    """The local time at which a ``Tick`` may make this node act (cut a block or time
    out), or None when only a log event can. Lets the shell sleep instead of polling;
    ticking more often is harmless."""
    config = state.config
    if config.me is None or not state.is_current or state.my_timed_out:
        return None
    times: list[int] = []
    height, round_ = state.vote_height, state.vote_round
    if (
        not state.my_proposed
        and state.pending_tx_count > 0
        and state.oldest_pending_ms is not None
        and state.proposal_at(height, round_) is None
        and proposer_for(state.view(height), height, round_) == config.me
    ):
        times.append(state.oldest_pending_ms + state.view(height).params.block_interval_ms)
    timeout_ms = _timeout_deadline_ms(state)
    if timeout_ms is not None:
        times.append(timeout_ms)
    return min(times) if times else None


def _timeout_deadline_ms(state: ConsensusState) -> int | None:
    """When this node's timer for the current round expires (None: not running)."""
    if state.timer_armed_ms is None:
        return None
    params = state.view(state.vote_height).params
    factor = min(1 + state.vote_round, ROUND_TIMEOUT_FACTOR_MAX)
    deadline = state.timer_armed_ms + params.block_interval_ms + params.proposer_timeout_ms * factor
    if state.proposal_seen_ms is not None:
        # The timer detects a silent proposer. Once its proposal is here the proposer has
        # spoken: give validation and voting a full timeout from its arrival, so a slow
        # (overloaded) round is not abandoned and re-cut into an even bigger block.
        deadline = max(deadline, state.proposal_seen_ms + params.proposer_timeout_ms * factor)
    return deadline


# -------------------------------------------------------------------------------- step

_STATE_FIELDS = tuple(f.name for f in fields(ConsensusState))
_state_values = operator.attrgetter(*_STATE_FIELDS)  # every field's value, in order
_STATE_SLOT_SETTERS: tuple[tuple[str, Callable[[object, object], None]], ...] = tuple(
    (name, ConsensusState.__dict__[name].__set__) for name in _STATE_FIELDS)


class _Work:
    """A mutable scratch copy of the state for one ``step`` (never escapes it)."""

    def __init__(self, state: ConsensusState) -> None:
        self.state = state
        self.actions: list[Action] = []

    def set(self, **changes: object) -> None:
        # dataclasses.replace re-runs __init__; this copy is faster on the hot path
        # (every Tick), and ConsensusState has no __post_init__ to skip: every field
        # read in one call, each set through its slot (decision 0121).
        fresh = object.__new__(ConsensusState)
        get = changes.get
        for (name, put), value in zip(_STATE_SLOT_SETTERS, _state_values(self.state),
                                      strict=True):
            put(fresh, get(name, value))
        self.state = fresh

    def emit(self, action: Action) -> None:
        self.actions.append(action)

    def evidence(self, kind: str, member: str, detail: str) -> None:
        self.actions.append(RecordEvidence(kind, member, detail))


def step(state: ConsensusState, event: Event) -> tuple[ConsensusState, tuple[Action, ...]]:
    """Feed one event; return the new state and the actions to carry out, in order."""
    work = _Work(state)
    if isinstance(event, Tick):
        if event.now_ms > state.now_ms:
            work.set(now_ms=event.now_ms)
    elif isinstance(event, TxPoolChanged):
        assert event.pending_tx_count >= 0 and event.pending_bytes >= 0
        work.set(
            pending_tx_count=event.pending_tx_count,
            pending_bytes=event.pending_bytes,
            oldest_pending_ms=event.oldest_pending_ms if event.pending_tx_count else None,
        )
    elif isinstance(event, ProposalReceived):
        _on_proposal(work, event.block)
    elif isinstance(event, ProposalValidated):
        _on_validated(work, event)
    elif isinstance(event, VoteReceived):
        _on_vote(work, event.vote)
    elif isinstance(event, CertifiedBlockReceived):
        _on_certified_block(work, event.block, event.qc)
    else:  # pragma: no cover - exhaustive over Event
        raise AssertionError(f"unknown event {event!r}")
    _advance(work)
    while work.state.held_votes and work.state.knows_vote_height:
        held = work.state.held_votes
        work.set(held_votes=held[1:])
        _on_vote(work, held[0], from_hold=True)
        _advance(work)
    return work.state, tuple(work.actions)


def _is_useful(state: ConsensusState, block: Block) -> bool:
    """A proposal can still commit: a later height, or a round not yet closed at the
    votes log's height, or exactly the body of a height decided but not committed."""
    height, round_ = block.header.height, block.header.round
    if height > state.vote_height:
        return True
    if height == state.vote_height:
        return round_ >= state.vote_round
    return any(d.block_hash == block.hash for d in state.decided)


def _prune_proposals(work: _Work) -> None:
    state = work.state
    kept = tuple(b for b in state.proposals if _is_useful(state, b))
    if len(kept) != len(state.proposals):
        work.set(proposals=kept)


def _store_proposal(work: _Work, block: Block) -> None:
    """Insert in (height, round) order; beyond the bound drop the highest."""
    if not _is_useful(work.state, block):
        return
    proposals = sorted(
        (*work.state.proposals, block), key=lambda b: (b.header.height, b.header.round)
    )
    if len(proposals) > PROPOSALS_BUFFERED_MAX and proposals.pop() is block:
        return
    work.set(proposals=tuple(proposals))


def _on_proposal(work: _Work, block: Block) -> None:
    state = work.state
    header = block.header
    if not _is_useful(state, block):
        return  # a committed height or a closed round: it can no longer commit
    if header.height > state.committed_height + ACTIVATION_DELAY_MIN_HEIGHTS:
        return  # membership not final there yet; the body comes from the blocks log
    existing = state.proposal_at(header.height, header.round)
    if existing is not None and existing.hash == block.hash:
        return  # duplicate delivery
    try:
        check_block_context_free(block, state.view(header.height))
    except ValidationError as error:
        # A forged signature may name an innocent proposer: the detail says which check.
        work.evidence(error.code, header.proposer, error.message)
        return
    if existing is not None:
        # Signed by the eligible proposer, so the proposer really equivocated.
        work.evidence(
            "proposal-equivocation",
            header.proposer,
            f"second block {block.hash_hex} for height {header.height} round "
            f"{header.round}; the first, {existing.hash_hex}, counts",
        )
        return
    _store_proposal(work, block)


def _on_validated(work: _Work, event: ProposalValidated) -> None:
    state = work.state
    if (
        state.config.me is None
        or not state.is_current
        or (event.height, event.round) != (state.vote_height, state.vote_round)
        or state.my_voted
        or state.my_timed_out
    ):
        return  # stale answer: the round moved on, or this node already voted
    proposal = state.proposal_at(event.height, event.round)
    if proposal is None or proposal.hash != event.block_hash:
        return
    if event.error_code is None:
        work.emit(CastVote(event.height, event.round, VOTE_ACK, event.block_hash))
    else:
        work.emit(
            CastVote(event.height, event.round, VOTE_NACK, event.block_hash, event.error_code)
        )
    work.set(my_voted=True)


def _enter_round(work: _Work, height: int, round_: int) -> None:
    work.set(
        vote_height=height,
        vote_round=round_,
        ack_votes=(),
        nack_votes=(),
        timeout_voters=frozenset(),
        timer_armed_ms=None,
        proposal_seen_ms=None,
        my_proposed=False,
        my_validation_requested=False,
        my_voted=False,
        my_timed_out=False,
    )
    _prune_proposals(work)
    work.emit(EnterRound(height, round_))


def _hold(work: _Work, vote: Vote) -> None:
    held = work.state.held_votes
    if len(held) >= HELD_VOTES_MAX:
        work.evidence("vote-held-overflow", vote.voter,
                      f"vote for height {vote.height} dropped: {HELD_VOTES_MAX} held")
    else:
        work.set(held_votes=(*held, vote))


def _count_timeout(work: _Work, vote: Vote, quorum: int) -> None:
    state = work.state
    if vote.voter in state.timeout_voters:
        return  # duplicate delivery
    timeouts = state.timeout_voters | {vote.voter}
    work.set(timeout_voters=timeouts)
    if vote.voter == state.config.me:
        work.set(my_timed_out=True)  # learnt from the log, e.g. after a restart
    if len(timeouts) >= quorum:
        _enter_round(work, state.vote_height, state.vote_round + 1)


def _on_vote(work: _Work, vote: Vote, *, from_hold: bool = False) -> None:
    state = work.state
    config = state.config
    position = (vote.height, vote.round)
    current = (state.vote_height, state.vote_round)
    if position < current:
        return  # late vote for a decided height or a closed round: no effect
    if not state.knows_vote_height or (state.held_votes and not from_hold):
        _hold(work, vote)  # in log order, behind the votes already held
        return
    view = state.view(vote.height)
    try:
        check_vote(vote, view, genesis_hash=config.genesis_hash)
    except ValidationError as error:
        work.evidence(error.code, vote.voter, error.message)
        return
    if position > current:
        # An honest member votes only where the log prefix it read puts it, which is
        # never ahead of the log at the vote's own position.
        work.evidence(
            "vote-ahead-of-log",
            vote.voter,
            f"{vote.kind} vote for height {vote.height} round {vote.round} while the log "
            f"is at height {state.vote_height} round {state.vote_round}",
        )
        return
    is_mine = vote.voter == config.me
    if vote.kind == VOTE_TIMEOUT:
        _count_timeout(work, vote, view.params.quorum)
        return
    previous = next(
        (v for v in (*state.ack_votes, *state.nack_votes) if v.voter == vote.voter), None
    )
    if previous is not None:
        same = (previous.kind, previous.block_hash, previous.reason_code) == (
            vote.kind, vote.block_hash, vote.reason_code
        )
        if not same:
            work.evidence(
                "double-vote",
                vote.voter,
                f"second {vote.kind} at height {vote.height} round {vote.round}; "
                "the first counts",
            )
        return
    if vote.voter in state.timeout_voters:
        work.evidence(
            "vote-after-timeout",
            vote.voter,
            f"{vote.kind} at height {vote.height} round {vote.round} after its timeout vote "
            "(not counted)",
        )
        return
    if is_mine:
        work.set(my_voted=True)
    if vote.kind == VOTE_NACK:
        work.set(nack_votes=(*state.nack_votes, vote))
        return
    acks = (*state.ack_votes, vote)
    work.set(ack_votes=acks)
    same_block = tuple(v for v in acks if v.block_hash == vote.block_hash)
    if len(same_block) >= view.params.quorum:
        qc = QuorumCertificate(vote.height, vote.round, vote.block_hash, same_block)
        work.set(decided=(*state.decided, Decision(vote.height, vote.round, vote.block_hash, qc)))
        _enter_round(work, state.vote_height + 1, 0)


def _on_certified_block(work: _Work, block: Block, qc: QuorumCertificate) -> None:
    state = work.state
    wanted = next((d for d in state.decided if d.block_hash == block.hash), None)
    if wanted is None or state.proposal_at(block.height, block.header.round) == block:
        return
    try:
        view = state.view(block.height)
        check_certified_block(block, qc, view, genesis_hash=state.config.genesis_hash)
        check_block_context_free(block, view)
    except ValidationError as error:
        work.evidence(error.code, block.header.proposer, error.message)
        return
    others = tuple(
        b for b in state.proposals
        if (b.header.height, b.header.round) != (block.height, block.header.round)
    )
    work.set(proposals=others)
    _store_proposal(work, block)


def _commit_decided(work: _Work) -> None:
    """Commit decided heights, in order, whose bodies are here."""
    while work.state.decided:
        state = work.state
        decision = state.decided[0]
        block = state.proposal_at(decision.height, decision.round)
        if block is None or block.hash != decision.block_hash:
            return  # body not here yet (proposals lag the votes, or was missed)
        try:
            check_block_links(block, prev_hash=state.head_hash, height=state.committed_height + 1)
        except ValidationError as error:
            # Only a majority of faulty members can decide a block that does not link.
            work.evidence("decided-block-invalid", block.header.proposer, error.message)
            return
        work.emit(Commit(block, decision.qc))
        assert state.schedule is not None
        schedule, skipped = schedule_after_block(state.schedule, block.height, block.txs)
        for txid in skipped:
            work.evidence("governance-skipped", block.header.proposer,
                          f"committed block {block.height}: governance tx {txid} does not apply")
        # The pool figures described the pool before this commit; the block just took
        # some of it. Until the shell reports the pool again (``TxPoolChanged`` after
        # carrying out ``Commit``), assume nothing is pending, so no proposal is cut
        # from transactions this very block already decided.
        work.set(
            committed_height=block.height,
            head_hash=block.hash,
            decided=state.decided[1:],
            proposals=tuple(b for b in state.proposals if b.header.height > block.height),
            timer_armed_ms=None,
            proposal_seen_ms=None,
            pending_tx_count=0,
            pending_bytes=0,
            oldest_pending_ms=None,
            schedule=schedule,
        )


def _advance(work: _Work) -> None:
    """Commit what can be committed, then do this node's part in the current round."""
    _commit_decided(work)
    state = work.state
    config = state.config
    me = config.me
    if me is None or not state.is_current:
        return
    height, round_ = state.vote_height, state.vote_round
    view = state.view(height)
    if view.member(me) is None:
        return  # not a member at this height (removed, or not yet added): observe
    proposal = state.proposal_at(height, round_)
    has_work = state.pending_tx_count > 0 or proposal is not None
    if has_work and state.timer_armed_ms is None:
        work.set(timer_armed_ms=state.now_ms)
        state = work.state
    if proposal is not None and state.proposal_seen_ms is None:
        work.set(proposal_seen_ms=state.now_ms)
        state = work.state
    if (
        not state.my_proposed
        and not state.my_timed_out
        and proposal is None
        and proposer_for(view, height, round_) == me
        and should_cut_block(
            now_ms=state.now_ms,
            pending_tx_count=state.pending_tx_count,
            pending_bytes=state.pending_bytes,
            oldest_pending_ms=state.oldest_pending_ms,
            params=view.params,
        )
    ):
        work.emit(Propose(height, round_, state.head_hash))
        work.set(my_proposed=True)
    if (
        proposal is not None
        and not state.my_voted
        and not state.my_timed_out
        and not state.my_validation_requested
    ):
        try:
            check_block_links(proposal, prev_hash=state.head_hash, height=height)
        except ValidationError as error:
            work.emit(CastVote(height, round_, VOTE_NACK, proposal.hash, error.code))
            work.set(my_voted=True)
        else:
            work.emit(ValidateProposal(proposal))
            work.set(my_validation_requested=True)
    state = work.state
    if not state.my_timed_out and state.timer_armed_ms is not None:
        # A round is dead when enough members nacked that no block can reach quorum.
        dead = len(state.nack_voters) > len(view.members) - view.params.quorum
        deadline_ms = _timeout_deadline_ms(state)
        if dead or (deadline_ms is not None and state.now_ms >= deadline_ms):
            work.emit(CastVote(height, round_, VOTE_TIMEOUT, ZERO_HASH))
            work.set(my_timed_out=True)

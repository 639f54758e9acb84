"""Reproduction (for the owner of ledger/consensus.py): a proposer that is next in
rotation when a block commits proposes in the same step, on the pool count from
*before* the commit; the shell's pool is empty after the commit (its range was just
decided), so streams.node._propose publishes nothing, yet the machine has set
my_proposed and never proposes again in that round: the next burst of transactions
waits for the proposer timeout and a view change (seen in `capledger demo`: each
round after the first commits at round 1, ~2.2 s instead of ~0.3 s).

Marked xfail(strict): it starts passing (and must lose the marker) once fixed.
"""

from __future__ import annotations

import pytest

from ledger.block import proposer_for
from ledger.consensus import (
    Commit,
    ProposalReceived,
    ProposalValidated,
    Propose,
    Tick,
    TxPoolChanged,
)
from tests.unit.test_consensus import GENESIS, POOL, acks, block, machine, of, run

pytestmark = pytest.mark.unit


@pytest.mark.xfail(strict=True, reason="Propose on a stale pool count right after Commit")
def test_next_proposer_proposes_for_transactions_arriving_after_the_commit() -> None:
    me = proposer_for(GENESIS, 2, 0)
    b1 = block()
    state, _ = run(machine(me), POOL, Tick(200), ProposalReceived(b1),
                   ProposalValidated(1, 0, b1.hash, None))
    state, actions = run(state, *acks(b1, ("otc-operator", "surveillance", "securities-a")))
    assert of(Commit, actions)
    # Same step: [EnterRound(2, 0), Commit, Propose(2, 0)] on the stale count 2. The
    # shell executes Commit (dropping the decided range from its pool) before this
    # Propose, so it finds nothing to propose and publishes nothing.
    # The shell's pool event after the commit: empty; then a new burst arrives.
    state, _ = run(state, TxPoolChanged(0, 0, None))
    state, later = run(state, TxPoolChanged(5, 500, 300), Tick(500))
    assert of(Propose, later) == [Propose(2, 0, b1.hash)]

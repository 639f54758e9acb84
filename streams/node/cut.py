"""How many transactions a proposer puts in a block: bounded by what validators check
well inside the round timer (decision 0110).

Owns: ``BlockCutSizer`` — a smoothed measure of this node's own CPU time (its
thread's) per transaction when it selects and checks a block's range (as proposer or
validator), and the block size it allows: ``budget_ms / ms_per_tx`` transactions, never
above the chain's ``block_txs_max`` nor below ``CUT_TXS_MIN``. A node is one validator
of five and measures itself as a stand-in for the others (same code).

CPU time, not wall time: on a starved machine the wall time per transaction is
mostly waiting for a core, and cutting small blocks then only multiplies the fixed
costs of a block (votes, fsync, round trips) — measured: wall-time cuts of ~200 txs at
load 30 let a backlog grow without bound. The bound is on the work a block is,
which is what a validator with a core of its own must finish inside the timer.

Exactness is not at stake: ``block_txs_max`` is only the proposer's cut; a validator
checks whatever range a proposal covers (decision 0030), so nodes need not agree on
this figure. What it buys: under load, blocks stop growing to sizes whose checking
takes a good part of the round timer, and the queue is worked off in short blocks
instead of long ones.
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of the proposer timeout a block's check may take on this node.
CUT_BUDGET_FRACTION = 0.25
# Never cut smaller blocks than this (fixed per-block costs would dominate).
CUT_TXS_MIN = 200
# Samples over fewer transactions say more about fixed costs than per-tx ones.
SAMPLE_TXS_MIN = 50
SMOOTHING = 0.3


@dataclass(slots=True)
class BlockCutSizer:
    budget_ms: float
    ms_per_tx: float | None = None

    @classmethod
    def for_timeout(cls, proposer_timeout_ms: int) -> BlockCutSizer:
        return cls(budget_ms=proposer_timeout_ms * CUT_BUDGET_FRACTION)

    def observe(self, txs: int, elapsed_ms: float) -> None:
        """One selection of ``txs`` range records took ``elapsed_ms`` of CPU."""
        if txs < SAMPLE_TXS_MIN or elapsed_ms < 0:
            return
        sample = elapsed_ms / txs
        previous = self.ms_per_tx
        self.ms_per_tx = sample if previous is None else (
            (1 - SMOOTHING) * previous + SMOOTHING * sample)

    def txs_max(self, configured: int) -> int:
        """The block size to cut at: the chain's limit, lowered to the budget."""
        if self.ms_per_tx is None or self.ms_per_tx <= 0:
            return configured
        return max(min(CUT_TXS_MIN, configured),
                   min(configured, int(self.budget_ms / self.ms_per_tx)))

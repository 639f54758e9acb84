"""Reproduction (for the lead): the proposer of height h+1 is told to propose in the
same ``consensus.step`` that commits height h, from the pool figures of *before* the
commit. ``LedgerNode._commit`` then drops the committed txs from its pool, and
``LedgerNode._propose`` finds nothing new, returns without proposing, while the
machine has set ``my_proposed=True``: the round can only end by timeout
(block_interval_ms + proposer_timeout_ms, 2.2 s with the bench genesis). Seen in
``capledger bench`` at 10 tx/s: 2 of 5 heights went through a view change, p99 2.2 s.

Run: .venv/bin/python docs/bench/repro_stale_propose.py   (exits 1 while the bug is there)

Status: fixed in 18d398f (consensus forgets the pool figures at each commit); this
script now prints "ok" and stays as a regression check.
"""

from __future__ import annotations

import hashlib
import sys

from ledger.block import make_block, proposer_for, sign_vote
from ledger.consensus import (
    Commit,
    ConsensusConfig,
    ProposalReceived,
    ProposalValidated,
    Propose,
    Tick,
    TxPoolChanged,
    VoteReceived,
    initial_state,
    step,
)
from ledger.hashing import sha256d
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, ChainParams, Genesis, Member
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

KEYS = {n: PrivateKey(hashlib.sha256(b"repro/" + n.encode()).digest()) for n in INSTITUTION_IDS}
PARAMS = ChainParams(quorum=3, block_interval_ms=100, proposer_timeout_ms=1_000,
                     block_txs_max=50, block_bytes_max=100_000)
GENESIS = Genesis("repro", 0, tuple(Member(n, n, "member", KEYS[n].public_key)
                                    for n in INSTITUTION_IDS), PARAMS)
GH = GENESIS.hash_le
P1, P2 = proposer_for(GENESIS, 1, 0), proposer_for(GENESIS, 2, 0)

tx = Transaction(1, (TxIn(OutPoint(sha256d(b"x"), 0), b"\x51"),), (TxOut(0, b"\x51"),))
block1 = make_block(KEYS[P1], height=1, prev_hash=GH, time_ms=5, proposer=P1, round_=0,
                    txs=[tx], tx_offset_start=0, tx_offset_end=1)

state = initial_state(ConsensusConfig(GENESIS, P2, GH), now_ms=0)
# The pool holds exactly block 1's tx (nothing else arrived yet).
for event in (TxPoolChanged(1, 100, 0), Tick(100), ProposalReceived(block1),
              ProposalValidated(1, 0, block1.hash, None)):
    state, _ = step(state, event)
actions: list[object] = []
for voter in [m for m in INSTITUTION_IDS if m != P2][:3]:
    vote = sign_vote(KEYS[voter], GH, voter=voter, height=1, round_=0, kind="ack",
                     block_hash=block1.hash, reason_code="")
    state, new = step(state, VoteReceived(vote))
    actions.extend(new)

commits = [a for a in actions if isinstance(a, Commit)]
proposes = [a for a in actions if isinstance(a, Propose)]
print("actions of the committing step:", [type(a).__name__ for a in actions])
if commits and proposes:
    print(f"BUG: Propose(height 2) emitted with the commit of height 1, from a pool count of "
          f"{state.pending_tx_count} that still includes the committed tx; the node finds its "
          f"pool empty, does not propose, and my_proposed={state.my_proposed} blocks any "
          f"later proposal in this round -> view change after the timeout.")
    sys.exit(1)
print("ok: no proposal from stale pool figures")

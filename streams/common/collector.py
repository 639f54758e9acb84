"""The cyclic garbage collector around state that only grows (decisions 0115, 0119).

Owns: :class:`BlockFreezer`. A ledger process keeps a large, long-lived state (unspent
outputs, the pool, a replay's pending rows) and makes short-lived objects per block.
CPython's young and middle collections scan every tracked object that survived since
the last full one, so the state is traversed again and again for no garbage. After each
block, :meth:`BlockFreezer.block_done` moves what exists out of the collector's view
(``gc.freeze``); objects freed by their reference count still go at once, as always.
Cyclic garbage made meanwhile is found by a full collection (``gc.unfreeze`` then
``gc.collect``) every ``collect_every`` blocks, so memory stays bounded.
"""

from __future__ import annotations

import gc

FREEZE_COLLECT_BLOCKS = 2_000  # default period of the full collection, in blocks


class BlockFreezer:
    """Call :meth:`block_done` once per block processed (module docstring)."""

    def __init__(self, collect_every: int = FREEZE_COLLECT_BLOCKS) -> None:
        if collect_every < 1:
            raise ValueError("collect_every must be at least 1")
        self.collect_every = collect_every
        self.blocks = 0
        self.collected = 0  # unreachable objects the periodic full collections found

    def block_done(self) -> None:
        self.blocks += 1
        if self.blocks % self.collect_every == 0:
            gc.unfreeze()
            self.collected += gc.collect()
        gc.freeze()

"""The audit's digests (decision 0115) encode exactly the projector's row model.

``block_digests``, ``spends_digest`` and ``block_values`` build what the audit compares
without ``block_rows``; here each is held to a digest written out from the row model
itself (``VerifiedBlock.rows``), on a chain with payments, an issuance and a colored
transfer. The per-block collector freeze is held to collecting cyclic garbage at its
period.
"""

from __future__ import annotations

import gc
import hashlib
import weakref
from typing import Any

import pytest

from streams.common.collector import FREEZE_COLLECT_BLOCKS, BlockFreezer
from streams.projections.audit import (
    _BLOCK_VALUES,
    AuditReport,
    ChainVerifier,
    VerifiedBlock,
    block_digests,
    block_values,
    spends_digest,
)
from tests.unit.test_projector_rows import CHAIN, GENESIS, log_record

pytestmark = pytest.mark.unit


def _field(value: Any) -> str:
    """One column as the SQL side writes it (``_sql_text``, ``_sql_int``, hex bytea)."""
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, str):
        return f"{len(value)}:{value}"
    return str(int(value))


def _digest(rows: list[tuple[Any, ...]], *, sort: bool = False) -> bytes | None:
    lines = ["\t".join(_field(v) for v in row) + "\n" for row in rows]
    if sort:
        lines.sort()
    return hashlib.sha256("".join(lines).encode()).digest() if lines else None


def _verified() -> list[VerifiedBlock]:
    chain = ChainVerifier(GENESIS, AuditReport())
    blocks = [chain.follow(log_record(offset, block, qc))
              for offset, (block, qc) in enumerate(CHAIN)]
    assert all(b is not None for b in blocks)
    return [b for b in blocks if b is not None]


def test_digests_and_block_values_match_the_row_model() -> None:
    verified = _verified()
    colored = 0
    for block in verified:
        rows = block.rows()
        assert block_values(block) == _BLOCK_VALUES(rows.block)
        txs = [tuple(row) for row in rows.txs]
        outputs = [(o.txid, o.index, o.value, o.script_pubkey, o.address, o.asset_id,
                    o.quantity) for o in rows.outputs]
        colored += sum(1 for o in rows.outputs if o.asset_id is not None)
        assert block_digests(block) == (_digest(txs), _digest(outputs))
        spends = [(s.txid, s.index, s.spent_by_txid) for s in rows.spends]
        assert spends_digest([block]) == _digest(spends, sort=True)
    assert colored >= 2  # the issuance's and the transfer's outputs are covered
    everything = [(s.txid, s.index, s.spent_by_txid) for b in verified for s in b.rows().spends]
    assert spends_digest(verified) == _digest(everything, sort=True)


def test_a_changed_value_changes_the_digest() -> None:
    block = _verified()[0]
    rows = block.rows()
    outputs = [(o.txid, o.index, o.value, o.script_pubkey, o.address, o.asset_id, o.quantity)
               for o in rows.outputs]
    altered = [(*outputs[0][:2], outputs[0][2] + 1, *outputs[0][3:]), *outputs[1:]]
    assert block_digests(block)[1] == _digest(outputs) != _digest(altered)
    # a text value cannot pass for a separator: lengths are part of the encoding
    assert _digest([("a\tb", None)]) != _digest([("a", "b")])


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_block_freezer_collects_cyclic_garbage_at_its_period() -> None:
    freezer = BlockFreezer()
    try:
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        freezer.block_done()  # frozen: out of the collector's view
        del cycle
        gc.collect()
        assert gone() is not None
        while freezer.blocks % FREEZE_COLLECT_BLOCKS:
            freezer.block_done()
        assert gone() is None
    finally:
        gc.unfreeze()

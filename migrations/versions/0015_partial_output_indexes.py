"""``tx_output``: the ``asset_id`` and ``spent_by_txid`` indexes only over non-NULL values.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30

Every lookup through these two indexes is an equality (the API's and the regulator's
``asset_id = …``, the audit's and the views' ``spent_by_txid = t.txid`` join), which
PostgreSQL can answer from a partial index ``WHERE … IS NOT NULL`` (an equality implies
it, also as a parameterised join). Native outputs (``asset_id`` NULL: most of them) and
unspent outputs (``spent_by_txid`` NULL until spent) then cost the projector's COPY no
entry in them: ~3 µs of server CPU per payment (decision 0095). The index names stay.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_INDEXES = (("tx_output_asset_id_idx", "asset_id"),
            ("tx_output_spent_by_txid_idx", "spent_by_txid"))


def upgrade() -> None:
    for name, column in _INDEXES:
        op.drop_index(name, table_name="tx_output")
        op.create_index(name, "tx_output", [column],
                        postgresql_where=sa.text(f"{column} IS NOT NULL"))


def downgrade() -> None:
    for name, column in _INDEXES:
        op.drop_index(name, table_name="tx_output")
        op.create_index(name, "tx_output", [column])

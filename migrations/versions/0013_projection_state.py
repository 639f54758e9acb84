"""The projector's resume row: what it needs, besides the projected rows, to start from
the database instead of re-reading the blocks log from offset 0.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30

Self-contained and reversible (the integrator re-chains revisions of parallel
branches). One row per consumer (``projection_state``), written by
streams/projections/projector.py in the same transaction as each batch's rows and
tracking rows: the head it projected (height, hash, state hash), the votes-log offset
right after the vote that decided that head (where the decision machine resumes), the
tx-log offset the next block must start at, and the asset-definition bindings and
issued supplies (few; the unspent outputs themselves are the ``tx_output`` rows).
Why and what is verified at start: docs/decisions/0093-projector-resume-and-write-path.md.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projection_state",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.Text(), nullable=False),
        sa.Column("state_hash", sa.Text(), nullable=False),
        sa.Column("votes_offset", sa.BigInteger(), nullable=False),
        sa.Column("tx_offset_end", sa.BigInteger(), nullable=False),
        sa.Column("bindings", postgresql.JSONB(), nullable=False),
        sa.Column("supply", postgresql.JSONB(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", name="projection_state_pkey"),
        sa.CheckConstraint("height >= 0 AND votes_offset >= 0 AND tx_offset_end >= 0",
                           name="projection_state_ranges_check"),
    )


def downgrade() -> None:
    op.drop_table("projection_state")

"""The membership and chain parameters in force by height (governance, decision 0061).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29

Self-contained and reversible (the integrator re-chains revisions of parallel
branches). One row per membership epoch: the genesis membership from height 0, then
one row per committed governance change from its effective height, written by the
projector (streams/projections/projector.py) in the same transaction as the block
that carries the change. The membership in force at height h is the row with the
greatest ``start_height`` <= h. The projector role of revision 0007 writes it through
its default privileges; the API role reads it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "membership",
        sa.Column("start_height", sa.BigInteger, nullable=False,
                  comment="first height this membership is in force"),
        sa.Column("sequence", sa.Integer, nullable=False,
                  comment="governance change number (0: genesis)"),
        sa.Column("change_id", sa.Text, nullable=True,
                  comment="sha256d of the change's canonical bytes, hex; null for genesis"),
        sa.Column("kind", sa.Text, nullable=False,
                  comment="genesis, add_member, remove_member, rotate_key or change_params"),
        sa.Column("member_id", sa.Text, nullable=True, comment="member added, removed, rotated"),
        sa.Column("carried_height", sa.BigInteger, nullable=True,
                  comment="height of the block carrying the change; null for genesis"),
        sa.Column("txid", sa.Text, nullable=True, comment="governance transaction id"),
        sa.Column("members", postgresql.JSONB, nullable=False,
                  comment='[{"id": ..., "public_key": SEC hex}] in rotation order'),
        sa.Column("signers", postgresql.ARRAY(sa.Text), nullable=False,
                  comment="members whose signatures approved the change"),
        sa.Column("quorum", sa.Integer, nullable=False),
        sa.Column("block_interval_ms", sa.Integer, nullable=False),
        sa.Column("block_bytes_max", sa.Integer, nullable=False),
        sa.Column("block_txs_max", sa.Integer, nullable=False),
        sa.Column("proposer_timeout_ms", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("start_height", name="membership_pkey"),
        sa.UniqueConstraint("sequence", name="membership_sequence_key"),
        sa.CheckConstraint("quorum > 0", name="membership_quorum_positive"),
    )


def downgrade() -> None:
    op.drop_table("membership")

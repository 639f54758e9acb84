"""The projector's quarantine: log records it could not project, and why.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

One row per record the projector skipped instead of stopping (a forged or broken
committed record, a second certified block at a projected height, a rejection record
with a NUL byte in its text): the consumer, the record's topic, partition and offset,
a stable reason code and the detail. Written in the same transaction as the rows and
the tracking offsets of its batch, so a replay finds the same rows
(docs/decisions/0050-no-record-stops-the-ledger.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projection_quarantine",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("reason_code", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("consumer", "topic", "partition", "offset",
                                name="projection_quarantine_pkey"),
        sa.CheckConstraint('"offset" >= 0', name="projection_quarantine_offset_check"),
    )


def downgrade() -> None:
    op.drop_table("projection_quarantine")

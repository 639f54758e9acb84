"""Negotiation messages as ciphertext, and each party's sealed negotiation key, so the
API reads a party's messages from the projection (decrypted in the API with the
party's custodial key) without running the market service.

Revision ID: 0012
Revises: 0009
Create Date: 2026-11-29

Self-contained and reversible (the integrator re-chains revisions of parallel
branches). Written by streams/projections/market.py from ``message-sent`` and
``negotiation-opened`` events. The text stays end-to-end encrypted: the rows hold
AES-GCM ciphertext and the negotiation key sealed to each reader (poster, joiner,
surveillance), which only that reader's private key opens; the regulator's role is
granted nothing here. Why: docs/decisions/0082-api-writes-notified-and-restart-safe.md.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "market_sealed_message",
        sa.Column("negotiation_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("sent_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("negotiation_id", "sequence",
                                name="market_sealed_message_pkey"),
    )
    op.create_table(
        "market_sealed_key",
        sa.Column("negotiation_id", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("command_nonce", sa.Text(), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("negotiation_id", "role", name="market_sealed_key_pkey"),
    )


def downgrade() -> None:
    op.drop_table("market_sealed_key")
    op.drop_table("market_sealed_message")

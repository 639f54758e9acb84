"""The OTC market's projection: assets with their terms, participants, orders and their
history, negotiations (metadata only), agreements, trades, and balances per user.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Written by the market projector (streams/projections/market.py) from the market.*.v1
topics, with its tracking rows in ``projection_offset`` in the same transaction.
Negotiation text never reaches these tables: ``market_negotiation`` counts messages and
``market_event`` keeps the events' payloads with the ciphertext removed. Prices are
numeric(16,2) KRW, quantities and amounts bigint (units, whole won).
``market_balance`` joins the participants' addresses with ``address_balance``
(revision 0002: unspent outputs projected from the chain).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MARKET_BALANCE_VIEW = """
CREATE VIEW market_balance AS
SELECT p.firm, p.user_id, p.address, b.asset_id, a.security_code, a.name, a.kind,
       b.amount::bigint AS amount
FROM market_participant p
JOIN address_balance b ON b.address = p.address AND b.asset_id IS NOT NULL
LEFT JOIN market_asset a ON a.asset_id = b.asset_id
"""

TIMESTAMP = sa.DateTime(timezone=True)


def _user_columns(prefix: str) -> list[sa.Column[str]]:
    return [sa.Column(f"{prefix}_firm", sa.Text(), nullable=False),
            sa.Column(f"{prefix}_user", sa.Text(), nullable=False)]


def upgrade() -> None:
    op.create_table(
        "market_asset",
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("security_code", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("unit", sa.Text(), nullable=False),
        sa.Column("decimals", sa.Integer(), nullable=False),
        sa.Column("issue_date", sa.Date(), nullable=True),
        sa.Column("maturity", sa.Date(), nullable=True),
        sa.Column("coupon_bp", sa.Integer(), nullable=True),
        sa.Column("face_value", sa.BigInteger(), nullable=True),
        sa.Column("definition_hash", sa.Text(), nullable=False),
        sa.Column("definition", postgresql.JSONB(), nullable=False),
        sa.Column("registered_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("asset_id", name="market_asset_pkey"),
        sa.UniqueConstraint("security_code", name="market_asset_security_code_key"),
    )
    op.create_table(
        "market_participant",
        sa.Column("firm", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("pubkey", sa.Text(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("firm", "user_id", name="market_participant_pkey"),
    )
    op.create_table(
        "market_order",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("security_code", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("side", sa.Text(), nullable=False),
        sa.Column("price", sa.Numeric(16, 2), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        *_user_columns("poster"),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("negotiation_id", sa.Text(), nullable=True),
        sa.Column("posted_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("order_id", name="market_order_pkey"),
        sa.CheckConstraint("side IN ('sell', 'buy')", name="market_order_side_check"),
        sa.CheckConstraint("price > 0 AND quantity > 0", name="market_order_size_check"),
        sa.CheckConstraint("status IN ('waiting', 'negotiating', 'agreed', 'settled', "
                           "'cancelled', 'expired')", name="market_order_status_check"),
    )
    op.create_index("market_order_status_idx", "market_order", ["status", "posted_at"])
    op.create_table(
        "market_event",
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("writer", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("topic", "log_offset", name="market_event_pkey"),
    )
    op.create_index("market_event_order_idx", "market_event", ["order_id", "log_offset"])
    op.create_table(
        "market_negotiation",
        sa.Column("negotiation_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        *_user_columns("poster"),
        *_user_columns("joiner"),
        sa.Column("opened_at", TIMESTAMP, nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("negotiation_id", name="market_negotiation_pkey"),
    )
    op.create_table(
        "market_agreement",
        sa.Column("agreement_id", sa.Text(), nullable=False),
        sa.Column("negotiation_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("price", sa.Numeric(16, 2), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        *_user_columns("seller"),
        *_user_columns("buyer"),
        sa.Column("signatures", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("failed_code", sa.Text(), nullable=True),
        sa.Column("expires_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("agreement_id", name="market_agreement_pkey"),
        sa.CheckConstraint("status IN ('signing', 'agreed', 'settled', 'failed')",
                           name="market_agreement_status_check"),
    )
    op.create_table(
        "market_trade",
        sa.Column("agreement_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("negotiation_id", sa.Text(), nullable=False),
        sa.Column("txid", sa.Text(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.Text(), nullable=False),
        sa.Column("committed_at", TIMESTAMP, nullable=False),
        sa.Column("asset_id", sa.Text(), nullable=False),
        sa.Column("security_code", sa.Text(), nullable=False),
        sa.Column("price", sa.Numeric(16, 2), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        *_user_columns("seller"),
        *_user_columns("buyer"),
        sa.PrimaryKeyConstraint("agreement_id", name="market_trade_pkey"),
        sa.UniqueConstraint("txid", name="market_trade_txid_key"),
    )
    op.execute(MARKET_BALANCE_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS market_balance")
    for table in ("market_trade", "market_agreement", "market_negotiation", "market_event",
                  "market_order", "market_participant", "market_asset"):
        op.drop_table(table)

"""Projection audit columns and the rejection table: block state hash, tx-log range,
quorum voters and source offset; tx issuance; tx_rejection (ledger.rejected.v1); the
address_balance view.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Every new column on an existing table is nullable so the revision applies to a
populated projection; the projector (streams/projector.py) always fills them.
``block.state_hash`` is the projector's ledger state hash after the block, the same
value the nodes report in their heartbeats at that height (the audit compares them).
``tx_rejection`` keeps one row per ``TxRejected`` record: every node publishes its
own copy, so a refused submission usually has several rows (one per institution),
told apart by ``institution``; ``log_offset`` is the record's offset in
ledger.rejected.v1, the identity a replay reproduces.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HEX64 = "~ '^[0-9a-f]{64}$'"

# What each address holds now: one row for native value (asset_id NULL; colored outputs
# carry native value too) and one per asset (units), from the unspent outputs.
ADDRESS_BALANCE_VIEW = """
CREATE VIEW address_balance AS
SELECT address, NULL::text AS asset_id, sum(value)::bigint AS amount, count(*) AS outputs
FROM tx_output WHERE spent_by_txid IS NULL AND address IS NOT NULL
GROUP BY address
UNION ALL
SELECT address, asset_id, sum(quantity)::bigint AS amount, count(*) AS outputs
FROM tx_output WHERE spent_by_txid IS NULL AND address IS NOT NULL AND asset_id IS NOT NULL
GROUP BY address, asset_id
"""


def upgrade() -> None:
    op.add_column("block", sa.Column("state_hash", sa.Text(), nullable=True))
    op.add_column("block", sa.Column("tx_offset_start", sa.BigInteger(), nullable=True))
    op.add_column("block", sa.Column("tx_offset_end", sa.BigInteger(), nullable=True))
    op.add_column("block", sa.Column("voters", postgresql.ARRAY(sa.Text()), nullable=True))
    op.add_column("block", sa.Column("source_offset", sa.BigInteger(), nullable=True))
    op.create_check_constraint("block_state_hash_check", "block", f"state_hash {HEX64}")
    op.create_check_constraint(
        "block_tx_offset_range_check", "block", "0 <= tx_offset_start AND "
        "tx_offset_start <= tx_offset_end")
    op.add_column("tx", sa.Column("issued_asset_id", sa.Text(), nullable=True))
    op.add_column("tx", sa.Column("issued_quantity", sa.BigInteger(), nullable=True))
    op.create_check_constraint(
        "tx_issued_check", "tx",
        "(issued_asset_id IS NULL) = (issued_quantity IS NULL) AND "
        "(issued_quantity IS NULL OR issued_quantity > 0)")
    op.create_index("tx_output_spent_by_txid_idx", "tx_output", ["spent_by_txid"])
    op.create_table(
        "tx_rejection",
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("txid", sa.Text(), nullable=True),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("institution", sa.Text(), nullable=False),
        sa.Column("submitter", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("block_hash", sa.Text(), nullable=True),
        sa.Column("source_topic", sa.Text(), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("projected_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("log_offset", name="tx_rejection_pkey"),
        sa.CheckConstraint("log_offset >= 0", name="tx_rejection_log_offset_check"),
        sa.CheckConstraint(f"txid IS NULL OR txid {HEX64}", name="tx_rejection_txid_check"),
        sa.CheckConstraint(f"block_hash IS NULL OR block_hash {HEX64}",
                           name="tx_rejection_block_hash_check"),
        sa.CheckConstraint("source_partition >= 0 AND source_offset >= -1",
                           name="tx_rejection_source_check"),
    )
    op.create_index("tx_rejection_code_idx", "tx_rejection", ["code"])
    op.create_index("tx_rejection_txid_idx", "tx_rejection", ["txid"])
    op.create_index("tx_rejection_source_idx", "tx_rejection",
                    ["source_topic", "source_partition", "source_offset"])
    op.execute(ADDRESS_BALANCE_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW address_balance")
    op.drop_index("tx_rejection_source_idx", table_name="tx_rejection")
    op.drop_index("tx_rejection_txid_idx", table_name="tx_rejection")
    op.drop_index("tx_rejection_code_idx", table_name="tx_rejection")
    op.drop_table("tx_rejection")
    op.drop_index("tx_output_spent_by_txid_idx", table_name="tx_output")
    op.drop_constraint("tx_issued_check", "tx", type_="check")
    op.drop_column("tx", "issued_quantity")
    op.drop_column("tx", "issued_asset_id")
    op.drop_constraint("block_tx_offset_range_check", "block", type_="check")
    op.drop_constraint("block_state_hash_check", "block", type_="check")
    op.drop_column("block", "source_offset")
    op.drop_column("block", "voters")
    op.drop_column("block", "tx_offset_end")
    op.drop_column("block", "tx_offset_start")
    op.drop_column("block", "state_hash")

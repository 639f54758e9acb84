"""Projection base tables: projection_offset, block, tx, tx_output.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Hashes and txids are lowercase hex in display order (64 characters) so that
regulators can paste them into SQL; raw transactions are bytea. Amounts are
integers in minor units (bigint). ``projection_offset`` is the tracking row a
projector writes in the same transaction as its rows, so redelivery is harmless.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

HEX64 = "~ '^[0-9a-f]{64}$'"


def upgrade() -> None:
    op.create_table(
        "projection_offset",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("consumer", "topic", "partition",
                                name="projection_offset_pkey"),
        sa.CheckConstraint('"offset" >= 0', name="projection_offset_offset_check"),
    )
    op.create_table(
        "block",
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.Text(), nullable=False),
        sa.Column("merkle_root", sa.Text(), nullable=False),
        sa.Column("proposer", sa.Text(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("time_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tx_count", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("projected_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("height", name="block_pkey"),
        sa.UniqueConstraint("hash", name="block_hash_key"),
        sa.CheckConstraint("height >= 0", name="block_height_check"),
        sa.CheckConstraint(f"hash {HEX64}", name="block_hash_check"),
        sa.CheckConstraint(f"prev_hash {HEX64}", name="block_prev_hash_check"),
        sa.CheckConstraint(f"merkle_root {HEX64}", name="block_merkle_root_check"),
        sa.CheckConstraint("round >= 0", name="block_round_check"),
        sa.CheckConstraint("tx_count >= 0", name="block_tx_count_check"),
        sa.CheckConstraint("size_bytes > 0", name="block_size_bytes_check"),
    )
    op.create_table(
        "tx",
        sa.Column("txid", sa.Text(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("txid", name="tx_pkey"),
        sa.ForeignKeyConstraint(["height"], ["block.height"], name="tx_height_fkey",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("height", "position", name="tx_height_position_key"),
        sa.CheckConstraint(f"txid {HEX64}", name="tx_txid_check"),
        sa.CheckConstraint("position >= 0", name="tx_position_check"),
        sa.CheckConstraint("size_bytes = octet_length(raw)", name="tx_size_bytes_check"),
    )
    op.create_table(
        "tx_output",
        sa.Column("txid", sa.Text(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("script_pubkey", sa.LargeBinary(), nullable=False),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("asset_id", sa.Text(), nullable=True),
        sa.Column("quantity", sa.BigInteger(), nullable=True),
        sa.Column("spent_by_txid", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("txid", "index", name="tx_output_pkey"),
        sa.ForeignKeyConstraint(["txid"], ["tx.txid"], name="tx_output_txid_fkey",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["spent_by_txid"], ["tx.txid"],
                                name="tx_output_spent_by_txid_fkey", ondelete="SET NULL"),
        sa.CheckConstraint('"index" >= 0', name="tx_output_index_check"),
        sa.CheckConstraint("value >= 0", name="tx_output_value_check"),
        sa.CheckConstraint("quantity IS NULL OR quantity >= 0",
                           name="tx_output_quantity_check"),
        sa.CheckConstraint("(asset_id IS NULL) = (quantity IS NULL)",
                           name="tx_output_asset_quantity_check"),
    )
    op.create_index("tx_output_address_idx", "tx_output", ["address"])
    op.create_index("tx_output_asset_id_idx", "tx_output", ["asset_id"])
    op.create_index("tx_output_unspent_idx", "tx_output", ["address"],
                    postgresql_where=sa.text("spent_by_txid IS NULL"))
    op.create_index("block_time_at_idx", "block", ["time_at"])


def downgrade() -> None:
    op.drop_index("block_time_at_idx", table_name="block")
    op.drop_index("tx_output_unspent_idx", table_name="tx_output")
    op.drop_index("tx_output_asset_id_idx", table_name="tx_output")
    op.drop_index("tx_output_address_idx", table_name="tx_output")
    op.drop_table("tx_output")
    op.drop_table("tx")
    op.drop_table("block")
    op.drop_table("projection_offset")

"""The projection's write path: no per-row foreign-key triggers on block, tx, tx_output.

Revision ID: 0011
Revises: 0009
Create Date: 2026-11-29

The three foreign keys of revision 0001 (``tx.height`` -> ``block``, ``tx_output.txid``
and ``tx_output.spent_by_txid`` -> ``tx``) cost PostgreSQL one trigger and one index
probe per row: measured, 56 µs of server CPU per projected transaction with them and
34 µs without (docs/benchmarks.md). The projector is the only writer of these tables
(the ``capledger_projector`` role), writes a block's rows and its parents in one
transaction, and ``capledger audit replay`` compares every row with the chain, so a
dangling row is named by the audit rather than refused by a trigger. Nothing deletes
single rows (a rebuild truncates all four tables together). Indexes are unchanged:
the regulator views and the API use each of them (decision 0092).

Downgrade adds the constraints back (validated against the rows present).
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# (table, constraint, definition) as revision 0001 created them
FOREIGN_KEYS = (
    ("tx", "tx_height_fkey", "FOREIGN KEY (height) REFERENCES block (height) ON DELETE CASCADE"),
    ("tx_output", "tx_output_txid_fkey",
     "FOREIGN KEY (txid) REFERENCES tx (txid) ON DELETE CASCADE"),
    ("tx_output", "tx_output_spent_by_txid_fkey",
     "FOREIGN KEY (spent_by_txid) REFERENCES tx (txid) ON DELETE SET NULL"),
)


def upgrade() -> None:
    for table, name, _ in FOREIGN_KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")


def downgrade() -> None:
    for table, name, definition in FOREIGN_KEYS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")

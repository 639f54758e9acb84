"""``refused_settlement``: one row per refused transaction, not per tx-log record.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30

A batch submission (``TxBatchSubmitted``, decision 0112) carries many transactions in
one tx-log record; each refused transaction has its own ``tx_rejection`` rows with its
own txid and idempotency key at the record's offset. Grouped by offset alone (revision
0005), a batch's refusals folded into one row with the smallest txid. Grouped by offset
and txid, a single-transaction record still gives one row (every node reports the
same txid), and each transaction of a batch gets its own. ``CREATE OR REPLACE`` keeps
the columns (names, types, order) and so the grants of revision 0007.
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_COLUMNS = """
SELECT source_topic, source_partition, source_offset,
       {txid} AS txid, min(submitter) AS submitter,
       min(idempotency_key) AS idempotency_key,
       array_agg(DISTINCT code ORDER BY code) AS codes,
       array_agg(DISTINCT stage::text ORDER BY stage::text) AS stages,
       array_agg(DISTINCT institution ORDER BY institution) AS reported_by,
       min(message) AS message,
       min(rejected_at) AS first_rejected_at,
       count(*) AS records
FROM tx_rejection
GROUP BY source_topic, source_partition, source_offset{by_txid}
"""


def upgrade() -> None:
    op.execute("CREATE OR REPLACE VIEW refused_settlement AS"
               + _COLUMNS.format(txid="txid", by_txid=", txid"))


def downgrade() -> None:
    op.execute("CREATE OR REPLACE VIEW refused_settlement AS"
               + _COLUMNS.format(txid="min(txid)", by_txid=""))

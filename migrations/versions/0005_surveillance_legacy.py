"""Regulator views, surveillance alerts and settings, legacy integration views and the
legacy import journal.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-29

Self-contained and reversible (the integrator re-chains revisions of parallel
branches). Every amount a view shows is ``numeric`` (never float): native value in
minor units when ``asset_id`` is NULL, asset units otherwise. Thresholds live in
``surveillance_setting`` (one row per named threshold; the regulator changes them with
UPDATE); the views and the ``surveillance`` service read the same rows. Queries with
one example each: docs/regulator-sql.md. Why these tables: decision 0090.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

SETTINGS = (
    ("large_position_change_min", "1000000",
     "a net change of one address in one asset (or native value) within one transaction "
     "at least this large is a large position change"),
    ("concentration_share_min", "0.5",
     "a participant receiving at least this share of a day's transfer volume of an asset "
     "is concentrated"),
    ("concentration_volume_min", "1000",
     "days whose transfer volume of an asset is below this are not judged for "
     "concentration"),
    ("concentration_transfers_min", "3",
     "days with fewer transfers of an asset than this are not judged for concentration"),
)

# One row per (transaction, address, asset): what the address received in the
# transaction minus what it spent there. NULL asset_id: native value.
POSITION_CHANGE = """
CREATE VIEW position_change AS
SELECT t.height, b.time_at, m.txid, m.address, m.asset_id, sum(m.amount)::numeric AS change
FROM (
    SELECT txid, address, asset_id,
           CASE WHEN asset_id IS NULL THEN value ELSE quantity END AS amount
    FROM tx_output WHERE address IS NOT NULL
    UNION ALL
    SELECT spent_by_txid, address, asset_id,
           -(CASE WHEN asset_id IS NULL THEN value ELSE quantity END)
    FROM tx_output WHERE spent_by_txid IS NOT NULL AND address IS NOT NULL
) m
JOIN tx t ON t.txid = m.txid
JOIN block b ON b.height = t.height
GROUP BY t.height, b.time_at, m.txid, m.address, m.asset_id
HAVING sum(m.amount) <> 0
"""

LARGE_POSITION_CHANGE = """
CREATE VIEW large_position_change AS
SELECT pc.height, pc.time_at, pc.txid, pc.address, pc.asset_id, pc.change,
       s.value AS threshold
FROM position_change pc
JOIN surveillance_setting s ON s.name = 'large_position_change_min'
WHERE abs(pc.change) >= s.value
"""

# One row per refused submission (every node reports it: institutions aggregated).
REFUSED_SETTLEMENT = """
CREATE VIEW refused_settlement AS
SELECT source_topic, source_partition, source_offset,
       min(txid) AS txid, min(submitter) AS submitter,
       min(idempotency_key) AS idempotency_key,
       array_agg(DISTINCT code ORDER BY code) AS codes,
       array_agg(DISTINCT stage::text ORDER BY stage::text) AS stages,
       array_agg(DISTINCT institution ORDER BY institution) AS reported_by,
       min(message) AS message,
       min(rejected_at) AS first_rejected_at,
       count(*) AS records
FROM tx_rejection
GROUP BY source_topic, source_partition, source_offset
"""

# Transfers: outputs paying an address that did not fund the same transaction (change
# excluded), per UTC day, asset and receiving participant, with its share of the day.
TRANSFER_CONCENTRATION = """
CREATE VIEW transfer_concentration AS
WITH received AS (
    SELECT (b.time_at AT TIME ZONE 'UTC')::date AS day, o.asset_id, o.address,
           sum(CASE WHEN o.asset_id IS NULL THEN o.value ELSE o.quantity END)::numeric
               AS volume,
           count(DISTINCT o.txid) AS transfers
    FROM tx_output o
    JOIN tx t ON t.txid = o.txid
    JOIN block b ON b.height = t.height
    WHERE o.address IS NOT NULL AND b.height > 0
      AND NOT EXISTS (SELECT 1 FROM tx_output i
                      WHERE i.spent_by_txid = o.txid AND i.address = o.address)
    GROUP BY 1, 2, 3
)
SELECT day, asset_id, address, volume, transfers,
       sum(volume) OVER (PARTITION BY day, asset_id) AS day_volume,
       sum(transfers) OVER (PARTITION BY day, asset_id) AS day_transfers,
       round(volume / nullif(sum(volume) OVER (PARTITION BY day, asset_id), 0), 6) AS share
FROM received
"""

# Legacy back offices: each settled movement (an output of a committed transaction)
# with its UTC settlement date.
LEGACY_SETTLEMENT = """
CREATE VIEW legacy_settlement AS
SELECT (b.time_at AT TIME ZONE 'UTC')::date AS settlement_date, b.height, b.time_at,
       t.txid, t.position, o."index" AS output_index, o.address, o.asset_id,
       (CASE WHEN o.asset_id IS NULL THEN o.value ELSE o.quantity END)::numeric AS amount,
       t.issued_asset_id IS NOT NULL AS is_issuance
FROM tx_output o
JOIN tx t ON t.txid = o.txid
JOIN block b ON b.height = t.height
WHERE o.address IS NOT NULL AND b.height > 0
"""

# Balances as they stood at an instant: outputs created in blocks before it and not
# spent by a transaction of a block before it.
LEGACY_BALANCE_AT = """
CREATE FUNCTION legacy_balance_at(at_time timestamptz)
RETURNS TABLE (address text, asset_id text, amount numeric, outputs bigint)
LANGUAGE sql STABLE AS $$
    SELECT o.address, o.asset_id,
           sum(CASE WHEN o.asset_id IS NULL THEN o.value ELSE o.quantity END)::numeric,
           count(*)
    FROM tx_output o
    JOIN tx t ON t.txid = o.txid
    JOIN block b ON b.height = t.height
    LEFT JOIN tx s ON s.txid = o.spent_by_txid
    LEFT JOIN block sb ON sb.height = s.height
    WHERE o.address IS NOT NULL AND b.time_at < at_time
      AND (s.txid IS NULL OR sb.time_at >= at_time)
    GROUP BY o.address, o.asset_id
$$
"""

# Per institution: its votes as the consensus rules judged them (decision 0020) and the
# rounds in which it was the proposer and the members timed out on it.
CONSENSUS_EVIDENCE = """
CREATE VIEW consensus_evidence AS
WITH votes AS (
    SELECT voter AS institution,
           count(*) FILTER (WHERE kind = 'ack') AS acks,
           count(*) FILTER (WHERE kind = 'nack') AS nacks,
           count(*) FILTER (WHERE kind = 'timeout') AS timeouts,
           count(*) FILTER (WHERE evidence = 'double-vote') AS double_votes,
           count(*) FILTER (WHERE evidence = 'vote-forged') AS forged_votes,
           count(*) FILTER (WHERE evidence IS NOT NULL
                              AND evidence NOT IN ('double-vote', 'vote-forged'))
               AS other_evidence,
           array_agg(DISTINCT reason_code ORDER BY reason_code)
               FILTER (WHERE kind = 'nack') AS nack_reasons
    FROM consensus_vote WHERE voter IS NOT NULL GROUP BY voter
), skipped AS (
    SELECT skipped_proposer AS institution, count(*) AS rounds_skipped_as_proposer
    FROM consensus_view_change GROUP BY skipped_proposer
)
SELECT institution, coalesce(acks, 0) AS acks, coalesce(nacks, 0) AS nacks,
       coalesce(timeouts, 0) AS timeouts, coalesce(double_votes, 0) AS double_votes,
       coalesce(forged_votes, 0) AS forged_votes,
       coalesce(other_evidence, 0) AS other_evidence, nack_reasons,
       coalesce(rounds_skipped_as_proposer, 0) AS rounds_skipped_as_proposer
FROM votes FULL JOIN skipped USING (institution)
"""

VIEWS = ("consensus_evidence", "legacy_settlement", "transfer_concentration",
         "refused_settlement", "large_position_change", "position_change")


def upgrade() -> None:
    op.create_table(
        "surveillance_setting",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Numeric(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("name", name="surveillance_setting_pkey"),
        sa.CheckConstraint("value >= 0", name="surveillance_setting_value_check"),
    )
    setting = sa.table("surveillance_setting", sa.column("name", sa.Text()),
                       sa.column("value", sa.Numeric()), sa.column("description", sa.Text()))
    op.bulk_insert(setting, [{"name": n, "value": v, "description": d} for n, v, d in SETTINGS])
    op.create_table(
        "alert",
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("asset_id", sa.Text(), nullable=True),
        sa.Column("amount", sa.Numeric(), nullable=True),
        sa.Column("evidence", postgresql.JSONB(), nullable=False),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("rule", "cause", name="alert_pkey"),
    )
    op.create_index("alert_unpublished_idx", "alert", ["raised_at"],
                    postgresql_where=sa.text("published_at IS NULL"))
    op.create_table(
        "surveillance_cursor",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("rejection_offset", sa.BigInteger(), nullable=False),
        sa.Column("vote_offset", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("consumer", name="surveillance_cursor_pkey"),
    )
    op.create_table(
        "legacy_import",
        sa.Column("file_sha256", sa.Text(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("security_code", sa.Text(), nullable=False),
        sa.Column("quantity", sa.Numeric(), nullable=False),
        sa.Column("txid", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("file_sha256", "line", name="legacy_import_pkey"),
        sa.UniqueConstraint("txid", name="legacy_import_txid_key"),
        sa.CheckConstraint("quantity > 0", name="legacy_import_quantity_check"),
    )
    op.create_index("tx_rejection_submitter_idx", "tx_rejection", ["submitter"])
    _create_consensus_tables()
    for statement in (POSITION_CHANGE, LARGE_POSITION_CHANGE, REFUSED_SETTLEMENT,
                      TRANSFER_CONCENTRATION, LEGACY_SETTLEMENT, LEGACY_BALANCE_AT,
                      CONSENSUS_EVIDENCE):
        op.execute(statement)


def _create_consensus_tables() -> None:
    """The votes log as the consensus rules judged it (consensus_evidence.py)."""
    op.create_table(
        "consensus_vote",
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("voter", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=True),
        sa.Column("block_hash", sa.Text(), nullable=True),
        sa.Column("reason_code", sa.Text(), nullable=True),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column("voted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("log_offset", name="consensus_vote_pkey"),
    )
    op.create_index("consensus_vote_voter_idx", "consensus_vote", ["voter"])
    op.create_table(
        "consensus_view_change",
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("skipped_proposer", sa.Text(), nullable=False),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("height", "round", name="consensus_view_change_pkey"),
    )
    op.create_table(
        "consensus_cursor",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("log_offset", sa.BigInteger(), nullable=False),
        sa.Column("height", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("consumer", name="consensus_cursor_pkey"),
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION legacy_balance_at(timestamptz)")
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    op.drop_table("consensus_cursor")
    op.drop_table("consensus_view_change")
    op.drop_index("consensus_vote_voter_idx", table_name="consensus_vote")
    op.drop_table("consensus_vote")
    op.drop_index("tx_rejection_submitter_idx", table_name="tx_rejection")
    op.drop_table("legacy_import")
    op.drop_table("surveillance_cursor")
    op.drop_index("alert_unpublished_idx", table_name="alert")
    op.drop_table("alert")
    op.drop_table("surveillance_setting")

"""Trade surveillance views over the OTC market's projection, their thresholds and the
regulator's grant on them.

Revision ID: 0009
Revises: 0007
Create Date: 2026-11-29

Self-contained and reversible (the integrator re-chains revisions of parallel
branches). Reads the market tables of revision 0003 (written by
streams/projections/market.py); thresholds are new rows of ``surveillance_setting``
(revision 0005), the regulator role of revision 0007 reads the views. Money is
``numeric`` whole won (prices numeric(16,2) KRW), never float. One owner per party:
the participant's public key (``market_participant.pubkey``), so one person trading
from two firms' accounts is one owner; a party the projection does not know keeps
``firm/user`` as its owner. Why: docs/decisions/0091-trade-surveillance.md; queries:
docs/regulator-sql.md.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None

REGULATOR = "capledger_regulator"

SETTINGS = (
    ("price_deviation_min", "0.1",
     "a trade whose price differs from the previous trade of the same security (or from "
     "its reference price) by at least this fraction deviates"),
    ("circular_trade_window_s", "86400",
     "a trade back from B to A of the same security within this many seconds after "
     "A sold to B is circular"),
    ("trade_concentration_share_min", "0.5",
     "a participant on at least this share of a day's traded amount of a security is "
     "concentrated"),
    ("trade_concentration_trades_min", "3",
     "days with fewer trades of a security than this are not judged for concentration"),
    ("order_cancel_ratio_min", "0.8",
     "amendments plus cancellations per posted order at or above this are a spoofing "
     "indicator"),
    ("order_ratio_orders_min", "5",
     "participants posting fewer orders than this in a day are not judged for the ratio"),
)

# Every settled trade with its parties' owners and addresses.
TRADE_REPORT = """
CREATE VIEW trade_report AS
SELECT (t.committed_at AT TIME ZONE 'UTC')::date AS day, t.committed_at, t.height, t.txid,
       t.agreement_id, t.order_id, t.security_code, t.asset_id, a.name AS security_name,
       t.price, t.quantity, t.amount::numeric AS amount,
       t.seller_firm, t.seller_user, s.address AS seller_address,
       coalesce(s.pubkey, t.seller_firm || '/' || t.seller_user) AS seller_owner,
       t.buyer_firm, t.buyer_user, b.address AS buyer_address,
       coalesce(b.pubkey, t.buyer_firm || '/' || t.buyer_user) AS buyer_owner
FROM market_trade t
LEFT JOIN market_asset a ON a.asset_id = t.asset_id
LEFT JOIN market_participant s ON s.firm = t.seller_firm AND s.user_id = t.seller_user
LEFT JOIN market_participant b ON b.firm = t.buyer_firm AND b.user_id = t.buyer_user
"""

# Each trade against the previous trade of its security (chain order) and against the
# security's reference price (its face value, when the terms give one in KRW).
TRADE_PRICE_DEVIATION = """
CREATE VIEW trade_price_deviation AS
WITH ordered AS (
    SELECT r.*,
           lag(r.price) OVER w AS previous_price,
           lag(r.agreement_id) OVER w AS previous_agreement_id,
           CASE WHEN a.unit = 'KRW' THEN a.face_value::numeric END AS reference_price
    FROM trade_report r
    LEFT JOIN market_asset a ON a.asset_id = r.asset_id
    WINDOW w AS (PARTITION BY r.security_code ORDER BY r.height, r.committed_at, r.txid)
)
SELECT o.day, o.committed_at, o.height, o.txid, o.agreement_id, o.security_code,
       o.asset_id, o.price, o.quantity, o.amount, o.seller_firm, o.seller_user,
       o.buyer_firm, o.buyer_user, o.previous_agreement_id, o.previous_price,
       round((o.price - o.previous_price) / o.previous_price, 6) AS deviation,
       o.reference_price,
       round((o.price - o.reference_price) / nullif(o.reference_price, 0), 6)
           AS reference_deviation,
       s.value AS threshold,
       coalesce(abs((o.price - o.previous_price) / o.previous_price) >= s.value, false)
       OR coalesce(abs((o.price - o.reference_price) / nullif(o.reference_price, 0))
                   >= s.value, false) AS is_beyond
FROM ordered o
JOIN surveillance_setting s ON s.name = 'price_deviation_min'
"""

# Wash trades: one owner on both sides.
WASH_TRADE = """
CREATE VIEW wash_trade AS
SELECT day, committed_at, height, txid, agreement_id, security_code, asset_id, price,
       quantity, amount, seller_firm, seller_user, buyer_firm, buyer_user,
       seller_owner AS owner,
       (seller_firm = buyer_firm AND seller_user = buyer_user) AS is_same_account
FROM trade_report
WHERE seller_owner = buyer_owner
"""

# Circular trades: A sells to B, then B sells the same security back to A within the
# window (distinct owners: one owner on both sides is a wash trade).
CIRCULAR_TRADE = """
CREATE VIEW circular_trade AS
SELECT f.security_code, f.asset_id, f.seller_owner AS owner_a, f.buyer_owner AS owner_b,
       f.seller_firm AS a_firm, f.seller_user AS a_user,
       f.buyer_firm AS b_firm, f.buyer_user AS b_user,
       f.agreement_id AS first_agreement_id, f.committed_at AS first_committed_at,
       f.price AS first_price, f.quantity AS first_quantity,
       r.agreement_id AS return_agreement_id, r.committed_at AS return_committed_at,
       r.height AS return_height, r.price AS return_price, r.quantity AS return_quantity,
       extract(epoch FROM r.committed_at - f.committed_at)::numeric AS gap_s,
       s.value AS window_s
FROM trade_report f
JOIN trade_report r ON r.security_code = f.security_code
     AND r.seller_owner = f.buyer_owner AND r.buyer_owner = f.seller_owner
     AND (r.height, r.committed_at, r.txid) > (f.height, f.committed_at, f.txid)
JOIN surveillance_setting s ON s.name = 'circular_trade_window_s'
WHERE f.seller_owner <> f.buyer_owner
  AND r.committed_at - f.committed_at <= s.value * interval '1 second'
"""

# Per UTC day, security and participant (either side): its traded amount and share of
# the day's traded amount of the security.
TRADE_CONCENTRATION = """
CREATE VIEW trade_concentration AS
WITH sides AS (
    SELECT day, security_code, agreement_id, amount, quantity, seller_firm AS firm,
           seller_user AS user_id
    FROM trade_report
    UNION
    SELECT day, security_code, agreement_id, amount, quantity, buyer_firm, buyer_user
    FROM trade_report
), participant AS (
    SELECT day, security_code, firm, user_id, sum(amount) AS amount,
           sum(quantity)::numeric AS quantity, count(*) AS trades
    FROM sides GROUP BY 1, 2, 3, 4
), total AS (
    SELECT day, security_code, sum(amount) AS day_amount, count(*) AS day_trades
    FROM trade_report GROUP BY 1, 2
)
SELECT p.day, p.security_code, p.firm, p.user_id, p.amount, p.quantity, p.trades,
       t.day_amount, t.day_trades,
       round(p.amount / nullif(t.day_amount, 0), 6) AS share
FROM participant p JOIN total t USING (day, security_code)
"""

# Per UTC day and participant: orders posted, amended, cancelled (by the poster) and
# the ratio of amendments plus cancellations to posted orders.
ORDER_ACTIVITY = """
CREATE VIEW order_activity AS
WITH activity AS (
    SELECT (e.recorded_at AT TIME ZONE 'UTC')::date AS day, o.poster_firm AS firm,
           o.poster_user AS user_id,
           count(*) FILTER (WHERE e.kind = 'order-posted') AS posted,
           count(*) FILTER (WHERE e.kind = 'order-amended') AS amended,
           count(*) FILTER (WHERE e.kind = 'order-cancelled') AS cancelled
    FROM market_event e
    JOIN market_order o ON o.order_id = e.order_id
    WHERE e.kind IN ('order-posted', 'order-amended', 'order-cancelled')
    GROUP BY 1, 2, 3
)
SELECT day, firm, user_id, posted, amended, cancelled,
       round((amended + cancelled)::numeric / nullif(posted, 0), 6) AS ratio
FROM activity
"""

# Settlements that failed (with the market's code and message) and settle commands the
# board refused, with the agreement's terms when known.
FAILED_SETTLEMENT = """
CREATE VIEW failed_settlement AS
SELECT e.topic, e.log_offset, e.kind, e.recorded_at,
       coalesce(e.payload->>'agreement_id', g.agreement_id) AS agreement_id,
       e.order_id, o.security_code, g.price, g.quantity, g.amount::numeric AS amount,
       g.seller_firm, g.seller_user, g.buyer_firm, g.buyer_user,
       e.payload->>'code' AS code, e.payload->>'message' AS message
FROM market_event e
LEFT JOIN market_agreement g ON g.agreement_id = e.payload->>'agreement_id'
LEFT JOIN market_order o ON o.order_id = e.order_id
WHERE e.kind = 'settlement-failed'
   OR (e.kind = 'command-refused' AND e.payload->>'command_kind' = 'settle')
"""

VIEWS = {
    "trade_report": TRADE_REPORT,
    "trade_price_deviation": TRADE_PRICE_DEVIATION,
    "wash_trade": WASH_TRADE,
    "circular_trade": CIRCULAR_TRADE,
    "trade_concentration": TRADE_CONCENTRATION,
    "order_activity": ORDER_ACTIVITY,
    "failed_settlement": FAILED_SETTLEMENT,
}
# The names the regulator reads (added to 0007's REGULATOR_READS by this revision).
REGULATOR_READS = tuple(VIEWS)
INDEXES = (
    ("market_trade_security_idx", "market_trade", "security_code, height"),
    ("market_event_kind_idx", "market_event", "kind, recorded_at"),
)


def upgrade() -> None:
    setting = sa.table("surveillance_setting", sa.column("name", sa.Text()),
                       sa.column("value", sa.Numeric()), sa.column("description", sa.Text()))
    op.bulk_insert(setting, [{"name": n, "value": v, "description": d} for n, v, d in SETTINGS])
    for name, table, columns in INDEXES:
        op.execute(f"CREATE INDEX {name} ON {table} ({columns})")
    for statement in VIEWS.values():
        op.execute(statement)
    op.execute(f"GRANT SELECT ON {', '.join(REGULATOR_READS)} TO {REGULATOR}")


def downgrade() -> None:
    op.execute(f"REVOKE ALL ON {', '.join(REGULATOR_READS)} FROM {REGULATOR}")
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW {name}")
    for name, _, _ in INDEXES:
        op.execute(f"DROP INDEX {name}")
    names = ", ".join(f"'{name}'" for name, _, _ in SETTINGS)
    op.execute(f"DELETE FROM surveillance_setting WHERE name IN ({names})")

"""The surveillance service: alert rules evaluated as the projection advances.

Owns: the rules (SQL over the projection's views, migration 0005), ``Surveillance``
(one evaluation = one PostgreSQL transaction: the heights and rejection records added
since its cursor, the alerts they raise inserted once per (rule, cause), the cursor
moved) and the publication of alerts to ``<prefix>surveillance.alerts.v1``. The
``alert`` table is an outbox: rows commit first, records are sent after and the rows
marked published, so a crash in between republishes (readers deduplicate on rule and
cause) and never loses an alert. Thresholds are the rows of ``surveillance_setting``,
read at every evaluation, so a regulator's UPDATE takes effect on the next one.

Rules (docs/regulator-sql.md):
- ``large-position-change``: one address's net change in one asset (or native value)
  within one transaction at least ``large_position_change_min``; cause
  ``txid/address/asset``.
- ``refused-settlement``: a refused transaction (one per transaction of a tx-log
  record — a batch holds many — however many institutions reported it) whose codes are
  not all ignored (default: ``duplicate``, a harmless retry); cause
  ``source_topic/partition/offset/txid`` (``-`` for a record that did not parse).
- ``consensus-evidence``: a vote the consensus rules recorded as evidence against its
  (claimed) voter — double vote, forged signature, vote ahead of the log, vote after
  its timeout, unknown voter (``consensus_vote``, filled by ``capledger surveillance
  evidence``); cause ``<votes topic offset>``.
- ``transfer-concentration``: a participant receiving at least
  ``concentration_share_min`` of a UTC day's transfer volume of an asset, on days with
  at least ``concentration_volume_min`` volume and ``concentration_transfers_min``
  transfers, judged on the day so far; cause ``day/asset/address``.

Market rules (migration 0009, decision 0091) judge the market's whole projection at
every evaluation (the market is small: one row per order and trade), so each trade,
day or event is raised once, when it first meets its rule; a threshold lowered later
raises what now meets it, history included:
- ``trade-price-deviation``: a trade priced at least ``price_deviation_min`` (a
  fraction) away from the previous trade of its security or from its reference
  price; cause ``agreement_id``.
- ``wash-trade``: one owner on both sides of a trade; cause ``agreement_id``.
- ``circular-trade``: A sells to B, B sells the same security back to A within
  ``circular_trade_window_s``; cause ``first agreement/return agreement``.
- ``trade-concentration``: a participant on at least ``trade_concentration_share_min``
  of a day's traded amount of a security, on days with at least
  ``trade_concentration_trades_min`` trades; cause ``day/security/firm/user``.
- ``order-cancel-ratio``: a participant's amendments plus cancellations per posted
  order in a day at least ``order_cancel_ratio_min``, with at least
  ``order_ratio_orders_min`` orders posted; cause ``day/firm/user``.
- ``failed-settlement``: a settlement that failed or a settle command the board
  refused (market events); cause ``topic/log_offset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from streams.kafka import codec
from streams.kafka.logio import LogWriter
from streams.kafka.topics import ALERTS
from streams.projections.consensus_evidence import EvidenceProjector

CONSUMER_DEFAULT = "surveillance"
IGNORED_CODES_DEFAULT = ("duplicate",)
POLL_INTERVAL_S = 1.0
PUBLISH_BATCH_MAX = 1_000
HEIGHTS_PER_EVALUATION_MAX = 1_000  # bounds one transaction's work while catching up
REJECTIONS_PER_EVALUATION_MAX = 50_000

RULE_LARGE_POSITION_CHANGE = "large-position-change"
RULE_REFUSED_SETTLEMENT = "refused-settlement"
RULE_TRANSFER_CONCENTRATION = "transfer-concentration"
RULE_CONSENSUS_EVIDENCE = "consensus-evidence"
EVIDENCE_CODES = ("double-vote", "vote-forged", "vote-ahead-of-log", "vote-after-timeout",
                  "vote-unknown-voter", "vote-malformed")
VOTES_PER_EVALUATION_MAX = 100_000

LARGE_POSITION_CHANGE_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'large-position-change',
       pc.txid || '/' || pc.address || '/' || coalesce(pc.asset_id, 'native'),
       pc.height, pc.address, pc.asset_id, pc.change,
       jsonb_build_object('txid', pc.txid, 'height', pc.height, 'time_at', pc.time_at,
                          'address', pc.address, 'asset_id', pc.asset_id,
                          'change', pc.change::text, 'threshold', %(threshold)s::text)
FROM position_change pc
WHERE pc.height > %(low)s AND pc.height <= %(high)s AND abs(pc.change) >= %(threshold)s
ON CONFLICT DO NOTHING
"""

REFUSED_SETTLEMENT_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'refused-settlement',
       r.source_topic || '/' || r.source_partition || '/' || r.source_offset || '/'
           || coalesce(r.txid, '-'),
       NULL, min(r.submitter), NULL, NULL,
       jsonb_build_object('txid', r.txid, 'submitter', min(r.submitter),
                          'idempotency_key', min(r.idempotency_key),
                          'codes', array_agg(DISTINCT r.code ORDER BY r.code),
                          'reported_by', array_agg(DISTINCT r.institution
                                                   ORDER BY r.institution),
                          'message', min(r.message), 'rejected_at', min(r.rejected_at))
FROM tx_rejection r
WHERE r.log_offset >= %(low)s AND r.log_offset < %(high)s AND r.submitter IS NOT NULL
  AND NOT (r.code = ANY(%(ignored)s))
GROUP BY r.source_topic, r.source_partition, r.source_offset, r.txid
ON CONFLICT DO NOTHING
"""

TRANSFER_CONCENTRATION_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'transfer-concentration',
       c.day::text || '/' || coalesce(c.asset_id, 'native') || '/' || c.address,
       %(high)s, c.address, c.asset_id, c.volume,
       jsonb_build_object('day', c.day, 'address', c.address, 'asset_id', c.asset_id,
                          'volume', c.volume::text, 'day_volume', c.day_volume::text,
                          'transfers', c.transfers, 'day_transfers', c.day_transfers,
                          'share', c.share::text, 'share_min', %(share)s::text,
                          'volume_min', %(volume)s::text, 'transfers_min', %(count)s::text)
FROM transfer_concentration c
WHERE c.day IN (SELECT DISTINCT (time_at AT TIME ZONE 'UTC')::date FROM block
                WHERE height > %(low)s AND height <= %(high)s)
  AND c.share >= %(share)s AND c.day_volume >= %(volume)s AND c.day_transfers >= %(count)s
ON CONFLICT DO NOTHING
"""


CONSENSUS_EVIDENCE_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'consensus-evidence', 'votes/' || v.log_offset, v.height, v.voter, NULL, NULL,
       jsonb_build_object('evidence', v.evidence, 'voter', v.voter, 'height', v.height,
                          'round', v.round, 'kind', v.kind, 'block_hash', v.block_hash,
                          'log_offset', v.log_offset, 'voted_at', v.voted_at)
FROM consensus_vote v
WHERE v.log_offset >= %(low)s AND v.log_offset < %(high)s AND v.evidence = ANY(%(codes)s)
ON CONFLICT DO NOTHING
"""

RULE_TRADE_PRICE_DEVIATION = "trade-price-deviation"
RULE_WASH_TRADE = "wash-trade"
RULE_CIRCULAR_TRADE = "circular-trade"
RULE_TRADE_CONCENTRATION = "trade-concentration"
RULE_ORDER_CANCEL_RATIO = "order-cancel-ratio"
RULE_FAILED_SETTLEMENT = "failed-settlement"

TRADE_PRICE_DEVIATION_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'trade-price-deviation', d.agreement_id, d.height,
       d.seller_firm || '/' || d.seller_user, d.asset_id, d.amount,
       jsonb_build_object('agreement_id', d.agreement_id, 'txid', d.txid,
                          'security_code', d.security_code, 'price', d.price::text,
                          'previous_price', d.previous_price::text,
                          'previous_agreement_id', d.previous_agreement_id,
                          'deviation', d.deviation::text,
                          'reference_price', d.reference_price::text,
                          'reference_deviation', d.reference_deviation::text,
                          'seller', d.seller_firm || '/' || d.seller_user,
                          'buyer', d.buyer_firm || '/' || d.buyer_user,
                          'threshold', %(threshold)s::text)
FROM trade_price_deviation d
WHERE abs(d.deviation) >= %(threshold)s OR abs(d.reference_deviation) >= %(threshold)s
ON CONFLICT DO NOTHING
"""

WASH_TRADE_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'wash-trade', w.agreement_id, w.height, w.owner, w.asset_id, w.amount,
       jsonb_build_object('agreement_id', w.agreement_id, 'txid', w.txid,
                          'security_code', w.security_code, 'price', w.price::text,
                          'quantity', w.quantity, 'owner', w.owner,
                          'seller', w.seller_firm || '/' || w.seller_user,
                          'buyer', w.buyer_firm || '/' || w.buyer_user,
                          'same_account', w.is_same_account)
FROM wash_trade w
ON CONFLICT DO NOTHING
"""

CIRCULAR_TRADE_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'circular-trade', c.first_agreement_id || '/' || c.return_agreement_id,
       c.return_height, c.a_firm || '/' || c.a_user, c.asset_id, NULL,
       jsonb_build_object('security_code', c.security_code,
                          'a', c.a_firm || '/' || c.a_user,
                          'b', c.b_firm || '/' || c.b_user,
                          'first_agreement_id', c.first_agreement_id,
                          'return_agreement_id', c.return_agreement_id,
                          'first_price', c.first_price::text,
                          'return_price', c.return_price::text,
                          'gap_s', c.gap_s::text, 'window_s', %(window)s::text)
FROM circular_trade c
WHERE c.gap_s <= %(window)s
ON CONFLICT DO NOTHING
"""

TRADE_CONCENTRATION_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'trade-concentration',
       c.day::text || '/' || c.security_code || '/' || c.firm || '/' || c.user_id,
       NULL, c.firm || '/' || c.user_id, NULL, c.amount,
       jsonb_build_object('day', c.day, 'security_code', c.security_code,
                          'participant', c.firm || '/' || c.user_id,
                          'amount', c.amount::text, 'day_amount', c.day_amount::text,
                          'trades', c.trades, 'day_trades', c.day_trades,
                          'share', c.share::text, 'share_min', %(share)s::text,
                          'trades_min', %(count)s::text)
FROM trade_concentration c
WHERE c.share >= %(share)s AND c.day_trades >= %(count)s
ON CONFLICT DO NOTHING
"""

ORDER_CANCEL_RATIO_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'order-cancel-ratio', a.day::text || '/' || a.firm || '/' || a.user_id, NULL,
       a.firm || '/' || a.user_id, NULL, NULL,
       jsonb_build_object('day', a.day, 'participant', a.firm || '/' || a.user_id,
                          'posted', a.posted, 'amended', a.amended,
                          'cancelled', a.cancelled, 'ratio', a.ratio::text,
                          'ratio_min', %(ratio)s::text, 'orders_min', %(count)s::text)
FROM order_activity a
WHERE a.posted >= %(count)s AND a.ratio >= %(ratio)s
ON CONFLICT DO NOTHING
"""

FAILED_SETTLEMENT_SQL = """
INSERT INTO alert (rule, cause, height, subject, asset_id, amount, evidence)
SELECT 'failed-settlement', f.topic || '/' || f.log_offset, NULL,
       coalesce(f.seller_firm || '/' || f.seller_user, f.agreement_id), NULL, f.amount,
       jsonb_build_object('kind', f.kind, 'agreement_id', f.agreement_id,
                          'order_id', f.order_id, 'security_code', f.security_code,
                          'code', f.code, 'message', f.message,
                          'seller', f.seller_firm || '/' || f.seller_user,
                          'buyer', f.buyer_firm || '/' || f.buyer_user,
                          'recorded_at', f.recorded_at)
FROM failed_settlement f
ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    cause: str
    height: int | None
    subject: str | None
    asset_id: str | None
    amount: Decimal | None
    evidence: dict[str, Any]
    raised_at_ms: int

    def record(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "cause": self.cause,
            "height": self.height,
            "subject": self.subject,
            "asset_id": self.asset_id,
            "amount": None if self.amount is None else str(self.amount),
            "evidence": json.dumps(self.evidence, sort_keys=True, default=str),
            "raised_at": self.raised_at_ms,
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    from_height: int
    to_height: int
    rejections_from: int
    rejections_to: int
    raised: int
    votes_moved: bool = False

    @property
    def moved(self) -> bool:
        return (self.to_height > self.from_height or self.rejections_to > self.rejections_from
                or self.votes_moved)


async def _settings(conn: psycopg.AsyncConnection[Any]) -> dict[str, Decimal]:
    rows = await (await conn.execute("SELECT name, value FROM surveillance_setting")).fetchall()
    return {str(name): Decimal(value) for name, value in rows}


async def _cursor(conn: psycopg.AsyncConnection[Any], consumer: str) -> tuple[int, int, int]:
    await conn.execute(
        "INSERT INTO surveillance_cursor (consumer, height, rejection_offset, vote_offset) "
        "VALUES (%s, 0, 0, 0) ON CONFLICT DO NOTHING", (consumer,))
    row = await (await conn.execute(
        "SELECT height, rejection_offset, vote_offset FROM surveillance_cursor "
        "WHERE consumer = %s FOR UPDATE", (consumer,))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def evaluate(conn: psycopg.AsyncConnection[Any], *, consumer: str = CONSUMER_DEFAULT,
                   ignored_codes: Sequence[str] = IGNORED_CODES_DEFAULT) -> Evaluation:
    """One evaluation in one transaction: new heights and rejection records since the
    cursor, alerts inserted once per cause, the cursor moved."""
    async with conn.transaction():
        low, rejections_low, votes_low = await _cursor(conn, consumer)
        head_row = await (await conn.execute(
            "SELECT coalesce(max(height), 0), "
            "(SELECT coalesce(max(log_offset) + 1, 0) FROM tx_rejection), "
            "(SELECT coalesce(max(log_offset) + 1, 0) FROM consensus_vote) FROM block"
        )).fetchone()
        assert head_row is not None
        high = min(int(head_row[0]), low + HEIGHTS_PER_EVALUATION_MAX)
        rejections_high = min(int(head_row[1]), rejections_low + REJECTIONS_PER_EVALUATION_MAX)
        votes_high = min(int(head_row[2]), votes_low + VOTES_PER_EVALUATION_MAX)
        settings = await _settings(conn)
        raised = 0
        if high > low:
            cursor = await conn.execute(LARGE_POSITION_CHANGE_SQL, {
                "low": low, "high": high, "threshold": settings["large_position_change_min"]})
            raised += cursor.rowcount
            cursor = await conn.execute(TRANSFER_CONCENTRATION_SQL, {
                "low": low, "high": high, "share": settings["concentration_share_min"],
                "volume": settings["concentration_volume_min"],
                "count": settings["concentration_transfers_min"]})
            raised += cursor.rowcount
        if rejections_high > rejections_low:
            cursor = await conn.execute(REFUSED_SETTLEMENT_SQL, {
                "low": rejections_low, "high": rejections_high, "ignored": list(ignored_codes)})
            raised += cursor.rowcount
        if votes_high > votes_low:
            cursor = await conn.execute(CONSENSUS_EVIDENCE_SQL, {
                "low": votes_low, "high": votes_high, "codes": list(EVIDENCE_CODES)})
            raised += cursor.rowcount
        raised += await _evaluate_market(conn, settings)
        await conn.execute(
            "UPDATE surveillance_cursor SET height = %s, rejection_offset = %s, "
            "vote_offset = %s, updated_at = now() WHERE consumer = %s",
            (high, rejections_high, votes_high, consumer))
    return Evaluation(low, high, rejections_low, rejections_high, raised,
                      votes_high > votes_low)


async def _evaluate_market(conn: psycopg.AsyncConnection[Any],
                           settings: dict[str, Decimal]) -> int:
    """The market rules over the whole market projection; the alerts newly raised."""
    raised = 0
    for statement, params in (
        (TRADE_PRICE_DEVIATION_SQL, {"threshold": settings["price_deviation_min"]}),
        (WASH_TRADE_SQL, {}),
        (CIRCULAR_TRADE_SQL, {"window": settings["circular_trade_window_s"]}),
        (TRADE_CONCENTRATION_SQL, {"share": settings["trade_concentration_share_min"],
                                   "count": settings["trade_concentration_trades_min"]}),
        (ORDER_CANCEL_RATIO_SQL, {"ratio": settings["order_cancel_ratio_min"],
                                  "count": settings["order_ratio_orders_min"]}),
        (FAILED_SETTLEMENT_SQL, {}),
    ):
        cursor = await conn.execute(statement, params)
        raised += cursor.rowcount
    return raised


async def unpublished(conn: psycopg.AsyncConnection[Any]) -> list[Alert]:
    rows = await (await conn.execute(
        "SELECT rule, cause, height, subject, asset_id, amount, evidence, "
        "(extract(epoch FROM raised_at) * 1000)::bigint FROM alert "
        "WHERE published_at IS NULL ORDER BY raised_at, rule, cause LIMIT %s",
        (PUBLISH_BATCH_MAX,))).fetchall()
    return [Alert(str(r[0]), str(r[1]), None if r[2] is None else int(r[2]), r[3], r[4],
                  r[5], dict(r[6]), int(r[7])) for r in rows]


async def publish(conn: psycopg.AsyncConnection[Any], writer: LogWriter, topic: str) -> int:
    """Send every unpublished alert, then mark it published; the number sent."""
    sent = 0
    while True:
        alerts = await unpublished(conn)
        if not alerts:
            return sent
        await writer.send_many(topic, [
            (f"{a.rule}/{a.cause}".encode(), codec.encode("AlertRaised", a.record()))
            for a in alerts])
        await conn.execute(
            "UPDATE alert SET published_at = now() FROM unnest(%s::text[], %s::text[]) "
            "AS p(rule, cause) WHERE alert.rule = p.rule AND alert.cause = p.cause",
            ([a.rule for a in alerts], [a.cause for a in alerts]))
        sent += len(alerts)


async def run_surveillance(*, dsn: str, bootstrap: str, topic_prefix: str = "",
                           consumer: str = CONSUMER_DEFAULT,
                           ignored_codes: Sequence[str] = IGNORED_CODES_DEFAULT,
                           follow: bool = False, stop: asyncio.Event | None = None,
                           poll_interval_s: float = POLL_INTERVAL_S,
                           evidence: EvidenceProjector | None = None) -> tuple[int, int]:
    """Evaluate until caught up (and, with ``follow``, keep polling until ``stop``);
    returns (alerts raised, alerts published). With ``evidence``, the votes log is
    projected (``consensus_vote``) before each evaluation."""
    stop = stop or asyncio.Event()
    raised = published = 0
    writer = LogWriter(bootstrap, client_id=f"capledger-{consumer}")
    await writer.start()
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            published += await publish(conn, writer, topic_prefix + ALERTS.name)
            if evidence is not None:
                await evidence.start(conn)
            while True:
                if evidence is not None:
                    await evidence.catch_up(conn)
                evaluation = await evaluate(conn, consumer=consumer, ignored_codes=ignored_codes)
                raised += evaluation.raised
                published += await publish(conn, writer, topic_prefix + ALERTS.name)
                caught_up = not evaluation.moved
                if caught_up and (not follow or stop.is_set()):
                    return raised, published
                if caught_up:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), poll_interval_s)
    finally:
        if evidence is not None:
            await evidence.stop()
        await writer.stop()

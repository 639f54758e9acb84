"""Trade surveillance (migration 0009): views over the market's projection, their alert
rules and the regulator's grant, against real PostgreSQL and a real alerts topic.

Market rows are written directly with a small builder that respects the tables'
constraints, so each rule meets data that must raise it and data that must not.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import psycopg

from streams.kafka import codec
from streams.kafka.logio import read_all
from streams.kafka.topics import ALERTS
from streams.projections.surveillance import run_surveillance
from streams.tools.devstack import postgres
from tests.integration.test_projector import chain_topics
from tests.integration.test_surveillance import hex64

D1 = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.UTC)
D3 = dt.datetime(2026, 11, 4, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
S1, S2 = "KR1000000001", "KR2000000002"
ASSET1, ASSET2 = "A" + "1" * 33, "A" + "2" * 33
# (firm, user, owner key): alice has accounts at two firms with one key (one owner)
ALICE, ALICE_B = ("securities-a", "alice", "02aa"), ("securities-b", "alice2", "02aa")
BOB, CAROL, DAVE = (("securities-b", "bob", "02bb"), ("securities-a", "carol", "02cc"),
                    ("securities-b", "dave", "02dd"))
TRADE_VIEWS = ("trade_report", "trade_price_deviation", "wash_trade", "circular_trade",
               "trade_concentration", "order_activity", "failed_settlement")
MARKET_RULES = {"trade-price-deviation", "wash-trade", "circular-trade",
                "trade-concentration", "order-cancel-ratio", "failed-settlement"}

Party = tuple[str, str, str]


class Market:
    """Market projection rows with valid shapes."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.offset = 0
        self.orders = 0
        for code, asset, unit, face in ((S1, ASSET1, "KRW", 11_000), (S2, ASSET2, "SHARE", None)):
            conn.execute(
                "INSERT INTO market_asset VALUES (%s, %s, %s, 'bond', 'securities-a', %s, 0, "
                "NULL, NULL, NULL, %s, %s, '{}', %s)",
                (asset, code, f"name of {code}", unit, face, hex64(code), D1))
        for firm, user, key in (ALICE, ALICE_B, BOB, CAROL, DAVE):
            conn.execute("INSERT INTO market_participant VALUES (%s, %s, %s, %s)",
                         (firm, user, key, f"addr-{user}"))

    def trade(self, label: str, height: int, at: dt.datetime, security: str,
              seller: Party, buyer: Party, price: str, quantity: int) -> str:
        asset = ASSET1 if security == S1 else ASSET2
        amount = int(Decimal(price) * quantity)
        self.conn.execute(
            "INSERT INTO market_trade VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s, %s, %s, %s)",
            (label, f"o-{label}", f"n-{label}", hex64(label), height, hex64(f"b{height}"), at,
             asset, security, Decimal(price), quantity, amount, seller[0], seller[1],
             buyer[0], buyer[1]))
        return label

    def event(self, kind: str, at: dt.datetime, payload: dict[str, Any],
              order_id: str | None = None) -> int:
        offset = self.offset
        self.conn.execute(
            "INSERT INTO market_event VALUES ('market.board.v1', %s, %s, %s, %s, "
            "'otc-operator', %s, %s)",
            (offset, kind, order_id or "s", order_id, json.dumps(payload), at))
        self.offset += 1
        return offset

    def orders_of(self, party: Party, at: dt.datetime, posted: int, amended: int,
                  cancelled: int) -> None:
        """``posted`` orders by ``party``; the first ones amended, the last cancelled."""
        ids = []
        for _ in range(posted):
            self.orders += 1
            order_id = f"order-{self.orders}"
            ids.append(order_id)
            self.conn.execute(
                "INSERT INTO market_order VALUES (%s, %s, %s, 'sell', 100, 1, %s, %s, "
                "'waiting', 1, NULL, %s, %s)", (order_id, S2, ASSET2, party[0], party[1], at,
                                                 at))
            self.event("order-posted", at, {"order_id": order_id}, order_id)
        for order_id in ids[:amended]:
            self.event("order-amended", at, {"order_id": order_id, "price": "101"}, order_id)
        for order_id in ids[len(ids) - cancelled:]:
            self.event("order-cancelled", at, {"order_id": order_id}, order_id)


def populate(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        m = Market(conn)
        # S1, reference price 11,000 KRW (face value)
        m.trade("t1", 10, D1, S1, ALICE, BOB, "10000", 10)
        m.trade("t2", 11, D1 + HOUR, S1, BOB, ALICE, "10500", 10)  # back to alice in 1 h
        m.trade("t3", 12, D1 + 2 * HOUR, S1, CAROL, DAVE, "12000", 10)  # +14.3 % on t2
        m.trade("t4", 13, D3, S1, DAVE, CAROL, "11900", 10)  # back to carol 2 days later
        m.trade("t5", 14, D3 + HOUR, S1, ALICE, DAVE, "12200", 10)  # +10.9 % on reference
        m.trade("w1", 15, D3 + HOUR, S2, ALICE, ALICE_B, "500", 100)  # one owner, two firms
        m.orders_of(CAROL, D1, posted=5, amended=2, cancelled=3)  # ratio 1.0
        m.orders_of(DAVE, D1, posted=5, amended=2, cancelled=1)  # ratio 0.6
        m.orders_of(BOB, D1, posted=2, amended=0, cancelled=2)  # ratio 1.0, 2 orders only
        conn.execute(
            "INSERT INTO market_agreement VALUES ('g1', 'n-g1', 'order-1', %s, 10000, 3, "
            "30000, 'securities-a', 'carol', 'securities-b', 'bob', 2, 'failed', "
            "'agreement-expired', NULL)", (ASSET1,))
        failed = m.event("settlement-failed", D3, {"agreement_id": "g1",
                                                   "code": "agreement-expired",
                                                   "message": "lapsed"}, "order-1")
        refused = m.event("command-refused", D3, {"command_kind": "settle",
                                                  "code": "agreement-settling",
                                                  "message": "busy", "order_id": "order-1"},
                          "order-1")
        m.event("command-refused", D3, {"command_kind": "post", "code": "order-invalid",
                                        "message": "no", "order_id": None})
        m.event("trade-settled", D3, {"agreement_id": "t1"}, "o-t1")
    return {"failed": failed, "refused": refused}


def market_alerts(dsn: str) -> set[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return {(str(r), str(c)) for r, c in conn.execute(
            "SELECT rule, cause FROM alert WHERE rule = ANY(%s)", (list(MARKET_RULES),))}


async def test_trade_rules_raise_once_per_cause(kafka_bootstrap: str, unique_id: str,
                                                pg_dsn: str) -> None:
    offsets = populate(pg_dsn)
    expected = {
        # must: t3 +14.3 % on t2, t5 +10.9 % on the reference price; must not: t2 (+5 %),
        # t4 (-0.8 %, +8.2 % on the reference), t1 and w1 (first trades of their security)
        ("trade-price-deviation", "t3"), ("trade-price-deviation", "t5"),
        # must: alice to her own account at another firm; must not: every other trade
        ("wash-trade", "w1"),
        # must: alice -> bob -> alice within the hour; must not: carol -> dave -> carol
        # two days apart (window one day)
        ("circular-trade", "t1/t2"),
        # must: alice and bob each on 63 % of day 1's S1 amount; must not: carol, dave
        # (37 %), day 3 (two trades of S1 only, one of S2)
        ("trade-concentration", f"2026-11-02/{S1}/securities-a/alice"),
        ("trade-concentration", f"2026-11-02/{S1}/securities-b/bob"),
        # must: carol 5 amendments + cancellations on 5 orders; must not: dave (0.6),
        # bob (ratio 1.0 but 2 orders)
        ("order-cancel-ratio", "2026-11-02/securities-a/carol"),
        # must: the failed settlement and the refused settle command; must not: a refused
        # post, a settled trade
        ("failed-settlement", f"market.board.v1/{offsets['failed']}"),
        ("failed-settlement", f"market.board.v1/{offsets['refused']}"),
    }
    prefix = f"{unique_id}."
    async with chain_topics(kafka_bootstrap, prefix):
        raised, published = await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                                    topic_prefix=prefix)
        assert market_alerts(pg_dsn) == expected
        assert (raised, published) == (len(expected), len(expected))
        assert await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                      topic_prefix=prefix) == (0, 0)
        # thresholds are configurable: at 5 %, t2 (+5 % on t1), t1 (-9.1 % on the
        # reference) and t4 (+8.2 % on the reference) deviate too; w1 still does not
        with psycopg.connect(pg_dsn) as conn:
            conn.execute("UPDATE surveillance_setting SET value = 0.05 "
                         "WHERE name = 'price_deviation_min'")
        assert await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                      topic_prefix=prefix) == (3, 3)
        assert {c for r, c in market_alerts(pg_dsn) if r == "trade-price-deviation"} == {
            "t1", "t2", "t3", "t4", "t5"}
        records = await read_all(kafka_bootstrap, prefix + ALERTS.name, client_id="test")
    decoded = [codec.decode(r.value, expected="AlertRaised").record for r in records]
    assert sorted((d["rule"], d["cause"]) for d in decoded) == sorted(market_alerts(pg_dsn))
    wash = next(d for d in decoded if d["rule"] == "wash-trade")
    evidence = json.loads(wash["evidence"])
    assert evidence["owner"] == "02aa" and evidence["same_account"] is False
    assert wash["amount"] == "50000"
    deviation = json.loads(next(d for d in decoded if d["cause"] == "t3")["evidence"])
    assert deviation["previous_price"] == "10500.00" and deviation["deviation"] == "0.142857"


def test_trade_views(pg_dsn: str) -> None:
    populate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        report = conn.execute(
            "SELECT agreement_id, price, amount, seller_address, buyer_owner FROM trade_report "
            "WHERE security_code = %s AND day = '2026-11-02' ORDER BY height", (S1,)).fetchall()
        assert report == [("t1", Decimal("10000.00"), 100_000, "addr-alice", "02bb"),
                          ("t2", Decimal("10500.00"), 105_000, "addr-bob", "02aa"),
                          ("t3", Decimal("12000.00"), 120_000, "addr-carol", "02dd")]
        deviations = {row[0]: row[1:] for row in conn.execute(
            "SELECT agreement_id, previous_price, deviation, reference_deviation, is_beyond "
            "FROM trade_price_deviation")}
        assert deviations["t1"] == (None, None, Decimal("-0.090909"), False)
        assert deviations["t3"] == (Decimal("10500.00"), Decimal("0.142857"),
                                    Decimal("0.090909"), True)
        assert deviations["t5"][3] is True and deviations["t4"][3] is False
        assert deviations["w1"] == (None, None, None, False)  # no reference price
        assert conn.execute("SELECT agreement_id, owner FROM wash_trade").fetchall() == [
            ("w1", "02aa")]
        assert conn.execute("SELECT first_agreement_id, return_agreement_id, gap_s "
                            "FROM circular_trade").fetchall() == [("t1", "t2", 3600)]
        shares = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT user_id, day::text, share, trades, day_trades FROM trade_concentration "
            "WHERE security_code = %s", (S1,))}
        assert shares[("alice", "2026-11-02")] == (Decimal("0.630769"), 2, 3)
        assert shares[("carol", "2026-11-02")] == (Decimal("0.369231"), 1, 3)
        activity = {r[0]: r[1:] for r in conn.execute(
            "SELECT user_id, posted, amended, cancelled, ratio FROM order_activity")}
        assert activity == {"carol": (5, 2, 3, Decimal(1)), "dave": (5, 2, 1, Decimal("0.6")),
                            "bob": (2, 0, 2, Decimal(1))}
        failed = conn.execute("SELECT kind, agreement_id, code, amount, seller_user "
                              "FROM failed_settlement ORDER BY log_offset").fetchall()
        assert failed == [("settlement-failed", "g1", "agreement-expired", 30_000, "carol"),
                          ("command-refused", None, "agreement-settling", None, None)]
        # money numeric (prices numeric(16,2)), never float
        types = {r[0] for r in conn.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = ANY(%s) "
            "AND column_name IN ('price', 'amount', 'share', 'deviation', 'ratio', "
            "'reference_price', 'day_amount', 'previous_price')", (list(TRADE_VIEWS),))}
        assert types == {"numeric"}
        # the regulator reads every trade view
        granted = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) v "
            "WHERE has_table_privilege('capledger_regulator', v, 'SELECT')",
            (list(TRADE_VIEWS),)).fetchone()
        assert granted == (len(TRADE_VIEWS),)


def test_migration_0009_upgrade_downgrade_upgrade(pg_dsn: str) -> None:
    objects = "SELECT count(*) FROM pg_class WHERE relname = ANY(%s)"
    names = [*TRADE_VIEWS, "market_trade_security_idx", "market_event_kind_idx"]
    settings = "SELECT count(*) FROM surveillance_setting"
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (len(names),)
        assert conn.execute(settings).fetchone() == (10,)
    postgres.migrate(pg_dsn, "0007", downgrade=True)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (0,)
        assert conn.execute(settings).fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM market_trade").fetchone() == (0,)
    postgres.migrate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (len(names),)
        assert conn.execute(settings).fetchone() == (10,)
        assert conn.execute("SELECT has_table_privilege('capledger_regulator', "
                            "'wash_trade', 'SELECT')").fetchone() == (True,)


def test_the_documented_trade_queries_run(pg_dsn: str) -> None:
    """Every SQL example of docs/regulator-sql.md's "Trades" section runs on the views
    (the documented names and columns exist) and finds the populated data."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "regulator-sql.md").read_text()
    section = text.split("## Trades (migration 0009)")[1].split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```sql")[1:]]
    statements = [s.strip() for block in blocks for s in block.split(";") if s.strip()]
    assert len(statements) == 7  # one query per view
    populate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        found = [len(conn.execute(statement).fetchall()) for statement in statements]
    # the per-security report of November, the deviating trades (t3, t5), one wash
    # trade, one circular pair, alice and bob concentrated, carol and dave judged (5
    # orders or more), two failed or refused settlements
    assert found == [5, 2, 1, 1, 2, 2, 2], found

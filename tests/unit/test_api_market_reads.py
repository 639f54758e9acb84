"""The market resources' shapes from projected rows (revision 0003 columns)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from streams.api.market_reads import agreement_row, order_row, trade_row

AT = dt.datetime(2026, 11, 29, 9, 0, tzinfo=dt.UTC)


def test_order_row_marks_the_callers_own_order() -> None:
    row = ("o-1", "KR101502D327", "국민주택 2013-02", dt.date(2018, 2, 28), "sell",
           Decimal("11578.50"), 100, "securities-a", "user-a", "waiting", AT, AT, 1, None)
    mine = order_row(row, "securities-a/user-a")
    assert mine["price"] == "11578.50" and mine["maturity"] == "2018-02-28"
    assert mine["poster"] == {"user_id": "user-a", "firm": "securities-a",
                              "key": "securities-a/user-a"}
    assert mine["mine"] is True and order_row(row, "securities-b/user-b")["mine"] is False
    assert mine["posted_at_ms"] == int(AT.timestamp() * 1000)


def test_agreement_and_trade_rows_keep_exact_prices_and_parties() -> None:
    agreement = agreement_row((
        "ag-1", "n-1", "o-1", "asset", "KR101502D327", Decimal("11578.49"), 100, 1_157_849,
        "securities-a", "user-a", "securities-b", "user-b", "settled", None, "tx-1",
        ["securities-a/user-a", "securities-b/user-b"]))
    assert agreement["terms"]["price"] == "11578.49"
    assert agreement["terms"]["buyer"]["key"] == "securities-b/user-b"
    assert agreement["complete"] and agreement["settled_txid"] == "tx-1"
    assert agreement["signed_by"] == ["securities-a/user-a", "securities-b/user-b"]
    trade = trade_row(("ag-1", "o-1", "n-1", "tx-1", 11, "bh", AT, "asset", "KR101502D327",
                       Decimal("11578.49"), 100, 1_157_849, "securities-a", "user-a",
                       "securities-b", "user-b"))
    assert trade["height"] == 11 and trade["terms"]["amount_krw"] == 1_157_849
    assert trade["terms"]["seller"]["user_id"] == "user-a"

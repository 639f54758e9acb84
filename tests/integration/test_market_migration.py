"""Revision 0003 (the market projection) upgrades, downgrades and upgrades again on its
own, leaving revisions 0001-0002 untouched."""

from __future__ import annotations

import psycopg
import pytest

from streams.tools.devstack import postgres

pytestmark = pytest.mark.integration

MARKET_TABLES = {"market_asset", "market_participant", "market_order", "market_event",
                 "market_negotiation", "market_agreement", "market_trade"}
BASE_TABLES = {"projection_offset", "block", "tx", "tx_output", "tx_rejection"}


def _relations(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = 'public'").fetchall()
    return {r[0] for r in rows}


def test_market_revision_is_reversible(pg_dsn: str) -> None:
    assert MARKET_TABLES | BASE_TABLES | {"market_balance"} <= _relations(pg_dsn)
    postgres.migrate(pg_dsn, "0002", downgrade=True)
    left = _relations(pg_dsn)
    assert not left & (MARKET_TABLES | {"market_balance"}) and left >= BASE_TABLES
    postgres.migrate(pg_dsn, "0003")
    assert MARKET_TABLES | {"market_balance"} <= _relations(pg_dsn)
    with psycopg.connect(pg_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO market_order VALUES ('o', 'KR1', 'A', 'hold', 1, 1, 'f', "
                     "'u', 'waiting', 1, NULL, now(), now())")


def test_sealed_messages_revision_is_reversible(pg_dsn: str) -> None:
    """Revision 0012: ciphertext and sealed keys; the API reads them, the regulator not."""
    sealed = {"market_sealed_message", "market_sealed_key"}
    assert sealed <= _relations(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        grants = conn.execute(
            "SELECT has_table_privilege('capledger_api', 'market_sealed_message', 'SELECT'), "
            "has_table_privilege('capledger_regulator', 'market_sealed_message', 'SELECT'), "
            "has_table_privilege('capledger_regulator', 'market_sealed_key', 'SELECT')"
        ).fetchone()
    assert grants == (True, False, False)
    postgres.migrate(pg_dsn, "0009", downgrade=True)
    assert not sealed & _relations(pg_dsn)
    postgres.migrate(pg_dsn)
    assert sealed <= _relations(pg_dsn)

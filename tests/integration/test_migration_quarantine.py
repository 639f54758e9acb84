"""Migration 0006 (projection_quarantine): upgrade -> downgrade -> upgrade, and its
constraints hold (one row per consumer/topic/partition/offset, offsets not negative)."""

from __future__ import annotations

import psycopg
import pytest

from streams.tools.devstack import postgres

pytestmark = pytest.mark.integration


def _has_table(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('public.projection_quarantine')").fetchone()
    return row is not None and row[0] is not None


def test_projection_quarantine_upgrade_downgrade_upgrade(pg_dsn: str) -> None:
    assert _has_table(pg_dsn)
    postgres.migrate(pg_dsn, "0002", downgrade=True)
    assert not _has_table(pg_dsn)
    postgres.migrate(pg_dsn)
    assert _has_table(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        insert = ('INSERT INTO projection_quarantine (consumer, topic, "offset", reason_code, '
                  "detail) VALUES ('projector', 'p.ledger.blocks.v1', %s, 'fork', 'x')")
        conn.execute(insert, (7,))
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute(insert, (7,))
        with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
            conn.execute(insert, (-1,))

"""Revision 0007 on a fresh database: what each platform role may and may not do."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors

from streams.common import db_roles
from streams.tools.devstack.postgres import Dsn, migrate

pytestmark = pytest.mark.integration

REGULATOR_VIEWS = ("regulator_blocks", "regulator_transactions", "regulator_rejections",
                   "address_balance")
TABLES = ("block", "tx", "tx_output", "tx_rejection", "projection_offset", "alembic_version")


def _connect(stack_settings: Any, pg_dsn: str, role: str) -> psycopg.Connection[Any]:
    kwargs = db_roles.connect_kwargs(stack_settings, role, Dsn.parse(pg_dsn).database)
    return psycopg.connect(**kwargs, autocommit=True)


def _refused(conn: psycopg.Connection[Any], statement: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_regulator_reads_its_views_and_nothing_else(stack_settings: Any, pg_dsn: str) -> None:
    with _connect(stack_settings, pg_dsn, db_roles.REGULATOR) as conn:
        for view in REGULATOR_VIEWS:
            assert conn.execute(f"SELECT count(*) FROM {view}").fetchone() == (0,)
        for table in TABLES:
            _refused(conn, f"SELECT * FROM {table} LIMIT 1")
        _refused(conn, "INSERT INTO projection_offset (consumer, topic, partition, \"offset\") "
                       "VALUES ('x', 't', 0, 0)")
        _refused(conn, "DELETE FROM regulator_blocks")
        _refused(conn, "CREATE TABLE mine (x int)")
        _refused(conn, "CREATE TEMP TABLE mine (x int)")
        _refused(conn, "CREATE VIEW mine AS SELECT 1")


def test_api_reads_everything_and_writes_nothing(stack_settings: Any, pg_dsn: str) -> None:
    with _connect(stack_settings, pg_dsn, db_roles.API) as conn:
        for relation in (*TABLES, *REGULATOR_VIEWS):
            conn.execute(f"SELECT * FROM {relation} LIMIT 1")
        _refused(conn, "INSERT INTO projection_offset (consumer, topic, partition, \"offset\") "
                       "VALUES ('x', 't', 0, 0)")
        _refused(conn, "UPDATE block SET tx_count = 0")
        _refused(conn, "CREATE TABLE mine (x int)")


def test_projector_writes_rows_but_not_the_schema(stack_settings: Any, pg_dsn: str) -> None:
    with _connect(stack_settings, pg_dsn, db_roles.PROJECTOR) as conn:
        conn.execute("INSERT INTO projection_offset (consumer, topic, partition, \"offset\") "
                     "VALUES ('role-test', 'ledger.blocks.v1', 0, 7)")
        assert conn.execute("SELECT \"offset\" FROM projection_offset WHERE consumer = "
                            "'role-test'").fetchone() == (7,)
        conn.execute("DELETE FROM projection_offset WHERE consumer = 'role-test'")
        _refused(conn, "UPDATE alembic_version SET version_num = 'x'")
        _refused(conn, "ALTER TABLE block ADD COLUMN extra int")
        _refused(conn, "DROP TABLE tx_rejection")
        _refused(conn, "CREATE TABLE mine (x int)")


async def test_projector_role_projects_and_regulator_sees_it(
        stack_settings: Any, pg_dsn: str, kafka_bootstrap: str, unique_id: str) -> None:
    """The real projector, connected as capledger_projector (rebuild: truncate, then
    write), and the regulator reading the result through its views only."""
    from psycopg.conninfo import make_conninfo

    from streams.kafka.logio import LogWriter
    from streams.kafka.topics import BLOCKS
    from streams.projections.projector import Projector
    from streams.projections.runner import run_projection
    from streams.tools.loadgen import Lanes, interleave, lane_chains
    from tests.integration.test_projector import (
        TIME_MS,
        certified_blocks,
        chain_topics,
        committed_payload,
        publish_votes,
        synthetic_genesis,
    )

    prefix = f"{unique_id}."
    lanes = Lanes(unique_id, 2)
    genesis, keys = synthetic_genesis(unique_id, lanes)
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 2)))
    blocks = certified_blocks(genesis, keys, [txs[:2], txs[2:]], time_ms=TIME_MS)
    projector_dsn = make_conninfo(**db_roles.connect_kwargs(
        stack_settings, db_roles.PROJECTOR, Dsn.parse(pg_dsn).database))
    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-writer")
        await writer.start()
        try:
            await publish_votes(writer, prefix, blocks)  # what decides each height
            await writer.send_many(prefix + BLOCKS.name, [
                (None, committed_payload(block, qc, "koscom")) for block, qc in blocks])
        finally:
            await writer.stop()
        stats = await run_projection(
            lambda: Projector(genesis, bootstrap=kafka_bootstrap, dsn=projector_dsn,
                              topic_prefix=prefix), follow=False, rebuild=True)
    assert stats.height == len(blocks)
    with _connect(stack_settings, pg_dsn, db_roles.REGULATOR) as conn:
        heights = [row[0] for row in conn.execute(
            "SELECT height FROM regulator_blocks ORDER BY height")]
        assert heights == list(range(len(blocks) + 1))  # genesis at 0
        assert conn.execute("SELECT count(*) FROM regulator_transactions").fetchone() == (
            len(txs) + 1,)  # with the genesis allocation


def test_downgrade_takes_the_grants_back(stack_settings: Any, pg_dsn: str) -> None:
    migrate(pg_dsn, "0002", downgrade=True)
    with _connect(stack_settings, pg_dsn, db_roles.REGULATOR) as conn:
        _refused(conn, "SELECT count(*) FROM address_balance")  # the view of 0002 stays
        with pytest.raises(errors.UndefinedTable):
            conn.execute("SELECT count(*) FROM regulator_blocks")
    with _connect(stack_settings, pg_dsn, db_roles.API) as conn:
        _refused(conn, "SELECT count(*) FROM block")
    migrate(pg_dsn)
    with _connect(stack_settings, pg_dsn, db_roles.REGULATOR) as conn:
        assert conn.execute("SELECT count(*) FROM regulator_blocks").fetchone() == (0,)

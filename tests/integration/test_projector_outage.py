"""The projector when PostgreSQL goes away or refuses writes (issue 9), against five
real nodes, a real ``capledger project --follow`` process and a per-test database:
the database first refuses every connection (``ALLOW_CONNECTIONS false`` and its sessions
terminated), then accepts connections but refuses writes (``default_transaction_read_only``
and its sessions terminated). Expected: the projector waits (``WAITING: retry`` lines,
``capledger_projector_database_up`` 0, ``/readyz`` 503) and does not exit; once the database
is back it resumes from its stored offsets and every committed tx is projected exactly
once. Also: ``capledger status`` shows the projection's lag. Figures:
docs/failure-tests.md.

Owns: nothing but the test (the projector process it starts).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.integration.cluster_fixtures import ChainRun, running_chain
from tests.integration.ops_fixtures import Probe, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

COMMIT_TIMEOUT_S = 40.0
CAUGHT_UP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def _admin(stack_settings: Any, statement: sql.Composable) -> None:
    with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
        conn.execute(statement)


def _terminate(stack_settings: Any, database: str) -> None:
    with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))


def _projected_txids(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [str(row[0]) for row in conn.execute("SELECT txid FROM tx WHERE height > 0")]


def _status_json(run: ChainRun, dsn: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "streams", "status", "--json", "--genesis", str(run.chain_dir),
         "--topic-prefix", run.prefix, "--dsn", dsn], capture_output=True, text=True,
        timeout=60, check=False)
    return dict(json.loads(done.stdout))


async def _outage(run: ChainRun, probe: Probe, begin: Callable[[], None],
                  end: Callable[[], None], projector: subprocess.Popen[bytes]) -> float:
    """Start the outage, commit two batches meanwhile, see the projector fail and retry
    at least twice (waiting, not exiting), end it; the seconds from its end until the
    projection holds the whole chain again."""
    before = (await probe.metrics())["capledger_projector_outages_total"]
    begin()
    for _ in range(2):
        await run.submit(run.next_batch(2))
    await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)

    async def waiting() -> str | None:
        samples = await probe.metrics()
        status, _ = await probe.get("/readyz")
        if samples["capledger_projector_outages_total"] < before + 2 or status != 503:
            return f"outages {samples['capledger_projector_outages_total']}, readyz {status}"
        return None

    await wait_for(waiting, timeout_s=CAUGHT_UP_TIMEOUT_S, what="projector waiting")
    assert projector.poll() is None, "the projector exited during the outage"
    end()
    ended = time.monotonic()
    await wait_for(_caught_up(run, probe), timeout_s=CAUGHT_UP_TIMEOUT_S,
                   what="projection caught up")
    return time.monotonic() - ended


def _caught_up(run: ChainRun, probe: Probe) -> Callable[[], Awaitable[str | None]]:
    async def check() -> str | None:
        samples = await probe.metrics()
        height = samples.get("capledger_projector_height", -1)
        status, body = await probe.get("/readyz")
        if height != run.blocks.head_height or status != 200:
            return f"projected {height} of {run.blocks.head_height}, readyz {body.strip()}"
        return None
    return check


async def test_projector_waits_for_its_database_and_resumes_exactly_once(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str, pg_dsn: str, stack_settings: Any
) -> None:
    database = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    name = sql.Identifier(str(database))
    port = free_port()
    log_path = tmp_path / "projector.log"
    async with running_chain(tmp_path, unique_id, kafka_bootstrap) as run:
        await run.submit(run.next_batch(2))
        await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
        with open(log_path, "wb") as log:
            projector = subprocess.Popen(
                [sys.executable, "-m", "streams", "project", "--follow", "--genesis",
                 str(run.chain_dir), "--topic-prefix", run.prefix, "--dsn", pg_dsn,
                 "--metrics-port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                start_new_session=True)
        probe = Probe(port)
        try:
            await wait_for(_caught_up(run, probe), timeout_s=CAUGHT_UP_TIMEOUT_S,
                           what="projection caught up")
            status = _status_json(run, pg_dsn)["projection"]
            assert status["available"] and status["height"] == run.blocks.head_height, status
            assert status["lag_records"] >= 0 and status["behind_blocks"] >= 0, status

            def refuse_connections() -> None:
                _admin(stack_settings, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false")
                       .format(name))
                _terminate(stack_settings, str(database))

            gone_s = await _outage(
                run, probe, refuse_connections,
                lambda: _admin(stack_settings, sql.SQL(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name)), projector)

            def refuse_writes() -> None:
                _admin(stack_settings, sql.SQL(
                    "ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
                _terminate(stack_settings, str(database))

            read_only_s = await _outage(
                run, probe, refuse_writes,
                lambda: _admin(stack_settings, sql.SQL(
                    "ALTER DATABASE {} RESET default_transaction_read_only").format(name)),
                projector)
        finally:
            projector.terminate()
            try:
                projector.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                projector.kill()
            print(log_path.read_text(errors="replace")[-3000:])
        projected = _projected_txids(pg_dsn)
        assert sorted(projected) == sorted(run.submitted), "projected != committed"
        assert len(projected) == len(set(projected)), "a tx projected twice"
        run.assert_exactly_once()
        assert "WAITING: retry" in log_path.read_text(errors="replace")
        print(f"\nprojector outage: caught up {gone_s:.2f} s after the database accepted "
              f"connections again, {read_only_s:.2f} s after it accepted writes again; "
              f"{len(projected)} txs projected once each")
    await asyncio.sleep(0)

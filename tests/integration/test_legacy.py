"""Legacy integration against real PostgreSQL (export) and a real five-node chain (import).

- ``capledger export legacy --date D`` writes the day's settlements and end-of-day
  balances; a second run gives byte-identical files; later days do not change them.
- ``capledger import legacy FILE`` issues each row once: the same file twice issues
  nothing new; a file with a bad row is refused with its line number and nothing of
  it is applied (no journal row, no transaction).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import sys
from pathlib import Path

import psycopg

from ledger.address import script_to_address
from ledger.keys import PrivateKey
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint
from streams.projections.projector import Projector
from streams.tools.loadgen import LANE_VALUE, sign_p2pkh_payment
from tests.integration.cluster_fixtures import running_chain
from tests.integration.test_surveillance import D1, D2, D3, Rows, populate_first_days

SUBPROCESS_TIMEOUT_S = 180.0
CODE = "KRLEGACY01"


async def run_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ})
    out, _ = await asyncio.wait_for(process.communicate(), SUBPROCESS_TIMEOUT_S)
    return int(process.returncode or 0), out.decode()


async def test_export_is_byte_identical_and_complete(pg_dsn: str, tmp_path: Path) -> None:
    txids = populate_first_days(pg_dsn)
    first, second = tmp_path / "first", tmp_path / "second"
    code, text = await run_cli("export", "legacy", "--date", D1.date().isoformat(),
                               "--out-dir", str(first), "--dsn", pg_dsn)
    assert code == 0, text
    # a later day's block must not change the files of an earlier day
    with psycopg.connect(pg_dsn) as conn:
        rows = Rows(conn, next_height=7)
        rows.block(D3 + dt.timedelta(days=1))
        rows.tx("late", [("Q", 999_999, None)], ((txids["t2"], 0),))  # spends Z's output
    code, text = await run_cli("export", "legacy", "--date", D1.date().isoformat(),
                               "--out-dir", str(second), "--dsn", pg_dsn)
    assert code == 0, text
    names = sorted(p.name for p in first.iterdir())
    assert names == ["balance-20261102.csv", "legacy-20261102.txt", "settlement-20261102.csv"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    settlements = (first / "settlement-20261102.csv").read_text().splitlines()
    # g0 (1 output), t1 (2), t2 (2): five movements on day 1, none of day 2
    assert len(settlements) == 1 + 5
    balances = {line.split(",")[1]: line.split(",")[3] for line in
                (first / "balance-20261102.csv").read_text().splitlines()[1:]}
    # end of day 1: X 1,000,001 (t2's change), Y 3,000,000, Z 999,999; no asset yet
    assert balances == {"X": "1000001", "Y": "3000000", "Z": "999999"}
    fixed = (first / "legacy-20261102.txt").read_text().splitlines()
    assert [line[0] for line in fixed] == ["H"] + ["S"] * 5 + ["B"] * 3 + ["T"]
    assert fixed[-1][1:10] == "000000005" and fixed[-1][34:43] == "000000003"
    assert int(fixed[-1][43:67]) == 5_000_000  # balances total: conservation
    # day 2 holds the asset transfers
    code, text = await run_cli("export", "legacy", "--date", D2.date().isoformat(),
                               "--out-dir", str(first), "--dsn", pg_dsn)
    assert code == 0, text
    assert len((first / "settlement-20261103.csv").read_text().splitlines()) == 1 + 3


def _csv(rows: list[tuple[str, str, str]]) -> bytes:
    return ("holder,security_code,quantity\n" + "".join(
        f"{a},{b},{c}\n" for a, b, c in rows)).encode()


async def test_import_once_per_file_and_bad_row_applies_nothing(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str, tmp_path: Path
) -> None:
    holders = [PrivateKey(hashlib.sha256(f"{unique_id}/{n}".encode()).digest())
               for n in ("alice", "bob")]
    alice, bob = (str(script_to_address(p2pkh_script(k.public_key.hash160))) for k in holders)
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=2) as run:
        issuer = run.key("securities-a")
        issuer_script = p2pkh_script(issuer.public_key.hash160)
        allocation = genesis_allocation_tx(run.genesis.hash_le, run.genesis.allocations)
        funding = sign_p2pkh_payment(run.lanes.keys()[1], OutPoint(allocation.hash_le, 1),
                                     LANE_VALUE, issuer_script, 5_000)
        await run.submit([funding])
        await run.wait_committed([funding.txid], timeout_s=60)

        async def project() -> None:
            await Projector(run.genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                            topic_prefix=run.prefix).run()

        def count(sql: str, *params: object) -> int:
            with psycopg.connect(pg_dsn) as conn:
                row = conn.execute(sql, params).fetchone()
            assert row is not None
            return int(row[0])

        await project()
        good = tmp_path / "holdings.csv"
        good.write_bytes(_csv([(alice, CODE, "1000"), (bob, CODE, "250")]))
        args = ("import", "legacy", "--genesis", str(run.chain_dir), "--issuer",
                "securities-a", "--security-code", CODE, "--topic-prefix", run.prefix,
                "--dsn", pg_dsn, "--timeout", "60")
        code, text = await run_cli(*args, str(good))
        assert code == 0, text
        assert "2 submitted, 2 committed" in text, text
        await project()
        bond = asset_id(issuer_script)
        assert count("SELECT count(*) FROM tx WHERE issued_asset_id = %s", bond) == 2
        assert count("SELECT amount FROM address_balance WHERE address = %s AND asset_id = %s",
                     alice, bond) == 1000

        # the same file again: nothing new is issued
        code, text = await run_cli(*args, str(good))
        assert code == 0 and "nothing new" in text, text
        await project()
        assert count("SELECT count(*) FROM tx WHERE issued_asset_id = %s", bond) == 2

        # a bad row (line 3): refused with its line number, nothing of the file applied
        bad = tmp_path / "bad.csv"
        bad.write_bytes(_csv([(alice, CODE, "5"), (bob, CODE, "five"), (alice, CODE, "6")]))
        code, text = await run_cli(*args, str(bad))
        assert code == 2 and "line 3: quantity 'five' is not a whole number" in text, text
        assert count("SELECT count(*) FROM legacy_import WHERE file_sha256 = %s",
                     hashlib.sha256(bad.read_bytes()).hexdigest()) == 0
        await project()
        assert count("SELECT count(*) FROM tx WHERE issued_asset_id = %s", bond) == 2
        assert count("SELECT count(*) FROM legacy_import") == 2

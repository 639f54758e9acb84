"""Regulator views, alert rules and migration 0005 against real PostgreSQL and Kafka.

Projection rows are written directly (a small builder that respects every constraint),
so each rule meets data that must raise it and data that must not; alerts go to the
``alert`` table once per cause and to a real ``surveillance.alerts.v1`` topic.
"""

from __future__ import annotations

import datetime as dt
import hashlib
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

D1 = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.UTC)
D2 = dt.datetime(2026, 11, 3, 10, 0, tzinfo=dt.UTC)
D3 = dt.datetime(2026, 11, 4, 10, 0, tzinfo=dt.UTC)
ASSET = "AKJt7NAHsMiYdaJzQkkSmAJuFqJ3nXv8Q4"


def hex64(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


class Rows:
    """Projection rows with valid shapes (hashes, sizes, foreign keys)."""

    def __init__(self, conn: psycopg.Connection[Any], next_height: int = 0) -> None:
        self.conn = conn
        self.height = next_height
        self.position = 0
        if next_height == 0:
            self.block(D1 - dt.timedelta(days=30))  # height 0, as the projector writes it

    def block(self, time_at: dt.datetime) -> int:
        height = self.height
        self.conn.execute(
            "INSERT INTO block (height, hash, prev_hash, merkle_root, proposer, round, time_at, "
            "tx_count, size_bytes, state_hash, voters) VALUES (%s, %s, %s, %s, 'koscom', 0, %s, "
            "0, 100, %s, '{}')",
            (height, hex64(f"b{height}"), hex64(f"b{height - 1}"), hex64(f"m{height}"), time_at,
             hex64(f"s{height}")))
        self.height += 1
        self.position = 0
        return height

    def tx(self, label: str, outputs: list[tuple[str, int, str | None]],
           spends: tuple[tuple[str, int], ...] = ()) -> str:
        """A tx at the current block paying (address, amount, asset) outputs."""
        txid = hex64(label)
        raw = label.encode()
        self.conn.execute("INSERT INTO tx (txid, height, position, size_bytes, raw) VALUES "
                          "(%s, %s, %s, %s, %s)", (txid, self.height - 1, self.position,
                                                   len(raw), raw))
        self.position += 1
        for index, (address, amount, asset) in enumerate(outputs):
            self.conn.execute(
                'INSERT INTO tx_output (txid, "index", value, script_pubkey, address, asset_id, '
                "quantity) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (txid, index, amount if asset is None else 0, b"\x76\xa9", address, asset,
                 None if asset is None else amount))
        for spent_txid, index in spends:
            self.conn.execute('UPDATE tx_output SET spent_by_txid = %s WHERE txid = %s AND '
                              '"index" = %s', (txid, spent_txid, index))
        return txid

    def rejection(self, log_offset: int, source_offset: int, code: str, institution: str,
                  submitter: str | None, topic: str = "ledger.tx.v1",
                  in_batch: int | None = None) -> None:
        """``in_batch``: the transaction's place in a batch record (its own txid and key)."""
        label = f"r{source_offset}" + ("" if in_batch is None else f"b{in_batch}")
        self.conn.execute(
            "INSERT INTO tx_rejection (log_offset, txid, stage, code, message, institution, "
            "submitter, idempotency_key, source_topic, source_partition, source_offset, "
            "rejected_at) VALUES (%s, %s, 'intake', %s, %s, %s, %s, %s, %s, 0, %s, %s)",
            (log_offset, hex64(label), code, f"refused: {code}", institution,
             submitter, None if submitter is None else f"k{label}", topic,
             source_offset, D1))


def alerts(dsn: str) -> set[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return {(str(r), str(c)) for r, c in conn.execute("SELECT rule, cause FROM alert")}


def populate_first_days(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = Rows(conn)
        rows.block(D1)
        g0 = rows.tx("g0", [("Y", 5_000_000, None)])
        rows.block(D1 + dt.timedelta(minutes=1))
        t1 = rows.tx("t1", [("X", 2_000_000, None), ("Y", 3_000_000, None)], ((g0, 0),))
        rows.block(D1 + dt.timedelta(minutes=2))
        t2 = rows.tx("t2", [("Z", 999_999, None), ("X", 1_000_001, None)], ((t1, 0),))
        rows.block(D2)
        a1 = rows.tx("a1", [("X", 800, ASSET)])
        rows.tx("a2", [("W", 100, ASSET)])
        rows.tx("a3", [("V", 100, ASSET)])
        rows.block(D3)
        rows.tx("a4", [("X", 2_500, ASSET)])
        rows.tx("a5", [("W", 2_500, ASSET)])
        rows.rejection(0, 10, "double-spend", "koscom", "securities-a")
        rows.rejection(1, 10, "double-spend", "surveillance", "securities-a")
        rows.rejection(2, 10, "double-spend", "securities-b", "securities-a")
        rows.rejection(3, 11, "duplicate", "koscom", "securities-b")
        rows.rejection(4, 7, "vote-forged", "koscom", None, topic="ledger.votes.v1")
        # a batch record at offset 12: two of its transactions refused, each its own row
        rows.rejection(5, 12, "missing-input", "koscom", "securities-b", in_batch=0)
        rows.rejection(6, 12, "missing-input", "surveillance", "securities-b", in_batch=0)
        rows.rejection(7, 12, "script-failed", "koscom", "securities-b", in_batch=1)
    return {"g0": g0, "t1": t1, "t2": t2, "a1": a1}


async def test_rules_raise_once_per_cause_and_publish(kafka_bootstrap: str, unique_id: str,
                                                      pg_dsn: str) -> None:
    prefix = f"{unique_id}."
    txids = populate_first_days(pg_dsn)
    expected = {
        # must: |change| >= 1,000,000; must not: t2's X (-999,999) and Z (+999,999)
        ("large-position-change", f"{txids['g0']}/Y/native"),
        ("large-position-change", f"{txids['t1']}/Y/native"),
        ("large-position-change", f"{txids['t1']}/X/native"),
        # must: one alert for submission 10 reported three times; must not: the
        # duplicate (ignored code) and the forged vote (not a submission)
        ("refused-settlement", f"ledger.tx.v1/0/10/{hex64('r10')}"),
        # must: one alert per refused transaction of the batch record at offset 12
        ("refused-settlement", f"ledger.tx.v1/0/12/{hex64('r12b0')}"),
        ("refused-settlement", f"ledger.tx.v1/0/12/{hex64('r12b1')}"),
        # must: X 80 % of day 2's asset volume in 3 transfers, Y 5/8 of day 1's native
        # transfers (change excluded); must not: W, V (10 %), day 3 (two transfers only)
        ("transfer-concentration", f"2026-11-03/{ASSET}/X"),
        ("transfer-concentration", "2026-11-02/native/Y"),
    }
    async with chain_topics(kafka_bootstrap, prefix):
        raised, published = await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                                    topic_prefix=prefix)
        assert alerts(pg_dsn) == expected
        assert (raised, published) == (len(expected), len(expected))
        # once per cause: a second run raises and publishes nothing
        assert await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                      topic_prefix=prefix) == (0, 0)
        # thresholds are configurable: 600 units now count as large, 599 still do not
        with psycopg.connect(pg_dsn) as conn:
            conn.execute("UPDATE surveillance_setting SET value = 600 "
                         "WHERE name = 'large_position_change_min'")
            rows = Rows(conn, next_height=6)
            rows.block(D3 + dt.timedelta(hours=1))
            big = rows.tx("a6", [("Q", 600, ASSET)])
            rows.tx("a7", [("R", 599, ASSET)])
        assert await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                      topic_prefix=prefix) == (1, 1)
        assert ("large-position-change", f"{big}/Q/{ASSET}") in alerts(pg_dsn)
        records = await read_all(kafka_bootstrap, prefix + ALERTS.name, client_id="test")
    decoded = [codec.decode(r.value, expected="AlertRaised").record for r in records]
    assert sorted((d["rule"], d["cause"]) for d in decoded) == sorted(
        alerts(pg_dsn)), "each alert published exactly once"
    refused = next(d for d in decoded if d["rule"] == "refused-settlement"
                   and d["cause"].startswith("ledger.tx.v1/0/10/"))
    evidence = json.loads(refused["evidence"])
    assert evidence["codes"] == ["double-spend"] and evidence["submitter"] == "securities-a"
    assert evidence["reported_by"] == ["koscom", "securities-b", "surveillance"]
    large = next(d for d in decoded if d["cause"] == f"{txids['t1']}/X/native")
    assert large["amount"] == "2000000" and large["height"] == 2


def test_regulator_views(pg_dsn: str) -> None:
    txids = populate_first_days(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        changes = {(t, a, asset): change for t, a, asset, change in conn.execute(
            "SELECT txid, address, asset_id, change FROM position_change")}
        assert changes[(txids["t1"], "Y", None)] == Decimal(-2_000_000)
        assert changes[(txids["t2"], "X", None)] == Decimal(-999_999)
        large = conn.execute("SELECT txid, address, change FROM large_position_change "
                             "ORDER BY height, address").fetchall()
        assert large == [(txids["g0"], "Y", 5_000_000), (txids["t1"], "X", 2_000_000),
                         (txids["t1"], "Y", -2_000_000)]
        refused = conn.execute("SELECT source_offset, codes, reported_by, records, submitter "
                               "FROM refused_settlement ORDER BY source_offset, codes").fetchall()
        assert refused == [
            (7, ["vote-forged"], ["koscom"], 1, None),
            (10, ["double-spend"], ["koscom", "securities-b", "surveillance"], 3,
             "securities-a"),
            (11, ["duplicate"], ["koscom"], 1, "securities-b"),
            (12, ["missing-input"], ["koscom", "surveillance"], 2, "securities-b"),
            (12, ["script-failed"], ["koscom"], 1, "securities-b")]
        shares = {(str(day), asset, address): (volume, share) for day, asset, address, volume,
                  share in conn.execute("SELECT day, asset_id, address, volume, share "
                                        "FROM transfer_concentration")}
        assert shares[("2026-11-03", ASSET, "X")] == (Decimal(800), Decimal("0.8"))
        assert shares[("2026-11-02", None, "Y")] == (Decimal(5_000_000), Decimal("0.625"))
        assert ("2026-11-02", None, "X") in shares  # X received 2,000,000 from Y in t1
        # numeric, never float
        types = dict(conn.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE column_name IN ('change', 'volume', 'share', 'amount') "
            "AND table_schema = 'public' AND table_name <> 'address_balance'").fetchall())
        # the market's tables keep KRW as bigint won (integer minor units, decision 0070)
        market = {k: v for k, v in types.items() if k.startswith("market_")}
        assert set(market.values()) <= {"bigint"}, market
        regulator = {k: v for k, v in types.items() if not k.startswith("market_")}
        assert set(regulator.values()) == {"numeric"}, regulator


def test_migration_0005_upgrade_downgrade_upgrade(pg_dsn: str) -> None:
    objects = "SELECT count(*) FROM pg_class WHERE relname = ANY(%s)"
    names = ["alert", "surveillance_setting", "surveillance_cursor", "legacy_import",
             "position_change", "large_position_change", "refused_settlement",
             "transfer_concentration", "legacy_settlement", "consensus_vote",
             "consensus_view_change", "consensus_cursor", "consensus_evidence"]
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (len(names),)
    postgres.migrate(pg_dsn, "0002", downgrade=True)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = "
                            "'legacy_balance_at'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM address_balance").fetchone() == (0,)
    postgres.migrate(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(objects, (names,)).fetchone() == (len(names),)
        assert conn.execute(  # 0005's four (later revisions add their own)
            "SELECT count(*) FROM surveillance_setting WHERE name IN "
            "('large_position_change_min', 'concentration_share_min', "
            "'concentration_volume_min', 'concentration_transfers_min')").fetchone() == (4,)


# --------------------------------------------------------------------------- consensus


async def test_consensus_evidence_per_institution(kafka_bootstrap: str, unique_id: str,
                                                  pg_dsn: str) -> None:
    """A votes log with a nack, a view change, a double vote and a forged vote: each is
    attributed to its institution; a height not decided yet is written once it is."""
    from ledger.block import proposer_for, sign_vote
    from ledger.membership import INSTITUTION_IDS
    from streams.common.genesis_files import build_genesis, seeded_entropy
    from streams.kafka.logio import LogWriter
    from streams.kafka.records import vote_record
    from streams.kafka.topics import VOTES
    from streams.projections.consensus_evidence import EvidenceProjector

    genesis, keys = build_genesis(chain_id="evidence", time_ms=1_764_000_000_000,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy(unique_id))
    chain_id = genesis.hash_le
    otc, surv, koscom, sec_a, sec_b = INSTITUTION_IDS
    x, y, z = (hashlib.sha256(label.encode()).digest() for label in "xyz")

    def vote(voter: str, height: int, round_: int, kind: str, block: bytes = bytes(32),
             reason: str = "", key_of: str | None = None) -> bytes:
        signed = sign_vote(keys[key_of or voter], chain_id, voter=voter, height=height,
                           round_=round_, kind=kind, block_hash=block, reason_code=reason)
        return codec.encode("VoteCast", vote_record(signed, now_ms=1_764_000_000_000))

    first = [
        vote(otc, 1, 0, "ack", x), vote(surv, 1, 0, "ack", x), vote(koscom, 1, 0, "ack", x),
        vote(sec_b, 2, 0, "nack", y, "double-spend"),
        vote(otc, 2, 0, "timeout"), vote(surv, 2, 0, "timeout"), vote(koscom, 2, 0, "timeout"),
        vote(koscom, 2, 1, "ack", z), vote(koscom, 2, 1, "ack", y),  # double vote
        vote(otc, 2, 1, "ack", z, key_of=sec_a),  # forged: claims otc, signed by sec-a
        b"not avro",
        vote(otc, 2, 1, "ack", z), vote(surv, 2, 1, "ack", z),  # decides height 2 at z
        vote(sec_a, 3, 0, "ack", x),  # height 3: not decided yet
    ]
    second = [vote(otc, 3, 0, "ack", x), vote(surv, 3, 0, "ack", x)]
    prefix = f"{unique_id}."
    async with chain_topics(kafka_bootstrap, prefix):
        writer = LogWriter(kafka_bootstrap, client_id=f"{unique_id}-votes")
        await writer.start()
        try:
            await writer.send_many(prefix + VOTES.name, [(None, v) for v in first])

            def projector() -> EvidenceProjector:
                return EvidenceProjector(genesis, bootstrap=kafka_bootstrap, dsn=pg_dsn,
                                         topic_prefix=prefix)

            stats = await projector().run()
            assert (stats.votes, stats.view_changes, stats.height) == (13, 1, 2)
            assert (await projector().run()).votes == 0  # nothing new until height 3 decides
            await writer.send_many(prefix + VOTES.name, [(None, v) for v in second])
        finally:
            await writer.stop()
        # the consensus-evidence rule: the double vote and the forged vote, nothing else
        # (the nack, the timeouts and the undecodable record are not evidence against a
        # member); each once; the service projects the votes itself when given genesis
        await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap, topic_prefix=prefix,
                               evidence=projector())
        assert await run_surveillance(dsn=pg_dsn, bootstrap=kafka_bootstrap,
                                      topic_prefix=prefix, evidence=projector()) == (0, 0)
    with psycopg.connect(pg_dsn) as conn:
        raised = conn.execute("SELECT cause, subject, evidence->>'evidence' FROM alert "
                              "WHERE rule = 'consensus-evidence' ORDER BY cause").fetchall()
    assert raised == [("votes/8", koscom, "double-vote"), ("votes/9", otc, "vote-forged")]
    with psycopg.connect(pg_dsn) as conn:
        evidence = {row[0]: row[1:] for row in conn.execute(
            "SELECT institution, acks, nacks, timeouts, double_votes, forged_votes, "
            "nack_reasons, rounds_skipped_as_proposer FROM consensus_evidence")}
        changes = conn.execute("SELECT height, round, skipped_proposer "
                               "FROM consensus_view_change").fetchall()
        undecodable = conn.execute("SELECT count(*) FROM consensus_vote "
                                   "WHERE evidence = 'vote-undecodable'").fetchone()
        assert conn.execute("SELECT count(*), max(log_offset) FROM consensus_vote").fetchone() \
            == (len(first) + len(second), len(first) + len(second) - 1)
    skipped = proposer_for(genesis, 2, 0)
    assert changes == [(2, 1, skipped)]
    assert evidence[sec_b][:2] == (0, 1) and evidence[sec_b][5] == ["double-spend"]
    assert evidence[koscom][3] == 1  # its second ack in round 1
    assert evidence[otc][4] == 1 and evidence[otc][0] == 4  # forged one counted as such
    assert evidence[surv][2] == 1 and evidence[sec_a][0] == 1
    assert evidence[skipped][6] == 1
    assert undecodable == (1,)


async def test_following_raises_alerts_as_the_projection_advances(
    kafka_bootstrap: str, unique_id: str, pg_dsn: str
) -> None:
    import asyncio

    from tests.integration.cluster_fixtures import wait_until

    prefix = f"{unique_id}."
    with psycopg.connect(pg_dsn) as conn:
        Rows(conn).block(D1)  # heights 0 and 1, nothing to raise
    async with chain_topics(kafka_bootstrap, prefix):
        stop = asyncio.Event()
        service = asyncio.create_task(run_surveillance(
            dsn=pg_dsn, bootstrap=kafka_bootstrap, topic_prefix=prefix, follow=True,
            stop=stop, poll_interval_s=0.1))
        try:
            await wait_until(lambda: _cursor_height(pg_dsn) == 1, timeout_s=30,
                             what="the service evaluated height 1")
            assert alerts(pg_dsn) == set()
            with psycopg.connect(pg_dsn) as conn:
                rows = Rows(conn, next_height=2)
                rows.block(D2)
                big = rows.tx("big", [("Y", 7_000_000, None)])
            await wait_until(lambda: bool(alerts(pg_dsn)), timeout_s=30,
                             what="the alert raised while following")
        finally:
            stop.set()
            raised, published = await asyncio.wait_for(service, 30)
    assert ("large-position-change", f"{big}/Y/native") in alerts(pg_dsn)
    assert raised == published == len(alerts(pg_dsn))


def _cursor_height(dsn: str) -> int | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT height FROM surveillance_cursor").fetchone()
    return None if row is None else int(row[0])

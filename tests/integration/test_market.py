"""The OTC bond market (issue 11) against the real stack: Kafka, five node processes.

- ``test_seed_scenario``: the seed's flow 등록·게시 → 거래참여 → 협의 → 거래 → 거래확인:
  the three bonds and KRW deposits registered and issued, the seed's three board rows
  posted, user B joins the 국민주택 2013-02 order, they negotiate to 11578.49 x 100,
  both sign, the DvP transaction commits through the five nodes, balances exact before
  and after (user A starts as in the seed's screen: 국민주택 2013-02 100주, 2,000,000원);
  the raw negotiation topic holds no plaintext; a restarted service replays the board.
- ``test_bad_input_is_refused``: each refusal of the issue with its code, nothing changed.

Who is who: user A = 홍길동 (securities-a, posts the 국민주택 sell), user B = 이몽룡
(securities-b, joins it), 박서방 (securities-b, posts the 통안 buy), 정도전
(securities-a, posts the 국고 sell).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger.market import MarketError, OrderStatus
from ledger.membership import INSTITUTION_IDS
from streams.kafka import codec
from streams.kafka.logio import read_all
from streams.kafka.topics import MARKET_BOARD, MARKET_NEGOTIATION
from streams.market.accounts import Account, Principal
from streams.market.fixtures import KRW_A, KRW_B, KUKGO, KUKMIN, TONGAN
from streams.market.service import MarketService
from tests.integration.cluster_fixtures import wait_until
from tests.integration.market_fixtures import MarketRun, running_market

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

AGREE_TIMEOUT_S = 60.0
SECRET_PHRASES = ("반갑습니다", "이율 0.001만 내려주시면", "11578.49", "좋습니다")


async def _users(run: MarketRun) -> dict[str, tuple[Account, Principal]]:
    users = {
        "A": run.open("securities-a", "홍길동"),
        "B": run.open("securities-b", "이몽룡"),
        "park": run.open("securities-b", "박서방"),
        "jeong": run.open("securities-a", "정도전"),
    }
    market = run.market
    await market.issue("securities-a", KUKMIN, users["A"][0], 100)
    await market.issue("securities-a", KRW_A.security_code, users["A"][0], 2_000_000)
    await market.issue("securities-a", KUKGO, users["jeong"][0], 20)
    await market.issue("securities-b", KRW_B.security_code, users["park"][0], 2_000_000)
    await market.issue("securities-b", KRW_B.security_code, users["B"][0], 5_000_000)
    return users


async def _nodes_agree(run: MarketRun, height: int) -> None:
    """Every one of the five nodes reports ``height`` or more with one state hash there."""
    def agreed() -> bool:
        beats = run.status.latest
        return set(INSTITUTION_IDS) <= beats.keys() and all(
            beats[name].height >= height for name in INSTITUTION_IDS)

    await wait_until(agreed, timeout_s=AGREE_TIMEOUT_S, what=f"five nodes at {height}")


async def test_seed_scenario(tmp_path: Path, unique_id: str, kafka_bootstrap: str,
                             pg_dsn: str) -> None:
    async with running_market(tmp_path, unique_id, kafka_bootstrap) as run:
        market = run.market
        await run.register_seed_assets()
        users = await _users(run)
        a_account, a = users["A"]
        b_account, b = users["B"]

        before_a, before_b = market.balance(a), market.balance(b)
        assert dict(before_a.securities) == {KUKMIN: 100} and before_a.cash_krw == 2_000_000
        assert dict(before_b.securities) == {} and before_b.cash_krw == 5_000_000

        # 등록·게시: the seed's three board rows
        kukmin = await market.post_order(a, KUKMIN, "sell", "11578.50", 100)
        tongan = await market.post_order(users["park"][1], TONGAN, "buy", "10016.69", 150)
        kukgo = await market.post_order(users["jeong"][1], KUKGO, "sell", "10179.33", 20)
        rows = {(o.security_code, o.side.value, str(o.price), o.quantity, o.status.value)
                for o in market.board()}
        assert rows == {(KUKMIN, "sell", "11578.50", 100, "waiting"),
                        (TONGAN, "buy", "10016.69", 150, "waiting"),
                        (KUKGO, "sell", "10179.33", 20, "waiting")}
        assert market.balance(users["park"][1]).committed == {"KRW": 1_502_503}  # ROUND_DOWN

        # 거래참여 and 협의
        negotiation = await market.join_order(b, kukmin.order_id)
        assert market.board_state.order(kukmin.order_id).status is OrderStatus.NEGOTIATING
        await market.send_message(a, negotiation.negotiation_id, "반갑습니다.")
        await market.send_message(b, negotiation.negotiation_id,
                                  "네~ 이율 0.001만 내려주시면 바로 삽니다.",
                                  offer_price="11578.49", offer_quantity=100)
        await market.send_message(a, negotiation.negotiation_id, "좋습니다.")
        seen_by_a = market.read_messages(a, negotiation.negotiation_id)
        assert [m.text for m in seen_by_a] == [
            "반갑습니다.", "네~ 이율 0.001만 내려주시면 바로 삽니다.", "좋습니다."]
        assert (seen_by_a[1].offer_price, seen_by_a[1].offer_quantity) == (
            Decimal("11578.49"), 100)
        regulator = market.read_messages_as_surveillance(run.key("surveillance"),
                                                         negotiation.negotiation_id)
        assert [m.text for m in regulator] == [m.text for m in seen_by_a]

        # 협상확정 by both, then 거래 (DvP) and 거래확인
        first = await market.agree(a, negotiation.negotiation_id, "11578.49", 100)
        assert not first.is_complete
        agreement = await market.agree(b, negotiation.negotiation_id, "11578.49", 100)
        assert agreement.is_complete and agreement.terms.amount == 1_157_849
        assert market.board_state.order(kukmin.order_id).status is OrderStatus.AGREED
        trade = await market.settle(agreement.agreement_id)
        assert market.board_state.order(kukmin.order_id).status is OrderStatus.SETTLED
        assert (trade.order_id, trade.negotiation_id) == (kukmin.order_id,
                                                         negotiation.negotiation_id)
        assert trade.height >= 1 and len(trade.block_hash) == 64
        block = market.chain.block_hashes[trade.height][::-1].hex()
        assert block == trade.block_hash
        await _nodes_agree(run, trade.height)

        after_a, after_b = market.balance(a), market.balance(b)
        assert dict(after_a.securities) == {} and after_a.cash_krw == 2_000_000 + 1_157_849
        assert dict(after_b.securities) == {KUKMIN: 100}
        assert after_b.cash_krw == 5_000_000 - 1_157_849
        assert market.trades(a) == market.trades(b) == [trade]
        assert [n.negotiation_id for n in market.negotiations(b)] == [
            negotiation.negotiation_id]
        assert market.agreements(users["park"][1]) == []
        assert market.trades(users["park"][1]) == []
        # the other two rows are untouched
        assert {o.order_id for o in market.board()} == {tongan.order_id, kukgo.order_id}

        await _no_plaintext_on_the_wire(run)
        await _replays(run, market)
        await _projects(run, pg_dsn, trade.txid)
        assert a_account.address != b_account.address


async def _no_plaintext_on_the_wire(run: MarketRun) -> None:
    """The raw bytes of the negotiation and board topics contain none of the messages'
    words, in UTF-8, in JSON escapes or base64 of UTF-8 — only ciphertext."""
    import base64
    import json

    for spec in (MARKET_NEGOTIATION, MARKET_BOARD):
        records = await read_all(run.bootstrap, run.prefix + spec.name, client_id="no-plain")
        assert records, spec.name
        raw = b"".join(record.value for record in records)
        for phrase in SECRET_PHRASES[:2] + SECRET_PHRASES[3:]:
            for form in (phrase.encode(), json.dumps(phrase).encode()[1:-1],
                         base64.b64encode(phrase.encode())):
                assert form not in raw, f"{phrase!r} readable on {spec.name}"
    negotiation = await read_all(run.bootstrap, run.prefix + MARKET_NEGOTIATION.name,
                                 client_id="no-plain")
    assert len(negotiation) == 3
    for record in negotiation:
        event = codec.decode(record.value, expected="MarketEventRecorded").record
        payload: dict[str, Any] = json.loads(event["payload"])
        assert set(payload) == {"negotiation_id", "sequence", "sender", "ciphertext", "at_ms"}
        assert "11578.49" not in record.value.decode("latin-1")


async def _replays(run: MarketRun, market: MarketService) -> None:
    """A second service reading only the logs reaches the same board and trades."""
    replica = run.new_service()
    await replica.start()
    try:
        await replica.chain.wait_height(market.chain.height, timeout_s=AGREE_TIMEOUT_S)
        assert replica.board_state.orders == market.board_state.orders
        assert replica.board_state.trades == market.board_state.trades
        assert replica.board_state.agreements == market.board_state.agreements
        assert replica.refused_records == []
    finally:
        await replica.stop()


async def _projects(run: MarketRun, dsn: str, txid: str) -> None:
    """The chain and the market projected into PostgreSQL (revisions 0001-0003): terms,
    orders, history, negotiation metadata, the trade and balances per user; twice, with
    the same result (upserts and tracking rows in one transaction)."""
    import psycopg

    from streams.projections.market import project_market
    from streams.projections.projector import Projector
    from streams.projections.runner import run_projection

    await run_projection(lambda: Projector(run.genesis, bootstrap=run.bootstrap, dsn=dsn,
                                           topic_prefix=run.prefix),
                         follow=False, rebuild=False)
    first = await project_market(dsn, run.bootstrap, run.genesis, topic_prefix=run.prefix)
    second = await project_market(dsn, run.bootstrap, run.genesis, topic_prefix=run.prefix)
    assert first == second and first.refused == 0 and first.trades == 1
    with psycopg.connect(dsn) as conn:
        def rows(sql: str) -> list[tuple[Any, ...]]:
            return conn.execute(sql).fetchall()

        assert rows("SELECT name, maturity::text, coupon_bp, face_value FROM market_asset "
                    f"WHERE security_code = '{KUKMIN}'") == [
            ("국민주택 2013-02", "2018-02-28", 275, 10_000)]
        assert rows("SELECT count(*) FROM market_asset") == [(5,)]
        assert sorted(rows("SELECT security_code, side, price::text, quantity, status "
                           "FROM market_order")) == [
            (KUKMIN, "sell", "11578.50", 100, "settled"),
            (KUKGO, "sell", "10179.33", 20, "waiting"),
            (TONGAN, "buy", "10016.69", 150, "waiting")]
        assert rows("SELECT txid, price::text, quantity, amount, seller_user, buyer_user "
                    "FROM market_trade") == [(txid, "11578.49", 100, 1_157_849, "홍길동",
                                              "이몽룡")]
        assert rows("SELECT messages, closed FROM market_negotiation") == [(3, True)]
        assert rows("SELECT count(*) FROM market_event WHERE payload ? 'ciphertext' "
                    "OR payload ? 'sealed_keys'") == [(0,)]
        # revision 0012: the messages as ciphertext and the key sealed to each reader
        assert rows("SELECT count(*), count(DISTINCT sequence) FROM market_sealed_message"
                    ) == [(3, 3)]
        assert sorted(rows("SELECT role FROM market_sealed_key")) == [
            ("joiner",), ("poster",), ("surveillance",)]
        history = rows("SELECT kind FROM market_event e JOIN market_order o USING (order_id) "
                       f"WHERE o.security_code = '{KUKMIN}' ORDER BY e.topic, e.log_offset")
        assert [k for (k,) in history if k != "message-sent"] == [
            "order-posted", "negotiation-opened", "agreement-signed", "agreement-signed",
            "settlement-sent", "trade-settled"]  # the DvP logged before it is sent (0132)
        balances = dict(rows("SELECT security_code, amount FROM market_balance "
                             "WHERE user_id = '홍길동'"))
        assert balances == {KRW_A.security_code: 2_000_000, KRW_B.security_code: 1_157_849}
        assert dict(rows("SELECT security_code, amount FROM market_balance "
                         "WHERE user_id = '이몽룡'")) == {
            KUKMIN: 100, KRW_B.security_code: 5_000_000 - 1_157_849}


async def _refused(call: Any, code: str) -> None:
    with pytest.raises(MarketError) as caught:
        await call
    assert caught.value.code == code, caught.value


async def test_bad_input_is_refused(tmp_path: Path, unique_id: str,
                                    kafka_bootstrap: str) -> None:
    async with running_market(tmp_path, unique_id, kafka_bootstrap) as run:
        market = run.market
        await run.register_seed_assets()
        users = await _users(run)
        a, b, park = users["A"][1], users["B"][1], users["park"][1]

        def snapshot() -> tuple[Any, ...]:
            s = market.board_state
            return (s.orders, s.negotiations, s.agreements, s.trades, market.chain.height,
                    market.balance(a), market.balance(b))

        order = await market.post_order(a, KUKMIN, "sell", "11578.50", 100)
        before = snapshot()
        await _refused(market.post_order(a, "KR0000000000", "sell", "100.00", 1),
                       "market-unknown-security")
        await _refused(market.post_order(a, KUKMIN, "sell", "11578.505", 1),
                       "market-price-precision")
        for quantity in (0, -5):
            await _refused(market.post_order(a, KUKMIN, "sell", "11578.50", quantity),
                           "market-quantity-invalid")
        await _refused(market.post_order(a, KUKMIN, "sell", "11578.50", Decimal("1.5")),
                       "market-quantity-fractional")
        await _refused(market.post_order(a, KUKMIN, "sell", "11578.50", 1),
                       "market-insufficient-units")  # all 100 are on the open order
        await _refused(market.post_order(b, KUKGO, "sell", "10179.33", 1),
                       "market-insufficient-units")
        await _refused(market.amend_order(b, order.order_id, price="11000.00"), "order-not-owner")
        await _refused(market.cancel_order(park, order.order_id), "order-not-owner")
        await _refused(market.join_order(a, order.order_id), "order-own")
        await _refused(market.cancel_order(a, "o" * 10_000), "market-bad-id")
        assert snapshot() == before

        # commands arriving together are decided in order as one batch: each sees the
        # ones before it (정도전's second sale no longer fits), refusals change nothing
        jeong = users["jeong"][1]
        batch = await asyncio.gather(
            market.post_order(a, KUKMIN, "sell", "11578.50", 1),
            market.post_order(jeong, KUKGO, "sell", "10179.33", 5),
            market.post_order(jeong, KUKGO, "sell", "10179.33", 16),
            market.post_order(park, TONGAN, "buy", "10016.69", 1),
            return_exceptions=True)
        assert [getattr(r, "code", "ok") for r in batch] == [
            "market-insufficient-units", "ok", "market-insufficient-units", "ok"]
        assert market.balance(jeong).committed == {
            market.board_state.asset(KUKGO).asset_id: 5}
        await market.cancel_order(jeong, batch[1].order_id)  # type: ignore[union-attr]

        negotiation = await market.join_order(b, order.order_id)
        await market.send_message(b, negotiation.negotiation_id, "offer",
                                  offer_price="11578.49", offer_quantity=100)
        before = snapshot()
        await _refused(market.agree(a, negotiation.negotiation_id, "11578.48", 100),
                       "agreement-terms-mismatch")
        await _refused(market.agree(b, negotiation.negotiation_id, "11578.49", 99),
                       "agreement-terms-mismatch")
        await _refused(market.send_message(park, negotiation.negotiation_id, "hi"),
                       "negotiation-not-party")
        assert snapshot() == before

        await market.agree(a, negotiation.negotiation_id, "11578.49", 100)
        agreement = await market.agree(b, negotiation.negotiation_id, "11578.49", 100)
        # settling twice at once: one DvP transaction, the other call refused
        results = await asyncio.gather(market.settle(agreement.agreement_id),
                                       market.settle(agreement.agreement_id),
                                       return_exceptions=True)
        trades = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, MarketError)]
        assert len(trades) == 1 and [e.code for e in errors] == ["agreement-settling"]
        trade = trades[0]
        before = snapshot()
        await _refused(market.settle(agreement.agreement_id), "agreement-already-settled")
        assert snapshot() == before
        assert market.balance(b).securities == {KUKMIN: 100}

        # two trades of the same seller settled at once: both commit, one after the other
        pairs = []
        for price in ("11600.00", "11700.00"):
            resold = await market.post_order(b, KUKMIN, "sell", price, 10)
            talk = await market.join_order(a, resold.order_id)
            await market.send_message(a, talk.negotiation_id, "ok", offer_price=price,
                                      offer_quantity=10)
            await market.agree(a, talk.negotiation_id, price, 10)
            pairs.append(await market.agree(b, talk.negotiation_id, price, 10))
        cash_before = market.balance(a).cash_krw
        both = await asyncio.gather(*(market.settle(p.agreement_id) for p in pairs))
        assert len({t.txid for t in both}) == 2
        assert market.balance(b).securities == {KUKMIN: 80}
        assert market.balance(a).securities == {KUKMIN: 20}
        assert market.balance(a).cash_krw == cash_before - 116_000 - 117_000

        # only member issuers register and issue; registered terms never change
        from dataclasses import replace

        from streams.market.fixtures import SEED_BONDS

        bond = next(d for d in SEED_BONDS if d.security_code == KUKMIN)
        await _refused(market.register_asset("koscom", replace(bond, issuer="koscom")),
                       "asset-issuer-not-member")
        await _refused(market.register_asset("securities-a", replace(bond, coupon_bp=300)),
                       "asset-terms-frozen")
        await _refused(market.issue("securities-b", KUKMIN, users["B"][0], 1),
                       "asset-issuer-mismatch")

        # settling after the units moved: 정도전 agrees to sell 국고 to 박서방, then his
        # units leave through a plain ledger transfer outside the market (his firm's
        # back office), so the agreed DvP can no longer be built
        jeong_account = users["jeong"][0]
        kukgo = await market.post_order(jeong, KUKGO, "sell", "10179.33", 20)
        first = await market.join_order(park, kukgo.order_id)
        await market.send_message(park, first.negotiation_id, "ok",
                                  offer_price="10179.33", offer_quantity=20)
        await market.agree(jeong, first.negotiation_id, "10179.33", 20)
        stale = await market.agree(park, first.negotiation_id, "10179.33", 20)
        await _move_units_outside(run, jeong_account, jeong, KUKGO, users["B"][0])
        moved = (market.balance(jeong).securities, market.balance(park).cash_krw)
        await _refused(market.settle(stale.agreement_id), "settlement-insufficient-units")
        assert (market.balance(jeong).securities, market.balance(park).cash_krw) == moved
        assert market.board_state.agreements[stale.agreement_id].failed_code == (
            "settlement-insufficient-units")
        await _refused(market.settle(stale.agreement_id), "agreement-failed")
        assert trade.txid

        # an agreement that lapsed settles never
        resale = await market.post_order(b, KUKMIN, "sell", "11650.00", 10)
        talk = await market.join_order(a, resale.order_id)
        await market.send_message(a, talk.negotiation_id, "10 at 11650",
                                  offer_price="11650.00", offer_quantity=10)
        market.agreement_ttl_ms = 1
        await market.agree(a, talk.negotiation_id, "11650.00", 10)
        lapsed = await market.agree(b, talk.negotiation_id, "11650.00", 10)
        assert market.balance(b).committed == {lapsed.terms.asset_id: 10}
        assert market.balance(a).committed == {"KRW": 116_500}
        before = (market.balance(a).securities, market.balance(a).cash_krw,
                  market.balance(b).securities, market.balance(b).cash_krw,
                  market.chain.height)
        await wait_until(lambda: market._clock_ms() > lapsed.expires_at_ms, timeout_s=5,
                         what="the agreement lapses")
        await _refused(market.settle(lapsed.agreement_id), "agreement-expired")
        assert (market.balance(a).securities, market.balance(a).cash_krw,
                market.balance(b).securities, market.balance(b).cash_krw,
                market.chain.height) == before
        # the lapsed agreement ends: the order reopens (still holding the seller's units),
        # the buyer's cash is no longer held back
        assert market.board_state.order(resale.order_id).status is OrderStatus.NEGOTIATING
        assert market.balance(b).committed == {lapsed.terms.asset_id: 10}
        assert market.balance(a).committed == {}
        await _refused(market.settle(lapsed.agreement_id), "agreement-failed")
        await _refused(market.agree(a, talk.negotiation_id, "11650.00", 10), "agreement-failed")
        await _refused(market.amend_order(b, resale.order_id), "order-amend-empty")
        market.agreement_ttl_ms = 600_000
        await _self_custody_user_trades(run, a)
        await _hostile_records_are_skipped(run)


async def _self_custody_user_trades(run: MarketRun, seller: Principal) -> None:
    """A user holding their own key (non-custodial) at securities-b buys from 홍길동:
    the same flow, the firm never holding the key."""
    import os

    from ledger.keys import PrivateKey
    from streams.market.accounts import OwnKey

    market = run.market
    own = OwnKey("self-custody", "securities-b", PrivateKey(os.urandom(32)))
    account = market.accounts.add_own_key(own)
    assert "self-custody" not in {a.user_id for a in run.stores["securities-b"].accounts()}
    await market.issue("securities-b", KRW_B.security_code, account, 100_000)
    buyer = own.principal()
    order = await market.post_order(seller, KUKMIN, "sell", "11578.00", 5)
    negotiation = await market.join_order(buyer, order.order_id)
    await market.send_message(buyer, negotiation.negotiation_id, "5 please",
                              offer_price="11578.00", offer_quantity=5)
    await market.agree(seller, negotiation.negotiation_id, "11578.00", 5)
    agreement = await market.agree(buyer, negotiation.negotiation_id, "11578.00", 5)
    await market.settle(agreement.agreement_id)
    assert market.balance(buyer).securities == {KUKMIN: 5}
    assert market.balance(buyer).cash_krw == 100_000 - 57_890
    forged = Principal("self-custody", "securities-b", b"\x00" * 32)
    await _refused(market.post_order(forged, KUKMIN, "buy", "1.00", 1),
                   "account-not-authenticated")


async def _hostile_records_are_skipped(run: MarketRun) -> None:
    """Garbage, a forged writer and a bad signature on the board topic: a replica
    replaying the log skips and reports each, and reaches the same board."""
    from ledger.market import MarketEvent
    from streams.kafka.logio import LogWriter
    from streams.kafka.market_log import envelope

    forged = MarketEvent("order-cancelled", {"order_id": "x", "at_ms": 1})
    records = [
        b"not avro at all",
        envelope(forged, "x", writer="otc-operator", key=run.key("koscom")),
        envelope(forged, "x", writer="koscom", key=run.key("koscom")),
    ]
    tampered = bytearray(envelope(forged, "x", writer="otc-operator",
                                  key=run.key("otc-operator")))
    tampered[-10] ^= 1
    records.append(bytes(tampered))
    writer = LogWriter(run.bootstrap, client_id="hostile")
    await writer.start()
    try:
        for value in records:
            await writer.send(run.prefix + MARKET_BOARD.name, value)
    finally:
        await writer.stop()
    replica = run.new_service()
    await replica.start()
    try:
        assert len(replica.refused_records) == len(records), replica.refused_records
        assert replica.board_state.orders == run.market.board_state.orders
        assert replica.board_state.agreements == run.market.board_state.agreements
    finally:
        await replica.stop()


async def _move_units_outside(run: MarketRun, account: Account, principal: Principal,
                              security_code: str, to: Account) -> None:
    """Every unit of ``security_code`` the user holds, sent by a plain ledger transfer."""
    from ledger.state import utxos_of
    from ledger.wallet import Coin, Leg, build_transfer

    market = run.market
    asset = market.board_state.asset(security_code).asset_id
    coins = tuple(Coin(o, e.value, e.script_pubkey, e.asset_id, e.quantity, e.height)
                  for o, e in utxos_of(market.chain.state, account.script)
                  if e.asset_id == asset)
    units = sum(c.quantity for c in coins)
    psbt = build_transfer([Leg(coins, asset, units, to.script, account.script)])
    tx = run.stores[account.firm].sign_inputs(principal, psbt).finalize()
    await market.client.submit(tx)
    outcome = (await market.client.wait([tx.txid], timeout_s=AGREE_TIMEOUT_S))[tx.txid]
    assert outcome.committed and outcome.height is not None, outcome
    await market.chain.wait_height(outcome.height, timeout_s=AGREE_TIMEOUT_S)


def _cli(run: MarketRun, custody: Path, *args: str, expect: int = 0) -> Any:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, CAPLEDGER_MARKET_PASSWORD="correct horse battery",
               CAPLEDGER_KAFKA_BOOTSTRAP=run.bootstrap)
    done = subprocess.run(
        [sys.executable, "-m", "streams", "market", "--genesis", str(run.chain_dir),
         "--custody-dir", str(custody), "--topic-prefix", run.prefix, *args],
        capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == expect, (args, done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout) if expect == 0 and done.stdout.strip() else done.stderr


CLI_TIMEOUT_S = 120


async def test_cli_drives_the_market(tmp_path: Path, unique_id: str,
                                     kafka_bootstrap: str, pg_dsn: str) -> None:
    """``capledger market`` over the real stack: register, open accounts, issue, post,
    refuse a bad price (exit 2) and a sale of units not held (exit 3), board, balance,
    expiry, projection."""
    async with running_market(tmp_path, unique_id, kafka_bootstrap) as run:
        custody = tmp_path / "cli-custody"

        def cli(*args: str, expect: int = 0) -> Any:
            return _cli(run, custody, *args, expect=expect)

        registered = await asyncio.to_thread(cli, "register", "--issuer", "securities-a",
                                             "--seed")
        assert {r["definition"]["security_code"] for r in registered} == {
            KUKMIN, KUKGO, KRW_A.security_code}
        user = ("--firm", "securities-a", "--user", "홍길동")
        await asyncio.to_thread(cli, "open-account", *user)
        await asyncio.to_thread(cli, "issue", "--issuer", "securities-a", "--security", KUKMIN,
                                "--quantity", "100", *user)
        order = await asyncio.to_thread(cli, "post", *user, "--security", KUKMIN, "--side",
                                        "sell", "--price", "11578.50", "--quantity", "100")
        assert order["status"] == "waiting" and order["price"] == "11578.50"
        error = await asyncio.to_thread(cli, "post", *user, "--security", KUKMIN, "--side",
                                        "sell", "--price", "1.005", "--quantity", "1",
                                        expect=2)
        assert "market-price-precision" in error
        error = await asyncio.to_thread(cli, "post", *user, "--security", KUKGO, "--side",
                                        "sell", "--price", "1.00", "--quantity", "1",
                                        expect=3)
        assert "market-insufficient-units" in error
        board = await asyncio.to_thread(cli, "board")
        assert [o["order_id"] for o in board] == [order["order_id"]]
        balance = await asyncio.to_thread(cli, "balance", *user)
        assert balance["securities"] == {KUKMIN: 100}
        assert balance["cash_krw"] == 0 and list(balance["committed"].values()) == [100]
        expired = await asyncio.to_thread(cli, "expire", "--ttl-hours", "0")
        assert [(o["order_id"], o["status"]) for o in expired] == [
            (order["order_id"], "expired")]
        assert await asyncio.to_thread(cli, "board") == []
        assert (await asyncio.to_thread(cli, "balance", *user))["committed"] == {}
        projected = await asyncio.to_thread(cli, "project", "--dsn", pg_dsn)
        # 3 registrations, the order, 2 refusals, the expiry
        assert projected == {"events": 7, "refused": 0, "orders": 1, "trades": 0}
        store_text = (custody / "securities-a.accounts.json").read_text()
        assert "correct horse" not in store_text

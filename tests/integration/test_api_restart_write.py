"""A write in flight when the API process dies: a real API server with the market
service, killed (SIGKILL, by its ``after-write`` fault point) once the broker
acknowledged the order and before any answer; restarted, the retry with the same
Idempotency-Key finds the order in the market's log and answers it — one order, one
event, the same answer every time (decision 0082). Then, with the API restarted
without the market service, a party still reads the negotiation's messages
(decrypted from the projection's ciphertext), and /metrics shows the lags.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.api_fixtures import (
    ISSUER_VALUE,
    KUKMIN,
    ApiRun,
    api_stack,
    seed_assets,
)
from tests.integration.cluster_fixtures import running_chain
from tests.integration.test_api_market import User, assert_problem

pytestmark = pytest.mark.cluster
TIMEOUT_S = 60.0
DEATH_TIMEOUT_S = 30.0


async def test_write_survives_api_killed_between_produce_and_answer(
        kafka_bootstrap: str, unique_id: str, pg_dsn: str, tmp_path: Path) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=1,
                             issuer_value=ISSUER_VALUE) as run, \
            api_stack(run, pg_dsn, tmp_path, market=True) as api, \
            httpx.AsyncClient(base_url=api.url, timeout=TIMEOUT_S) as http:
        await seed_assets(api)
        a = User(http, "user-a", api.credentials["custodial_users"]["user-a@securities-a"])
        await a.login()
        order = {"security_code": KUKMIN, "side": "sell", "price": "11578.50", "quantity": 40}

        api.stop()
        api.env["CAPLEDGER_API_FAULT"] = "after-write"
        api.start()
        await api.wait_ready()
        with pytest.raises(httpx.TransportError):  # the server died: no answer at all
            await a.post("/api/market/orders", order, key="post-dies-0001")
        assert api.process is not None
        returncode = await asyncio.to_thread(api.process.wait, DEATH_TIMEOUT_S)
        assert returncode == -signal.SIGKILL, api.log_tail()

        api.start()  # still with the fault point: the retry sends nothing new
        await api.wait_ready()
        first = await a.post("/api/market/orders", order, key="post-dies-0001")
        assert first.status_code == 200, first.text
        assert first.headers.get("idempotent-replayed") == "true"
        answer = first.json()
        assert (answer["status"], answer["quantity"], answer["version"]) == ("waiting", 40, 1)
        again = await a.post("/api/market/orders", order, key="post-dies-0001")
        assert again.status_code == 200 and again.json() == answer
        assert_problem(await a.post("/api/market/orders", {**order, "quantity": 5},
                                    key="post-dies-0001"), 422, "idempotency-key-reused")
        board = (await a.get("/api/market/board")).json()["items"]
        assert [item["order_id"] for item in board] == [answer["order_id"]]

        b = User(http, "user-b", api.credentials["custodial_users"]["user-b@securities-b"])
        await b.login()
        await _money_moves_once_across_kills(api, http, a, b)  # leaves it without a fault

        # a negotiation's messages are read from the projection's ciphertext, decrypted
        # with the party's custodial key: no market service in the API process needed
        joined = await b.post(f"/api/market/orders/{answer['order_id']}/join", key="join-b-0001")
        assert joined.status_code == 200, joined.text
        negotiation_id = joined.json()["negotiation_id"]
        sent = await a.post(f"/api/market/negotiations/{negotiation_id}/messages",
                            {"text": "반갑습니다.", "offer_price": "11578.49",
                             "offer_quantity": 40}, key="message-a-0001")
        assert sent.status_code == 200 and sent.json()["sequence"] == 0, sent.text
        await _settles_once_across_a_kill(api, a, b, negotiation_id)
        await _unsent_dvp_is_sent_at_restart(api, a, b)

        # a restart after the answer still answers the same (from the stored answer),
        # here without the market service
        api.market = False
        await api.restart()
        read = await b.get(f"/api/market/negotiations/{negotiation_id}/messages")
        assert read.status_code == 200, read.text
        assert [(m["sender"], m["text"], m["offer_price"], m["offer_quantity"], m["mine"])
                for m in read.json()["items"]] == [
            ("securities-a/user-a", "반갑습니다.", "11578.49", 40, False)]
        mine = (await a.get(f"/api/market/negotiations/{negotiation_id}/messages")).json()
        assert [m["mine"] for m in mine["items"]] == [True]
        regulator = User(http, "regulator", api.secret("user", "regulator"))
        await regulator.login()
        assert_problem(await regulator.get(f"/api/market/negotiations/{negotiation_id}"
                                           "/messages"), 403, "custodial-user-only")
        replayed = await a.post("/api/market/orders", order, key="post-dies-0001")
        assert replayed.status_code == 200 and replayed.json() == answer
        with psycopg.connect(pg_dsn) as conn:  # the orders posted, once each
            assert conn.execute("SELECT count(*) FROM market_order").fetchone() == (2,)
            assert conn.execute("SELECT count(*) FROM market_event WHERE kind = "
                                "'order-posted'").fetchone() == (2,)
        await _wait_node_lag_metric(http)


async def _killed(api: ApiRun, write: Awaitable[httpx.Response], fault_next: str | None
                  ) -> None:
    """The write kills the server at its fault point (no answer at all); it is started
    again with ``fault_next`` (None: no fault point)."""
    with pytest.raises(httpx.TransportError):
        await write
    assert api.process is not None
    returncode = await asyncio.to_thread(api.process.wait, DEATH_TIMEOUT_S)
    assert returncode == -signal.SIGKILL, api.log_tail()
    api.env.pop("CAPLEDGER_API_FAULT", None)
    if fault_next is not None:
        api.env["CAPLEDGER_API_FAULT"] = fault_next
    api.start()
    await api.wait_ready()


async def _retried(user: User, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    """The retry after the restart answers from the recorded transaction, and so does
    every retry after it; the same key with another body is refused."""
    first = await user.post(path, body, key=key)
    assert first.status_code == 200, first.text
    assert first.headers.get("idempotent-replayed") == "true"
    again = await user.post(path, body, key=key)
    assert again.status_code == 200 and again.json() == first.json()
    changed = {name: value + 1 if isinstance(value, int) else value
               for name, value in body.items()}
    assert_problem(await user.post(path, changed, key=key), 422, "idempotency-key-reused")
    answer: dict[str, Any] = first.json()
    return answer


async def _money_moves_once_across_kills(api: ApiRun, http: httpx.AsyncClient, a: User,
                                         b: User) -> None:
    """Issuance and transfers (decision 0083), the server started with ``after-write``:
    an issuance killed after the broker's ack; a transfer killed after recording its
    transaction and before sending it; a transfer killed after the broker's ack. Each
    retry answers the one transaction; the balances moved once."""
    firm = User(http, "securities-a", "")
    token = await http.post("/oauth2/token", data={"grant_type": "client_credentials"},
                            auth=("securities-a", api.secret("client", "securities-a")))
    firm.headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    kukmin = next(item["asset_id"] for item in (await a.get("/api/market/assets")).json()[
        "items"] if item["security_code"] == KUKMIN)
    issue_path, issue = f"/api/market/assets/{KUKMIN}/issue", {"account_id": "user-a",
                                                               "quantity": 7}
    await _killed(api, firm.post(issue_path, issue, key="issue-dies-0001"), "before-write")
    issued = await _retried(firm, issue_path, issue, "issue-dies-0001")
    assert (issued["asset_id"], issued["quantity"]) == (kukmin, 7)

    address_b = (await b.get("/api/accounts")).json()["items"][0]["address"]
    path = "/api/accounts/user-a/transfers"
    unsent = {"asset_id": kukmin, "amount": 3, "to_address": address_b}
    await _killed(api, a.post(path, unsent, key="pay-unsent-0001"), "after-write")
    assert await _txids_paying(api, address_b, kukmin) == []  # it never reached the log
    paid_unsent = await _retried(a, path, unsent, "pay-unsent-0001")
    acked = {"asset_id": kukmin, "amount": 2, "to_address": address_b}
    await _killed(api, a.post(path, acked, key="pay-acked-0001"), None)
    paid_acked = await _retried(a, path, acked, "pay-acked-0001")
    assert sorted(await _txids_paying(api, address_b, kukmin)) == sorted(
        [paid_unsent["txid"], paid_acked["txid"]])
    assert await _kukmin_of(a, kukmin) == 100 + 7 - 3 - 2
    assert await _kukmin_of(b, kukmin) == 3 + 2


async def _settles_once_across_a_kill(api: ApiRun, a: User, b: User,
                                      negotiation_id: str) -> None:
    """The second signature settles (DvP); the server dies once the broker acknowledged
    the DvP and before the trade is confirmed. The retry confirms that DvP: one trade,
    the units moved once (decision 0083)."""
    settled, trades = await _second_signature_killed(
        api, a, b, negotiation_id, {"price": "11578.49", "quantity": 40}, "after-write",
        "0001", trades_after=1)
    assert settled["agreement"]["complete"], settled
    assert [trade["txid"] for trade in trades] == [settled["trade"]["txid"]]
    trades = (await b.get("/api/market/trades")).json()["items"]
    assert [trade["txid"] for trade in trades] == [settled["trade"]["txid"]]
    with psycopg.connect(api.env["CAPLEDGER_PG_DSN"]) as conn:
        logged = conn.execute("SELECT payload FROM market_event WHERE kind = "
                              "'settlement-sent'").fetchall()
    assert [row[0]["txid"] for row in logged] == [settled["trade"]["txid"]]
    assert "raw_tx" not in logged[0][0]  # on the chain already: not in the projection
    kukmin = settled["trade"]["terms"]["asset_id"]
    assert await _kukmin_of(a, kukmin) == 100 + 7 - 3 - 2 - 40
    assert await _kukmin_of(b, kukmin) == 3 + 2 + 40


async def _unsent_dvp_is_sent_at_restart(api: ApiRun, a: User, b: User) -> None:
    """The server dies after the DvP was logged and recorded, before it was sent
    (decision 0132): restarted, it sends that very DvP itself and confirms the trade;
    the retried request answers it."""
    order = {"security_code": KUKMIN, "side": "sell", "price": "11000.00", "quantity": 5}
    posted = await a.post("/api/market/orders", order, key="post-second-0001")
    assert posted.status_code == 200, posted.text
    joined = await b.post(f"/api/market/orders/{posted.json()['order_id']}/join",
                          key="join-second-0001")
    assert joined.status_code == 200, joined.text
    negotiation_id = joined.json()["negotiation_id"]
    offered = await a.post(f"/api/market/negotiations/{negotiation_id}/messages",
                           {"text": "5좌 가능합니다.", "offer_price": "11000.00",
                            "offer_quantity": 5}, key="message-second-0001")
    assert offered.status_code == 200, offered.text
    settled, trades = await _second_signature_killed(
        api, a, b, negotiation_id, {"price": "11000.00", "quantity": 5}, "before-write",
        "second-0001", trades_after=2)
    assert settled["trade"]["txid"] in [trade["txid"] for trade in trades]
    assert settled["trade"]["terms"]["quantity"] == 5
    kukmin = settled["trade"]["terms"]["asset_id"]
    assert await _kukmin_of(a, kukmin) == 100 + 7 - 3 - 2 - 40 - 5
    assert await _kukmin_of(b, kukmin) == 3 + 2 + 40 + 5


async def _second_signature_killed(
        api: ApiRun, a: User, b: User, negotiation_id: str, terms: dict[str, Any],
        fault: str, key_suffix: str, *, trades_after: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``a`` signs the terms; ``b``'s signature (which settles) kills the server at
    ``fault``. Restarted, the server finishes the settlement with no request (decision
    0132): the trades once there are ``trades_after``. Then ``b``'s retry answers the
    trade; returns that answer and the trades."""
    path = f"/api/market/negotiations/{negotiation_id}/agree"
    signed = await a.post(path, terms, key=f"agree-a-{key_suffix}")
    assert signed.status_code == 200 and signed.json()["trade"] is None, signed.text
    api.env["CAPLEDGER_API_FAULT"] = fault
    await api.restart()
    await _killed(api, b.post(path, terms, key=f"agree-b-{key_suffix}"), None)
    trades = await _until_trades(b, trades_after)
    settled = await _retried(b, path, terms, f"agree-b-{key_suffix}")
    assert settled["trade"] is not None, settled
    return settled, trades


async def _until_trades(user: User, count: int) -> list[dict[str, Any]]:
    """The user's confirmed trades, once there are ``count`` of them."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        listed = await user.get("/api/market/trades")
        assert listed.status_code == 200, listed.text
        items: list[dict[str, Any]] = listed.json()["items"]
        if len(items) >= count:
            return items
        assert asyncio.get_running_loop().time() < deadline, items
        await asyncio.sleep(0.2)


async def _txids_paying(api: ApiRun, address: str, asset: str) -> list[str]:
    """The committed transactions with an output of ``asset`` to ``address``."""
    def query() -> list[str]:
        with psycopg.connect(api.env["CAPLEDGER_PG_DSN"]) as conn:
            return [row[0] for row in conn.execute(
                "SELECT DISTINCT txid FROM tx_output WHERE address = %s AND asset_id = %s",
                (address, asset)).fetchall()]
    return await asyncio.to_thread(query)


async def _kukmin_of(user: User, asset: str) -> int:
    listed = (await user.get("/api/accounts")).json()["items"]
    return sum(item["quantity"] for item in listed[0]["balances"] if item["asset_id"] == asset)


async def _wait_node_lag_metric(http: httpx.AsyncClient) -> None:
    """/metrics shows each node's Kafka consumer lag (from its heartbeats) and the
    projections' lags, once the heartbeats were read."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        metrics = (await http.get("/metrics")).text
        if 'capledger_api_node_consumer_lag_records{institution="koscom"}' in metrics:
            break
        assert asyncio.get_running_loop().time() < deadline, metrics[-2000:]
        await asyncio.sleep(0.2)
    assert "capledger_api_projection_lag_blocks" in metrics
    assert "capledger_api_market_projection_lag_records 0.0" in metrics

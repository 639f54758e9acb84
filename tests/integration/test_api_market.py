"""The market resources over HTTP against five real nodes, the projector and a real API
server process running the market service: idempotent writes, the refusals of the
issue (unknown asset, someone else's order, a read-only scope, an over-long body)
each a problem with its code, and an API restart that loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from streams.api.middleware import BODY_BYTES_MAX
from tests.integration.api_fixtures import ISSUER_VALUE, KUKMIN, ApiRun, api_stack, seed_assets
from tests.integration.cluster_fixtures import running_chain

pytestmark = pytest.mark.cluster
TIMEOUT_S = 60.0
PROBLEM = "application/problem+json"


class User:
    def __init__(self, http: httpx.AsyncClient, name: str, password: str) -> None:
        self.http, self.name, self.password = http, name, password
        self.headers: dict[str, str] = {}

    async def login(self) -> None:
        answer = await self.http.post("/api/login", json={"username": self.name,
                                                          "password": self.password})
        assert answer.status_code == 200, answer.text
        self.headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}

    async def post(self, path: str, body: dict[str, Any] | None = None,
                   key: str | None = "k-default-000") -> httpx.Response:
        headers = dict(self.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.http.post(path, json=body or {}, headers=headers)

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path, headers=self.headers)


def assert_problem(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["code"] == code, answer.json()


async def test_market_api_refusals_idempotency_restart(kafka_bootstrap: str, unique_id: str,
                                                       pg_dsn: str, tmp_path: Path) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=1,
                             issuer_value=ISSUER_VALUE) as run, \
            api_stack(run, pg_dsn, tmp_path, market=True) as api, \
            httpx.AsyncClient(base_url=api.url, timeout=TIMEOUT_S) as http:
        await seed_assets(api)
        order_id = await _exercise(api, http)
        with psycopg.connect(pg_dsn) as conn:  # what the API answered is the projection's
            assert conn.execute("SELECT status, price::text FROM market_order "
                                "WHERE order_id = %s", (order_id,)).fetchall() == [
                ("cancelled", "11578.40")]


async def _exercise(api: ApiRun, http: httpx.AsyncClient) -> str:
    custodial = api.credentials["custodial_users"]
    a = User(http, "user-a", custodial["user-a@securities-a"])
    b = User(http, "user-b", custodial["user-b@securities-b"])
    regulator = User(http, "regulator", api.secret("user", "regulator"))
    for user in (a, b, regulator):
        await user.login()
    order = {"security_code": KUKMIN, "side": "sell", "price": "11578.50", "quantity": 100}

    first = await a.post("/api/market/orders", order, key="post-kukmin-1")
    again = await a.post("/api/market/orders", order, key="post-kukmin-1")
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    order_id = first.json()["order_id"]
    assert again.json()["order_id"] == order_id
    board = (await b.get("/api/market/board")).json()["items"]
    assert [item["order_id"] for item in board] == [order_id]  # one order, not two

    assert_problem(await a.post("/api/market/orders", {**order, "quantity": 5},
                                key="post-kukmin-1"), 422, "idempotency-key-reused")
    assert_problem(await a.post("/api/market/orders", order, key=None), 400,
                   "idempotency-key-required")
    assert_problem(await a.post("/api/market/orders", {**order, "security_code": "KR0000"},
                                key="post-unknown-1"), 404, "market-unknown-security")
    assert_problem(await b.post(f"/api/market/orders/{order_id}/cancel", key="cancel-b-1"),
                   403, "order-not-owner")
    assert_problem(await a.post(f"/api/market/orders/{order_id}/join", key="join-own-1"),
                   422, "order-own")
    assert_problem(await regulator.post("/api/market/orders", order, key="post-reg-1"),
                   403, "read-only-scope")
    assert_problem(await b.get("/api/market/surveillance"), 403, "regulator-only")
    assert_problem(await http.post("/api/market/orders", content=b"x" * (BODY_BYTES_MAX + 1),
                                   headers=a.headers), 413, "body-too-large")
    answer = await a.post(f"/api/market/orders/{order_id}/amend", {"price": "11578.40"},
                          key="amend-a-1")
    assert answer.status_code == 200 and answer.json()["price"] == "11578.40", answer.text
    balance = (await a.get("/api/market/balance")).json()
    assert balance["securities"] == {KUKMIN: 100}
    surveillance = (await regulator.get("/api/market/surveillance")).json()
    assert surveillance["refused_by_code"].get("order-not-owner") == 1

    # restart mid-flow: the board reads from the projection as before, the custody
    # session resumes from the sealed session in A's token (no sign-in again), and a
    # retried pre-restart write answers its first answer from the persisted store
    await api.restart()
    board = (await b.get("/api/market/board")).json()["items"]
    assert [(item["order_id"], item["price"]) for item in board] == [(order_id, "11578.40")]
    replayed = await a.post("/api/market/orders", order, key="post-kukmin-1")
    assert replayed.status_code == 200 and replayed.json()["order_id"] == order_id
    assert replayed.headers.get("idempotent-replayed") == "true"
    assert_problem(await a.post("/api/market/orders", {**order, "quantity": 5},
                                key="post-kukmin-1"), 422, "idempotency-key-reused")
    answer = await a.post(f"/api/market/orders/{order_id}/cancel", key="cancel-a-1")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    board = (await b.get("/api/market/board")).json()["items"]
    assert board == []  # read-your-writes: the cancel is projected when it is answered
    metrics = (await http.get("/metrics")).text
    assert 'capledger_api_requests_total{method="POST",route="/api/market/orders/{order_id}' \
           '/cancel",status="200"}' in metrics
    assert "capledger_api_projected_height" in metrics
    assert "capledger_api_market_projection_lag_records 0.0" in metrics
    return str(order_id)

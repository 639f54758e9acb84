"""``make demo`` / ``capledger api demo``: the seed's OTC market scenario end to end.

Owns: :func:`run_market_demo` — a fresh chain (five node processes), its own projection
database, the projector following, the API server with the market service in this
process; then, through the API as institution systems and users would: the seed's
bonds and KRW deposits registered and issued, the three board rows posted, users A and
B negotiating to 11578.49 x 100, both agreeing, the DvP transaction committing. Prints
each step, the committed block with its voters, both balances before and after and the
surveillance summary; leaves the UI running until Ctrl-C (or exits, with ``exit_after``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from psycopg import sql

from streams.api.auth import load_access
from streams.api.context import ApiDeps
from streams.api.server import build_market, init_state, load_custody
from streams.common.config import Settings
from streams.common.genesis_files import load_institution_key
from streams.kafka.topics import ensure_topics
from streams.projections.market import follow_market
from streams.projections.projector import Projector
from streams.tools.cluster import LocalCluster, create_chain
from streams.tools.devstack.postgres import migrate, with_database

ISSUER_VALUE = 1_000_000_000
READY_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 90.0
POLL_S = 0.2
EXTRA_USERS = (("jeong", "securities-a"), ("park", "securities-b"))  # 정도전, 박서방
BONDS = (  # the seed's board: code, name, issuer, maturity, coupon bp, issue date
    ("KR101502D327", "국민주택 2013-02", "securities-a", "2018-02-28", 275, "2013-02-28"),
    ("KR1350146D48", "통안0146-1804-02", "securities-b", "2018-04-02", 146, "2016-04-02"),
    ("KR103502G797", "국고02750-1709(12-4)", "securities-a", "2017-09-10", 275, "2012-09-10"),
)
DEPOSITS = (("KRW-DEP-A", "원화예수금 (A증권)", "securities-a"),
            ("KRW-DEP-B", "원화예수금 (B증권)", "securities-b"))
ISSUES = (("securities-a", "KR101502D327", "user-a", 100),
          ("securities-a", "KRW-DEP-A", "user-a", 2_000_000),
          ("securities-a", "KR103502G797", "jeong", 20),
          ("securities-b", "KRW-DEP-B", "park", 2_000_000),
          ("securities-b", "KRW-DEP-B", "user-b", 5_000_000))
ROWS = (("user-a", "KR101502D327", "sell", "11578.50", 100),
        ("park", "KR1350146D48", "buy", "10016.69", 150),
        ("jeong", "KR103502G797", "sell", "10179.33", 20))


@dataclass
class Demo:
    http: httpx.AsyncClient
    say: Callable[[str], None]
    credentials: dict[str, Any]
    tokens: dict[str, dict[str, str]]
    keys: int = 0

    async def sign_in(self) -> None:
        for firm in ("securities-a", "securities-b"):
            answer = await self.http.post(
                "/oauth2/token", data={"grant_type": "client_credentials"},
                auth=(firm, self.credentials["clients"][firm]))
            self.tokens[firm] = self._bearer(answer)
        for name, password in self.credentials["custodial_users"].items():
            answer = await self.http.post("/api/login", json={"username": name,
                                                              "password": password})
            self.tokens[name.split("@")[0]] = self._bearer(answer)
        answer = await self.http.post("/api/login", json={
            "username": "regulator", "password": self.credentials["users"]["regulator"]})
        self.tokens["regulator"] = self._bearer(answer)

    def _bearer(self, answer: httpx.Response) -> dict[str, str]:
        if answer.status_code != 200:
            raise RuntimeError(f"sign-in refused: {answer.text}")
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}

    async def post(self, who: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self.keys += 1
        answer = await self.http.post(path, json=body or {}, headers={
            **self.tokens[who], "Idempotency-Key": f"demo-{self.keys:06d}-{uuid.uuid4().hex}"})
        if answer.status_code != 200:
            raise RuntimeError(f"{path} refused: {answer.text}")
        return answer.json()

    async def get(self, who: str, path: str) -> Any:
        answer = await self.http.get(path, headers=self.tokens[who])
        if answer.status_code != 200:
            raise RuntimeError(f"{path} refused: {answer.text}")
        return answer.json()

    async def get_projected(self, who: str, path: str) -> Any:
        """GET once the projector has caught up with what the market just committed."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            answer = await self.http.get(path, headers=self.tokens[who])
            if answer.status_code == 200:
                return answer.json()
            if answer.status_code != 404 or time.monotonic() > deadline:
                raise RuntimeError(f"{path} refused: {answer.text}")
            await asyncio.sleep(POLL_S)

    async def balance(self, who: str, label: str) -> None:
        found = await self.get(who, "/api/market/balance")
        units = ", ".join(f"{code} {n}주" for code, n in found["securities"].items()) or "-"
        self.say(f"  {label} 나의 잔고: {units}; 원화 {found['cash_krw']:,}원")


async def _scenario(demo: Demo) -> None:
    say = demo.say
    say("1. 자산 온라인 등록 (securities-a, securities-b register the bonds and KRW deposits)")
    for code, name, issuer, maturity, coupon, issued in BONDS:
        await demo.post(issuer, "/api/market/assets", {
            "security_code": code, "name": name, "kind": "bond", "maturity": maturity,
            "coupon_bp": coupon, "issue_date": issued, "face_value": 10_000})
        say(f"   registered {code} {name} (issuer {issuer})")
    for code, name, issuer in DEPOSITS:
        await demo.post(issuer, "/api/market/assets", {"security_code": code, "name": name,
                                                       "kind": "deposit", "face_value": 1})
        say(f"   registered {code} {name}")
    for issuer, code, user, quantity in ISSUES:
        result = await demo.post(issuer, f"/api/market/assets/{code}/issue",
                                 {"account_id": user, "quantity": quantity})
        say(f"   issued {quantity:,} {code} to {user} (height {result['height']})")
    say("2. Balances before")
    await demo.balance("user-a", "user A")
    await demo.balance("user-b", "user B")
    say("3. 게시판: the seed's three rows")
    orders = {}
    for user, code, side, price, quantity in ROWS:
        order = await demo.post(user, "/api/market/orders", {
            "security_code": code, "side": side, "price": price, "quantity": quantity})
        orders[user] = order
        say(f"   {order['name']}  {order['maturity']}  {side}  {price}  {quantity}  {user}")
    say("4. 거래참여: user B joins user A's 국민주택 2013-02 order")
    negotiation = await demo.post("user-b",
                                  f"/api/market/orders/{orders['user-a']['order_id']}/join")
    path = f"/api/market/negotiations/{negotiation['negotiation_id']}"
    say("5. 메신저 (end-to-end encrypted)")
    for who, text, offer in (("user-a", "반갑습니다.", None),
                             ("user-b", "네~ 이율 0.001만 내려주시면 바로 삽니다.", "11578.49"),
                             ("user-a", "좋습니다.", None)):
        body: dict[str, Any] = {"text": text}
        if offer:
            body |= {"offer_price": offer, "offer_quantity": 100}
        await demo.post(who, f"{path}/messages", body)
        say(f"   {who}: {text}" + (f" [{offer} x 100]" if offer else ""))
    say("6. 협상확정: both sign 11578.49 x 100; the DvP transaction commits")
    await demo.post("user-a", f"{path}/agree", {"price": "11578.49", "quantity": 100})
    answer = await demo.post("user-b", f"{path}/agree", {"price": "11578.49", "quantity": 100})
    trade = answer["trade"]
    block = await demo.get_projected("regulator", f"/api/chain/blocks/{trade['height']}")
    say(f"7. 거래확인: txid {trade['txid']}")
    say(f"   block {block['height']} {block['hash']} proposer {block['proposer']} "
        f"round {block['round']} voters {', '.join(block['voters'])}")
    say("8. Balances after")
    await demo.balance("user-a", "user A")
    await demo.balance("user-b", "user B")
    view = await demo.get("regulator", "/api/market/surveillance")
    say(f"9. 시장감시: {len(view['orders'])} orders, {len(view['trades'])} trades, "
        f"{view['events']} market events, refused {view['refused_by_code'] or 'none'}")


async def _database(settings: Settings, name: str) -> str:
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_database(settings.pg_dsn, name)
    await asyncio.to_thread(migrate, dsn)
    return dsn


async def _wait_ready(url: str, server_task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            if server_task.done():
                raise RuntimeError("the API server stopped while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the API server was not ready in time")
            await asyncio.sleep(POLL_S)


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: the demo's handler stops the
    server, the projector and the node processes together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_market_demo(settings: Settings, *, state_dir: Path, host: str, port: int,
                          exit_after: bool, say: Callable[[str], None]) -> None:
    from streams.api.app import create_app

    run_id = uuid.uuid4().hex[:8]
    base = state_dir / "market-demo" / run_id
    prefix = f"seed{run_id}."
    say(f"chain files, logs and API state under {base}")
    genesis = create_chain(base / "chain", chain_id=f"seed-{run_id}", issuer_value=ISSUER_VALUE,
                           proposer_timeout_ms=1_000)
    await ensure_topics(settings.kafka_bootstrap, prefix=prefix)
    dsn = await _database(settings, f"capledger_demo_{run_id}")
    cluster = LocalCluster(base / "chain", state_dir=base / "nodes", topic_prefix=prefix)
    api_dir = base / "api"
    credentials = init_state(api_dir, token_ttl_s=3_600)
    accounts = load_custody(api_dir)
    for user_id, firm in EXTRA_USERS:
        secret = uuid.uuid4().hex
        accounts.store(firm).open_account(user_id, secret)
        made = json.loads(credentials.read_text(encoding="utf-8"))
        made["custodial_users"][f"{user_id}@{firm}"] = secret
        credentials.write_text(json.dumps(made, indent=2) + "\n", encoding="utf-8")
    deps = ApiDeps(dsn=dsn, bootstrap=settings.kafka_bootstrap, genesis=genesis,
                   access=load_access(api_dir), topic_prefix=prefix, accounts=accounts,
                   submit_key=load_institution_key(base / "chain", "koscom"),
                   state_dir=api_dir)
    deps = replace(deps, market_factory=build_market(base / "chain", deps))
    server = SignalFreeServer(uvicorn.Config(create_app(deps), host=host, port=port,
                                              log_level="warning", access_log=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    projector = Projector(genesis, bootstrap=settings.kafka_bootstrap, dsn=dsn,
                          topic_prefix=prefix)
    tasks: list[asyncio.Task[Any]] = []
    try:
        say("starting five nodes (otc-operator, surveillance, koscom, securities-a, -b)")
        cluster.start()
        await cluster.wait_ready(settings.kafka_bootstrap)
        tasks.append(asyncio.create_task(projector.run(follow=True, stop=stop)))
        tasks.append(asyncio.create_task(follow_market(
            dsn, settings.kafka_bootstrap, genesis, stop=stop, topic_prefix=prefix)))
        tasks.append(asyncio.create_task(server.serve()))
        url = f"http://{host}:{port}"
        await _wait_ready(url, tasks[-1])
        say(f"API server up at {url} (projector following into {dsn.rsplit('/', 1)[-1]})")
        async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
            demo = Demo(http, say, json.loads(credentials.read_text(encoding="utf-8")), {})
            await demo.sign_in()
            await _scenario(demo)
        say(f"web UI: {url}/ui/  (sign-in secrets: {credentials})")
        if not exit_after:
            say("Ctrl-C to stop")
            await stop.wait()
    finally:
        stop.set()
        server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        cluster.stop()
        if exit_after:  # a test run: the database goes (the chain's files and topics stay)
            with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"capledger_demo_{run_id}")))

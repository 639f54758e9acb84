"""Helpers of the API tests: a real ``capledger api serve`` process over a real chain.

Owns: ``api_stack`` (an async context manager: the access file in the test's
``tmp_path``, a projector following the chain's logs into the test's database, a
``capledger market project --follow`` process projecting the market topics, the
API server as its own OS process on a free port, waited on until ready; all stopped
on the way out, the server's log printed when the test fails) and ``ApiRun`` (its
URL, the generated credentials, ``restart``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from streams.api.server import init_state
from streams.common import config
from streams.projections.projector import Projector
from tests.integration.cluster_fixtures import ChainRun

READY_TIMEOUT_S = 120.0  # a loaded machine: the market replays its topics at start
ISSUER_VALUE = 1_000_000_000  # native value of each member issuer (the market's issuance)
KUKMIN = "KR101502D327"  # 국민주택 2013-02
CASH_A, CASH_B = 2_000_000, 5_000_000
STOP_TIMEOUT_S = 15.0
POLL_S = 0.1
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ApiRun:
    chain: ChainRun
    access_dir: Path
    port: int
    log_path: Path
    env: dict[str, str]
    market: bool = False
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def secret(self, kind: str, name: str) -> str:
        return self.credentials[kind + "s"][name]

    def start(self) -> None:
        command = [sys.executable, "-m", "streams", "api", "serve",
                   "--genesis", str(self.chain.chain_dir), "--access-dir", str(self.access_dir),
                   "--topic-prefix", self.chain.prefix, "--port", str(self.port)]
        if self.market:
            command.append("--market")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                assert self.process is not None and self.process.poll() is None, \
                    f"API server exited: {self.log_tail()}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"API not ready in {READY_TIMEOUT_S} s: {self.log_tail()}")
                await asyncio.sleep(POLL_S)

    async def restart(self) -> None:
        self.stop()
        self.start()
        await self.wait_ready()

    def log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


@contextlib.asynccontextmanager
async def api_stack(run: ChainRun, pg_dsn: str, tmp_path: Path, *,
                    market: bool = False) -> AsyncIterator[ApiRun]:
    access_dir = tmp_path / "api"
    credentials = init_state(access_dir, token_ttl_s=300)
    settings = config.load()  # the broker's credentials stay where the set-up put them
    env = {**os.environ, "CAPLEDGER_PG_DSN": pg_dsn, "CAPLEDGER_KAFKA_BOOTSTRAP": run.bootstrap,
           "CAPLEDGER_STATE_DIR": str(tmp_path / "api-state"),
           "CAPLEDGER_KAFKA_PRINCIPAL": "koscom",
           "CAPLEDGER_KAFKA_PASSWORD_FILE": str(settings.kafka_password_file("koscom")),
           "CAPLEDGER_KAFKA_CA_FILE": str(settings.kafka_ca_file)}
    api = ApiRun(run, access_dir, free_port(), tmp_path / "api.log", env, market,
                 json.loads(credentials.read_text()))
    stop = asyncio.Event()
    projector = Projector(run.genesis, bootstrap=run.bootstrap, dsn=pg_dsn,
                          topic_prefix=run.prefix)
    following = asyncio.create_task(projector.run(follow=True, stop=stop))
    # the market projector beside the API, as deployed: its own OS process
    market_log = (tmp_path / "market-projector.log").open("ab")
    market_projector = subprocess.Popen(
        [sys.executable, "-m", "streams", "market", "--genesis", str(run.chain_dir),
         "--topic-prefix", run.prefix, "project", "--follow"],
        env=env, stdout=market_log, stderr=subprocess.STDOUT)
    try:
        api.start()
        await api.wait_ready()
        yield api
    except BaseException:
        print(f"----- API server log\n{api.log_tail()}")
        projector_log = (tmp_path / "market-projector.log").read_text(errors="replace")
        print(f"----- market projector log\n{projector_log[-LOG_TAIL_CHARS:]}")
        raise
    finally:
        api.stop()
        stop.set()
        market_projector.terminate()
        try:
            market_projector.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            market_projector.kill()
            market_projector.wait(STOP_TIMEOUT_S)
        market_log.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(following, STOP_TIMEOUT_S)
        if not following.done():
            following.cancel()


async def seed_assets(api: ApiRun) -> None:
    """The issuing firms' systems register and issue over the API (client credentials)."""
    async with httpx.AsyncClient(base_url=api.url, timeout=READY_TIMEOUT_S) as http:
        async def token(firm: str) -> dict[str, str]:
            answer = await http.post("/oauth2/token", data={"grant_type": "client_credentials"},
                                     auth=(firm, api.secret("client", firm)))
            assert answer.status_code == 200, answer.text
            return {"Authorization": f"Bearer {answer.json()['access_token']}"}

        async def post(headers: dict[str, str], path: str, body: dict[str, Any],
                       key: str) -> None:
            answer = await http.post(path, json=body, headers={**headers, "Idempotency-Key": key})
            assert answer.status_code == 200, answer.text

        a, b = await token("securities-a"), await token("securities-b")
        await post(a, "/api/market/assets", {
            "security_code": KUKMIN, "name": "국민주택 2013-02", "kind": "bond",
            "maturity": "2018-02-28", "coupon_bp": 275, "issue_date": "2013-02-28",
            "face_value": 10_000}, "register-kukmin")
        await post(a, "/api/market/assets", {"security_code": "KRW-DEP-A",
                                             "name": "원화예수금 (A증권)", "kind": "deposit",
                                             "face_value": 1}, "register-krw-a")
        await post(b, "/api/market/assets", {"security_code": "KRW-DEP-B",
                                             "name": "원화예수금 (B증권)", "kind": "deposit",
                                             "face_value": 1}, "register-krw-b")
        await post(a, f"/api/market/assets/{KUKMIN}/issue",
                   {"account_id": "user-a", "quantity": 100}, "issue-kukmin")
        await post(a, "/api/market/assets/KRW-DEP-A/issue",
                   {"account_id": "user-a", "quantity": CASH_A}, "issue-krw-a")
        await post(b, "/api/market/assets/KRW-DEP-B/issue",
                   {"account_id": "user-b", "quantity": CASH_B}, "issue-krw-b")

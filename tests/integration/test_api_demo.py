"""``capledger api demo --exit`` (what ``make demo`` runs): the seed's scenario through
the API server on five real nodes, printed step by step."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.integration.api_fixtures import free_port

pytestmark = pytest.mark.cluster
DEMO_TIMEOUT_S = 300.0


async def test_market_demo_plays_the_seed_scenario(stack_settings: object, kafka_bootstrap: str,
                                                    tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams", "api", "demo", "--exit", "--port", str(free_port()),
        "--state-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=dict(os.environ))
    out, _ = await asyncio.wait_for(process.communicate(), DEMO_TIMEOUT_S)
    text = out.decode()
    assert process.returncode == 0, text
    for line in ("국민주택 2013-02  2018-02-28  sell  11578.50  100  user-a",
                 "통안0146-1804-02  2018-04-02  buy  10016.69  150  park",
                 "국고02750-1709(12-4)  2017-09-10  sell  10179.33  20  jeong",
                 "user-b: 네~ 이율 0.001만 내려주시면 바로 삽니다. [11578.49 x 100]",
                 "user A 나의 잔고: KR101502D327 100주; 원화 2,000,000원",
                 "user A 나의 잔고: -; 원화 3,157,849원",
                 "user B 나의 잔고: KR101502D327 100주; 원화 3,842,151원",
                 "1 trades"):
        assert line in text, text
    assert "voters " in text and "web UI: http://127.0.0.1:" in text

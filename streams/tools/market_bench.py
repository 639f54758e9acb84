"""Market throughput against the real stack: orders accepted per second and DvP
settlements committed per second, through ``MarketService`` and five node processes.

Owns: ``bench_market`` — a fresh chain (five ``capledger node`` processes, topics under
a unique prefix), the seed's 국민주택 bond and a KRW deposit registered, ``pairs``
seller/buyer accounts funded by one bulk issuance each, then:
1. sell orders (each: command signed by the user's custodial key, checked against the
   chain view and the open orders, written to market.board.v1 with acks=all, applied)
   posted one after another (up to 200), then ``orders`` posted by all sellers at once
   (the board decides concurrent commands in batches) -> orders accepted per second;
2. one order per pair joined, an offer sent (encrypted), signed by both, and all
   ``pairs`` agreements settled at once -> DvP transactions committed per second
   (first submission to last commit) and each settlement's latency.
Everything it started is stopped and its topics deleted on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streams.common.genesis_files import load_institution_key
from streams.kafka.topics import delete_topics, ensure_topics
from streams.market.accounts import Account, Accounts, CustodyStore, Principal
from streams.market.fixtures import KRW_B, KUKMIN, SEED_BONDS
from streams.market.service import MarketService
from streams.tools.cluster import LocalCluster, create_chain

PASSWORD = "market-bench-password"
SELLER_UNITS = 100_000
BUYER_CASH_KRW = 10**12
ORDER_PRICE = "10000.00"
TRADE_QUANTITY = 10
ISSUER_VALUE = 10**9
SEQUENTIAL_ORDERS_MAX = 200


@dataclass(frozen=True, slots=True)
class MarketBenchResult:
    orders: int  # posted by all sellers at once
    orders_seconds: float
    sequential_orders: int  # posted one after another by one caller
    sequential_seconds: float
    settlements: int
    settlements_seconds: float
    settlement_latency_p50_ms: float
    settlement_latency_max_ms: float
    blocks: int  # blocks the settlements were committed in

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.orders_seconds

    @property
    def sequential_orders_per_s(self) -> float:
        return self.sequential_orders / self.sequential_seconds

    @property
    def settlements_per_s(self) -> float:
        return self.settlements / self.settlements_seconds


def _open(store: CustodyStore, user_id: str) -> tuple[Account, Principal]:
    return store.open_account(user_id, PASSWORD), store.authenticate(user_id, PASSWORD)


async def bench_market(bootstrap: str, work_dir: Path, *, pairs: int = 20, orders: int = 200,
                       log: Callable[[str], None] = print) -> MarketBenchResult:
    assert pairs >= 1 and orders >= 1
    prefix = f"mbench-{uuid.uuid4().hex[:10]}."
    chain_dir = work_dir / "chain"
    genesis = create_chain(chain_dir, chain_id=f"mbench-{prefix[7:15]}",
                           issuer_value=ISSUER_VALUE, proposer_timeout_ms=1_000)
    await ensure_topics(bootstrap, prefix=prefix)
    cluster = LocalCluster(chain_dir, state_dir=work_dir / "state", topic_prefix=prefix)
    stores = {f: CustodyStore(f, os.urandom(32)) for f in ("securities-a", "securities-b")}
    service = MarketService(
        bootstrap, genesis, accounts=Accounts(stores.values()),
        operator_key=load_institution_key(chain_dir, "otc-operator", genesis=genesis),
        issuer_keys={f: load_institution_key(chain_dir, f, genesis=genesis) for f in stores},
        topic_prefix=prefix)
    try:
        cluster.start()
        await cluster.wait_ready(bootstrap)
        await service.start()
        log("five nodes up; registering and funding")
        return await _run(service, stores, pairs, orders, log)
    finally:
        cluster.stop()
        await service.stop()
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, prefix=prefix)


async def _run(service: MarketService, stores: dict[str, CustodyStore], pairs: int,
               orders: int, log: Callable[[str], None]) -> MarketBenchResult:
    bond = next(d for d in SEED_BONDS if d.security_code == KUKMIN)
    await service.register_asset("securities-a", bond)
    await service.register_asset("securities-b", KRW_B)
    sellers = [_open(stores["securities-a"], f"seller-{i}") for i in range(pairs)]
    buyers = [_open(stores["securities-b"], f"buyer-{i}") for i in range(pairs)]
    await service.issue_many("securities-a", KUKMIN, [(a, SELLER_UNITS) for a, _ in sellers])
    await service.issue_many("securities-b", KRW_B.security_code,
                             [(a, BUYER_CASH_KRW) for a, _ in buyers])

    sequential = min(orders, SEQUENTIAL_ORDERS_MAX)
    log(f"posting {sequential} orders one after another")
    started = time.perf_counter()
    for index in range(sequential):
        await service.post_order(sellers[index % pairs][1], KUKMIN, "sell", ORDER_PRICE, 1)
    sequential_seconds = time.perf_counter() - started

    log(f"posting {orders} orders from {pairs} sellers at once")

    async def post_share(position: int) -> None:
        for _ in range(position, orders, pairs):
            await service.post_order(sellers[position][1], KUKMIN, "sell", ORDER_PRICE, 1)

    started = time.perf_counter()
    await asyncio.gather(*(post_share(position) for position in range(pairs)))
    orders_seconds = time.perf_counter() - started

    log(f"negotiating {pairs} trades")
    agreements = []
    for (_, seller), (_, buyer) in zip(sellers, buyers, strict=True):
        order = await service.post_order(seller, KUKMIN, "sell", ORDER_PRICE, TRADE_QUANTITY)
        negotiation = await service.join_order(buyer, order.order_id)
        await service.send_message(buyer, negotiation.negotiation_id, "deal",
                                   offer_price=ORDER_PRICE, offer_quantity=TRADE_QUANTITY)
        await service.agree(seller, negotiation.negotiation_id, ORDER_PRICE, TRADE_QUANTITY)
        agreements.append(await service.agree(buyer, negotiation.negotiation_id, ORDER_PRICE,
                                              TRADE_QUANTITY))

    log(f"settling {pairs} agreements at once")
    latencies: list[float] = []

    async def settle(agreement_id: str) -> int:
        begun = time.perf_counter()
        trade = await service.settle(agreement_id)
        latencies.append((time.perf_counter() - begun) * 1000)
        return trade.height

    started = time.perf_counter()
    heights = await asyncio.gather(*(settle(a.agreement_id) for a in agreements))
    settlements_seconds = time.perf_counter() - started
    return MarketBenchResult(orders, orders_seconds, sequential, sequential_seconds, pairs,
                             settlements_seconds, statistics.median(latencies),
                             max(latencies), len(set(heights)))

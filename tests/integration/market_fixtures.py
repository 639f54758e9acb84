"""Helpers of the market tests: a five-node chain with funded member issuers, custody
stores for securities-a and securities-b, and a running ``MarketService``.

Owns: ``running_market`` (an async context manager: chain files in ``tmp_path``, topics
under a unique prefix, five real ``capledger node`` processes, the market service;
everything stopped and the topics deleted on the way out, node log tails printed when
the test fails) and ``MarketRun`` (what a test drives).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis
from streams.common.genesis_files import load_institution_key
from streams.kafka.topics import STATUS, delete_topics, ensure_topics
from streams.market.accounts import Account, Accounts, CustodyStore, Principal
from streams.market.fixtures import SEED_ASSETS
from streams.market.service import MarketService
from streams.tools.cluster import LocalCluster, create_chain
from tests.integration.cluster_fixtures import StatusBoard, wait_until

NODES_UP_TIMEOUT_S = 120.0
ISSUER_VALUE = 1_000_000_000
PASSWORD = "correct horse battery"



@dataclass
class MarketRun:
    bootstrap: str
    prefix: str
    chain_dir: Path
    genesis: Genesis
    cluster: LocalCluster
    status: StatusBoard
    stores: dict[str, CustodyStore]
    accounts: Accounts
    market: MarketService

    def key(self, institution: str) -> PrivateKey:
        return load_institution_key(self.chain_dir, institution, genesis=self.genesis)

    def open(self, firm: str, user_id: str) -> tuple[Account, Principal]:
        account = self.stores[firm].open_account(user_id, PASSWORD)
        return account, self.stores[firm].authenticate(user_id, PASSWORD)

    def new_service(self) -> MarketService:
        """Another service over the same logs and custody stores (a restart)."""
        return MarketService(
            self.bootstrap, self.genesis, accounts=self.accounts,
            operator_key=self.key("otc-operator"),
            issuer_keys={f: self.key(f) for f in ("securities-a", "securities-b")},
            topic_prefix=self.prefix)

    async def register_seed_assets(self) -> None:
        for definition in SEED_ASSETS:
            await self.market.register_asset(definition.issuer, definition)

    def dump_logs(self) -> None:
        for institution in self.cluster.nodes:
            print(f"----- {institution} (exit {self.cluster.exit_codes()[institution]})")
            print(self.cluster.log_tail(institution, 40))


@contextlib.asynccontextmanager
async def running_market(tmp_path: Path, unique_id: str,
                         bootstrap: str) -> AsyncIterator[MarketRun]:
    prefix = f"{unique_id}."
    chain_dir = tmp_path / "chain"
    genesis = create_chain(chain_dir, chain_id=f"mkt-{unique_id[-12:]}",
                           issuer_value=ISSUER_VALUE, proposer_timeout_ms=1_000)
    await ensure_topics(bootstrap, prefix=prefix)
    cluster = LocalCluster(chain_dir, state_dir=tmp_path / "state", topic_prefix=prefix)
    stores = {firm: CustodyStore(firm, os.urandom(32), tmp_path / f"custody-{firm}.json")
              for firm in ("securities-a", "securities-b")}
    accounts = Accounts(stores.values())
    status = StatusBoard(bootstrap, prefix + STATUS.name)
    run = MarketRun(bootstrap, prefix, chain_dir, genesis, cluster, status, stores, accounts,
                    None)  # type: ignore[arg-type]
    run.market = run.new_service()
    try:
        cluster.start()
        await status.start()
        await wait_until(lambda: set(INSTITUTION_IDS) <= status.latest.keys(),
                         timeout_s=NODES_UP_TIMEOUT_S, what="a heartbeat from every node")
        await run.market.start()
        yield run
    except BaseException:
        run.dump_logs()
        raise
    finally:
        cluster.stop()
        await run.market.stop()
        await status.stop()
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, prefix=prefix)

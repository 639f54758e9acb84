"""The seed platform's ``/v1`` REST flow against real nodes, projection and API server.

The client below is written from the issue's description of the PoC client's calls
(not generated from our OpenAPI): token (HTTP Basic key:secret, form
``grant_type=client_credentials``) -> swap -> sign (originator) -> sign (participant)
-> send -> show, with a ``network`` header. User A sells 100 units of the seed's bond
to user B for 11578.49 x 100 KRW; the trade commits and both accounts show it. Bad
requests get problems with their codes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger.assets import AssetDefinition
from ledger.keys import PrivateKey
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.state import UtxoEntry, genesis_allocation_tx
from ledger.tx import OutPoint, Transaction
from ledger.wallet import KeyStore, Wallet
from streams.api.addresses import asset_address
from streams.api.custody import load_accounts
from streams.tools.loadgen import LANE_VALUE, sign_p2pkh_payment
from tests.integration.api_fixtures import ApiRun, api_stack
from tests.integration.cluster_fixtures import ChainRun, running_chain

pytestmark = pytest.mark.cluster
COMMIT_TIMEOUT_S = 60.0
PROBLEM = "application/problem+json"
BOND_UNITS = 100
PRICE_KRW_CENTS = 1_157_849  # 11578.49 KRW x 100 units, in whole KRW: 1,157,849
CASH_KRW = 2_000_000
ISSUER_FUNDING = 5_000
POLL_S = 0.1


class SeedClient:
    """What the PoC's client did, per the issue: JSON over HTTP with a bearer token."""

    def __init__(self, base_url: str, network: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=COMMIT_TIMEOUT_S,
                                      headers={"network": network})
        self.token = ""

    async def login(self, key: str, secret: str) -> None:
        basic = base64.b64encode(f"{key}:{secret}".encode()).decode()
        answer = await self.http.post("/v1/oauth2/token",
                                      content="grant_type=client_credentials",
                                      headers={"Authorization": f"Basic {basic}",
                                               "Content-Type":
                                                   "application/x-www-form-urlencoded"})
        assert answer.status_code == 200, answer.text
        self.token = answer.json()["access_token"]

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post(path, json=body,
                                    headers={"Authorization": f"Bearer {self.token}"})

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path, headers={"Authorization": f"Bearer {self.token}"})

    async def close(self) -> None:
        await self.http.aclose()


def issue(run: ChainRun, issuer_id: str, lane: int, definition: AssetDefinition,
          quantity: int, to_script: bytes) -> tuple[list[Transaction], str]:
    """Lane ``lane`` funds the issuer's script, which issues ``quantity`` to ``to_script``."""
    issuer: PrivateKey = run.key(issuer_id)
    issuer_spk = p2pkh_script(issuer.public_key.hash160)
    allocation = genesis_allocation_tx(run.genesis.hash_le, run.genesis.allocations)
    funding = sign_p2pkh_payment(run.lanes.keys()[lane], OutPoint(allocation.hash_le, lane),
                                 LANE_VALUE, issuer_spk, ISSUER_FUNDING)
    store = KeyStore().with_key(issuer)
    issuance = (Wallet.from_utxos(store, [(OutPoint(funding.hash_le, 1),
                                           UtxoEntry(ISSUER_FUNDING, issuer_spk, None, 0, 1))])
                .issue(quantity, to_script, issuer_script=issuer_spk, definition=definition)
                .add_signatures(store).finalize())
    return [funding, issuance], asset_id(issuer_spk)


def assert_problem(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["code"] == code, answer.json()


async def test_seed_swap_flow_commits(kafka_bootstrap: str, unique_id: str, pg_dsn: str,
                                      tmp_path: Path) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=2) as run, \
            api_stack(run, pg_dsn, tmp_path) as api:
        accounts = load_accounts(api.access_dir)
        user_a = accounts.store("securities-a").account("user-a")
        user_b = accounts.store("securities-b").account("user-b")
        bond = AssetDefinition("KR2013-02", "국민주택 2013-02", "bond", "securities-a", "KRW",
                               maturity="2018-02-28", coupon_bp=275)
        cash = AssetDefinition("KRW-B", "원화 예수금", "cash", "securities-b", "KRW")
        bond_txs, bond_id = issue(run, "securities-a", 0, bond, BOND_UNITS, user_a.script)
        cash_txs, cash_id = issue(run, "securities-b", 1, cash, CASH_KRW, user_b.script)
        await run.submit(bond_txs + cash_txs)
        await run.wait_committed([tx.txid for tx in bond_txs + cash_txs],
                                 timeout_s=COMMIT_TIMEOUT_S)
        await _flow(api, run, user_a.address, user_b.address, bond_id, cash_id)


async def _flow(api: ApiRun, run: ChainRun, address_a: str, address_b: str, bond_id: str,
                cash_id: str) -> None:
    a, b = SeedClient(api.url, run.genesis.chain_id), SeedClient(api.url, run.genesis.chain_id)
    custodial = api.credentials["custodial_users"]
    try:
        await a.login("user-a@securities-a", custodial["user-a@securities-a"])
        await b.login("user-b@securities-b", custodial["user-b@securities-b"])
        # the issuances committed; the projector shows them a moment later
        await _wait_holding(a, "user-a", bond_id)
        await _wait_holding(b, "user-b", cash_id)
        swap = {"originator": {"account_id": "user-a", "to_address": asset_address(address_b),
                               "change_address": address_a, "asset_id": bond_id,
                               "amount": BOND_UNITS},
                "participant": {"account_id": "user-b", "to_address": address_a,
                                "change_address": asset_address(address_b),
                                "asset_id": cash_id, "amount": PRICE_KRW_CENTS}}
        answer = await a.post("/v1/assets/swap", swap)
        assert answer.status_code == 200, answer.text
        unsigned = answer.json()["unsigned_tx_hex"]

        # refusals: unknown asset, malformed hex, someone else's account, not your inputs
        unknown = {**swap, "participant": {**swap["participant"],
                                           "asset_id": asset_id(p2pkh_script(bytes(20)))}}
        assert_problem(await a.post("/v1/assets/swap", unknown), 422, "asset-unknown")
        assert_problem(await a.post("/v1/transactions/sign",
                                    {"unsigned_tx_hex": "00zz", "account_id": "user-a"}),
                       400, "tx-malformed")
        assert_problem(await a.post("/v1/transactions/sign",
                                    {"unsigned_tx_hex": unsigned, "account_id": "user-b"}),
                       403, "account-forbidden")
        assert_problem(await a.get("/v1/accounts/user-b/show"), 403, "account-forbidden")

        answer = await a.post("/v1/transactions/sign",
                              {"unsigned_tx_hex": unsigned, "account_id": "user-a"})
        assert answer.status_code == 200, answer.text
        half = answer.json()["signed_tx_hex"]
        # the platform restarts between the two signatures: B's session (sealed in its
        # token) still signs, without signing in again (decision 0081)
        await api.restart()
        answer = await b.post("/v1/transactions/sign",
                              {"unsigned_tx_hex": half, "account_id": "user-b"})
        assert answer.status_code == 200, answer.text
        signed = answer.json()["signed_tx_hex"]
        assert_problem(await b.post("/v1/transactions/send", {"signed_tx_hex": half}),
                       422, "tx-rejected")
        answer = await b.post("/v1/transactions/send", {"signed_tx_hex": signed})
        assert answer.status_code == 200, answer.text
        txid = answer.json()["txid"]

        committed = (await a.get(f"/api/chain/transactions/{txid}")).json()
        assert committed["hex"] == signed and committed["decoded"]["txid"] == txid
        block = (await a.get(f"/api/chain/blocks/{committed['height']}")).json()
        assert txid in block["txids"] and len(block["voters"]) >= run.genesis.params.quorum
        heights: list[int] = []
        cursor = ""
        while cursor is not None:  # the blocks list pages down to genesis
            query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
            listed = (await a.get(f"/api/chain/blocks?{query}")).json()
            heights += [item["height"] for item in listed["items"]]
            cursor = listed["next_cursor"]
        assert heights == list(range(heights[0], -1, -1)) and heights[0] >= block["height"]
        assert_problem(await a.get("/api/chain/transactions/" + "ab" * 32), 404, "tx-not-found")
        shown_a = (await a.get("/v1/accounts/user-a/show")).json()
        shown_b = (await b.get("/v1/accounts/user-b/show")).json()
        assert {"txid": txid, "asset_id": bond_id, "category": "send",
                "asset_quantity": BOND_UNITS}.items() <= _move(shown_a, txid, bond_id).items()
        assert _move(shown_a, txid, cash_id)["category"] == "receive"
        assert _move(shown_b, txid, bond_id)["category"] == "receive"
        assert _move(shown_b, txid, cash_id)["asset_quantity"] == PRICE_KRW_CENTS
        balances_b = {item["asset_id"]: item["quantity"] for item in shown_b["balances"]}
        assert balances_b == {bond_id: BOND_UNITS, cash_id: CASH_KRW - PRICE_KRW_CENTS}
        balances_a = {item["asset_id"]: item["quantity"] for item in shown_a["balances"]}
        assert balances_a == {cash_id: PRICE_KRW_CENTS}

        # a transfer out of one's own account (the resources beside the seed's /v1)
        transfer = {"asset_id": cash_id, "amount": 1_000, "to_address": address_b}
        answer = await a.http.post("/api/accounts/user-a/transfers", json=transfer, headers={
            "Authorization": f"Bearer {a.token}", "Idempotency-Key": "transfer-a-0001"})
        assert answer.status_code == 200, answer.text
        again = await a.http.post("/api/accounts/user-a/transfers", json=transfer, headers={
            "Authorization": f"Bearer {a.token}", "Idempotency-Key": "transfer-a-0001"})
        assert again.json()["txid"] == answer.json()["txid"]  # once, not twice
        assert_problem(await a.http.post("/api/accounts/user-b/transfers", json=transfer,
                                         headers={"Authorization": f"Bearer {a.token}",
                                                  "Idempotency-Key": "transfer-a-0002"}),
                       403, "account-forbidden")
        too_much = {**transfer, "amount": 10**9}
        assert_problem(await a.http.post("/api/accounts/user-a/transfers", json=too_much,
                                         headers={"Authorization": f"Bearer {a.token}",
                                                  "Idempotency-Key": "transfer-a-0003"}),
                       422, "insufficient-funds")
        listed = (await a.get("/api/accounts")).json()["items"]
        assert [item["account_id"] for item in listed] == ["user-a@securities-a"]
        assert listed[0]["balances"] == [{"asset_id": cash_id,
                                          "quantity": PRICE_KRW_CENTS - 1_000}]

        # a firm sees its own customers only; the regulator reads everything, writes nothing
        firm_a = SeedClient(api.url, run.genesis.chain_id)
        regulator = SeedClient(api.url, run.genesis.chain_id)
        try:
            await firm_a.login("securities-a", api.secret("client", "securities-a"))
            await regulator.login("surveillance", api.secret("client", "surveillance"))
            assert (await firm_a.get("/v1/accounts/user-a/show")).json()["address"] == address_a
            assert_problem(await firm_a.get("/v1/accounts/user-b/show"), 403,
                           "account-forbidden")
            assert (await regulator.get("/v1/accounts/user-b/show")).status_code == 200
            everyone = (await regulator.get("/api/accounts")).json()["items"]
            assert {item["account_id"] for item in everyone} == {"user-a@securities-a",
                                                                 "user-b@securities-b"}
            assert_problem(await regulator.post("/v1/transactions/send",
                                                {"signed_tx_hex": signed}), 403,
                           "read-only-scope")
            assert_problem(await firm_a.post("/v1/transactions/sign",
                                             {"unsigned_tx_hex": unsigned,
                                              "account_id": "user-a"}), 403,
                           "custodial-user-only")
        finally:
            await firm_a.close()
            await regulator.close()
    finally:
        await a.close()
        await b.close()


async def _wait_holding(client: SeedClient, account: str, asset: str) -> None:
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    while True:
        shown = (await client.get(f"/v1/accounts/{account}/show")).json()
        if any(item["asset_id"] == asset for item in shown["balances"]):
            return
        assert time.monotonic() < deadline, f"{account} never shows {asset}: {shown}"
        await asyncio.sleep(POLL_S)


def _move(shown: dict[str, Any], txid: str, asset: str) -> dict[str, Any]:
    found = [t for t in shown["transactions"] if t["txid"] == txid and t["asset_id"] == asset]
    assert len(found) == 1, shown["transactions"]
    return found[0]

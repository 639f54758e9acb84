"""The Bitcoin JSON-RPC endpoint against a real five-node chain, its projection and a
real API server process, driven by python-bitcoinlib's ``RawProxy`` (a standard
Bitcoin client library that is not ours): a signed transaction submitted and read
back; Core's error codes for duplicates, double spends and unknown objects; the API
restarted loses nothing.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from bitcoin.rpc import JSONRPCError, RawProxy

from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint
from streams.tools.loadgen import LANE_VALUE, sign_p2pkh_payment, sink_script
from tests.integration.api_fixtures import ApiRun, api_stack
from tests.integration.cluster_fixtures import running_chain

pytestmark = pytest.mark.cluster
COMMIT_TIMEOUT_S = 60.0


def proxy(api: ApiRun, client: str = "koscom-backoffice") -> RawProxy:
    secret = api.secret("client", client)
    return RawProxy(service_url=f"http://{client}:{secret}@127.0.0.1:{api.port}/rpc",
                    timeout=COMMIT_TIMEOUT_S)


async def call(rpc: RawProxy, method: str, *params: Any) -> Any:
    return await asyncio.to_thread(getattr(rpc, method), *params)


async def rpc_error(rpc: RawProxy, method: str, *params: Any) -> int:
    with pytest.raises(JSONRPCError) as caught:
        await call(rpc, method, *params)
    code: int = caught.value.error["code"]
    return code


async def test_bitcoin_client_submits_and_reads_back(kafka_bootstrap: str, unique_id: str,
                                                     pg_dsn: str, tmp_path: Path) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=2) as run, \
            api_stack(run, pg_dsn, tmp_path) as api:
        rpc = proxy(api)
        assert await call(rpc, "getblockcount") >= 0
        info = await call(rpc, "getblockchaininfo")
        assert info["chain"] == run.genesis.chain_id

        tx = run.next_batch(1, lanes=[0])[0]
        assert (await call(rpc, "decoderawtransaction", tx.serialize().hex()))["txid"] == tx.txid
        assert await call(rpc, "sendrawtransaction", tx.serialize().hex()) == tx.txid

        found = await call(rpc, "getrawtransaction", tx.txid, True)
        assert found["txid"] == tx.txid and found["hex"] == tx.serialize().hex()
        assert found["confirmations"] >= 1
        assert await call(rpc, "getrawtransaction", tx.txid) == tx.serialize().hex()
        block = await call(rpc, "getblock", found["blockhash"])
        assert tx.txid in block["tx"] and len(block["voters"]) >= run.genesis.params.quorum
        full = await call(rpc, "getblock", found["blockhash"], 2)
        assert [item["txid"] for item in full["tx"]] == block["tx"]
        assert await rpc_error(rpc, "getblock", found["blockhash"], 0) == -8
        assert await call(rpc, "getblockhash", block["height"]) == found["blockhash"]
        assert await call(rpc, "getblockcount") >= block["height"]
        out = await call(rpc, "gettxout", tx.txid, 0)
        assert out["value"] == Decimal(tx.outputs[0].value) / 100_000_000
        assert out["scriptPubKey"]["hex"] == tx.outputs[0].script_pubkey.hex()
        address = out["scriptPubKey"]["address"]
        assert (await call(rpc, "validateaddress", address))["isvalid"] is True

        # Core's codes: already in the chain, a double spend, unknown objects
        assert await rpc_error(rpc, "sendrawtransaction", tx.serialize().hex()) == -27
        allocation = genesis_allocation_tx(run.genesis.hash_le, run.genesis.allocations)
        double = sign_p2pkh_payment(run.lanes.keys()[0], OutPoint(allocation.hash_le, 0),
                                    LANE_VALUE, sink_script(run.lanes.seed), 2)
        assert await rpc_error(rpc, "sendrawtransaction", double.serialize().hex()) == -26
        assert await rpc_error(rpc, "sendrawtransaction", "00zz") == -22
        assert await rpc_error(rpc, "getrawtransaction", "ab" * 32) == -5
        assert await rpc_error(rpc, "getblockhash", 10**9) == -8
        assert await rpc_error(rpc, "getblock", "00" * 32) == -5
        assert await call(rpc, "gettxout", allocation.txid, 0) is None  # spent
        regulator = proxy(api, "surveillance")
        second = run.next_batch(1, lanes=[1])[0]
        assert await rpc_error(regulator, "sendrawtransaction", second.serialize().hex()) == -32

        # an API restart loses nothing: the chain is read back as before
        await api.restart()
        rpc = proxy(api)
        assert (await call(rpc, "getrawtransaction", tx.txid, True))["blockhash"] == \
            found["blockhash"]

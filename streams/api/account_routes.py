"""Custodial accounts: who holds what, and transfers out of one's own account.

Owns: ``GET /api/accounts`` (the accounts a caller may see — their own, a firm's
customers, all for the regulator and the platform — with balances from the projection)
and ``POST /api/accounts/{account_id}/transfers`` (one asset, or native value, from the
caller's own custodial account to an address: built from the projection's unspent
outputs, signed through the custody store, recorded with its Idempotency-Key claim,
sent and answered once committed; the key is required and a retry, after a crash
too, answers the same transaction — ``chain_writes``, decision 0083).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ledger.errors import ValidationError
from ledger.oap import asset_id_to_bytes
from ledger.script import p2pkh_script_sig
from ledger.tx import Transaction
from ledger.wallet import Leg, build_transfer, select_coins
from streams.api.addresses import address_script, asset_address
from streams.api.auth import Principal
from streams.api.chain_writes import AfterSend, BeforeSend, once_on_chain
from streams.api.context import (
    deps_of,
    ledger_client,
    market_principal,
    principal,
    projection,
    writer,
)
from streams.api.idempotency import check_key
from streams.api.problems import ApiProblem
from streams.api.seed_v1 import account_for, coin_of, custody_accounts, may_see
from streams.api.submission import Submitted, submit_and_wait

ACCOUNTS_LISTED_MAX = 1_000

router = APIRouter(prefix="/api/accounts", tags=["accounts"])


class Transfer(BaseModel):
    asset_id: str | None = Field(default=None, min_length=1, max_length=64)
    amount: int = Field(gt=0, le=2**62)
    to_address: str = Field(min_length=1, max_length=80)


@router.get("")
async def list_accounts(request: Request,
                        caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    accounts = custody_accounts(request)
    found = projection(request)
    visible = [account for firm in accounts.firms() for account in accounts.store(firm).accounts()
               if may_see(caller, account)][:ACCOUNTS_LISTED_MAX]
    items = []
    for account in visible:
        balances = await found.balances([account.address])
        items.append({"account_id": f"{account.user_id}@{account.firm}", "firm": account.firm,
                      "address": account.address,
                      "asset_address": asset_address(account.address),
                      "balances": [{"asset_id": asset, "quantity": amount}
                                   for asset, amount in sorted(balances.items(),
                                                               key=lambda i: i[0] or "")
                                   if amount]})
    return {"items": items}


@router.post("/{account_id}/transfers")
async def transfer(request: Request, account_id: str, body: Transfer,
                   caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    """Pay ``amount`` of ``asset_id`` (null: native value) from your own account, once
    per Idempotency-Key even across a crash of this process (decision 0083)."""
    key = check_key(request.headers.get("idempotency-key"), required=True)
    assert key is not None
    account = account_for(request, caller, account_id)
    holder = market_principal(request, caller)
    if (holder.user_id, holder.firm) != (account.user_id, account.firm):
        raise ApiProblem(403, "account-forbidden", "you may transfer from your own account only")
    ledger_client(request)

    async def run(resend: Transaction | None, record: BeforeSend,
                  sent: AfterSend) -> Submitted:
        tx = resend or await _signed_transfer(request, account, holder, body)
        await record(tx)
        return await submit_and_wait(request, tx, idempotency_key=key, sent=sent)

    def answer(txid: str, height: int) -> dict[str, Any]:
        return {"txid": txid, "status": "committed", "height": height}
    return await once_on_chain(request, caller, run, answer, _rejected)


def _rejected(sent: Submitted) -> ApiProblem:
    return ApiProblem(422, "tx-rejected", f"the ledger refused {sent.txid}: {sent.message}",
                      txid=sent.txid, rejection_code=sent.code)


async def _signed_transfer(request: Request, account: Any, holder: Any,
                           body: Transfer) -> Transaction:
    """The transfer built from the projection's unspent outputs, signed by custody."""
    if body.asset_id is not None:
        try:
            asset_id_to_bytes(body.asset_id)
        except (ValidationError, ValueError):
            raise ApiProblem(400, "asset-id-malformed",
                             "asset_id is not an Open Assets asset id") from None
        if not await projection(request).asset_exists(body.asset_id):
            raise ApiProblem(422, "asset-unknown", f"no asset {body.asset_id} was ever issued")
    recipient = address_script(body.to_address, deps_of(request).genesis.params,
                               what="to_address")
    coins = [coin_of(row) for row in await projection(request).unspent_of([account.address])]
    try:
        chosen = select_coins(coins, body.asset_id, body.amount)
        psbt = build_transfer([Leg(chosen.coins, body.asset_id, body.amount, recipient,
                                   account.script)])
        signed = custody_accounts(request).store(account.firm).sign_inputs(holder, psbt)
    except ValidationError as error:
        code = "insufficient-funds" if "insufficient" in error.code else error.code
        raise ApiProblem(422, code, error.message) from None
    pubkey = bytes.fromhex(account.pubkey_hex)
    tx: Transaction = signed.tx
    for index, collected in enumerate(signed.signatures):
        tx = tx.with_script_sig(index, p2pkh_script_sig(dict(collected)[pubkey], pubkey))
    return tx

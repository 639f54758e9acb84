"""The seed platform's REST surface, as its PoC client used it (``/v1``).

Owns: ``POST /v1/assets/swap`` (an unsigned transaction exchanging two parties'
assets, built from the projection's unspent outputs with ``ledger.wallet``),
``POST /v1/transactions/sign`` (the platform signs the inputs of one custodial account,
for that account's signed-in user only, keeping the other party's signatures),
``POST /v1/transactions/send`` (to the ledger, answered once committed or refused) and
``GET /v1/accounts/{account_id}/show`` (balances and per-asset activity). ``POST
/v1/oauth2/token`` is in :mod:`streams.api.app`. Requests may carry a ``network``
header naming the chain.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ledger.errors import ValidationError
from ledger.oap import asset_id_to_bytes
from ledger.script import ScriptTemplate, classify, p2pkh_script_sig
from ledger.tx import TX_BYTES_MAX, OutPoint, Transaction, TxIn
from ledger.wallet import Coin, Leg, PartiallySignedTx, build_transfer, select_coins
from streams.api.addresses import address_script, asset_address
from streams.api.auth import Principal
from streams.api.context import (
    check_network,
    deps_of,
    ledger_client,
    market_principal,
    principal,
    projection,
    writer,
)
from streams.api.custody import find_account
from streams.api.problems import ApiProblem
from streams.api.submission import submit_and_wait

TX_HEX_CHARS_MAX = 2 * TX_BYTES_MAX
ACTIVITY_ROWS_MAX = 200
ID_CHARS_MAX = 160

router = APIRouter(prefix="/v1", tags=["seed-v1"], dependencies=[Depends(check_network)])


class Party(BaseModel):
    account_id: str = Field(min_length=1, max_length=ID_CHARS_MAX)
    to_address: str = Field(min_length=1, max_length=80)
    change_address: str = Field(min_length=1, max_length=80)
    asset_id: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0, le=2**63 - 1)


class SwapRequest(BaseModel):
    originator: Party
    participant: Party


class SignRequest(BaseModel):
    unsigned_tx_hex: str = Field(min_length=2, max_length=TX_HEX_CHARS_MAX)
    account_id: str = Field(min_length=1, max_length=ID_CHARS_MAX)


class SendRequest(BaseModel):
    signed_tx_hex: str = Field(min_length=2, max_length=TX_HEX_CHARS_MAX)


def custody_accounts(request: Request) -> Any:
    accounts = deps_of(request).accounts
    if accounts is None:
        raise ApiProblem(503, "custody-unavailable", "this server holds no custodial accounts")
    return accounts


def may_see(caller: Principal, account: Any) -> bool:
    """A user sees their own account, a firm its customers, regulator/platform all."""
    if caller.reads_everything:
        return True
    if caller.scope == "firm":
        return bool(caller.firm == account.firm)
    return f"{account.user_id}@{account.firm}" in caller.accounts


def account_for(request: Request, caller: Principal, account_id: str) -> Any:
    account = find_account(custody_accounts(request), account_id)
    if not may_see(caller, account):
        raise ApiProblem(403, "account-forbidden", f"account {account_id[:64]!r} is not yours")
    return account


def parse_tx(text: str, field: str) -> Transaction:
    try:
        return Transaction.parse(bytes.fromhex(text))
    except (ValueError, ValidationError) as error:
        raise ApiProblem(400, "tx-malformed", f"{field} is not a transaction: {error}") from None


def coin_of(row: Any) -> Coin:
    return Coin(OutPoint.from_txid(row.txid, row.index), row.value, row.script_pubkey,
                row.asset_id, row.quantity or 0, row.height)


async def _leg(request: Request, party: Party, role: str) -> Leg:
    params = deps_of(request).genesis.params
    try:
        asset_id_to_bytes(party.asset_id)
    except (ValidationError, ValueError):
        raise ApiProblem(400, "asset-id-malformed",
                         f"{role}.asset_id is not an Open Assets asset id") from None
    found = projection(request)
    if not await found.asset_exists(party.asset_id):
        raise ApiProblem(422, "asset-unknown", f"no asset {party.asset_id} was ever issued")
    account = find_account(custody_accounts(request), party.account_id)
    coins = [coin_of(row) for row in await found.unspent_of([account.address])]
    try:
        chosen = select_coins(coins, party.asset_id, party.amount)
    except ValidationError:
        raise ApiProblem(422, "insufficient-asset",
                         f"{role} {party.account_id} holds less than {party.amount} of "
                         f"{party.asset_id}") from None
    return Leg(chosen.coins, party.asset_id, party.amount,
               address_script(party.to_address, params, what=f"{role}.to_address"),
               address_script(party.change_address, params, what=f"{role}.change_address"))


@router.post("/assets/swap")
async def swap(request: Request, body: SwapRequest,
               caller: Principal = Depends(writer)) -> dict[str, str]:  # noqa: B008
    """An unsigned transaction: each party's asset to its ``to_address``, its change back."""
    parties = [find_account(custody_accounts(request), party.account_id)
               for party in (body.originator, body.participant)]
    if not any(may_see(caller, account) for account in parties):
        raise ApiProblem(403, "account-forbidden", "neither party is an account of yours")
    legs = [await _leg(request, body.originator, "originator"),
            await _leg(request, body.participant, "participant")]
    try:
        psbt = build_transfer(legs)
    except ValidationError as error:
        raise ApiProblem(422, error.code, error.message) from None
    return {"unsigned_tx_hex": psbt.tx.serialize().hex()}


async def _spent_coins(request: Request, tx: Transaction) -> list[Coin]:
    found = projection(request)
    coins = []
    for index, tx_in in enumerate(tx.inputs):
        row = await found.output(tx_in.prevout.txid, tx_in.prevout.index)
        if row is None or row.spent_by_txid is not None:
            raise ApiProblem(422, "input-unknown-or-spent",
                             f"input {index} spends {tx_in.prevout}, not an unspent output")
        coins.append(coin_of(row))
    return coins


@router.post("/transactions/sign")
async def sign(request: Request, body: SignRequest,
               caller: Principal = Depends(writer)) -> dict[str, str]:  # noqa: B008
    """Sign the inputs of ``account_id`` (the caller's own custodial account) only."""
    tx = parse_tx(body.unsigned_tx_hex, "unsigned_tx_hex")
    account = account_for(request, caller, body.account_id)
    holder = market_principal(request, caller)
    if f"{holder.user_id}@{holder.firm}" != f"{account.user_id}@{account.firm}":
        raise ApiProblem(403, "account-forbidden", "you may sign for your own account only")
    unsigned = Transaction(tx.version, tuple(TxIn(i.prevout, b"", i.sequence)
                                             for i in tx.inputs), tx.outputs, tx.lock_time)
    psbt = PartiallySignedTx.create(unsigned, await _spent_coins(request, unsigned))
    try:
        signed = custody_accounts(request).store(account.firm).sign_inputs(holder, psbt)
    except ValidationError as error:
        raise ApiProblem(403, "sign-no-inputs-of-account",
                         f"the transaction spends nothing of {body.account_id}: "
                         f"{error.code}") from None
    pubkey = bytes.fromhex(account.pubkey_hex)
    result = tx
    for index, collected in enumerate(signed.signatures):
        signature = dict(collected).get(pubkey)
        if signature is None:
            continue  # another party's input: its scriptSig (if any) stays as it came
        if classify(signed.inputs[index].script_pubkey) is not ScriptTemplate.P2PKH:
            raise ApiProblem(422, "input-not-p2pkh", f"input {index} is not P2PKH")
        result = result.with_script_sig(index, p2pkh_script_sig(signature, pubkey))
    return {"signed_tx_hex": result.serialize().hex()}


@router.post("/transactions/send")
async def send(request: Request, body: SendRequest,
               caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    """Send a signed transaction; 200 with its txid once committed, 202 while undecided."""
    tx = parse_tx(body.signed_tx_hex, "signed_tx_hex")
    ledger_client(request)
    if await projection(request).tx(tx.txid) is not None:
        return JSONResponse({"txid": tx.txid, "status": "committed"})
    key = request.headers.get("idempotency-key")
    sent = await submit_and_wait(request, tx, idempotency_key=key or f"v1-{tx.txid}")
    if not sent.decided:
        return JSONResponse({"txid": tx.txid, "status": "pending"}, status_code=202)
    if not sent.committed:
        raise ApiProblem(422, "tx-rejected", f"the ledger refused {tx.txid}: {sent.message}",
                         txid=tx.txid, rejection_code=sent.code)
    return JSONResponse({"txid": tx.txid, "status": "committed", "height": sent.height})


@router.get("/accounts/{account_id}/show")
async def show(request: Request, account_id: str,
               caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """The account's balances and activity: per transaction and asset, received or sent."""
    account = account_for(request, caller, account_id)
    found = projection(request)
    head = await found.head()
    height = 0 if head is None else head.height
    balances = await found.balances([account.address])
    moves = await found.activity([account.address], limit=ACTIVITY_ROWS_MAX)
    transactions = [
        {"txid": move["txid"], "asset_id": move["asset_id"],
         "asset_quantity": abs(move["net"]), "category": "receive" if move["net"] > 0
         else "send", "height": move["height"], "confirmations": height - move["height"] + 1,
         "time": move["time_at"].astimezone(dt.UTC).isoformat()}
        for move in moves if move["net"] != 0
    ]
    return {"account_id": f"{account.user_id}@{account.firm}", "firm": account.firm,
            "address": account.address, "asset_address": asset_address(account.address),
            "balances": [{"asset_id": asset, "quantity": amount}
                         for asset, amount in sorted(balances.items(), key=lambda i: i[0] or "")
                         if amount],
            "transactions": transactions}

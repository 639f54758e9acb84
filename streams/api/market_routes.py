"""Market resources: writes through the market service (its signed events on the
market topics), reads from the PostgreSQL projection (``market_reads``): assets, the
board, negotiations, agreements, trades, balances, and the regulator's surveillance
view. A write is answered once the projection shows it (read-your-writes, bounded).

Owns: ``/api/market/...``. A user acts through their custodial session (the market's
own principal); a firm, the platform and the regulator read. Writes take an
``Idempotency-Key`` (a repeated key answers the first answer, a reused key with
another body is refused). The market's refusals (``MarketError``) become problems
with the market's own codes. When the second party's signature completes an
agreement, the API asks the market to settle it (the DvP transaction) at once.
Issuance and that settlement send ledger transactions: recorded with the key's claim
before they are sent, so a retry after a crash sends or finds that very transaction
(``chain_writes``, decision 0083).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ledger.errors import ValidationError
from ledger.market import MarketError, check_id
from ledger.tx import Transaction
from streams.api.auth import Principal
from streams.api.chain_writes import (
    AfterSend,
    BeforeSend,
    fault_point,
    once_on_chain,
    recorded_tx,
)
from streams.api.context import (
    deps_of,
    market_principal,
    principal,
    projection,
    services,
    writer,
)
from streams.api.idempotency import check_key, fingerprint, keyed_write, nonce_for
from streams.api.market_reads import PROJECTED_WAIT_S, MarketReads, wait_projected
from streams.api.problems import ApiProblem
from streams.api.submission import Submitted
from streams.market.service import LedgerRejected, Sending

PRICE_CHARS_MAX = 24
PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 100
CURSOR_CHARS_MAX = 200
TEXT_CHARS_MAX = 1_000
QUANTITY_MAX = 10**12
# an issuance sent whose outcome the market service did not learn in time: undecided
ISSUE_UNDECIDED_CODES = frozenset({"ledger-timeout"})

router = APIRouter(prefix="/api/market", tags=["market"])


class PostOrder(BaseModel):
    security_code: str = Field(min_length=1, max_length=32)
    side: str = Field(pattern="^(sell|buy)$")
    price: str = Field(min_length=1, max_length=PRICE_CHARS_MAX)
    quantity: int = Field(gt=0, le=QUANTITY_MAX)


class AmendOrder(BaseModel):
    price: str | None = Field(default=None, min_length=1, max_length=PRICE_CHARS_MAX)
    quantity: int | None = Field(default=None, gt=0, le=QUANTITY_MAX)


class SendMessage(BaseModel):
    text: str = Field(min_length=1, max_length=TEXT_CHARS_MAX)
    offer_price: str | None = Field(default=None, min_length=1, max_length=PRICE_CHARS_MAX)
    offer_quantity: int | None = Field(default=None, gt=0, le=QUANTITY_MAX)


class Agree(BaseModel):
    price: str = Field(min_length=1, max_length=PRICE_CHARS_MAX)
    quantity: int = Field(gt=0, le=QUANTITY_MAX)


def market(request: Request) -> Any:
    found = services(request).market
    if found is None:
        raise ApiProblem(503, "market-unavailable", "this server runs no market service")
    return found


def problem_of(error: ValidationError) -> ApiProblem:
    code = error.code
    if code.endswith("-unknown") or code.endswith("-unknown-security"):
        status = 404
    elif code.endswith(("not-party", "not-owner", "not-authenticated")):
        status = 403
    else:
        status = 422
    return ApiProblem(status, code, error.message)


Produce = Callable[[str], Awaitable[Any]]  # the write, given the nonce it must carry
Rebuild = Callable[[Any, Any], Awaitable[Any]]  # (service, the logged event) -> answer


async def idempotent(request: Request, caller: Principal, produce: Produce,
                     rebuild: Rebuild | None = None) -> JSONResponse:
    """Run a write once per Idempotency-Key; market refusals become problems.

    The key is claimed (pending, on disk) before anything is written and the write
    carries the key's nonce; a retry that finds a claim without an answer (the process
    died in between) answers from the event the market's log holds for that nonce
    (``rebuild``), or runs the write when the log holds none. The answer's
    ``Server-Timing`` says where the time went: ``claim`` (the fsync), ``write``
    (decided, signed, acknowledged by the broker), ``projected`` (until reads show it)."""
    store = services(request).idempotency
    write = keyed_write(store, caller.subject, request.headers.get("idempotency-key"),
                        request.method, request.url.path, await request.body())
    if write.answered is not None:
        return JSONResponse(write.answered.body, status_code=write.answered.status,
                            headers={"Idempotent-Replayed": "true"})
    key, print_, stored = write.key, write.print_, write.stored
    nonce = nonce_for(caller.subject, key)
    times_s = [time.perf_counter()]
    store.begin(caller.subject, key)
    try:
        if stored is None:
            await store.claim(caller.subject, key, print_)
        times_s.append(time.perf_counter())
        logged = _logged(request, nonce) if stored is not None else None
        if logged is not None and rebuild is not None:
            body = await rebuild(market(request), logged)
        else:
            body = await produce(nonce)
            fault_point(request, "after-write")
    except ValidationError as error:
        await projected(request)  # the refusal is a board event too
        raise problem_of(error) from None
    finally:
        store.end(caller.subject, key)
    times_s.append(time.perf_counter())
    store.remember(caller.subject, key, print_, 200, body, durable=False)
    await projected(request, _txid_of(body))
    times_s.append(time.perf_counter())
    timing = ", ".join(f"{name};dur={(end - start) * 1000:.1f}" for name, start, end in
                       zip(("claim", "write", "projected"), times_s[:-1], times_s[1:],
                           strict=True))
    headers = {"Server-Timing": timing}
    if logged is not None:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, headers=headers)


def _logged(request: Request, nonce: str) -> Any:
    """The market event that carried ``nonce`` (the log, replayed at start), if any;
    a refusal found there is answered as it was refused."""
    event = market(request).by_nonce.get(nonce)
    if event is not None and event.kind == "command-refused":
        raise MarketError(str(event.payload.get("message", "")),
                          code=str(event.payload.get("code", "market-refused")))
    return event


def _txid_of(body: Any) -> str | None:
    """The chain transaction a write's answer names (issuance, a settled trade)."""
    if not isinstance(body, dict):
        return None
    trade = body.get("trade")
    found = body.get("txid") or (trade.get("txid") if isinstance(trade, dict) else None)
    return found if isinstance(found, str) else None


def board_after(service: Any, event: Any) -> Any:
    """The market as it stood right after ``event`` for its order (the order's history
    folded up to it): a write retried after a restart answers what its first run would
    have answered, whatever happened to the order since."""
    from ledger.market import Board, apply_event

    board = Board(assets=service.board_state.assets)
    for past in service.board_state.history.get(str(event.payload["order_id"]), ()):
        board = apply_event(board, past)
        if past == event:
            break
    return board


def _order_answer(holder: Any) -> Rebuild:
    async def rebuild(service: Any, event: Any) -> Any:
        board = board_after(service, event)
        return order_json(board.order(str(event.payload["order_id"])), board, holder.key)
    return rebuild


def reads(request: Request) -> MarketReads:
    return MarketReads(projection(request))


async def projected(request: Request, txid: str | None = None) -> None:
    """Wait (bounded) until the projection shows this server's market writes and, given
    ``txid``, that chain transaction: a read right after the answer sees the write."""
    service = services(request).market
    if service is None:
        return
    await wait_projected(reads(request), dict(service.written_ends),
                         watch=services(request).watch)
    if txid is not None:
        await projection(request).wait_for_tx(txid, timeout_s=PROJECTED_WAIT_S)


def user_json(user: Any) -> dict[str, str]:
    return {"user_id": user.user_id, "firm": user.firm, "key": user.key}


def order_json(order: Any, board: Any, me: str | None) -> dict[str, Any]:
    asset = board.assets.get(order.security_code)
    definition = asset.definition if asset is not None else None
    return {"order_id": order.order_id, "security_code": order.security_code,
            "name": definition.name if definition else order.security_code,
            "maturity": definition.maturity if definition else None,
            "side": str(order.side), "price": str(order.price), "quantity": order.quantity,
            "poster": user_json(order.poster), "status": str(order.status),
            "posted_at_ms": order.posted_at_ms, "updated_at_ms": order.updated_at_ms,
            "version": order.version, "negotiation_id": order.negotiation_id,
            "mine": me == order.poster.key}


def terms_json(terms: Any) -> dict[str, Any]:
    return {"security_code": terms.security_code, "asset_id": terms.asset_id,
            "price": str(terms.price), "quantity": terms.quantity,
            "amount_krw": terms.amount, "seller": user_json(terms.seller),
            "buyer": user_json(terms.buyer), "order_id": terms.order_id,
            "negotiation_id": terms.negotiation_id}


def agreement_json(agreement: Any) -> dict[str, Any]:
    return {"agreement_id": agreement.agreement_id, "terms": terms_json(agreement.terms),
            "signed_by": sorted(agreement.signatures), "complete": agreement.is_complete,
            "settled_txid": agreement.settled_txid, "failed_code": agreement.failed_code}


def trade_json(trade: Any) -> dict[str, Any]:
    return {"agreement_id": trade.agreement_id, "order_id": trade.order_id,
            "txid": trade.txid, "height": trade.height, "block_hash": trade.block_hash,
            "committed_at_ms": trade.committed_at_ms, "terms": terms_json(trade.terms)}


def _key_of(caller: Principal) -> str | None:
    """The market's user key ("firm/user") of a custodial user."""
    if caller.scope != "user" or "@" not in caller.subject:
        return None
    user_id, _, firm = caller.subject.partition("@")
    return f"{firm}/{user_id}"


@router.get("/version")
async def version(request: Request,
                  caller: Principal = Depends(principal)) -> dict[str, int]:  # noqa: B008
    """A number that changes whenever the projected board or a negotiation changes."""
    return {"version": await reads(request).version()}


@router.get("/assets")
async def assets(request: Request,
                 caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    return {"items": await reads(request).assets()}


class RegisterAsset(BaseModel):
    security_code: str = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(min_length=1, max_length=16)
    unit: str = Field(default="KRW", min_length=1, max_length=16)
    decimals: int = Field(default=0, ge=0, le=18)
    maturity: str | None = Field(default=None, max_length=10)
    coupon_bp: int | None = Field(default=None, ge=0, le=100_000)
    issue_date: str | None = Field(default=None, max_length=10)
    face_value: int | None = Field(default=None, gt=0, le=10**15)


class IssueAsset(BaseModel):
    account_id: str = Field(min_length=1, max_length=160)
    quantity: int = Field(gt=0, le=2**62)


def _issuer(caller: Principal) -> str:
    """The issuing firm acting: a firm principal of a member that may issue."""
    if caller.scope != "firm" or caller.firm is None:
        raise ApiProblem(403, "issuer-only", "assets are registered and issued by their "
                                             "issuing firm's system")
    return caller.firm


@router.post("/assets")
async def register_asset(request: Request, body: RegisterAsset,
                         caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    """Register an asset's terms (the issuing firm only); terms never change."""
    from ledger.assets import AssetDefinition

    issuer = _issuer(caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        definition = AssetDefinition(body.security_code, body.name, body.kind, issuer,
                                     body.unit, body.decimals, body.maturity, body.coupon_bp,
                                     body.issue_date, body.face_value)
        registered = await service.register_asset(issuer, definition)
        return {"asset_id": registered.asset_id, "security_code": body.security_code,
                "issuer": issuer}
    return await idempotent(request, caller, produce)


@router.post("/assets/{security_code}/issue")
async def issue_asset(request: Request, security_code: str, body: IssueAsset,
                      caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    """Issue units of a registered asset to a custodial account; answered once committed,
    once per Idempotency-Key even across a crash of this process (decision 0083)."""
    from streams.api.custody import find_account

    issuer = _issuer(caller)
    accounts = deps_of(request).accounts
    if accounts is None:
        raise ApiProblem(503, "custody-unavailable", "this server holds no custodial accounts")
    account = find_account(accounts, body.account_id)
    service = market(request)
    try:
        registered = service.board_state.asset(security_code)
    except ValidationError as error:
        raise problem_of(error) from None

    async def run(resend: Transaction | None, record: BeforeSend,
                  sent: AfterSend) -> Submitted:
        built: list[Transaction] = []

        async def before(tx: Transaction) -> None:
            built.append(tx)
            await record(tx)
        try:
            result = await service.issue(issuer, security_code, account, body.quantity,
                                         prepared=resend, before_send=before,
                                         after_send=sent)
        except LedgerRejected as error:
            return Submitted(built[0].txid, True, False, code=error.rejection_code,
                             message=error.message)
        except ValidationError as error:
            if built and error.code in ISSUE_UNDECIDED_CODES:
                return Submitted(built[0].txid, decided=False)
            raise problem_of(error) from None
        return Submitted(result.txid, True, True, height=result.height)

    def answer(txid: str, height: int) -> dict[str, Any]:
        return {"txid": txid, "height": height, "asset_id": registered.asset_id,
                "quantity": body.quantity}

    def refused(sent: Submitted) -> ApiProblem:
        return ApiProblem(422, "ledger-rejected", sent.message or "the nodes rejected it",
                          txid=sent.txid, rejection_code=sent.code)
    return await once_on_chain(request, caller, run, answer, refused)


def page(items: list[Any], key: Callable[[Any], str], *, limit: int,
         cursor: str | None) -> tuple[list[Any], str | None]:
    """Keyset pagination over a list already in its order: the items after ``cursor``
    (the key of the last item of the previous page), at most ``limit``."""
    if cursor is not None and len(cursor) > CURSOR_CHARS_MAX:
        raise ApiProblem(400, "cursor-invalid", "cursor is a value from next_cursor")
    start = 0
    if cursor is not None:
        keys = [key(item) for item in items]
        if cursor not in keys:
            raise ApiProblem(400, "cursor-invalid", "cursor is a value from next_cursor")
        start = keys.index(cursor) + 1
    chosen = items[start:start + limit]
    more = start + limit < len(items)
    return chosen, key(chosen[-1]) if more and chosen else None


@router.get("/board")
async def board(request: Request, include_closed: bool = False,
                limit: int = Query(PAGE_LIMIT_DEFAULT, ge=1, le=PAGE_LIMIT_MAX),
                cursor: str | None = None,
                caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """호가게시판, newest first, a page at a time (from the projection)."""
    found = reads(request)
    after = None
    if cursor is not None:
        after = (await found.order_cursor(cursor[:CURSOR_CHARS_MAX])
                 if len(cursor) <= CURSOR_CHARS_MAX else None)
        if after is None:
            raise ApiProblem(400, "cursor-invalid", "cursor is a value from next_cursor")
    orders = await found.orders(include_closed=include_closed, me=_key_of(caller),
                                limit=limit + 1, after=after)
    following = orders[limit - 1]["order_id"] if len(orders) > limit else None
    return {"version": await found.version(), "next_cursor": following,
            "items": orders[:limit]}


@router.post("/orders")
async def post_order(request: Request, body: PostOrder,
                     caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    holder = market_principal(request, caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        order = await service.post_order(holder, body.security_code, body.side, body.price,
                                         body.quantity, nonce=nonce)
        return order_json(order, service.board_state, holder.key)
    return await idempotent(request, caller, produce, _order_answer(holder))


@router.post("/orders/{order_id}/amend")
async def amend_order(request: Request, order_id: str, body: AmendOrder,
                      caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    holder = market_principal(request, caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        order = await service.amend_order(holder, order_id, price=body.price,
                                          quantity=body.quantity, nonce=nonce)
        return order_json(order, service.board_state, holder.key)
    return await idempotent(request, caller, produce, _order_answer(holder))


@router.post("/orders/{order_id}/cancel")
async def cancel_order(request: Request, order_id: str,
                       caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    holder = market_principal(request, caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        order = await service.cancel_order(holder, order_id, nonce=nonce)
        return order_json(order, service.board_state, holder.key)
    return await idempotent(request, caller, produce, _order_answer(holder))


def negotiation_json(negotiation: Any, board: Any) -> dict[str, Any]:
    order = board.orders.get(negotiation.order_id)
    return {"negotiation_id": negotiation.negotiation_id, "order_id": negotiation.order_id,
            "poster": user_json(negotiation.poster), "joiner": user_json(negotiation.joiner),
            "opened_at_ms": negotiation.opened_at_ms, "messages": negotiation.messages,
            "closed": negotiation.closed,
            "order": order_json(order, board, None) if order is not None else None}


@router.post("/orders/{order_id}/join")
async def join_order(request: Request, order_id: str,
                     caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    holder = market_principal(request, caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        negotiation = await service.join_order(holder, order_id, nonce=nonce)
        return negotiation_json(negotiation, service.board_state)

    async def rebuild(found: Any, event: Any) -> Any:
        board = board_after(found, event)
        return negotiation_json(board.negotiation(str(event.payload["negotiation_id"])), board)
    return await idempotent(request, caller, produce, rebuild)


@router.get("/negotiations")
async def negotiations(request: Request,
                       limit: int = Query(PAGE_LIMIT_DEFAULT, ge=1, le=PAGE_LIMIT_MAX),
                       cursor: str | None = None,
                       caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    who = ("all" if caller.reads_everything else
           "firm" if caller.scope == "firm" else "user")
    found = await reads(request).negotiations(who, _key_of(caller), caller.firm)
    chosen, following = page(found, lambda n: str(n["negotiation_id"]), limit=limit,
                             cursor=cursor)
    return {"items": chosen, "next_cursor": following}


@router.get("/negotiations/{negotiation_id}/messages")
async def read_messages(request: Request, negotiation_id: str,
                        caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """Decrypted for the two parties only (with the party's custodial key, from the
    ciphertext the projection keeps); everyone else is refused."""
    holder = market_principal(request, caller)
    accounts = deps_of(request).accounts
    if accounts is None:
        raise ApiProblem(503, "custody-unavailable", "this server holds no custodial accounts")
    try:
        messages = await _decrypted(reads(request), accounts, holder,
                                    check_id(negotiation_id, "negotiation id"))
    except ValidationError as error:
        raise problem_of(error) from None
    return {"negotiation_id": negotiation_id, "items": [
        {"sequence": m.sequence, "sender": m.sender, "text": m.text, "mine": m.sender ==
         holder.key, "offer_price": None if m.offer_price is None else str(m.offer_price),
         "offer_quantity": m.offer_quantity, "sent_at_ms": m.sent_at_ms} for m in messages]}


async def _decrypted(found: MarketReads, accounts: Any, holder: Any,
                     negotiation_id: str) -> list[Any]:
    """A party's messages: its sealed copy of the negotiation key opened by its custody
    store, each message's ciphertext decrypted with it (decision 0082)."""
    from streams.market.service import decrypt_messages, negotiation_key_aad

    parties = await found.sealed_negotiation(negotiation_id)
    if parties is None:
        raise MarketError(f"no negotiation {negotiation_id!r}", code="negotiation-unknown")
    if holder.key not in parties:
        raise MarketError("only the two parties take part in a negotiation",
                          code="negotiation-not-party")
    role = "poster" if holder.key == parties[0] else "joiner"
    sealed = await found.sealed_key(negotiation_id, role)
    if sealed is None:
        raise MarketError(f"negotiation {negotiation_id} has no key for its {role}",
                          code="negotiation-unknown")
    order_id, nonce, blob = sealed
    key = accounts.signer(holder.firm, holder.user_id).unseal(
        holder, blob, negotiation_key_aad(order_id, nonce, role))
    messages, _ = decrypt_messages(key, negotiation_id,
                                   await found.sealed_messages(negotiation_id))
    return messages


@router.post("/negotiations/{negotiation_id}/messages")
async def send_message(request: Request, negotiation_id: str, body: SendMessage,
                       caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    holder = market_principal(request, caller)

    async def produce(nonce: str) -> Any:
        service = market(request)
        sequence = await service.send_message(holder, negotiation_id, body.text,
                                              offer_price=body.offer_price,
                                              offer_quantity=body.offer_quantity, nonce=nonce)
        return {"negotiation_id": negotiation_id, "sequence": sequence}

    async def rebuild(found: Any, event: Any) -> Any:
        return {"negotiation_id": negotiation_id, "sequence": int(event.payload["sequence"])}
    return await idempotent(request, caller, produce, rebuild)


@router.post("/negotiations/{negotiation_id}/agree")
async def agree(request: Request, negotiation_id: str, body: Agree,
                caller: Principal = Depends(writer)) -> JSONResponse:  # noqa: B008
    """협상확정: sign the terms; the second signature settles the trade (DvP), once per
    Idempotency-Key even across a crash (the DvP is recorded with the claim before it
    is sent, decision 0083)."""
    holder = market_principal(request, caller)
    key = check_key(request.headers.get("idempotency-key"), required=True)
    assert key is not None
    print_ = fingerprint(request.method, request.url.path, await request.body())
    store = services(request).idempotency

    async def record(tx: Transaction) -> None:
        await store.record_tx(caller.subject, key, print_, tx.txid, tx.serialize().hex())
        fault_point(request, "before-write")  # logged and recorded, not sent (tests)
    first = Sending(before_send=record, after_send=lambda _: fault_point(request,
                                                                         "after-write"))

    async def produce(nonce: str) -> Any:
        service = market(request)
        agreement = await service.agree(holder, negotiation_id, body.price, body.quantity,
                                        nonce=nonce)
        return await _settled_answer(request, service, agreement, first)

    async def rebuild(found: Any, event: Any) -> Any:
        # signed before the process died: settle now if that never happened, with the
        # DvP recorded then if there is one
        resend = recorded_tx(store.lookup(caller.subject, key, print_))
        return await _settled_answer(request, found, found.board_state.agreement(
            str(event.payload["agreement_id"])), first if resend is None else
            Sending(prepared=resend))
    return await idempotent(request, caller, produce, rebuild)


async def _settled_answer(request: Request, service: Any, agreement: Any,
                          sending: Sending) -> dict[str, Any]:
    """The agreement and, once both signed, its trade: the second signature settles
    (a complete agreement not settled nor failed yet is settled here)."""
    answer: dict[str, Any] = {"agreement": agreement_json(agreement), "trade": None}
    if not agreement.is_complete:
        return answer
    trade = service.board_state.trades.get(agreement.agreement_id)
    if trade is None and agreement.failed_code is None:
        trade = await _settle_once(request, service, agreement.agreement_id, sending)
    answer["trade"] = None if trade is None else trade_json(trade)
    answer["agreement"] = agreement_json(service.board_state.agreements[agreement.agreement_id])
    return answer


async def _settle_once(request: Request, service: Any, agreement_id: str,
                       sending: Sending) -> Any:
    """Settle; a recorded DvP (a retry after a crash) is sent again, or, when the
    projection shows it committed, only confirmed — never built anew from other coins."""
    prepared = sending.prepared
    found = projection(request)
    row = None if prepared is None else await found.tx(prepared.txid)
    if row is not None:
        return await service.settle(agreement_id, sending=replace(
            sending, committed_height=row.height))
    try:
        return await service.settle(agreement_id, sending=sending)
    except LedgerRejected as error:
        # raised for a resent copy only: the recorded one, or the market log's (0132)
        txid = error.txid or (prepared.txid if prepared is not None else None)
        assert txid is not None
        if not await found.wait_for_tx(txid, timeout_s=PROJECTED_WAIT_S):
            raise ApiProblem(503, "settlement-pending", f"the DvP {txid} was sent "
                             "before and is not shown yet; retry") from None
        row = await found.tx(txid)
        assert row is not None
        return await service.settle(agreement_id, sending=replace(
            sending, committed_height=row.height))


@router.get("/agreements")
async def agreements(request: Request,
                     limit: int = Query(PAGE_LIMIT_DEFAULT, ge=1, le=PAGE_LIMIT_MAX),
                     cursor: str | None = None,
                     caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    if not caller.reads_everything and _key_of(caller) is None:
        return {"items": [], "next_cursor": None}
    found = await reads(request).agreements(
        None if caller.reads_everything else _key_of(caller))
    chosen, following = page(found, lambda a: str(a["agreement_id"]), limit=limit,
                             cursor=cursor)
    return {"items": chosen, "next_cursor": following}


@router.get("/trades")
async def trades(request: Request,
                 limit: int = Query(PAGE_LIMIT_DEFAULT, ge=1, le=PAGE_LIMIT_MAX),
                 cursor: str | None = None,
                 caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """거래확인: a user's own trades; a firm its customers'; regulator and platform all."""
    me = _key_of(caller)
    if caller.reads_everything:
        found = await reads(request).trades(None, None)
    elif caller.scope == "firm" and caller.firm is not None:
        found = await reads(request).trades(None, caller.firm)
    elif me is not None:
        found = await reads(request).trades(me, None)
    else:
        found = []
    chosen, following = page(found, lambda trade: str(trade["agreement_id"]), limit=limit,
                             cursor=cursor)
    return {"items": chosen, "next_cursor": following}


@router.get("/balance")
async def balance(request: Request,
                  caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """나의 잔고 조회: the signed-in user's units per security and KRW cash (projection)."""
    from streams.api.custody import find_account

    accounts = deps_of(request).accounts
    if caller.kind != "user" or caller.scope != "user" or accounts is None:
        raise ApiProblem(403, "custodial-user-only", "the balance is a custodial user's own")
    account = find_account(accounts, caller.subject)
    return await reads(request).balance(f"{account.firm}/{account.user_id}", account.address)


@router.get("/surveillance")
async def surveillance(request: Request,
                       caller: Principal = Depends(principal)) -> dict[str, Any]:  # noqa: B008
    """The regulator's view: every order (closed ones too), agreement, trade, and the
    refused commands by code (all from the projection)."""
    if not caller.reads_everything:
        raise ApiProblem(403, "regulator-only", "the surveillance view is for the regulator")
    found = reads(request)
    return {"orders": await found.orders(include_closed=True, me=None, limit=1_000,
                                         after=None),
            "negotiations": len(await found.negotiations("all", None, None)),
            "agreements": await found.agreements(None),
            "trades": await found.trades(None, None),
            "refused_by_code": await found.refused_by_code(),
            "events": await found.event_count()}

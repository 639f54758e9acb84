"""The OTC bond market service: the interface the CLI and the HTTP API call.

Owns: ``MarketService`` — registered assets and issuance, the quote board (post, amend,
cancel), joining and end-to-end-encrypted negotiation, agreement signed by both parties
and delivery-versus-payment settlement as one ledger transaction, confirmation, balances.
Every state change is a signed event on a ``market.*.v1`` topic written *before* the
in-memory board changes; ``start`` rebuilds the board by replaying those topics, so a
restart loses nothing. Rules are ``ledger.market``'s; this module reads, decides through
them, writes. Refusals raise ``MarketError`` (stable ``code``) and change nothing; the
board's refusals are also recorded (``command-refused``) for surveillance.

Who runs what (decision 0070): the board and messenger parts run at the otc-operator
(one writer of market.board.v1 and market.negotiation.v1); the parts that act for a user
(signing commands, sealing and reading messages, signing settlement inputs) use the
user's firm's ``CustodyStore``; issuance uses the issuing firm's identity key. In one
process (tests, the CLI against a local chain) all of them are passed in.

Calling it: ``await start()`` once (topics, replay, chain view), ``await stop()`` at the
end. Commands are coroutines: ``register_asset``, ``issue``/``issue_many``,
``post_order``, ``amend_order``, ``cancel_order``, ``expire_orders``, ``join_order``,
``send_message``, ``agree``, ``settle``. Reads of the in-memory board are plain methods:
``board``, ``order_history``, ``read_messages``, ``negotiations``, ``agreements``,
``trades``, ``balance``. A user is a ``Principal`` from
``accounts.store(firm).authenticate(user_id, password)``. One ``MarketService`` per
market writes the board; more instances are read replicas as of their start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ledger.assets import (
    AssetDefinition,
    issuing_private_key,
    issuing_script,
    terms_output,
)
from ledger.errors import ValidationError
from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.market import (
    AGREEMENT_TTL_MS_DEFAULT,
    CASH_UNIT,
    DVP_TX_BYTES_MAX,
    MESSAGE_BYTES_MAX,
    ORDER_TTL_MS_DEFAULT,
    Agreement,
    Board,
    MarketError,
    MarketEvent,
    Negotiation,
    Order,
    RegisteredAsset,
    Side,
    Trade,
    apply_event,
    check_id,
    check_matches_offer,
    check_quantity,
    check_settleable,
    decide_amend,
    decide_cancel,
    decide_expiries,
    decide_join,
    decide_post,
    decide_sign,
    digest,
    logged_dvp,
    parse_price,
    price_text,
    settlement_sent,
    terms_for,
    unfinished_settlements,
)
from ledger.membership import Genesis
from ledger.oap import asset_id, build_marker
from ledger.tx import Transaction, TxIn, TxOut
from ledger.wallet import KeyStore, PartiallySignedTx, Wallet
from streams.client.chain_view import ChainView
from streams.client.ledger_client import LedgerClient
from streams.common.clock import now_ms
from streams.kafka.logio import LogWriter
from streams.kafka.market_log import Recorded, envelope, read_events
from streams.kafka.topics import (
    MARKET_ASSETS,
    MARKET_BOARD,
    MARKET_NEGOTIATION,
    MARKET_TOPICS,
    ensure_topics,
)
from streams.market import sealing
from streams.market.accounts import Account, Accounts, Principal
from streams.market.settlement import build_dvp, sign_for_party

logger = logging.getLogger(__name__)

OPERATOR = "otc-operator"
SURVEILLANCE = "surveillance"
ISSUER_FUNDING_VALUE = 1_000  # native units parked at an asset's issuing script
COMMIT_TIMEOUT_S_DEFAULT = 60.0
BOARD_WRITERS = frozenset({OPERATOR})
DECISION_BATCH_MAX = 500  # board commands decided and written in one broker round trip
ISSUE_GRANTS_MAX = 1_000  # recipients of one bulk issuance (bounds the transaction size)
BeforeSend = Callable[[Transaction], Awaitable[None]]  # sees a transaction before it is sent
AfterSend = Callable[[Transaction], None]  # told once the broker acknowledged it
# the nodes' codes for a transaction sent again after its first copy was decided
DUPLICATE_CODES = frozenset({"duplicate", "duplicate-idempotency-key"})


@dataclass(frozen=True, slots=True)
class Message:
    """One decrypted negotiation message, as a party (or surveillance) reads it."""

    sequence: int
    sender: str  # "firm/user"
    text: str
    offer_price: Decimal | None
    offer_quantity: int | None
    sent_at_ms: int


class LedgerRejected(MarketError):
    """The nodes rejected a transaction the service sent; ``rejection_code`` is theirs
    (``duplicate``: this very transaction was sent and committed before)."""

    def __init__(self, message: str, *, rejection_code: str | None,
                 txid: str | None = None) -> None:
        super().__init__(message, code="ledger-rejected")
        self.rejection_code = rejection_code
        self.txid = txid  # the transaction refused


@dataclass(frozen=True, slots=True)
class Sending:
    """How a restart-safe caller (the API, decision 0083) has a transaction sent:
    ``before_send`` sees it before it goes to the broker (the caller records it);
    ``prepared`` is such a recorded transaction, sent again as it is, never rebuilt
    from other coins; ``committed_height``: the caller already saw it committed there
    (nothing is sent); ``after_send`` runs once the broker acknowledged it."""

    prepared: Transaction | None = None
    committed_height: int | None = None
    before_send: BeforeSend | None = None
    after_send: AfterSend | None = None


@dataclass(frozen=True, slots=True)
class IssueResult:
    txid: str
    height: int
    asset_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Balance:
    """나의 잔고: units per security code, KRW cash, and what open orders hold back."""

    user: str
    address: str
    securities: Mapping[str, int]
    cash_krw: int
    committed: Mapping[str, int]
    height: int


@dataclass(frozen=True, slots=True)
class _Pending:
    """A board command waiting for the next batch."""

    decide: Callable[[Board], MarketEvent]
    kind: str
    user: str
    order_id: str | None
    future: asyncio.Future[MarketEvent]
    nonce: str | None = None


def nonce_of(event: MarketEvent) -> str | None:
    """The nonce a write carried: its user's signed command's, else the event's own (a
    refusal, a message, a signature); the API derives it from the Idempotency-Key."""
    command = event.payload.get("command")
    found = command.get("nonce") if isinstance(command, dict) else event.payload.get("nonce")
    return found if isinstance(found, str) and found else None


def _stream_id(event: MarketEvent) -> str:
    """The message key of a board event: what it is about."""
    for field_name in ("negotiation_id", "agreement_id", "order_id", "user"):
        value = event.payload.get(field_name)
        if event.kind == "negotiation-opened" and field_name != "negotiation_id":
            continue
        if isinstance(value, str) and value:
            return value
    return event.kind



class MarketService:
    def __init__(
        self,
        bootstrap: str,
        genesis: Genesis,
        *,
        accounts: Accounts,
        operator_key: PrivateKey,
        issuer_keys: Mapping[str, PrivateKey],
        topic_prefix: str = "",
        agreement_ttl_ms: int = AGREEMENT_TTL_MS_DEFAULT,
        commit_timeout_s: float = COMMIT_TIMEOUT_S_DEFAULT,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        """``operator_key``: the otc-operator's identity key (signs board events);
        ``issuer_keys``: identity keys of the issuing firms this process acts for."""
        self.genesis = genesis
        self.accounts = accounts
        self.prefix = topic_prefix
        self._bootstrap = bootstrap
        self._operator_key = operator_key
        self._issuer_keys = dict(issuer_keys)
        self.agreement_ttl_ms = agreement_ttl_ms  # for agreements signed from now on
        self._commit_timeout_s = commit_timeout_s
        self._clock_ms = clock_ms
        surveillance = genesis.member(SURVEILLANCE)
        assert surveillance is not None, "genesis lacks the surveillance institution"
        self._surveillance_sec = surveillance.public_key.sec
        self.board_state = Board()
        self.messages: dict[str, list[Mapping[str, Any]]] = {}
        self.refused_records: list[str] = []
        # nonce -> the event that carried it (replayed at start): a write retried after a
        # restart finds what it did (decision 0082)
        self.by_nonce: dict[str, MarketEvent] = {}
        # topic (with prefix) -> the offset after the last record this service wrote:
        # what a projection must reach to show this service's writes (read-your-writes)
        self.written_ends: dict[str, int] = {}
        self.chain = ChainView(bootstrap, genesis, topic_prefix=topic_prefix,
                               client_id="capledger-market-chain")
        self.client = LedgerClient(bootstrap, genesis, submitter=OPERATOR,
                                   signing_key=operator_key, topic_prefix=topic_prefix)
        self._writer = LogWriter(bootstrap, client_id="capledger-market")
        self._lock = asyncio.Lock()
        self._issue_locks: dict[str, asyncio.Lock] = {}
        self._settling: set[str] = set()
        self._pending: list[_Pending] = []
        self._batcher: asyncio.Task[None] | None = None
        self._party_locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Create the market topics if missing, replay them, follow the chain (watching
        the DvPs of settlements left unfinished: ``finish_settlements``)."""
        await ensure_topics(self._bootstrap, prefix=self.prefix, specs=MARKET_TOPICS)
        await self._writer.start()
        await self.client.start()
        issuers = frozenset(m.id for m in self.genesis.members if m.may_issue)
        for spec, writers in ((MARKET_ASSETS, issuers), (MARKET_BOARD, BOARD_WRITERS),
                              (MARKET_NEGOTIATION, BOARD_WRITERS)):
            events, refused = await read_events(
                self._bootstrap, self.prefix + spec.name, self.genesis, writers,
                client_id="capledger-market-replay")
            self.refused_records.extend(refused)
            for recorded in events:
                self._replay(recorded)
        for agreement in unfinished_settlements(self.board_state):
            assert agreement.sent_txid is not None
            self.chain.watch(bytes.fromhex(agreement.sent_txid)[::-1])
        await self.chain.start()
        await self.chain.wait_caught_up(timeout_s=self._commit_timeout_s)

    async def finish_settlements(self) -> list[str]:
        """Complete every settlement whose DvP was logged and sent but neither confirmed
        nor refused (the process stopped in between; decision 0132): confirmed when the
        chain holds it, else sent again, as it is, and the ledger's verdict recorded.
        Returns the agreement ids finished (settled or failed); one that cannot be
        finished now (no verdict yet, brokers away) is logged and left for the API
        server's next pass (decision 0133) or a retried request. One a request is
        settling now is left to that request."""
        finished = []
        for agreement in unfinished_settlements(self.board_state):
            if agreement.agreement_id in self._settling:  # a request is finishing it now
                continue
            try:
                await self.settle(agreement.agreement_id)
            except (MarketError, TimeoutError) as error:
                code = getattr(error, "code", type(error).__name__)
                known = self.board_state.agreements.get(agreement.agreement_id)
                if known is None or (known.failed_code is None and
                                     agreement.agreement_id not in self.board_state.trades):
                    logger.warning("settlement of %s not finished: %s: %s",
                                   agreement.agreement_id, code, error)
                    continue
            finished.append(agreement.agreement_id)
        return finished

    def left_unfinished(self) -> list[str]:
        """The agreements ``finish_settlements`` has still to finish: logged and sent,
        neither confirmed nor refused, and no request settling them now."""
        return [agreement.agreement_id for agreement in unfinished_settlements(self.board_state)
                if agreement.agreement_id not in self._settling]

    async def stop(self) -> None:
        await self.chain.stop()
        await self.client.stop()
        await self._writer.stop()

    def _replay(self, recorded: Recorded) -> None:
        try:
            self._apply(recorded.event)
        except (ValidationError, KeyError, TypeError, ValueError) as error:
            self.refused_records.append(f"offset {recorded.offset}: {error}")

    def _apply(self, event: MarketEvent) -> None:
        self.board_state = apply_event(self.board_state, event)
        self._index(event)

    def _index(self, event: MarketEvent) -> None:
        nonce = nonce_of(event)
        if nonce is not None:
            self.by_nonce.setdefault(nonce, event)
        if event.kind == "message-sent":
            self.messages.setdefault(str(event.payload["negotiation_id"]), []).append(
                event.payload)

    async def _record(self, topic: str, event: MarketEvent, stream_id: str, *,
                      writer: str = OPERATOR, key: PrivateKey | None = None) -> None:
        """Write the event (acknowledged by the broker), then apply it."""
        value = envelope(event, stream_id, writer=writer, key=key or self._operator_key,
                         now_ms=self._clock_ms())
        offset = await self._writer.send(self.prefix + topic, value, key=stream_id.encode())
        self._wrote(self.prefix + topic, offset)
        self._apply(event)

    def _wrote(self, topic: str, offset: int) -> None:
        self.written_ends[topic] = max(self.written_ends.get(topic, 0), offset + 1)

    def _refusal(self, error: ValidationError, kind: str, user: str,
                 order_id: str | None = None, nonce: str | None = None) -> MarketEvent:
        payload = {"command_kind": kind, "code": error.code, "message": error.message[:500],
                   "user": user, "order_id": order_id, "at_ms": self._clock_ms()}
        if nonce is not None:
            payload["nonce"] = nonce
        return MarketEvent("command-refused", payload)

    async def _refuse(self, error: MarketError, kind: str, user: str,
                      order_id: str | None = None, nonce: str | None = None) -> None:
        await self._record(MARKET_BOARD.name,
                           self._refusal(error, kind, user, order_id, nonce), order_id or user)

    async def _decide(self, decide: Callable[[Board], MarketEvent], kind: str, user: str,
                      order_id: str | None = None, nonce: str | None = None) -> MarketEvent:
        """Decide a board command in log order and record its event (or its refusal, then
        raise it). Commands arriving together are decided as one batch against the board
        as it stands after the previous ones, written in one broker round trip, and
        applied only once the broker acknowledged the whole batch (group commit)."""
        future: asyncio.Future[MarketEvent] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(decide, kind, user, order_id, future, nonce))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._decide_batches(), name="market-board")
        return await future

    async def _decide_batches(self) -> None:
        while self._pending:
            batch = self._pending[:DECISION_BATCH_MAX]
            del self._pending[:len(batch)]
            try:
                async with self._lock:
                    await self._decide_batch(batch)
            except Exception as error:  # the broker failed: nobody's command took effect
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)

    async def _decide_batch(self, batch: list[_Pending]) -> None:
        board = self.board_state
        decided: list[tuple[_Pending, MarketEvent, ValidationError | None]] = []
        for pending in batch:
            try:
                event, refused = pending.decide(board), None
            except ValidationError as error:
                event = self._refusal(error, pending.kind, pending.user, pending.order_id,
                                      pending.nonce)
                refused = error
            board = apply_event(board, event)
            decided.append((pending, event, refused))
        now_ms = self._clock_ms()
        offsets = await self._writer.send_many(self.prefix + MARKET_BOARD.name, [
            (_stream_id(event).encode(),
             envelope(event, _stream_id(event), writer=OPERATOR, key=self._operator_key,
                      now_ms=now_ms))
            for _, event, _ in decided])
        self._wrote(self.prefix + MARKET_BOARD.name, max(offsets, default=-1))
        self.board_state = board
        for pending, event, refused in decided:
            self._index(event)
            if pending.future.done():
                continue
            if refused is None:
                pending.future.set_result(event)
            else:
                pending.future.set_exception(refused)

    # ------------------------------------------------------------------ assets

    async def register_asset(self, issuer: str, definition: AssetDefinition) -> RegisteredAsset:
        """Register an asset's terms (signed by the issuing firm on market.assets.v1) and
        park native value at its issuing script so it can be issued. The asset id is the
        issuer's per-definition issuing script's (pay-to-contract, decision 0070)."""
        key = self._issuer_key(issuer)
        if definition.issuer != issuer:
            raise MarketError(f"definition names issuer {definition.issuer!r}, not {issuer!r}",
                              code="asset-issuer-mismatch")
        script = issuing_script(key.public_key, definition.definition_hash)
        registered_id = asset_id(script)
        async with self._lock:
            existing = self.board_state.assets.get(definition.security_code)
            if existing is not None:
                if existing.definition == definition:
                    return existing
                raise MarketError(f"{definition.security_code} is registered with other terms; "
                                  "terms never change", code="asset-terms-frozen")
            event = MarketEvent("asset-registered", {
                "asset_id": registered_id, "definition": definition.to_dict(),
                "at_ms": self._clock_ms()})
            await self._record(MARKET_ASSETS.name, event, definition.security_code,
                               writer=issuer, key=key)
        if not any(True for _ in self._coins_at(script)):
            await self._fund(issuer, key, script)
        return self.board_state.asset(definition.security_code)

    async def issue(self, issuer: str, security_code: str, to_user: Account,
                    quantity: int, *, prepared: Transaction | None = None,
                    before_send: BeforeSend | None = None,
                    after_send: AfterSend | None = None) -> IssueResult:
        """Issue ``quantity`` units of a registered asset to a user's address (an Open
        Assets issuance from the asset's issuing script), wait until committed.

        Restart-safe callers (the API, decision 0083): ``before_send`` gets the signed
        transaction before it goes to the broker (the API records it, fsynced);
        ``prepared`` is such a recorded transaction, sent again as it is and never
        rebuilt from other coins (a rebuild would issue twice); ``after_send`` runs once
        the broker acknowledged it."""
        key = self._issuer_key(issuer)
        registered = self.board_state.asset(security_code)
        if registered.definition.issuer != issuer:
            raise MarketError(f"{security_code} is issued by {registered.definition.issuer}",
                              code="asset-issuer-mismatch")
        units = check_quantity(quantity)
        signing = issuing_private_key(key, registered.definition.definition_hash)
        script = issuing_script(key.public_key, registered.definition.definition_hash)
        if prepared is not None and not any(out.script_pubkey == to_user.script
                                            for out in prepared.outputs):
            raise MarketError(f"the recorded transaction {prepared.txid} pays nothing to "
                              f"{to_user.user_id}", code="issue-record-mismatch")
        async with self._issue_locks.setdefault(issuer, asyncio.Lock()):
            tx = prepared
            if tx is None:
                wallet = Wallet(KeyStore().with_key(signing), tuple(self._coins_at(script)))
                psbt = wallet.issue(units, to_user.script, issuer_script=script,
                                    definition=registered.definition,
                                    data_outputs=(terms_output(registered.definition),))
                tx = psbt.add_signatures(KeyStore().with_key(signing)).finalize()
            if before_send is not None:
                await before_send(tx)
            height = await self._commit(tx, f"issue/{security_code}/{tx.txid}",
                                        sent=after_send)
        return IssueResult(tx.txid, height, registered.asset_id, units)

    async def issue_many(self, issuer: str, security_code: str,
                         grants: list[tuple[Account, int]]) -> IssueResult:
        """One issuance paying several users (outputs before the marker, one quantity
        each, as Open Assets allows): bulk onboarding in one block."""
        key = self._issuer_key(issuer)
        registered = self.board_state.asset(security_code)
        if registered.definition.issuer != issuer:
            raise MarketError(f"{security_code} is issued by {registered.definition.issuer}",
                              code="asset-issuer-mismatch")
        if not 1 <= len(grants) <= ISSUE_GRANTS_MAX:
            raise MarketError(f"1..{ISSUE_GRANTS_MAX} recipients per issuance",
                              code="market-quantity-invalid")
        units = [check_quantity(quantity) for _, quantity in grants]
        definition = registered.definition
        signing = issuing_private_key(key, definition.definition_hash)
        script = issuing_script(key.public_key, definition.definition_hash)
        async with self._issue_locks.setdefault(issuer, asyncio.Lock()):
            coins = [c for c in self._coins_at(script) if c.asset_id is None]
            if not coins:
                raise MarketError(f"no native coin at {security_code}'s issuing script",
                                  code="wallet-no-issuing-coin")
            coin = coins[0]
            outputs = [TxOut(0, account.script) for account, _ in grants]
            outputs.append(TxOut(0, build_marker(units, definition.reference())))
            outputs.append(TxOut(coin.value, script))
            outputs.append(TxOut(0, terms_output(definition)))
            psbt = PartiallySignedTx.create(Transaction(1, (TxIn(coin.outpoint),),
                                                        tuple(outputs), 0), [coin])
            tx = psbt.add_signatures(KeyStore().with_key(signing)).finalize()
            height = await self._commit(tx, f"issue/{security_code}/{tx.txid}")
        return IssueResult(tx.txid, height, registered.asset_id, sum(units))

    # ------------------------------------------------------------------ the board

    async def post_order(self, principal: Principal, security_code: str, side: str,
                         price: Decimal | str, quantity: int, *,
                         nonce: str | None = None) -> Order:
        """등록·게시: post an order; accepted only if the user holds the units (sell) or
        the cash (buy) not already committed to open orders. ``nonce``: the command's
        (a fresh one when None), as for every command below."""
        account = self.accounts.check(principal)
        check_id(security_code, "security code")
        command = self._command(account, "post", nonce, security_code=security_code,
                                side=side, price=_raw(price), quantity=_raw(quantity))
        signature = self._sign_command(principal, command)
        event = await self._decide(
            lambda board: decide_post(board, command, signature, self._holdings(account),
                                      now_ms=self._clock_ms()),
            "post", principal.key, nonce=command["nonce"])
        return self.board_state.order(str(event.payload["order_id"]))

    async def amend_order(self, principal: Principal, order_id: str, *,
                          price: Decimal | str | None = None,
                          quantity: int | None = None, nonce: str | None = None) -> Order:
        """정정: the poster changes price and/or quantity (waiting or negotiating orders)."""
        account = self.accounts.check(principal)
        check_id(order_id, "order id")
        current = self.board_state.orders.get(order_id)
        fields: dict[str, Any] = {"order_id": order_id,
                                  "version": current.version if current else 0}
        if price is not None:
            fields["price"] = _raw(price)
        if quantity is not None:
            fields["quantity"] = _raw(quantity)
        command = self._command(account, "amend", nonce, **fields)
        signature = self._sign_command(principal, command)
        await self._decide(
            lambda board: decide_amend(board, command, signature, self._holdings(account),
                                       now_ms=self._clock_ms()),
            "amend", principal.key, order_id, nonce=command["nonce"])
        return self.board_state.order(order_id)

    async def cancel_order(self, principal: Principal, order_id: str, *,
                           nonce: str | None = None) -> Order:
        """취소: the poster withdraws an order; its negotiation (if any) closes."""
        account = self.accounts.check(principal)
        check_id(order_id, "order id")
        command = self._command(account, "cancel", nonce, order_id=order_id)
        signature = self._sign_command(principal, command)
        await self._decide(
            lambda board: decide_cancel(board, command, signature, now_ms=self._clock_ms()),
            "cancel", principal.key, order_id, nonce=command["nonce"])
        return self.board_state.order(order_id)

    async def expire_orders(self, *, ttl_ms: int = ORDER_TTL_MS_DEFAULT) -> list[Order]:
        """만료: the operator retires waiting orders older than ``ttl_ms`` (one
        ``order-expired`` event each); run periodically or by `capledger market expire`."""
        async with self._lock:
            events = decide_expiries(self.board_state, now_ms=self._clock_ms(), ttl_ms=ttl_ms)
            for event in events:
                await self._record(MARKET_BOARD.name, event, str(event.payload["order_id"]))
        return [self.board_state.order(str(e.payload["order_id"])) for e in events]

    # ------------------------------------------------------------------ negotiation

    async def join_order(self, principal: Principal, order_id: str, *,
                         nonce: str | None = None) -> Negotiation:
        """거래참여: join another user's waiting order; opens a negotiation whose fresh
        key is sealed to the poster, the joiner and surveillance only."""
        account = self.accounts.check(principal)
        check_id(order_id, "order id")
        command = self._command(account, "join", nonce, order_id=order_id)
        signature = self._sign_command(principal, command)
        order = self.board_state.orders.get(order_id)
        sealed: dict[str, str] = {}
        if order is not None:  # the poster's key never changes; decide_join checks the rest
            key = sealing.fresh_key()
            readers = {"poster": bytes.fromhex(order.poster.pubkey_hex),
                       "joiner": bytes.fromhex(account.pubkey_hex),
                       "surveillance": self._surveillance_sec}
            sealed = {role: sealing.seal(sec, key, _key_aad(order_id, command, role)).hex()
                      for role, sec in readers.items()}
        event = await self._decide(
            lambda board: decide_join(board, command, signature, self._holdings(account),
                                      sealed, now_ms=self._clock_ms()),
            "join", principal.key, order_id, nonce=command["nonce"])
        return self.board_state.negotiation(str(event.payload["negotiation_id"]))

    async def send_message(self, principal: Principal, negotiation_id: str, text: str, *,
                           offer_price: Decimal | str | None = None,
                           offer_quantity: int | None = None,
                           nonce: str | None = None) -> int:
        """협의: send a message (optionally a (counter-)offer) to the other party; only
        ciphertext leaves this call. Returns the message's sequence number."""
        self.accounts.check(principal)
        negotiation, role = self._party(principal, negotiation_id)
        offer: dict[str, Any] | None = None
        if offer_price is not None or offer_quantity is not None:
            terms = terms_for(self.board_state, negotiation_id, _raw(offer_price),
                              _raw(offer_quantity))
            offer = {"price": price_text(terms.price), "quantity": terms.quantity}
        plaintext = json.dumps({"text": text, "offer": offer}, sort_keys=True,
                               ensure_ascii=False).encode("utf-8")
        if len(plaintext) > MESSAGE_BYTES_MAX:
            raise MarketError(f"message over {MESSAGE_BYTES_MAX} bytes", code="message-too-long")
        key = self._negotiation_key(principal, negotiation, role)
        async with self._lock:
            sequence = len(self.messages.get(negotiation_id, []))
            aad = _message_aad(negotiation_id, sequence, principal.key)
            payload = {
                "negotiation_id": negotiation_id, "sequence": sequence,
                "sender": principal.key,
                "ciphertext": base64.b64encode(sealing.encrypt(key, plaintext, aad)).decode(),
                "at_ms": self._clock_ms()}
            if nonce is not None:
                payload["nonce"] = nonce
            event = MarketEvent("message-sent", payload)
            await self._record(MARKET_NEGOTIATION.name, event, negotiation_id)
        return sequence

    def read_messages(self, principal: Principal, negotiation_id: str) -> list[Message]:
        """The negotiation's messages, decrypted for one of its two parties."""
        self.accounts.check(principal)
        negotiation, role = self._party(principal, negotiation_id)
        key = self._negotiation_key(principal, negotiation, role)
        return self._decrypt_all(negotiation_id, key)

    def read_messages_as_surveillance(self, surveillance_key: PrivateKey,
                                      negotiation_id: str) -> list[Message]:
        """What the surveillance institution reads with its own identity key."""
        negotiation = self.board_state.negotiation(negotiation_id)
        key = sealing.unseal(surveillance_key, bytes.fromhex(negotiation.sealed_keys[
            SURVEILLANCE]), self._opened_aad(negotiation, SURVEILLANCE))
        return self._decrypt_all(negotiation_id, key)

    # ------------------------------------------------------------------ agreement

    async def agree(self, principal: Principal, negotiation_id: str, price: Decimal | str,
                    quantity: int, *, nonce: str | None = None) -> Agreement:
        """협상확정: sign the terms; they must equal the last offer in the negotiation (the
        party's own decrypted view) and, for the second signer, the first's terms."""
        self.accounts.check(principal)
        self._party(principal, negotiation_id)
        terms = terms_for(self.board_state, negotiation_id, _raw(price), _raw(quantity))
        offers = [(m.offer_price, m.offer_quantity)
                  for m in self.read_messages(principal, negotiation_id)
                  if m.offer_price is not None and m.offer_quantity is not None]
        order_id = terms.order_id
        try:
            check_matches_offer(terms, offers[-1] if offers else None)
        except MarketError as error:
            async with self._lock:
                await self._refuse(error, "agree", principal.key, order_id, nonce)
            raise
        signature = self.accounts.signer(principal.firm, principal.user_id).sign_digest(
            principal, digest(terms.to_dict(), tag="terms"))
        async with self._lock:
            try:
                event = decide_sign(self.board_state, terms.to_dict(), principal.key, signature,
                                    now_ms=self._clock_ms(), ttl_ms=self.agreement_ttl_ms)
            except MarketError as error:
                await self._refuse(error, "agree", principal.key, order_id, nonce)
                raise
            if nonce is not None:
                event = MarketEvent(event.kind, {**event.payload, "nonce": nonce})
            await self._record(MARKET_BOARD.name, event, terms.terms_hash)
        return self.board_state.agreement(terms.terms_hash)

    # ------------------------------------------------------------------ settlement

    async def settle(self, agreement_id: str, *, sending: Sending | None = None) -> Trade:
        """거래: one DvP transaction — bond units seller->buyer, cash buyer->seller, each
        party's custodian signing its own inputs against the agreement its user signed —
        committed by the nodes whole or not at all; then the trade is confirmed.
        ``sending``: a restart-safe caller's hooks and recorded transaction (decision
        0083; as for ``issue``)."""
        check_id(agreement_id, "agreement id")
        async with self._lock:
            try:
                if agreement_id in self._settling:
                    raise MarketError(f"agreement {agreement_id} is being settled",
                                      code="agreement-settling")
                agreement = check_settleable(self.board_state, agreement_id,
                                             now_ms=self._now_unless_sent(agreement_id, sending))
            except MarketError as error:
                known = self.board_state.agreements.get(agreement_id)
                if known is not None and error.code == "agreement-expired":
                    # A lapsed agreement ends: its order reopens for negotiation and
                    # what it held back is released. Nothing moves on the ledger.
                    event = MarketEvent("settlement-failed", {
                        "agreement_id": agreement_id, "code": error.code,
                        "message": error.message[:500], "at_ms": self._clock_ms()})
                    await self._record(MARKET_BOARD.name, event, agreement_id)
                    raise
                await self._refuse(error, "settle", OPERATOR,
                                   known.terms.order_id if known is not None else None)
                raise
            self._settling.add(agreement_id)
        try:
            # One settlement at a time per party: a second DvP of the same seller or buyer
            # is built after the first committed, from its change, never from the same
            # coins (which the nodes would refuse as a double spend).
            async with contextlib.AsyncExitStack() as stack:
                for key in sorted({agreement.terms.seller.key, agreement.terms.buyer.key}):
                    await stack.enter_async_context(
                        self._party_locks.setdefault(key, asyncio.Lock()))
                return await self._settle(agreement, sending or Sending())
        finally:
            self._settling.discard(agreement_id)

    def _now_unless_sent(self, agreement_id: str, sending: Sending | None) -> int:
        """The time an agreement's expiry is checked against: none when its DvP is known
        committed already (it settled in time; only the confirmation is missing), or
        was logged and sent (the ledger's verdict on it decides, not the clock:
        decision 0132)."""
        if sending is not None and sending.committed_height is not None:
            return 0
        known = self.board_state.agreements.get(agreement_id)
        if known is not None and known.sent_txid is not None:
            return 0
        return self._clock_ms()

    async def _settle(self, agreement: Agreement, sending: Sending) -> Trade:
        terms = agreement.terms
        # The market's own log holds the DvP sent before, if one was: that very
        # transaction, whatever the caller brings (decision 0132).
        logged = logged_dvp(agreement)
        tx = logged or sending.prepared
        resent = tx is not None
        height = sending.committed_height
        if logged is not None and height is None:
            height = self.chain.committed_height(logged.hash_le)
        if tx is None:
            try:
                seller = self._account_of(terms.seller.key, terms.seller.pubkey_hex)
                buyer = self._account_of(terms.buyer.key, terms.buyer.pubkey_hex)
                psbt = build_dvp(terms, self.chain.state, seller.script, buyer.script,
                                 self.board_state.cash_assets())
                for party in (seller, buyer):
                    psbt = sign_for_party(self.accounts.signer(party.firm, party.user_id),
                                          party, agreement, psbt,
                                          self.board_state.cash_assets())
                tx = psbt.finalize()
                if tx.size_bytes > DVP_TX_BYTES_MAX:  # could not be logged before sending
                    raise MarketError(f"the DvP transaction has {tx.size_bytes} bytes, more "
                                      f"than {DVP_TX_BYTES_MAX}: too many coins",
                                      code="settlement-tx-too-large")
            except MarketError as error:
                await self._failed(agreement, error.code, error.message)
                raise
        if height is None:
            # A copy committed before the chain view watched it shows no height there:
            # then the caller looks it up elsewhere (LedgerRejected, the API's projection).
            watched_before = self.chain.watching(tx.hash_le)
            self.chain.watch(tx.hash_le)  # its height, whichever copy commits
            if logged is None:  # in the log before anything leaves the process;
                # settlements arriving together share one broker round trip (group commit)
                await self._decide(functools.partial(
                    _sent_event, agreement.agreement_id, tx, self._clock_ms()), "settle",
                    OPERATOR, agreement.terms.order_id)
            if sending.before_send is not None:
                await sending.before_send(tx)
            outcome = await self._submit(tx, f"settle/{agreement.agreement_id}",
                                         sent=sending.after_send)
            if not outcome.committed or outcome.height is None:
                if resent and outcome.code in DUPLICATE_CODES:
                    if logged is not None and watched_before:
                        # sent before: its commit is on its way, or in the chain view
                        height = await self.chain.wait_committed(
                            logged.hash_le, timeout_s=self._commit_timeout_s)
                        return await self._confirmed(agreement, tx, height)
                    # the recorded DvP was sent before and committed: not a failure
                    raise LedgerRejected(f"{tx.txid} was sent before", rejection_code=
                                         outcome.code, txid=tx.txid)
                self.chain.unwatch(tx.hash_le)
                await self._failed(agreement, f"settlement-rejected:{outcome.code}",
                                   outcome.message or "")
                raise MarketError(f"the nodes rejected the DvP transaction: {outcome.code}",
                                  code="settlement-rejected")
            height = int(outcome.height)
        return await self._confirmed(agreement, tx, height)

    async def _confirmed(self, agreement: Agreement, tx: Transaction, height: int) -> Trade:
        """The trade confirmed (``trade-settled``) once the chain view holds its height."""
        await self.chain.wait_height(height, timeout_s=self._commit_timeout_s)
        self.chain.unwatch(tx.hash_le)
        block_hash = display_hex(self.chain.block_hashes[height])
        async with self._lock:
            event = MarketEvent("trade-settled", {
                "agreement_id": agreement.agreement_id, "txid": tx.txid,
                "height": height, "block_hash": block_hash,
                "committed_at_ms": self.chain.block_times_ms.get(height, 0),
                "at_ms": self._clock_ms()})
            await self._record(MARKET_BOARD.name, event, agreement.agreement_id)
        return self.board_state.trades[agreement.agreement_id]

    async def _failed(self, agreement: Agreement, code: str, message: str) -> None:
        async with self._lock:
            event = MarketEvent("settlement-failed", {
                "agreement_id": agreement.agreement_id, "code": code,
                "message": message[:500], "at_ms": self._clock_ms()})
            await self._record(MARKET_BOARD.name, event, agreement.agreement_id)

    # ------------------------------------------------------------------ reading

    def board(self, *, include_closed: bool = False) -> list[Order]:
        """호가게시판: orders, newest first (open ones only unless ``include_closed``)."""
        from ledger.market import OPEN_STATUSES

        orders = [o for o in self.board_state.orders.values()
                  if include_closed or o.status in OPEN_STATUSES]
        return sorted(orders, key=lambda o: (-o.posted_at_ms, o.order_id))

    def order_history(self, order_id: str) -> tuple[MarketEvent, ...]:
        self.board_state.order(order_id)
        return self.board_state.history.get(order_id, ())

    def negotiations(self, principal: Principal) -> list[Negotiation]:
        """The negotiations the user takes part in (as poster or joiner), newest first."""
        self.accounts.check(principal)
        found = [n for n in self.board_state.negotiations.values()
                 if principal.key in (n.poster.key, n.joiner.key)]
        return sorted(found, key=lambda n: (-n.opened_at_ms, n.negotiation_id))

    def agreements(self, principal: Principal) -> list[Agreement]:
        """Agreements the user is a party to (signing, agreed, settled or failed)."""
        self.accounts.check(principal)
        return [a for a in self.board_state.agreements.values()
                if principal.key in (a.terms.seller.key, a.terms.buyer.key)]

    def trades(self, principal: Principal | None = None) -> list[Trade]:
        """거래확인: confirmed trades; a user sees only their own (None: all, for the
        operator and surveillance)."""
        found = list(self.board_state.trades.values())
        if principal is not None:
            self.accounts.check(principal)
            found = [t for t in found if principal.key in (t.terms.seller.key,
                                                           t.terms.buyer.key)]
        return sorted(found, key=lambda t: (t.height, t.txid))

    def balance(self, principal: Principal) -> Balance:
        """나의 잔고 조회: the user's units per security and KRW cash, from the chain."""
        account = self.accounts.check(principal)
        return self.balance_of(account)

    def balance_of(self, account: Account) -> Balance:
        holdings = self._holdings(account)
        securities = {}
        for registered in self.board_state.assets.values():
            if registered.asset_id in self.board_state.cash_assets():
                continue
            units = holdings.get(registered.asset_id, 0)
            if units:
                securities[registered.definition.security_code] = units
        return Balance(f"{account.firm}/{account.user_id}", account.address, securities,
                       holdings.get(CASH_UNIT, 0), self.board_state.committed(account.user),
                       self.chain.height)

    # ------------------------------------------------------------------ helpers

    def _issuer_key(self, issuer: str) -> PrivateKey:
        member = self.genesis.member(issuer)
        key = self._issuer_keys.get(issuer)
        if member is None or not member.may_issue:
            raise MarketError(f"{issuer!r} is not a member issuer", code="asset-issuer-not-member")
        if key is None:
            raise MarketError(f"this service holds no key of {issuer}", code="issuer-key-missing")
        return key

    def _coins_at(self, script: bytes) -> list[Any]:
        from ledger.state import utxos_of
        from ledger.wallet import Coin

        return [Coin(outpoint, e.value, e.script_pubkey, e.asset_id, e.quantity, e.height)
                for outpoint, e in utxos_of(self.chain.state, script)]

    def _holdings(self, account: Account) -> dict[str, int]:
        from ledger.state import utxos_of

        held: dict[str, int] = {}
        for _, entry in utxos_of(self.chain.state, account.script):
            if entry.asset_id is not None:
                held[entry.asset_id] = held.get(entry.asset_id, 0) + entry.quantity
        held[CASH_UNIT] = sum(held.get(cash, 0) for cash in self.board_state.cash_assets())
        return held

    async def _fund(self, issuer: str, key: PrivateKey, script: bytes) -> None:
        keystore = KeyStore().with_key(key)
        async with self._issue_locks.setdefault(issuer, asyncio.Lock()):
            wallet = Wallet.from_state(keystore, self.chain.state)
            try:
                psbt = wallet.pay(None, ISSUER_FUNDING_VALUE, script)
            except ValidationError as error:
                raise MarketError(f"{issuer} has no native value to fund issuance: {error}",
                                  code="issuer-no-funds") from None
            tx = psbt.add_signatures(keystore).finalize()
            await self._commit(tx, f"fund/{tx.txid}")

    async def _submit(self, tx: Transaction, idempotency_key: str, *,
                      sent: AfterSend | None = None) -> Any:
        await self.client.submit(tx, idempotency_key=idempotency_key[:128])
        if sent is not None:
            sent(tx)
        try:
            outcomes = await self.client.wait([tx.txid], timeout_s=self._commit_timeout_s)
        except TimeoutError:
            raise MarketError(f"no outcome for {tx.txid} in {self._commit_timeout_s} s",
                              code="ledger-timeout") from None
        return outcomes[tx.txid]

    async def _commit(self, tx: Transaction, idempotency_key: str, *,
                      sent: AfterSend | None = None) -> int:
        outcome = await self._submit(tx, idempotency_key, sent=sent)
        if not outcome.committed or outcome.height is None:
            raise LedgerRejected(f"the nodes rejected {tx.txid}: {outcome.code}: "
                                 f"{outcome.message}", rejection_code=outcome.code)
        await self.chain.wait_height(outcome.height, timeout_s=self._commit_timeout_s)
        return int(outcome.height)

    def _command(self, account: Account, kind: str, nonce: str | None = None,
                 **fields: Any) -> dict[str, Any]:
        return {"kind": kind, "user": account.user.to_dict(),
                "nonce": nonce or uuid.uuid4().hex, "at_ms": self._clock_ms(), **fields}

    def _sign_command(self, principal: Principal, command: Mapping[str, Any]) -> str:
        return self.accounts.signer(principal.firm, principal.user_id).sign_digest(
            principal, digest(command, tag="command"))

    def _party(self, principal: Principal, negotiation_id: str) -> tuple[Negotiation, str]:
        negotiation = self.board_state.negotiation(check_id(negotiation_id, "negotiation id"))
        if principal.key == negotiation.poster.key:
            return negotiation, "poster"
        if principal.key == negotiation.joiner.key:
            return negotiation, "joiner"
        raise MarketError("only the two parties take part in a negotiation",
                          code="negotiation-not-party")

    def _opened_aad(self, negotiation: Negotiation, role: str) -> bytes:
        opened = next(e for e in self.board_state.history[negotiation.order_id]
                      if e.kind == "negotiation-opened"
                      and e.payload["negotiation_id"] == negotiation.negotiation_id)
        return _key_aad(negotiation.order_id, opened.payload["command"], role)

    def _negotiation_key(self, principal: Principal, negotiation: Negotiation,
                         role: str) -> bytes:
        return self.accounts.signer(principal.firm, principal.user_id).unseal(
            principal, bytes.fromhex(negotiation.sealed_keys[role]),
            self._opened_aad(negotiation, role))

    def _decrypt_all(self, negotiation_id: str, key: bytes) -> list[Message]:
        sealed: list[tuple[int, str, bytes, int]] = []
        for payload in self.messages.get(negotiation_id, []):
            try:
                sealed.append((int(payload["sequence"]), str(payload["sender"]),
                               base64.b64decode(str(payload["ciphertext"])),
                               int(payload["at_ms"])))
            except (ValueError, KeyError, TypeError):
                self.refused_records.append(
                    f"negotiation {negotiation_id} message {payload.get('sequence')}: "
                    "malformed; skipped")
        found, skipped = decrypt_messages(key, negotiation_id, sealed)
        self.refused_records.extend(
            f"negotiation {negotiation_id} message {sequence}: does not decrypt to a "
            "message; skipped" for sequence in skipped)
        return found

    def _account_of(self, user_key: str, pubkey_hex: str) -> Account:
        firm, _, user_id = user_key.partition("/")
        account = self.accounts.signer(firm, user_id).account(user_id)
        if account.pubkey_hex != pubkey_hex:
            raise MarketError(f"{user_key}'s key changed since the agreement",
                              code="account-key-mismatch")
        return account


def _sent_event(agreement_id: str, tx: Transaction, now_ms: int, board: Board) -> MarketEvent:
    """``settlement-sent`` for the board's agreement (decision 0132), refused here with
    its code when it does not apply, so a batch of board commands never fails on it."""
    event = settlement_sent(board.agreement(agreement_id), tx.serialize(), tx.txid,
                            now_ms=now_ms)
    apply_event(board, event)
    return event


def _raw(value: object) -> object:
    """A command field as the user gave it: Decimal as text (precision kept), floats
    refused later by the rules, everything else unchanged."""
    if isinstance(value, Decimal):
        return str(value)
    return value


def decrypt_messages(key: bytes, negotiation_id: str,
                     sealed: list[tuple[int, str, bytes, int]]) -> tuple[list[Message], list[int]]:
    """A negotiation's messages (sequence, sender, ciphertext, sent at ms) decrypted
    with its key; the sequences that do not decrypt to a message are skipped."""
    found: list[Message] = []
    skipped: list[int] = []
    for sequence, sender, ciphertext, at_ms in sealed:
        aad = _message_aad(negotiation_id, sequence, sender)
        try:
            plain = json.loads(sealing.decrypt(key, ciphertext, aad))
            offer = plain.get("offer")
            if not isinstance(plain.get("text"), str) or not (
                    offer is None or isinstance(offer, dict)):
                raise ValueError("not a message")
            found.append(Message(
                sequence, sender, str(plain["text"]),
                parse_price(offer["price"]) if offer else None,
                int(offer["quantity"]) if offer else None, at_ms))
        except (ValidationError, ValueError, KeyError, TypeError, AttributeError):
            skipped.append(sequence)
    return found, skipped


def negotiation_key_aad(order_id: str, nonce: str, role: str) -> bytes:
    """What a negotiation key is sealed to a reader under (the opening command's nonce)."""
    return _key_aad(order_id, {"nonce": nonce}, role)


def _key_aad(order_id: str, command: Mapping[str, Any], role: str) -> bytes:
    return f"capital-ledger/negotiation-key/v1/{order_id}/{command['nonce']}/{role}".encode()


def _message_aad(negotiation_id: str, sequence: int, sender: str) -> bytes:
    return f"capital-ledger/negotiation-message/v1/{negotiation_id}/{sequence}/{sender}".encode()


__all__ = ["Balance", "IssueResult", "LedgerRejected", "MarketService", "Message", "Sending",
           "Side",
           "decrypt_messages", "negotiation_key_aad"]

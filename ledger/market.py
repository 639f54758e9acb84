"""The OTC bond market's rules: the quote board (호가게시판), negotiation, agreement and
the delivery-versus-payment amounts. Decision: docs/decisions/0070-otc-market.md.

Owns:
- prices and quantities: ``parse_price`` (KRW with at most two decimals, Decimal only),
  ``check_quantity`` (a positive whole number of units) and ``settlement_amount`` (price
  x quantity in whole won, fractions of a won truncated: ROUND_DOWN);
- ``Order`` / ``Negotiation`` / ``Agreement`` / ``Trade`` and ``Board``, the market's
  state as a fold over its events: ``apply_event(board, event) -> board``;
- the commands' rules, each ``decide_*(board, ...) -> MarketEvent`` (raises
  ``MarketError`` with a stable code and changes nothing);
- canonical bytes and hashes of commands and agreement terms (what users sign).

Pure: no I/O, no clock (times come in as ``now_ms``), no randomness.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any

from ledger.assets import AssetDefinition
from ledger.errors import ValidationError
from ledger.keys import PublicKey, verify_der
from ledger.tx import Transaction

PRICE_DECIMALS = 2  # the seed's board: KRW with two decimals (11578.50)
PRICE_MAX = Decimal("1000000000")  # one unit never costs a billion won: a typo
QUANTITY_MAX = 10**12  # units in one order
MESSAGE_BYTES_MAX = 4_096  # plaintext of one negotiation message
AGREEMENT_TTL_MS_DEFAULT = 10 * 60 * 1000  # an agreement settles within ten minutes or lapses
ORDER_TTL_MS_DEFAULT = 24 * 60 * 60 * 1000  # a quote nobody joined leaves the board after a day
ORDERS_OPEN_MAX = 100_000  # open orders the board holds (a bound, not a business rule)
USER_ID_CHARS_MAX = 64
ID_CHARS_MAX = 64  # order, negotiation, agreement ids and security codes as given by callers
# A DvP transaction as logged (hex) fits a market record's 64 KiB payload: ~200 inputs.
DVP_TX_BYTES_MAX = 30_000
CASH_UNIT = "KRW"


class MarketError(ValidationError):
    """A market command refused; ``code`` is stable and machine-readable."""

    code = "market"


class Side(enum.StrEnum):
    SELL = "sell"  # 매도
    BUY = "buy"  # 매수


class OrderStatus(enum.StrEnum):
    WAITING = "waiting"  # 대기
    NEGOTIATING = "negotiating"  # 협의중
    AGREED = "agreed"  # 확정
    SETTLED = "settled"  # 체결
    CANCELLED = "cancelled"  # 취소
    EXPIRED = "expired"  # 만료


OPEN_STATUSES = frozenset({OrderStatus.WAITING, OrderStatus.NEGOTIATING, OrderStatus.AGREED})


# ---------------------------------------------------------------------------
# Prices, quantities, amounts


def parse_price(value: object) -> Decimal:
    """A unit price in KRW: Decimal or text, positive, at most two decimals."""
    if isinstance(value, (bool, float)):
        raise MarketError(f"price {value!r}: give a decimal string, never a float",
                          code="market-price-invalid")
    try:
        price = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError):
        raise MarketError(f"price {value!r} is not a number", code="market-price-invalid") from None
    if not price.is_finite() or price <= 0 or price > PRICE_MAX:
        raise MarketError(f"price {value!r} must be above 0 and at most {PRICE_MAX}",
                          code="market-price-invalid")
    exponent = price.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -PRICE_DECIMALS and price != price.quantize(Decimal(1).scaleb(-PRICE_DECIMALS)):
        raise MarketError(f"price {value!r} has more than {PRICE_DECIMALS} decimals",
                          code="market-price-precision")
    return price.quantize(Decimal(1).scaleb(-PRICE_DECIMALS))


def check_quantity(value: object) -> int:
    """A quantity of units: a whole number from 1 to QUANTITY_MAX (not a bool, not 1.5)."""
    if isinstance(value, bool):
        raise MarketError(f"quantity {value!r} is not a number", code="market-quantity-invalid")
    if isinstance(value, int):
        quantity = value
    else:
        try:
            number = Decimal(str(value))
        except (InvalidOperation, ValueError):
            raise MarketError(f"quantity {value!r} is not a number",
                              code="market-quantity-invalid") from None
        if not number.is_finite() or number != number.to_integral_value():
            raise MarketError(f"quantity {value!r} is not a whole number of units",
                              code="market-quantity-fractional")
        quantity = int(number)
    if not 1 <= quantity <= QUANTITY_MAX:
        raise MarketError(f"quantity {value!r} must be 1..{QUANTITY_MAX}",
                          code="market-quantity-invalid")
    return quantity


def check_id(value: object, what: str) -> str:
    """An id or code given by a caller: a non-empty string of printable characters,
    at most ID_CHARS_MAX long (bounded before it reaches any record)."""
    if not isinstance(value, str) or not 1 <= len(value) <= ID_CHARS_MAX or (
            not value.isprintable()):
        raise MarketError(f"{what} must be 1..{ID_CHARS_MAX} printable characters",
                          code="market-bad-id")
    return value


def settlement_amount(price: Decimal, quantity: int) -> int:
    """Cash for ``quantity`` units at ``price``, in whole won: fractions of a won are
    truncated (ROUND_DOWN, 원 미만 절사), so 10016.69 x 150 = 1,502,503.5 -> 1,502,503."""
    return int((price * quantity).to_integral_value(rounding=ROUND_DOWN))


def price_text(price: Decimal) -> str:
    return f"{price.quantize(Decimal(1).scaleb(-PRICE_DECIMALS))}"


# ---------------------------------------------------------------------------
# Canonical bytes and signatures


def canonical_bytes(payload: Mapping[str, Any]) -> bytes:
    """Sorted-key JSON without whitespace, UTF-8: what hashes and signatures cover."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def digest(payload: Mapping[str, Any], *, tag: str) -> bytes:
    """SHA-256 of a domain tag and the canonical bytes (a signature for one purpose
    never verifies for another)."""
    return hashlib.sha256(f"capital-ledger/market/{tag}/v1\x00".encode() + canonical_bytes(
        payload)).digest()


def check_signature(payload: Mapping[str, Any], *, tag: str, pubkey_hex: str,
                    signature_hex: str) -> None:
    try:
        key = PublicKey.parse(bytes.fromhex(pubkey_hex))
        signature = bytes.fromhex(signature_hex)
    except (ValueError, ValidationError):
        raise MarketError("signature or key is not hex of a secp256k1 key/DER signature",
                          code="market-bad-signature") from None
    if not verify_der(key.sec, signature, digest(payload, tag=tag)):
        raise MarketError(f"{tag} signature by {pubkey_hex[:16]}... does not verify",
                          code="market-bad-signature")


# ---------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class UserRef:
    """A market participant: user id at a securities firm, and the user's key."""

    user_id: str
    firm: str
    pubkey_hex: str

    def to_dict(self) -> dict[str, str]:
        return {"user_id": self.user_id, "firm": self.firm, "pubkey": self.pubkey_hex}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserRef:
        return cls(str(data["user_id"]), str(data["firm"]), str(data["pubkey"]))

    @property
    def key(self) -> str:
        return f"{self.firm}/{self.user_id}"


@dataclass(frozen=True, slots=True)
class RegisteredAsset:
    asset_id: str
    definition: AssetDefinition
    registered_at_ms: int


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    security_code: str
    asset_id: str
    side: Side
    price: Decimal
    quantity: int
    poster: UserRef
    status: OrderStatus
    posted_at_ms: int
    updated_at_ms: int
    version: int = 1  # 1 + amendments
    negotiation_id: str | None = None

    @property
    def amount(self) -> int:
        return settlement_amount(self.price, self.quantity)


@dataclass(frozen=True, slots=True)
class Negotiation:
    negotiation_id: str
    order_id: str
    poster: UserRef
    joiner: UserRef
    opened_at_ms: int
    # sealed negotiation key per reader ("poster", "joiner", "surveillance"): hex blobs
    sealed_keys: Mapping[str, str]
    messages: int = 0
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Terms:
    """What both parties sign: who sells and buys what, at which price, how many."""

    negotiation_id: str
    order_id: str
    asset_id: str
    security_code: str
    price: Decimal
    quantity: int
    seller: UserRef
    buyer: UserRef

    @property
    def amount(self) -> int:
        return settlement_amount(self.price, self.quantity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "negotiation_id": self.negotiation_id, "order_id": self.order_id,
            "asset_id": self.asset_id, "security_code": self.security_code,
            "price": price_text(self.price), "quantity": self.quantity,
            "amount": self.amount, "seller": self.seller.to_dict(),
            "buyer": self.buyer.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Terms:
        terms = cls(str(data["negotiation_id"]), str(data["order_id"]), str(data["asset_id"]),
                    str(data["security_code"]), parse_price(data["price"]),
                    check_quantity(data["quantity"]), UserRef.from_dict(data["seller"]),
                    UserRef.from_dict(data["buyer"]))
        if int(data["amount"]) != terms.amount:
            raise MarketError("terms state an amount other than price x quantity",
                              code="agreement-amount-mismatch")
        return terms

    @property
    def terms_hash(self) -> str:
        return digest(self.to_dict(), tag="terms").hex()


@dataclass(frozen=True, slots=True)
class Agreement:
    agreement_id: str  # = terms hash
    terms: Terms
    signatures: Mapping[str, str]  # user key ("firm/user") -> DER hex over the terms
    signed_at_ms: int = 0  # when the second signature arrived
    expires_at_ms: int = 0
    settled_txid: str | None = None
    failed_code: str | None = None
    # The DvP transaction signed for it and logged before it was sent (hex), and its
    # txid: a settlement that did not finish is completed with this very transaction,
    # never with one built again from other coins (decision 0132).
    sent_txid: str | None = None
    sent_tx_hex: str | None = None

    @property
    def is_complete(self) -> bool:
        return {self.terms.seller.key, self.terms.buyer.key} <= set(self.signatures)


@dataclass(frozen=True, slots=True)
class Trade:
    """A confirmed trade (거래확인): order, negotiation, agreement, committed transaction."""

    agreement_id: str
    order_id: str
    negotiation_id: str
    txid: str
    height: int
    block_hash: str
    committed_at_ms: int
    terms: Terms


@dataclass(frozen=True, slots=True)
class MarketEvent:
    """One state change of the market: ``kind`` and its canonical JSON ``payload``."""

    kind: str
    payload: Mapping[str, Any]

    def payload_bytes(self) -> bytes:
        return canonical_bytes(self.payload)


@dataclass(frozen=True)
class Board:
    """The market's state; only ``apply_event`` makes a new one."""

    assets: Mapping[str, RegisteredAsset] = field(default_factory=dict)  # by security code
    orders: Mapping[str, Order] = field(default_factory=dict)
    history: Mapping[str, tuple[MarketEvent, ...]] = field(default_factory=dict)  # by order
    negotiations: Mapping[str, Negotiation] = field(default_factory=dict)
    agreements: Mapping[str, Agreement] = field(default_factory=dict)
    trades: Mapping[str, Trade] = field(default_factory=dict)  # by agreement id
    events: int = 0

    def asset(self, security_code: str) -> RegisteredAsset:
        found = self.assets.get(security_code)
        if found is None:
            raise MarketError(f"security {security_code!r} is not registered",
                              code="market-unknown-security")
        return found

    def asset_by_id(self, asset_id: str) -> RegisteredAsset | None:
        for registered in self.assets.values():
            if registered.asset_id == asset_id:
                return registered
        return None

    def order(self, order_id: str) -> Order:
        found = self.orders.get(order_id)
        if found is None:
            raise MarketError(f"no order {order_id!r}", code="order-unknown")
        return found

    def negotiation(self, negotiation_id: str) -> Negotiation:
        found = self.negotiations.get(negotiation_id)
        if found is None:
            raise MarketError(f"no negotiation {negotiation_id!r}", code="negotiation-unknown")
        return found

    def agreement(self, agreement_id: str) -> Agreement:
        found = self.agreements.get(agreement_id)
        if found is None:
            raise MarketError(f"no agreement {agreement_id!r}", code="agreement-unknown")
        return found

    def cash_assets(self) -> tuple[str, ...]:
        """Asset ids of registered KRW cash deposits, sorted (payment uses them in order)."""
        return tuple(sorted(
            r.asset_id for r in self.assets.values()
            if r.definition.kind in ("cash", "deposit") and r.definition.unit == CASH_UNIT
        ))

    def committed(self, user: UserRef) -> dict[str, int]:
        """Units (by asset id) and cash (under "KRW") the user's open orders and
        unsettled agreements hold back from new orders."""
        held: dict[str, int] = {}
        for order in self.orders.values():
            if order.poster.key != user.key or order.status not in OPEN_STATUSES:
                continue
            if order.status is OrderStatus.AGREED:
                continue  # counted through its agreement below
            _add_commitment(held, order.side, order.asset_id, order.quantity, order.amount)
        for agreement in self.agreements.values():
            if agreement.settled_txid is not None or not agreement.is_complete:
                continue
            terms = agreement.terms
            if agreement.failed_code is not None:
                continue
            if terms.seller.key == user.key:
                _add_commitment(held, Side.SELL, terms.asset_id, terms.quantity, terms.amount)
            if terms.buyer.key == user.key:
                _add_commitment(held, Side.BUY, terms.asset_id, terms.quantity, terms.amount)
        return held


def _add_commitment(held: dict[str, int], side: Side, asset: str, quantity: int,
                    amount: int) -> None:
    if side is Side.SELL:
        held[asset] = held.get(asset, 0) + quantity
    else:
        held[CASH_UNIT] = held.get(CASH_UNIT, 0) + amount


# ---------------------------------------------------------------------------
# Commands: each signed by its user (tag "command"), checked, turned into one event


def short_id(payload: Mapping[str, Any], tag: str) -> str:
    """A 128-bit id from a command's content (its nonce makes it unique)."""
    return digest(payload, tag=tag)[:16].hex()


def _check_command(command: Mapping[str, Any], signature_hex: str, kind: str) -> UserRef:
    if command.get("kind") != kind:
        raise MarketError(f"command kind {command.get('kind')!r} is not {kind!r}",
                          code="market-bad-command")
    try:
        user = UserRef.from_dict(command["user"])
    except (KeyError, TypeError):
        raise MarketError("command names no user", code="market-bad-command") from None
    if not user.user_id or len(user.user_id) > USER_ID_CHARS_MAX:
        raise MarketError("user id must be 1..64 characters", code="market-bad-command")
    check_signature(command, tag="command", pubkey_hex=user.pubkey_hex,
                    signature_hex=signature_hex)
    return user


def _check_available(board: Board, user: UserRef, side: Side, asset_id: str, quantity: int,
                     amount: int, holdings: Mapping[str, int], *, releasing: Order | None) -> None:
    committed = board.committed(user)
    if releasing is not None:  # an amendment frees what the order held before
        _add_commitment(committed, releasing.side, releasing.asset_id,
                        -releasing.quantity, -releasing.amount)
    if side is Side.SELL:
        free = holdings.get(asset_id, 0) - committed.get(asset_id, 0)
        if free < quantity:
            raise MarketError(f"selling {quantity} units needs them: {free} free "
                              f"(held {holdings.get(asset_id, 0)})",
                              code="market-insufficient-units")
    else:
        free = holdings.get(CASH_UNIT, 0) - committed.get(CASH_UNIT, 0)
        if free < amount:
            raise MarketError(f"buying for {amount} KRW needs the cash: {free} KRW free",
                              code="market-insufficient-cash")


def decide_post(board: Board, command: Mapping[str, Any], signature_hex: str,
                holdings: Mapping[str, int], *, now_ms: int) -> MarketEvent:
    """등록·게시: an order is accepted when its security is registered, price and
    quantity are well-formed and the poster holds the units (sell) or the cash (buy)
    not already committed to open orders."""
    user = _check_command(command, signature_hex, "post")
    registered = board.asset(str(command.get("security_code")))
    try:
        side = Side(str(command.get("side")))
    except ValueError:
        raise MarketError(f"side {command.get('side')!r} is not sell or buy",
                          code="market-bad-side") from None
    price = parse_price(command.get("price"))
    quantity = check_quantity(command.get("quantity"))
    if registered.definition.kind in ("cash", "deposit"):
        raise MarketError("cash is paid, not quoted", code="market-unknown-security")
    if sum(o.status in OPEN_STATUSES for o in board.orders.values()) >= ORDERS_OPEN_MAX:
        raise MarketError("the board is full", code="market-board-full")
    _check_available(board, user, side, registered.asset_id, quantity,
                     settlement_amount(price, quantity), holdings, releasing=None)
    order_id = short_id(command, "order")
    if order_id in board.orders:
        raise MarketError(f"order {order_id} exists (repeated nonce)", code="order-duplicate")
    return MarketEvent("order-posted", {
        "order_id": order_id, "asset_id": registered.asset_id, "command": dict(command),
        "signature": signature_hex, "at_ms": now_ms,
    })


def _own_open_order(board: Board, command: Mapping[str, Any], user: UserRef) -> Order:
    order = board.order(str(command.get("order_id")))
    if order.poster.key != user.key or order.poster.pubkey_hex != user.pubkey_hex:
        raise MarketError(f"order {order.order_id} belongs to another user",
                          code="order-not-owner")
    if order.status not in (OrderStatus.WAITING, OrderStatus.NEGOTIATING):
        raise MarketError(f"order {order.order_id} is {order.status.value}",
                          code="order-not-open")
    return order


def decide_amend(board: Board, command: Mapping[str, Any], signature_hex: str,
                 holdings: Mapping[str, int], *, now_ms: int) -> MarketEvent:
    """정정: the poster changes price and/or quantity of a waiting or negotiating order;
    the new size must still be covered. The version guards against a stale amendment."""
    user = _check_command(command, signature_hex, "amend")
    order = _own_open_order(board, command, user)
    if command.get("version") != order.version:
        raise MarketError(f"order {order.order_id} is at version {order.version}",
                          code="order-version-mismatch")
    if "price" not in command and "quantity" not in command:
        raise MarketError("an amendment changes the price, the quantity or both",
                          code="order-amend-empty")
    price = parse_price(command.get("price", price_text(order.price)))
    quantity = check_quantity(command.get("quantity", order.quantity))
    _check_available(board, user, order.side, order.asset_id, quantity,
                     settlement_amount(price, quantity), holdings, releasing=order)
    return MarketEvent("order-amended", {
        "order_id": order.order_id, "command": dict(command), "signature": signature_hex,
        "price": price_text(price), "quantity": quantity, "at_ms": now_ms,
    })


def decide_cancel(board: Board, command: Mapping[str, Any], signature_hex: str, *,
                  now_ms: int) -> MarketEvent:
    """취소: the poster withdraws a waiting or negotiating order (its negotiation closes)."""
    user = _check_command(command, signature_hex, "cancel")
    order = _own_open_order(board, command, user)
    return MarketEvent("order-cancelled", {
        "order_id": order.order_id, "command": dict(command), "signature": signature_hex,
        "at_ms": now_ms,
    })


def decide_join(board: Board, command: Mapping[str, Any], signature_hex: str,
                holdings: Mapping[str, int], sealed_keys: Mapping[str, str], *,
                now_ms: int) -> MarketEvent:
    """거래참여: another user joins a waiting order; a negotiation opens between the two.
    The joiner must hold the other side: the units (joining a buy) or the cash (a sell).
    ``sealed_keys``: the fresh negotiation key sealed to poster, joiner, surveillance."""
    user = _check_command(command, signature_hex, "join")
    order = board.order(str(command.get("order_id")))
    if order.poster.key == user.key:
        raise MarketError("a user cannot join their own order", code="order-own")
    if order.status is not OrderStatus.WAITING:
        raise MarketError(f"order {order.order_id} is {order.status.value}",
                          code="order-not-open")
    if set(sealed_keys) != {"poster", "joiner", "surveillance"}:
        raise MarketError("the negotiation key must be sealed to poster, joiner and "
                          "surveillance", code="negotiation-bad-keys")
    other = Side.BUY if order.side is Side.SELL else Side.SELL
    _check_available(board, user, other, order.asset_id, order.quantity, order.amount,
                     holdings, releasing=None)
    return MarketEvent("negotiation-opened", {
        "negotiation_id": short_id(command, "negotiation"), "order_id": order.order_id,
        "command": dict(command), "signature": signature_hex,
        "sealed_keys": dict(sealed_keys), "at_ms": now_ms,
    })


def decide_expiries(board: Board, *, now_ms: int, ttl_ms: int) -> list[MarketEvent]:
    """만료: waiting orders older than ``ttl_ms`` (since posting or their last amendment)
    leave the board; orders in negotiation stay until the negotiation ends."""
    return [
        MarketEvent("order-expired", {"order_id": order.order_id, "at_ms": now_ms})
        for order in sorted(board.orders.values(), key=lambda o: o.order_id)
        if order.status is OrderStatus.WAITING and now_ms - order.updated_at_ms > ttl_ms
    ]


def terms_for(board: Board, negotiation_id: str, price: object, quantity: object) -> Terms:
    """The terms of a negotiation at ``price`` x ``quantity`` (seller and buyer from the
    order's side); quantity may not exceed the order's."""
    negotiation = board.negotiation(negotiation_id)
    order = board.order(negotiation.order_id)
    parsed_quantity = check_quantity(quantity)
    if parsed_quantity > order.quantity:
        raise MarketError(f"quantity {parsed_quantity} exceeds the order's {order.quantity}",
                          code="agreement-quantity-exceeds")
    seller, buyer = ((order.poster, negotiation.joiner) if order.side is Side.SELL
                     else (negotiation.joiner, order.poster))
    return Terms(negotiation_id, order.order_id, order.asset_id, order.security_code,
                 parse_price(price), parsed_quantity, seller, buyer)


def check_matches_offer(terms: Terms, last_offer: tuple[Decimal, int] | None) -> None:
    """A party agrees only to the last offer made in the negotiation (checked where the
    offer can be read: by the party's own client, which decrypts the messages)."""
    if last_offer is None:
        raise MarketError("no offer was made in this negotiation", code="agreement-no-offer")
    if (terms.price, terms.quantity) != last_offer:
        raise MarketError(
            f"terms {price_text(terms.price)} x {terms.quantity} differ from the last offer "
            f"{price_text(last_offer[0])} x {last_offer[1]}", code="agreement-terms-mismatch")


def decide_sign(board: Board, terms_payload: Mapping[str, Any], user_key: str,
                signature_hex: str, *, now_ms: int, ttl_ms: int) -> MarketEvent:
    """협상확정: one party signs the terms; both signatures over the same terms make the
    agreement. A second signer's terms must equal the first's (same hash)."""
    terms = Terms.from_dict(terms_payload)
    negotiation = board.negotiation(terms.negotiation_id)
    expected = terms_for(board, terms.negotiation_id, terms.price, terms.quantity)
    if expected != terms:
        raise MarketError("terms name other parties or another asset than the negotiation",
                          code="agreement-terms-mismatch")
    if negotiation.closed:
        raise MarketError(f"negotiation {negotiation.negotiation_id} is closed",
                          code="negotiation-closed")
    order = board.order(terms.order_id)
    if order.status is not OrderStatus.NEGOTIATING:
        raise MarketError(f"order {order.order_id} is {order.status.value}",
                          code="order-not-open")
    signer = {terms.seller.key: terms.seller, terms.buyer.key: terms.buyer}.get(user_key)
    if signer is None:
        raise MarketError("only the two parties sign the agreement", code="agreement-not-party")
    check_signature(terms.to_dict(), tag="terms", pubkey_hex=signer.pubkey_hex,
                    signature_hex=signature_hex)
    earlier = board.agreements.get(terms.terms_hash)
    if earlier is not None and earlier.failed_code is not None:
        raise MarketError(f"these terms already failed to settle ({earlier.failed_code}); "
                          "agree on new terms", code="agreement-failed")
    pending = [a for a in board.agreements.values()
               if a.terms.negotiation_id == terms.negotiation_id and a.settled_txid is None
               and a.failed_code is None]
    for agreement in pending:
        if agreement.agreement_id != terms.terms_hash:
            raise MarketError("the other party signed different terms",
                              code="agreement-terms-mismatch")
        if user_key in agreement.signatures:
            raise MarketError("already signed", code="agreement-already-signed")
    return MarketEvent("agreement-signed", {
        "agreement_id": terms.terms_hash, "terms": terms.to_dict(), "user": user_key,
        "signature": signature_hex, "at_ms": now_ms, "ttl_ms": ttl_ms,
    })


def check_settleable(board: Board, agreement_id: str, *, now_ms: int) -> Agreement:
    """An agreement settles once: complete, not expired, not settled, not failed."""
    agreement = board.agreement(agreement_id)
    if agreement.settled_txid is not None or agreement_id in board.trades:
        raise MarketError(f"agreement {agreement_id} is already settled",
                          code="agreement-already-settled")
    if agreement.failed_code is not None:
        raise MarketError(f"agreement {agreement_id} failed to settle "
                          f"({agreement.failed_code})", code="agreement-failed")
    if not agreement.is_complete:
        raise MarketError(f"agreement {agreement_id} lacks a signature",
                          code="agreement-incomplete")
    if now_ms > agreement.expires_at_ms:
        raise MarketError(f"agreement {agreement_id} expired at {agreement.expires_at_ms}",
                          code="agreement-expired")
    check_signature(agreement.terms.to_dict(), tag="terms",
                    pubkey_hex=agreement.terms.seller.pubkey_hex,
                    signature_hex=agreement.signatures[agreement.terms.seller.key])
    check_signature(agreement.terms.to_dict(), tag="terms",
                    pubkey_hex=agreement.terms.buyer.pubkey_hex,
                    signature_hex=agreement.signatures[agreement.terms.buyer.key])
    return agreement


# ---------------------------------------------------------------------------
# Applying events (the fold the market replays from its log)


def _with_history(board: Board, order_id: str, event: MarketEvent) -> dict[str, tuple[
        MarketEvent, ...]]:
    return {**board.history, order_id: (*board.history.get(order_id, ()), event)}


def _set_order(board: Board, order: Order, event: MarketEvent) -> Board:
    return replace(board, orders={**board.orders, order.order_id: order},
                   history=_with_history(board, order.order_id, event))


def apply_event(board: Board, event: MarketEvent) -> Board:
    """The board after ``event``. Events come from the market's own log, already
    decided; an event that does not fit (a bug or a forged record) raises MarketError
    and the caller skips it."""
    payload = event.payload
    at_ms = int(payload.get("at_ms", 0))
    board = replace(board, events=board.events + 1)
    if event.kind == "asset-registered":
        definition = AssetDefinition.from_dict(payload["definition"])
        registered = RegisteredAsset(str(payload["asset_id"]), definition, at_ms)
        return replace(board, assets={**board.assets, definition.security_code: registered})
    if event.kind == "order-posted":
        command = payload["command"]
        order = Order(str(payload["order_id"]), str(command["security_code"]),
                      str(payload["asset_id"]), Side(command["side"]),
                      parse_price(command["price"]), check_quantity(command["quantity"]),
                      UserRef.from_dict(command["user"]), OrderStatus.WAITING, at_ms, at_ms)
        return _set_order(board, order, event)
    if event.kind == "order-amended":
        order = board.order(str(payload["order_id"]))
        return _set_order(board, replace(
            order, price=parse_price(payload["price"]),
            quantity=check_quantity(payload["quantity"]), version=order.version + 1,
            updated_at_ms=at_ms), event)
    if event.kind == "order-expired":
        order = board.order(str(payload["order_id"]))
        if order.status is not OrderStatus.WAITING:
            raise MarketError(f"order {order.order_id} is {order.status.value}",
                              code="order-not-open")
        return _set_order(board, replace(order, status=OrderStatus.EXPIRED,
                                         updated_at_ms=at_ms), event)
    if event.kind == "order-cancelled":
        order = board.order(str(payload["order_id"]))
        board = _close_negotiation(board, order.negotiation_id)
        return _set_order(board, replace(order, status=OrderStatus.CANCELLED,
                                         updated_at_ms=at_ms), event)
    if event.kind == "negotiation-opened":
        return _apply_opened(board, event)
    if event.kind == "message-sent":
        negotiation = board.negotiation(str(payload["negotiation_id"]))
        updated = replace(negotiation, messages=negotiation.messages + 1)
        return replace(board, negotiations={**board.negotiations,
                                            negotiation.negotiation_id: updated})
    if event.kind == "agreement-signed":
        return _apply_signed(board, event)
    if event.kind == "settlement-sent":
        return _apply_sent(board, event)
    if event.kind in ("trade-settled", "settlement-failed"):
        return _apply_settlement(board, event)
    if event.kind == "command-refused":
        order_id = payload.get("order_id")
        if isinstance(order_id, str) and order_id in board.orders:
            return replace(board, history=_with_history(board, order_id, event))
        return board
    raise MarketError(f"unknown market event kind {event.kind!r}", code="market-unknown-event")


def _close_negotiation(board: Board, negotiation_id: str | None) -> Board:
    if negotiation_id is None or negotiation_id not in board.negotiations:
        return board
    closed = replace(board.negotiations[negotiation_id], closed=True)
    return replace(board, negotiations={**board.negotiations, negotiation_id: closed})


def _apply_opened(board: Board, event: MarketEvent) -> Board:
    payload = event.payload
    order = board.order(str(payload["order_id"]))
    negotiation = Negotiation(
        str(payload["negotiation_id"]), order.order_id, order.poster,
        UserRef.from_dict(payload["command"]["user"]), int(payload["at_ms"]),
        {str(k): str(v) for k, v in payload["sealed_keys"].items()},
    )
    board = replace(board, negotiations={**board.negotiations,
                                         negotiation.negotiation_id: negotiation})
    return _set_order(board, replace(order, status=OrderStatus.NEGOTIATING,
                                     negotiation_id=negotiation.negotiation_id,
                                     updated_at_ms=int(payload["at_ms"])), event)


def _apply_signed(board: Board, event: MarketEvent) -> Board:
    payload = event.payload
    terms = Terms.from_dict(payload["terms"])
    at_ms = int(payload["at_ms"])
    agreement = board.agreements.get(str(payload["agreement_id"])) or Agreement(
        terms.terms_hash, terms, {})
    agreement = replace(agreement, signatures={**agreement.signatures,
                                               str(payload["user"]): str(payload["signature"])})
    if agreement.is_complete:
        agreement = replace(agreement, signed_at_ms=at_ms,
                            expires_at_ms=at_ms + int(payload["ttl_ms"]))
    board = replace(board, agreements={**board.agreements, agreement.agreement_id: agreement})
    if agreement.is_complete:
        order = board.order(terms.order_id)
        board = _set_order(board, replace(order, status=OrderStatus.AGREED,
                                          updated_at_ms=at_ms), event)
    else:
        board = replace(board, history=_with_history(board, terms.order_id, event))
    return board


def settlement_sent(agreement: Agreement, tx_bytes: bytes, txid: str, *,
                    now_ms: int) -> MarketEvent:
    """The event logged before an agreement's DvP transaction is sent (decision 0132)."""
    return MarketEvent("settlement-sent", {
        "agreement_id": agreement.agreement_id, "txid": txid, "raw_tx": tx_bytes.hex(),
        "at_ms": now_ms})


def logged_dvp(agreement: Agreement) -> Transaction | None:
    """The DvP transaction logged for ``agreement`` (``settlement-sent``), if any."""
    if agreement.sent_tx_hex is None:
        return None
    return Transaction.parse(bytes.fromhex(agreement.sent_tx_hex))


def unfinished_settlements(board: Board) -> list[Agreement]:
    """Agreements whose DvP was logged and sent but that are neither settled nor failed:
    a process stopped between sending and confirming (decision 0132)."""
    return sorted((a for a in board.agreements.values()
                   if a.sent_txid is not None and a.settled_txid is None
                   and a.failed_code is None and a.agreement_id not in board.trades),
                  key=lambda a: a.agreement_id)


def _apply_sent(board: Board, event: MarketEvent) -> Board:
    payload = event.payload
    agreement = board.agreement(str(payload["agreement_id"]))
    if agreement.settled_txid is not None or agreement.failed_code is not None:
        raise MarketError(f"agreement {agreement.agreement_id} has ended",
                          code="agreement-already-settled")
    if not agreement.is_complete:
        raise MarketError(f"agreement {agreement.agreement_id} lacks a signature",
                          code="agreement-incomplete")
    raw_hex = payload["raw_tx"]
    if not isinstance(raw_hex, str) or len(raw_hex) > 2 * DVP_TX_BYTES_MAX:
        raise MarketError("a logged DvP transaction is not hex of a bounded size",
                          code="settlement-tx-malformed")
    try:
        tx = Transaction.parse(bytes.fromhex(raw_hex))
    except ValueError:
        raise MarketError("a logged DvP transaction is not hex",
                          code="settlement-tx-malformed") from None
    if tx.txid != payload["txid"]:
        raise MarketError(f"a logged DvP transaction is {tx.txid}, not {payload['txid']}",
                          code="settlement-txid-mismatch")
    if agreement.sent_txid is not None and agreement.sent_txid != tx.txid:
        raise MarketError(f"agreement {agreement.agreement_id} already sent "
                          f"{agreement.sent_txid}", code="settlement-already-sent")
    sent = replace(agreement, sent_txid=tx.txid, sent_tx_hex=tx.serialize().hex())
    board = replace(board, agreements={**board.agreements, sent.agreement_id: sent})
    return replace(board, history=_with_history(board, agreement.terms.order_id, event))


def _apply_settlement(board: Board, event: MarketEvent) -> Board:
    payload = event.payload
    agreement = board.agreement(str(payload["agreement_id"]))
    order = board.order(agreement.terms.order_id)
    at_ms = int(payload.get("at_ms", 0))
    if event.kind == "settlement-failed":
        failed = replace(agreement, failed_code=str(payload["code"]))
        board = replace(board, agreements={**board.agreements, failed.agreement_id: failed})
        return _set_order(board, replace(order, status=OrderStatus.NEGOTIATING,
                                         updated_at_ms=at_ms), event)
    settled = replace(agreement, settled_txid=str(payload["txid"]))
    trade = Trade(agreement.agreement_id, order.order_id, agreement.terms.negotiation_id,
                  str(payload["txid"]), int(payload["height"]), str(payload["block_hash"]),
                  int(payload["committed_at_ms"]), agreement.terms)
    board = replace(board, agreements={**board.agreements, settled.agreement_id: settled},
                    trades={**board.trades, trade.agreement_id: trade})
    board = _close_negotiation(board, agreement.terms.negotiation_id)
    return _set_order(board, replace(order, status=OrderStatus.SETTLED, updated_at_ms=at_ms),
                      event)


# ---------------------------------------------------------------------------
# Delivery versus payment: what a party's custodian checks before signing


def net_deltas(
    inputs: list[tuple[bytes, int, str | None, int]],
    outputs: list[tuple[bytes, int, str | None, int]],
    script: bytes,
    cash_assets: tuple[str, ...],
) -> dict[str, int]:
    """Net change of one script's holdings in a transaction: per asset id, ``KRW`` for the
    cash assets together, and ``native`` value. Items are (script, value, asset, units)."""
    delta: dict[str, int] = {"native": 0, CASH_UNIT: 0}
    for sign, items in ((-1, inputs), (1, outputs)):
        for item_script, value, asset, units in items:
            if item_script != script:
                continue
            delta["native"] += sign * value
            if asset is not None:
                name = CASH_UNIT if asset in cash_assets else asset
                delta[name] = delta.get(name, 0) + sign * units
    return {name: change for name, change in delta.items() if change}


def check_delivery(terms: Terms, party: UserRef, deltas: Mapping[str, int]) -> None:
    """The transaction does exactly what the party agreed to, and nothing else with its
    holdings: the seller gives ``quantity`` units and gets ``amount`` won; the buyer the
    reverse; no native value moves."""
    if party.key == terms.seller.key:
        wanted = {terms.asset_id: -terms.quantity, CASH_UNIT: terms.amount}
    elif party.key == terms.buyer.key:
        wanted = {terms.asset_id: terms.quantity, CASH_UNIT: -terms.amount}
    else:
        raise MarketError(f"{party.key} is not a party to the agreement",
                          code="agreement-not-party")
    if dict(deltas) != wanted:
        raise MarketError(f"the settlement transaction moves {dict(deltas)} for {party.key}; "
                          f"the agreement says {wanted}", code="settlement-terms-mismatch")

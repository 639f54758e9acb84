"""The market's pure rules (ledger/market.py), the per-definition issuing keys and the
node rule that accepts them, negotiation sealing and custodial accounts."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger.assets import (
    AssetDefinition,
    issuing_private_key,
    issuing_script,
    parse_terms_output,
    terms_output,
)
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.market import (
    Board,
    MarketError,
    MarketEvent,
    OrderStatus,
    UserRef,
    apply_event,
    check_delivery,
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
    net_deltas,
    parse_price,
    settlement_amount,
    settlement_sent,
    terms_for,
    unfinished_settlements,
)
from ledger.membership import ChainParams, Genesis, Member
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.state import LedgerRules, check_tx, state_from_genesis
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from ledger.wallet import Coin, KeyStore, build_issuance
from streams.market import sealing
from streams.market.accounts import CustodyStore, Principal

pytestmark = pytest.mark.unit

BOND = AssetDefinition("KR101502D327", "국민주택 2013-02", "bond", "securities-a", "KRW",
                       maturity="2018-02-28", coupon_bp=275, issue_date="2013-02-28",
                       face_value=10_000)
CASH = AssetDefinition("KRW-DEP-A", "원화예수금", "deposit", "securities-a", "KRW")
BOND_ID, CASH_ID = "Abond", "Acash"
PASSWORD = "a long password"


def _key(n: int) -> PrivateKey:
    return PrivateKey(n.to_bytes(32, "big"))


SELLER_KEY, BUYER_KEY, OTHER_KEY = _key(11), _key(12), _key(13)
SELLER = UserRef("홍길동", "securities-a", SELLER_KEY.public_key.sec.hex())
BUYER = UserRef("이몽룡", "securities-b", BUYER_KEY.public_key.sec.hex())
OTHER = UserRef("박서방", "securities-b", OTHER_KEY.public_key.sec.hex())
KEYS = {SELLER.key: SELLER_KEY, BUYER.key: BUYER_KEY, OTHER.key: OTHER_KEY}


# ---------------------------------------------------------------- prices and amounts


@pytest.mark.parametrize(("given", "expected"), [
    ("11578.50", Decimal("11578.50")), ("11578.5", Decimal("11578.50")),
    (Decimal("10016.69"), Decimal("10016.69")), ("7", Decimal("7.00")),
    ("11578.500", Decimal("11578.50")),  # trailing zero, still two decimals of value
])
def test_price_accepts_two_decimals(given: object, expected: Decimal) -> None:
    assert parse_price(given) == expected
    assert str(parse_price(given)) == str(expected)


@pytest.mark.parametrize(("given", "code"), [
    ("11578.505", "market-price-precision"), ("0.001", "market-price-precision"),
    (11578.5, "market-price-invalid"), ("0", "market-price-invalid"),
    ("-1.00", "market-price-invalid"), ("abc", "market-price-invalid"),
    ("NaN", "market-price-invalid"), ("Infinity", "market-price-invalid"),
    (True, "market-price-invalid"), ("1000000000.01", "market-price-invalid"),
])
def test_price_refusals(given: object, code: str) -> None:
    with pytest.raises(MarketError) as caught:
        parse_price(given)
    assert caught.value.code == code


@pytest.mark.parametrize(("given", "code"), [
    (0, "market-quantity-invalid"), (-5, "market-quantity-invalid"),
    (True, "market-quantity-invalid"), ("x", "market-quantity-invalid"),
    (1.5, "market-quantity-fractional"), ("1.5", "market-quantity-fractional"),
    (Decimal("2.25"), "market-quantity-fractional"), (10**13, "market-quantity-invalid"),
])
def test_quantity_refusals(given: object, code: str) -> None:
    with pytest.raises(MarketError) as caught:
        check_quantity(given)
    assert caught.value.code == code


@pytest.mark.parametrize("given", ["", "x" * 65, "a\nb", None, 7])
def test_ids_are_bounded(given: object) -> None:
    with pytest.raises(MarketError) as caught:
        check_id(given, "order id")
    assert caught.value.code == "market-bad-id"


def test_quantity_accepts_whole_numbers() -> None:
    assert check_quantity(100) == check_quantity("100") == check_quantity(Decimal("100")) == 100


@pytest.mark.parametrize(("price", "quantity", "amount"), [
    ("11578.49", 100, 1_157_849),  # the seed's agreement
    ("11578.50", 100, 1_157_850),
    ("10016.69", 150, 1_502_503),  # 1,502,503.5: fractions of a won truncated
    ("10179.33", 20, 203_586),  # 203,586.6 -> 203,586
    ("0.01", 1, 0),
])
def test_settlement_amount_rounds_down(price: str, quantity: int, amount: int) -> None:
    assert settlement_amount(parse_price(price), quantity) == amount


# ---------------------------------------------------------------- the board


def _registered() -> Board:
    board = Board()
    for definition, ident in ((BOND, BOND_ID), (CASH, CASH_ID)):
        board = apply_event(board, MarketEvent("asset-registered", {
            "asset_id": ident, "definition": definition.to_dict(), "at_ms": 1}))
    return board


def _command(user: UserRef, kind: str, nonce: str = "n1", **fields: Any) -> tuple[
        dict[str, Any], str]:
    command = {"kind": kind, "user": user.to_dict(), "nonce": nonce, "at_ms": 5, **fields}
    return command, KEYS[user.key].sign(digest(command, tag="command")).hex()


SELLER_HOLDS = {BOND_ID: 100, "KRW": 2_000_000}
BUYER_HOLDS = {"KRW": 5_000_000}
SEALED = {"poster": "aa", "joiner": "bb", "surveillance": "cc"}


def _posted() -> tuple[Board, str]:
    board = _registered()
    command, signature = _command(SELLER, "post", security_code=BOND.security_code,
                                  side="sell", price="11578.50", quantity=100)
    event = decide_post(board, command, signature, SELLER_HOLDS, now_ms=10)
    return apply_event(board, event), str(event.payload["order_id"])


def _refused(code: str, call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(MarketError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value


def test_post_refusals() -> None:
    board, _ = _posted()
    cases = [
        ({"security_code": "KR0000000000", "side": "sell", "price": "1", "quantity": 1},
         SELLER, SELLER_HOLDS, "market-unknown-security"),
        ({"security_code": CASH.security_code, "side": "sell", "price": "1", "quantity": 1},
         SELLER, SELLER_HOLDS, "market-unknown-security"),
        ({"security_code": BOND.security_code, "side": "hold", "price": "1", "quantity": 1},
         SELLER, SELLER_HOLDS, "market-bad-side"),
        ({"security_code": BOND.security_code, "side": "sell", "price": "1", "quantity": 1},
         SELLER, SELLER_HOLDS, "market-insufficient-units"),  # all 100 on the open order
        ({"security_code": BOND.security_code, "side": "buy", "price": "11578.50",
          "quantity": 1000}, BUYER, BUYER_HOLDS, "market-insufficient-cash"),
    ]
    for fields, user, holds, code in cases:
        command, signature = _command(user, "post", **fields)
        _refused(code, decide_post, board, command, signature, holds, now_ms=11)


def test_post_refuses_a_forged_or_altered_command() -> None:
    board = _registered()
    command, signature = _command(SELLER, "post", security_code=BOND.security_code,
                                  side="sell", price="11578.50", quantity=100)
    altered = {**command, "quantity": 10}
    _refused("market-bad-signature", decide_post, board, altered, signature, SELLER_HOLDS,
             now_ms=1)
    forged = {**command, "user": OTHER.to_dict()}
    _refused("market-bad-signature", decide_post, board, forged, signature, SELLER_HOLDS,
             now_ms=1)


def test_amend_and_cancel_by_the_poster_only() -> None:
    board, order_id = _posted()
    command, signature = _command(BUYER, "amend", order_id=order_id, version=1, price="1")
    _refused("order-not-owner", decide_amend, board, command, signature, BUYER_HOLDS, now_ms=2)
    command, signature = _command(SELLER, "amend", order_id=order_id, version=0, price="1")
    _refused("order-version-mismatch", decide_amend, board, command, signature, SELLER_HOLDS,
             now_ms=2)
    command, signature = _command(SELLER, "amend", order_id=order_id, version=1)
    _refused("order-amend-empty", decide_amend, board, command, signature, SELLER_HOLDS,
             now_ms=2)
    command, signature = _command(SELLER, "amend", order_id=order_id, version=1,
                                  price="11578.40", quantity=90)
    board = apply_event(board, decide_amend(board, command, signature, SELLER_HOLDS, now_ms=2))
    order = board.order(order_id)
    assert (order.price, order.quantity, order.version) == (Decimal("11578.40"), 90, 2)
    command, signature = _command(OTHER, "cancel", order_id=order_id)
    _refused("order-not-owner", decide_cancel, board, command, signature, now_ms=3)
    command, signature = _command(SELLER, "cancel", order_id=order_id)
    board = apply_event(board, decide_cancel(board, command, signature, now_ms=3))
    assert board.order(order_id).status is OrderStatus.CANCELLED
    assert [e.kind for e in board.history[order_id]] == [
        "order-posted", "order-amended", "order-cancelled"]
    _refused("order-not-open", decide_cancel, board, command, signature, now_ms=4)


def test_waiting_orders_expire() -> None:
    board, order_id = _posted()
    assert decide_expiries(board, now_ms=10 + 1_000, ttl_ms=1_000) == []
    events = decide_expiries(board, now_ms=10 + 1_001, ttl_ms=1_000)
    assert [e.payload["order_id"] for e in events] == [order_id]
    board = apply_event(board, events[0])
    assert board.order(order_id).status is OrderStatus.EXPIRED
    assert board.committed(SELLER) == {}
    assert decide_expiries(board, now_ms=10**9, ttl_ms=1) == []
    negotiating, _, _ = _negotiating()
    assert decide_expiries(negotiating, now_ms=10**9, ttl_ms=1) == []


def _negotiating() -> tuple[Board, str, str]:
    board, order_id = _posted()
    command, signature = _command(BUYER, "join", order_id=order_id)
    event = decide_join(board, command, signature, BUYER_HOLDS, SEALED, now_ms=20)
    return apply_event(board, event), order_id, str(event.payload["negotiation_id"])


def test_join_rules() -> None:
    board, order_id = _posted()
    command, signature = _command(SELLER, "join", order_id=order_id)
    _refused("order-own", decide_join, board, command, signature, SELLER_HOLDS, SEALED,
             now_ms=1)
    command, signature = _command(BUYER, "join", order_id=order_id)
    _refused("market-insufficient-cash", decide_join, board, command, signature, {"KRW": 5},
             SEALED, now_ms=1)
    _refused("negotiation-bad-keys", decide_join, board, command, signature, BUYER_HOLDS,
             {"poster": "aa", "joiner": "bb"}, now_ms=1)
    board, order_id, _ = _negotiating()
    assert board.order(order_id).status is OrderStatus.NEGOTIATING
    command, signature = _command(OTHER, "join", order_id=order_id)
    _refused("order-not-open", decide_join, board, command, signature, BUYER_HOLDS, SEALED,
             now_ms=1)


def _sign(board: Board, user: UserRef, negotiation_id: str, price: str = "11578.49",
          quantity: int = 100, now_ms: int = 30) -> Board:
    terms = terms_for(board, negotiation_id, price, quantity)
    signature = KEYS[user.key].sign(digest(terms.to_dict(), tag="terms")).hex()
    event = decide_sign(board, terms.to_dict(), user.key, signature, now_ms=now_ms,
                        ttl_ms=1_000)
    return apply_event(board, event)


def test_agreement_needs_both_signatures_on_the_same_terms() -> None:
    board, order_id, negotiation_id = _negotiating()
    terms = terms_for(board, negotiation_id, "11578.49", 100)
    assert (terms.seller, terms.buyer, terms.amount) == (SELLER, BUYER, 1_157_849)
    check_matches_offer(terms, (Decimal("11578.49"), 100))
    _refused("agreement-terms-mismatch", check_matches_offer, terms, (Decimal("11578.50"), 100))
    _refused("agreement-no-offer", check_matches_offer, terms, None)
    _refused("agreement-quantity-exceeds", terms_for, board, negotiation_id, "1", 101)
    board = _sign(board, SELLER, negotiation_id)
    _refused("agreement-terms-mismatch", _sign, board, BUYER, negotiation_id, "11578.48")
    _refused("agreement-already-signed", _sign, board, SELLER, negotiation_id)
    _refused("agreement-not-party", _sign, board, OTHER, negotiation_id)
    agreement_id = terms.terms_hash
    _refused("agreement-incomplete", check_settleable, board, agreement_id, now_ms=31)
    board = _sign(board, BUYER, negotiation_id, now_ms=40)
    assert board.order(order_id).status is OrderStatus.AGREED
    agreement = check_settleable(board, agreement_id, now_ms=41)
    assert agreement.expires_at_ms == 1_040
    _refused("agreement-expired", check_settleable, board, agreement_id, now_ms=1_041)
    # what was signed cannot be changed afterwards: the signatures stop verifying
    signed = board.agreements[agreement_id]
    changed = replace(signed, terms=replace(signed.terms, price=Decimal("11000.00")))
    tampered = replace(board, agreements={**board.agreements, agreement_id: changed})
    _refused("market-bad-signature", check_settleable, tampered, agreement_id, now_ms=42)
    settled = apply_event(board, MarketEvent("trade-settled", {
        "agreement_id": agreement_id, "txid": "ab" * 32, "height": 5,
        "block_hash": "cd" * 32, "committed_at_ms": 50, "at_ms": 50}))
    assert settled.order(order_id).status is OrderStatus.SETTLED
    _refused("agreement-already-settled", check_settleable, settled, agreement_id, now_ms=41)
    failed = apply_event(board, MarketEvent("settlement-failed", {
        "agreement_id": agreement_id, "code": "agreement-expired", "at_ms": 1_042}))
    assert failed.order(order_id).status is OrderStatus.NEGOTIATING
    assert failed.committed(BUYER) == {}
    _refused("agreement-failed", check_settleable, failed, agreement_id, now_ms=41)
    _refused("agreement-failed", _sign, failed, SELLER, negotiation_id)
    assert settled.committed(SELLER) == {} and settled.committed(BUYER) == {}


def _dvp_like(n: int) -> Transaction:
    return Transaction(1, (TxIn(OutPoint(bytes([n]) * 32, 0)),),
                       (TxOut(1_000, p2pkh_script(SELLER_KEY.public_key.hash160)),))


def test_a_logged_dvp_is_the_settlement_every_later_attempt_finishes() -> None:
    """``settlement-sent`` (decision 0132): logged before the DvP leaves the process;
    the agreement keeps that transaction until it settles or fails, and a record that
    does not fit is refused with a code, changing nothing."""
    board, order_id, negotiation_id = _negotiating()
    board = _sign(board, SELLER, negotiation_id)
    agreement_id = terms_for(board, negotiation_id, "11578.49", 100).terms_hash
    dvp = _dvp_like(1)
    early = settlement_sent(board.agreements[agreement_id], dvp.serialize(), dvp.txid,
                            now_ms=35)
    _refused("agreement-incomplete", apply_event, board, early)
    board = _sign(board, BUYER, negotiation_id, now_ms=40)
    agreement = board.agreements[agreement_id]
    assert logged_dvp(agreement) is None and unfinished_settlements(board) == []
    sent = apply_event(board, settlement_sent(agreement, dvp.serialize(), dvp.txid,
                                              now_ms=45))
    logged = sent.agreements[agreement_id]
    assert (logged.sent_txid, logged_dvp(logged)) == (dvp.txid, dvp)
    assert unfinished_settlements(sent) == [logged]
    assert sent.order(order_id).status is OrderStatus.AGREED
    assert [e.kind for e in sent.history[order_id]][-1] == "settlement-sent"
    # the same transaction logged again (a retry) changes nothing of it
    again = apply_event(sent, settlement_sent(logged, dvp.serialize(), dvp.txid, now_ms=46))
    assert again.agreements[agreement_id].sent_txid == dvp.txid
    other = _dvp_like(2)
    bad = {
        "settlement-already-sent": settlement_sent(logged, other.serialize(), other.txid,
                                                   now_ms=47).payload,
        "settlement-txid-mismatch": {**settlement_sent(
            logged, other.serialize(), other.txid, now_ms=47).payload, "txid": dvp.txid},
        "settlement-tx-malformed": {**settlement_sent(
            logged, other.serialize(), other.txid, now_ms=47).payload, "raw_tx": "zz"},
    }
    for code, payload in bad.items():
        _refused(code, apply_event, sent, MarketEvent("settlement-sent", payload))
    with pytest.raises(ValidationError):  # hex, but not a transaction
        apply_event(sent, MarketEvent("settlement-sent", {
            "agreement_id": agreement_id, "txid": dvp.txid, "raw_tx": "00ff", "at_ms": 1}))
    # past its expiry, the logged DvP still settles: the ledger's verdict decides
    assert check_settleable(sent, agreement_id, now_ms=0).sent_txid == dvp.txid
    settled = apply_event(sent, MarketEvent("trade-settled", {
        "agreement_id": agreement_id, "txid": dvp.txid, "height": 5,
        "block_hash": "cd" * 32, "committed_at_ms": 50, "at_ms": 50}))
    assert unfinished_settlements(settled) == []
    _refused("agreement-already-settled", apply_event, settled,
             settlement_sent(logged, dvp.serialize(), dvp.txid, now_ms=51))
    failed = apply_event(sent, MarketEvent("settlement-failed", {
        "agreement_id": agreement_id, "code": "settlement-rejected:missing-inputs",
        "at_ms": 52}))
    assert unfinished_settlements(failed) == []


def test_open_orders_and_agreements_commit_holdings() -> None:
    board, _, negotiation_id = _negotiating()
    assert board.committed(SELLER) == {BOND_ID: 100}
    board = _sign(_sign(board, SELLER, negotiation_id), BUYER, negotiation_id)
    assert board.committed(SELLER) == {BOND_ID: 100}
    assert board.committed(BUYER) == {"KRW": 1_157_849}


def test_delivery_check() -> None:
    board, _, negotiation_id = _negotiating()
    terms = terms_for(board, negotiation_id, "11578.49", 100)
    seller, buyer = b"S", b"B"
    inputs = [(seller, 0, BOND_ID, 100), (buyer, 0, CASH_ID, 2_000_000)]
    outputs = [(buyer, 0, BOND_ID, 100), (seller, 0, CASH_ID, 1_157_849),
               (buyer, 0, CASH_ID, 842_151)]
    check_delivery(terms, SELLER, net_deltas(inputs, outputs, seller, (CASH_ID,)))
    check_delivery(terms, BUYER, net_deltas(inputs, outputs, buyer, (CASH_ID,)))
    short = [*outputs[:1], (seller, 0, CASH_ID, 1_157_848), (buyer, 0, CASH_ID, 842_152)]
    _refused("settlement-terms-mismatch", check_delivery, terms, SELLER,
             net_deltas(inputs, short, seller, (CASH_ID,)))
    _refused("agreement-not-party", check_delivery, terms, OTHER, {})


# ---------------------------------------------------------------- issuing keys and the node


def _genesis(issuer: PrivateKey) -> Genesis:
    members = (Member("securities-a", "A", "securities", issuer.public_key, may_issue=True),
               Member("koscom", "K", "platform", _key(99).public_key))
    return Genesis("unit", 0, members, ChainParams(quorum=2, block_interval_ms=500,
                                                  block_bytes_max=1_000_000,
                                                  proposer_timeout_ms=1_000))


def test_issuing_key_is_per_definition_and_accepted_by_the_node() -> None:
    issuer = _key(21)
    genesis = _genesis(issuer)
    script = issuing_script(issuer.public_key, BOND.definition_hash)
    assert script != issuing_script(issuer.public_key, CASH.definition_hash)
    state = state_from_genesis(genesis.hash_le, [(script, 1_000)], index_scripts=True)
    rules = LedgerRules.from_genesis(genesis)
    outpoint = OutPoint(next(iter(state.items()))[0].txid_le, 0)
    coin = Coin(outpoint, 1_000, script)
    signer = KeyStore().with_key(issuing_private_key(issuer, BOND.definition_hash))
    recipient = p2pkh_script(b"\x01" * 20)

    def issuance(definition: AssetDefinition, *terms: bytes) -> Transaction:
        psbt = build_issuance(coin, 100, recipient, metadata=definition.reference(),
                              data_outputs=terms)
        return psbt.add_signatures(signer).finalize()

    effects = check_tx(state, issuance(BOND, terms_output(BOND)), rules)
    assert effects.issued_asset_id == asset_id(script)
    # the terms travel on the chain: missing, other or foreign terms are refused
    other_issuer = replace(BOND, issuer="securities-b")
    for terms, code in (((), "asset-terms-missing"),
                        ((terms_output(CASH),), "asset-terms-mismatch"),
                        ((b"\x6a\x08CLT1{}{}",), "asset-terms-mismatch")):
        with pytest.raises(ValidationError) as caught:
            check_tx(state, issuance(BOND, *terms), rules)
        assert caught.value.code == code
    assert parse_terms_output(terms_output(BOND)) == BOND.canonical_bytes()
    script_b = issuing_script(issuer.public_key, other_issuer.definition_hash)
    state_b = state_from_genesis(genesis.hash_le, [(script_b, 1_000)], index_scripts=True)
    coin_b = Coin(OutPoint(next(iter(state_b.items()))[0].txid_le, 0), 1_000, script_b)
    signer_b = KeyStore().with_key(issuing_private_key(issuer, other_issuer.definition_hash))
    foreign = build_issuance(coin_b, 1, recipient, metadata=other_issuer.reference(),
                             data_outputs=(terms_output(other_issuer),))
    with pytest.raises(ValidationError) as caught:
        check_tx(state_b, foreign.add_signatures(signer_b).finalize(), rules)
    assert caught.value.code == "asset-issuer-mismatch"
    # the same issuing script naming another definition is not a member's issuing key
    wrong = build_issuance(coin, 100, recipient, metadata=CASH.reference(),
                           data_outputs=(terms_output(CASH),))
    with pytest.raises(ValidationError) as caught:
        check_tx(state, wrong.add_signatures(signer).finalize(), rules)
    assert caught.value.code == "asset-issuer-not-member"
    # a non-member's tweaked key issues nothing
    outsider = issuing_script(_key(22).public_key, BOND.definition_hash)
    state2 = state_from_genesis(genesis.hash_le, [(outsider, 1_000)], index_scripts=True)
    coin2 = Coin(OutPoint(next(iter(state2.items()))[0].txid_le, 0), 1_000, outsider)
    signer2 = KeyStore().with_key(issuing_private_key(_key(22), BOND.definition_hash))
    tx = build_issuance(coin2, 1, outsider, metadata=BOND.reference()).add_signatures(
        signer2).finalize()
    with pytest.raises(ValidationError) as caught:
        check_tx(state2, tx, rules)
    assert caught.value.code == "asset-issuer-not-member"


def test_definition_hash_unchanged_without_the_new_fields() -> None:
    old = AssetDefinition("KR1", "x", "bond", "securities-a", "KRW", maturity="2020-01-01")
    assert "issue_date" not in old.to_dict() and "face_value" not in old.to_dict()
    assert AssetDefinition.from_dict(BOND.to_dict()) == BOND
    with pytest.raises(ValidationError):
        AssetDefinition("KR1", "x", "bond", "securities-a", "KRW", maturity="2010-01-01",
                        issue_date="2011-01-01")


# ---------------------------------------------------------------- sealing and custody


def test_sealing_opens_only_with_the_right_key_and_place() -> None:
    reader = _key(31)
    blob = sealing.seal(reader.public_key.sec, b"k" * 32, b"place")
    assert sealing.unseal(reader, blob, b"place") == b"k" * 32
    for key, aad, data in ((_key(32), b"place", blob), (reader, b"elsewhere", blob),
                           (reader, b"place", blob[:-1] + bytes([blob[-1] ^ 1]))):
        with pytest.raises(sealing.SealError):
            sealing.unseal(key, data, aad)
    message = sealing.encrypt(b"n" * 32, "반갑습니다".encode(), b"m")
    assert "반갑습니다".encode() not in message
    assert sealing.decrypt(b"n" * 32, message, b"m") == "반갑습니다".encode()
    with pytest.raises(sealing.SealError):
        sealing.decrypt(b"o" * 32, message, b"m")


def test_custody_keys_encrypted_at_rest_and_used_only_for_the_user(tmp_path: Path) -> None:
    path = tmp_path / "custody.json"
    custody_key = b"c" * 32
    store = CustodyStore("securities-a", custody_key, path)
    secret = (7).to_bytes(32, "big")
    account = store.open_account("홍길동", PASSWORD, entropy32=secret)
    text = path.read_text()
    assert secret.hex() not in text and PrivateKey(secret).to_wif() not in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(text)["accounts"][0]["pubkey"] == account.pubkey_hex
    with pytest.raises(MarketError) as caught:
        store.authenticate("홍길동", "wrong password")
    assert caught.value.code == "account-auth-failed"
    principal = store.authenticate("홍길동", PASSWORD)
    digest32 = b"\x05" * 32
    assert PrivateKey(secret).public_key.verify(bytes.fromhex(store.sign_digest(
        principal, digest32)), digest32)
    for forged in (Principal("홍길동", "securities-a", b"\x00" * 32),
                   Principal("홍길동", "securities-b", principal.token)):
        with pytest.raises(MarketError) as caught:
            store.sign_digest(forged, digest32)
        assert caught.value.code == "account-not-authenticated"
    other_firm = CustodyStore("securities-b", custody_key)
    assert other_firm.accounts() == ()
    reopened = CustodyStore("securities-a", custody_key, path)
    assert reopened.accounts() == (account,)
    with pytest.raises(MarketError):
        reopened.sign_digest(principal, digest32)  # sessions do not survive a restart
    wrong_key = CustodyStore("securities-a", b"d" * 32, path)
    with pytest.raises(MarketError) as caught:
        wrong_key.sign_digest(wrong_key.authenticate("홍길동", PASSWORD), digest32)
    assert caught.value.code == "custody-key-invalid"
    assert "c" * 10 not in repr(store)


def test_own_key_signs_only_for_its_holder() -> None:
    from streams.market.accounts import Accounts, OwnKey

    own = OwnKey("self", "securities-b", _key(41))
    accounts = Accounts([CustodyStore("securities-b", b"c" * 32)], [own])
    principal = own.principal()
    assert accounts.check(principal).pubkey_hex == _key(41).public_key.sec.hex()
    assert accounts.signer("securities-b", "self") is own
    digest32 = b"\x07" * 32
    assert _key(41).public_key.verify(bytes.fromhex(own.sign_digest(principal, digest32)),
                                      digest32)
    for forged in (Principal("self", "securities-b", b"\x00" * 32),
                   Principal("other", "securities-b", principal.token)):
        with pytest.raises(MarketError):
            own.sign_digest(forged, digest32)
    assert "41" not in repr(own) and "secret" not in repr(own)

"""Delivery versus payment: building the one transaction of a trade and having each
party's custodian sign only its own inputs, only for what its user agreed.

Owns: ``build_dvp`` (bond units seller->buyer, KRW cash buyer->seller, every party's
change back to it, no fees; coins from the given ledger state) and ``sign_for_party``.
"""

from __future__ import annotations

from ledger.errors import ValidationError
from ledger.market import (
    Agreement,
    MarketError,
    Terms,
    check_delivery,
    check_signature,
    net_deltas,
)
from ledger.state import LedgerState, utxos_of
from ledger.wallet import Coin, Leg, PartiallySignedTx, build_transfer, select_coins
from streams.market.accounts import Account, UserSigner


def _coins(state: LedgerState, script: bytes) -> list[Coin]:
    return [Coin(outpoint, e.value, e.script_pubkey, e.asset_id, e.quantity, e.height)
            for outpoint, e in utxos_of(state, script)]


def build_dvp(terms: Terms, state: LedgerState, seller_script: bytes, buyer_script: bytes,
              cash_assets: tuple[str, ...]) -> PartiallySignedTx:
    """The unsigned DvP transaction of ``terms`` against ``state``; MarketError when the
    seller lacks the units or the buyer the cash (nothing is sent then)."""
    try:
        units = select_coins(_coins(state, seller_script), terms.asset_id, terms.quantity)
    except ValidationError:
        raise MarketError(f"the seller no longer holds {terms.quantity} units of "
                          f"{terms.security_code}", code="settlement-insufficient-units") from None
    legs = [Leg(units.coins, terms.asset_id, terms.quantity, buyer_script, seller_script)]
    remaining = terms.amount
    buyer_coins = _coins(state, buyer_script)
    for cash in cash_assets:
        if remaining == 0:
            break
        held = sum(c.quantity for c in buyer_coins if c.asset_id == cash)
        paid = min(held, remaining)
        if paid == 0:
            continue
        selection = select_coins(buyer_coins, cash, paid)
        legs.append(Leg(selection.coins, cash, paid, seller_script, buyer_script))
        remaining -= paid
    if remaining:
        raise MarketError(f"the buyer lacks {remaining} KRW of {terms.amount}",
                          code="settlement-insufficient-cash")
    return build_transfer(legs)


def sign_for_party(store: UserSigner, party: Account, agreement: Agreement,
                   psbt: PartiallySignedTx, cash_assets: tuple[str, ...]) -> PartiallySignedTx:
    """The party's custodian signs its user's inputs once the user's own signature on
    the agreement verifies and the transaction does exactly what the terms say for it."""
    terms = agreement.terms
    signature = agreement.signatures.get(party.user.key)
    if signature is None:
        raise MarketError(f"{party.user.key} did not sign the agreement",
                          code="agreement-incomplete")
    check_signature(terms.to_dict(), tag="terms", pubkey_hex=party.pubkey_hex,
                    signature_hex=signature)
    colored = psbt.colored_outputs()
    inputs = [(i.script_pubkey, i.value, i.asset_id, i.quantity) for i in psbt.inputs]
    outputs = [(out.script_pubkey, out.value, asset, units)
               for out, (asset, units) in zip(psbt.tx.outputs, colored, strict=True)]
    check_delivery(terms, party.user, net_deltas(inputs, outputs, party.script, cash_assets))
    return store.sign_agreed_inputs(party.user_id, psbt)

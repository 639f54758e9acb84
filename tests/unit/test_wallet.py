"""Wallet: key store, coin selection per asset, building and (partially) signing
P2PKH and P2SH-multisig spends, two-party delivery-versus-payment, and a cross-check
of wallet-signed transactions with the independent ``bitcoin-utils`` library."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.address import p2pkh_address, p2sh_address
from ledger.errors import ScriptError, WalletError
from ledger.hashing import hash160, sha256
from ledger.interpreter import verify_input
from ledger.keys import PrivateKey
from ledger.oap import asset_id, check_asset_rules, color_outputs, parse_marker
from ledger.script import iter_ops, p2pk_script, p2pkh_script, p2sh_script
from ledger.sighash import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    legacy_sighash,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from ledger.wallet import (
    SELECTION_INPUTS_MAX,
    Coin,
    KeyStore,
    Leg,
    PartiallySignedTx,
    SelectionOrder,
    SigningInput,
    Wallet,
    build_transfer,
    combine,
    multisig_redeem_script,
    select_coins,
)

pytestmark = pytest.mark.unit


def key(label: str, *, compressed: bool = True) -> PrivateKey:
    """A deterministic test key (the core takes randomness from its caller)."""
    return PrivateKey(sha256(label.encode()), compressed=compressed)


@dataclass(frozen=True, slots=True)
class Entry:
    """Shaped like ``ledger.state.UtxoEntry`` (what ``Wallet.from_utxos`` reads)."""

    value: int
    script_pubkey: bytes
    asset_id: str | None = None
    quantity: int = 0
    height: int = 0


def outpoint(n: int, index: int = 0) -> OutPoint:
    return OutPoint(sha256(f"prev-{n}".encode()), index)


def wallet_of(keystore: KeyStore, *entries: Entry) -> Wallet:
    return Wallet.from_utxos(keystore, [(outpoint(n), e) for n, e in enumerate(entries)])


def verify_all(tx: Transaction, psbt: PartiallySignedTx) -> None:
    for index, info in enumerate(psbt.inputs):
        verify_input(tx, index, info.script_pubkey, info.value)


ALICE = key("alice")
BOB = key("bob")
CAROL = key("carol")
ISSUER_A = key("securities-a")  # issues the bond
ISSUER_B = key("securities-b")  # issues the cash token
BOND = asset_id(p2pkh_script(ISSUER_A.public_key.hash160))
CASH = asset_id(p2pkh_script(ISSUER_B.public_key.hash160))


# --- key store ------------------------------------------------------------------------


def test_keystore_wif_round_trip_and_addresses() -> None:
    uncompressed = key("dave", compressed=False)
    store = KeyStore().with_wif(ALICE.to_wif()).with_key(uncompressed)
    alice_address = p2pkh_address(ALICE.public_key.hash160)
    dave_address = p2pkh_address(uncompressed.public_key.hash160)
    assert set(store.p2pkh_addresses()) == {alice_address, dave_address}
    assert store.export_wif(alice_address) == ALICE.to_wif()
    assert PrivateKey.from_wif(store.export_wif(dave_address)) == uncompressed
    assert store.key_for_hash(ALICE.public_key.hash160) == ALICE
    with pytest.raises(WalletError) as caught:
        store.export_wif(p2pkh_address(BOB.public_key.hash160))
    assert caught.value.code == "wallet-unknown-key"


def test_keystore_never_shows_secrets() -> None:
    redeem = multisig_redeem_script(2, [k.public_key.sec for k in (ALICE, BOB, CAROL)])
    store = KeyStore().with_key(ALICE).with_redeem_script(redeem)
    for text in (repr(store), str(store), f"{store}", repr(store.key_for_hash(
            ALICE.public_key.hash160))):
        assert ALICE.secret.hex() not in text
        assert ALICE.to_wif() not in text
    assert p2pkh_address(ALICE.public_key.hash160) in repr(store)
    assert p2sh_address(hash160(redeem)) in repr(store)


def test_keystore_multisig_limits() -> None:
    pubkeys = [key(f"k{n}").public_key for n in range(16)]
    store = KeyStore().with_multisig(15, pubkeys[:15])  # 15-of-15 is the largest
    assert len(store.p2sh_addresses()) == 1
    for m, keys in ((3, pubkeys[:2]), (0, pubkeys[:2]), (1, pubkeys)):
        with pytest.raises(WalletError) as caught:
            KeyStore().with_multisig(m, keys)
        assert caught.value.code == "wallet-bad-multisig"
    with pytest.raises(WalletError):
        KeyStore().with_redeem_script(p2pkh_script(ALICE.public_key.hash160))


def test_keystore_network_version_bytes() -> None:
    store = KeyStore(p2pkh_version=0x6F, p2sh_version=0xC4, wif_version=0xEF).with_key(ALICE)
    (address,) = store.p2pkh_addresses()
    assert address[0] in "mn"  # testnet-style version byte
    wif = store.export_wif(address)
    assert KeyStore(wif_version=0xEF).with_wif(wif).key_for_hash(ALICE.public_key.hash160)


# --- P2PKH and P2SH multisig spends ---------------------------------------------------


@pytest.mark.parametrize("hash_type", [
    SIGHASH_ALL, SIGHASH_NONE, SIGHASH_SINGLE, SIGHASH_ALL | SIGHASH_ANYONECANPAY,
    SIGHASH_SINGLE | SIGHASH_ANYONECANPAY,
])
def test_p2pkh_spend_verifies(hash_type: int) -> None:
    store = KeyStore().with_key(ALICE).with_key(key("alice-old", compressed=False))
    old = key("alice-old", compressed=False)
    wallet = wallet_of(
        store,
        Entry(700, p2pkh_script(ALICE.public_key.hash160), height=5),
        Entry(500, p2pkh_script(old.public_key.hash160), height=3),
    )
    bob_script = p2pkh_script(BOB.public_key.hash160)
    psbt = wallet.pay(None, 1_000, bob_script, hash_type=hash_type,
                      change_script=p2pkh_script(ALICE.public_key.hash160))
    assert not psbt.is_complete and psbt.missing_inputs() == (0, 1)
    signed = psbt.add_signatures(store)
    assert signed.is_complete
    tx = signed.finalize()
    verify_all(tx, signed)
    assert [o.value for o in tx.outputs] == [1_000, 200]
    assert tx.outputs[0].script_pubkey == bob_script
    # the oldest coin (height 3) is input 0
    assert tx.inputs[0].prevout == outpoint(1)
    assert Transaction.parse(tx.serialize()) == tx


def test_p2pk_coin_is_held_and_spent() -> None:
    store = KeyStore().with_key(ALICE)
    wallet = wallet_of(store, Entry(42, p2pk_script(ALICE.public_key.sec)))
    assert wallet.balance(None) == 42
    assert wallet.balances_by_address() == {p2pkh_address(ALICE.public_key.hash160): {None: 42}}
    psbt = wallet.pay(None, 42, p2pkh_script(BOB.public_key.hash160))
    tx = psbt.add_signatures(store).finalize()
    verify_all(tx, psbt)


def test_wallet_ignores_outputs_it_does_not_hold() -> None:
    store = KeyStore().with_key(ALICE)
    wallet = wallet_of(store, Entry(5, p2pkh_script(ALICE.public_key.hash160)),
                       Entry(9, p2pkh_script(BOB.public_key.hash160)))
    assert len(wallet.coins) == 1 and wallet.balance(None) == 5


def _multisig_parties() -> tuple[bytes, KeyStore, KeyStore, KeyStore]:
    redeem = multisig_redeem_script(2, [k.public_key.sec for k in (ALICE, BOB, CAROL)])
    return (
        redeem,
        KeyStore().with_key(ALICE).with_redeem_script(redeem),
        KeyStore().with_key(BOB).with_redeem_script(redeem),
        KeyStore().with_key(CAROL).with_redeem_script(redeem),
    )


def test_p2sh_2_of_3_from_two_separate_keystores() -> None:
    redeem, alice, _, carol = _multisig_parties()
    escrow = p2sh_script(hash160(redeem))
    wallet = wallet_of(alice, Entry(1_000, escrow), Entry(50, escrow, height=9))
    assert wallet.coins[0].redeem_script == redeem
    psbt = wallet.pay(None, 1_000, p2pkh_script(BOB.public_key.hash160))
    by_alice = psbt.add_signatures(alice)
    by_carol = psbt.add_signatures(carol)
    assert not by_alice.is_complete and not by_carol.is_complete
    with pytest.raises(WalletError) as caught:
        by_alice.finalize()
    assert caught.value.code == "wallet-incomplete"
    # either combination order gives the same transaction: signatures are placed in
    # the redeem script's key order (ALICE before CAROL), as CHECKMULTISIG requires
    tx = combine(by_alice, by_carol).finalize()
    assert tx == combine(by_carol, by_alice).finalize()
    verify_all(tx, psbt)
    pushes = [data for _, data in iter_ops(tx.inputs[0].script_sig)]
    message = legacy_sighash(tx, 0, redeem, SIGHASH_ALL)
    assert ALICE.public_key.verify(pushes[1][:-1], message)  # type: ignore[index]
    assert CAROL.public_key.verify(pushes[2][:-1], message)  # type: ignore[index]


def test_partial_tx_travels_as_json_and_rejects_forged_signatures() -> None:
    redeem, alice, bob, _ = _multisig_parties()
    escrow = p2sh_script(hash160(redeem))
    # Bob's co-signer store only knows the redeem script; the psbt carries it anyway
    psbt = wallet_of(alice, Entry(10, escrow)).pay(None, 10, p2pkh_script(CAROL.public_key.hash160))
    wire = json.dumps(psbt.add_signatures(alice).to_dict())
    received = PartiallySignedTx.from_dict(json.loads(wire))
    tx = received.add_signatures(bob).finalize()
    verify_all(tx, psbt)

    # a signature over a different message is refused on the way in
    data = json.loads(wire)
    (sec_hex, sig_hex), = data["inputs"][0]["signatures"].items()
    forged = bytes.fromhex(sig_hex)
    forged = forged[:10] + bytes([forged[10] ^ 1]) + forged[11:]
    data["inputs"][0]["signatures"][sec_hex] = forged.hex()
    with pytest.raises(WalletError) as caught:
        PartiallySignedTx.from_dict(data)
    assert caught.value.code in ("wallet-bad-signature",)
    # a key that is not in the redeem script may not sign
    with pytest.raises(WalletError) as caught:
        received.with_signature(0, ISSUER_A.public_key.sec, bytes.fromhex(sig_hex))
    assert caught.value.code == "wallet-unknown-key"


def test_cosigners_supply_the_redeem_script_and_bare_multisig_signs() -> None:
    """A builder that knows only the P2SH output (watch-only) leaves the redeem script
    out; each co-signer's key store fills it in. Bare multisig outputs sign too."""
    redeem, alice, bob, _ = _multisig_parties()
    escrow = p2sh_script(hash160(redeem))
    bare = multisig_redeem_script(1, [CAROL.public_key.sec, BOB.public_key.sec])
    unsigned = Transaction(1, (TxIn(outpoint(1)), TxIn(outpoint(2))),
                           (TxOut(15, p2pkh_script(CAROL.public_key.hash160)),))
    psbt = PartiallySignedTx.create(unsigned, [SigningInput(escrow, 10), SigningInput(bare, 5)])
    assert psbt.missing_inputs() == (0, 1)
    by_alice = psbt.add_signatures(alice)
    assert by_alice.inputs[0].redeem_script == redeem
    by_bob = psbt.add_signatures(bob)
    tx = combine(psbt, combine(by_alice, by_bob)).finalize()
    verify_input(tx, 0, escrow, 10)
    verify_input(tx, 1, bare, 5)
    with pytest.raises(WalletError) as caught:  # a redeem script that is not the output's
        PartiallySignedTx.create(unsigned, [SigningInput(escrow, 10, redeem_script=bare),
                                            SigningInput(bare, 5)])
    assert caught.value.code == "wallet-bad-redeem-script"


def test_combine_refuses_different_transactions() -> None:
    store = KeyStore().with_key(ALICE)
    wallet = wallet_of(store, Entry(10, p2pkh_script(ALICE.public_key.hash160)))
    first = wallet.pay(None, 10, p2pkh_script(BOB.public_key.hash160))
    second = wallet.pay(None, 9, p2pkh_script(BOB.public_key.hash160))
    with pytest.raises(WalletError) as caught:
        combine(first, second)
    assert caught.value.code == "wallet-combine-mismatch"


def test_unknown_key_is_reported() -> None:
    store = KeyStore().with_key(ALICE)
    psbt = wallet_of(store, Entry(10, p2pkh_script(ALICE.public_key.hash160))).pay(
        None, 10, p2pkh_script(BOB.public_key.hash160))
    with pytest.raises(WalletError) as caught:
        psbt.add_signatures(KeyStore().with_key(BOB))
    assert caught.value.code == "wallet-unknown-key"


def test_refuses_unspendable_recipients_and_blind_single_signatures() -> None:
    store = KeyStore().with_key(ALICE)
    mine = p2pkh_script(ALICE.public_key.hash160)
    wallet = wallet_of(store, Entry(10, mine), Entry(0, mine, BOND, 5))
    for asset, amount in ((None, 10), (BOND, 5)):
        with pytest.raises(WalletError) as caught:
            wallet.pay(asset, amount, bytes.fromhex("6a04deadbeef"))
        assert caught.value.code == "wallet-unspendable-script"
    # SINGLE on input 1 of a 1-output tx would sign Bitcoin's constant "one"
    two_inputs = wallet_of(store, Entry(6, mine), Entry(4, mine))
    with pytest.raises(WalletError) as caught:
        two_inputs.pay(None, 10, p2pkh_script(BOB.public_key.hash160), hash_type=SIGHASH_SINGLE)
    assert caught.value.code == "wallet-single-no-output"
    with pytest.raises(WalletError) as caught:
        wallet.pay(None, 10, mine, hash_type=0x04)
    assert caught.value.code == "wallet-bad-hash-type"


# --- coin selection ---------------------------------------------------------------------


def _mixed_wallet() -> Wallet:
    store = KeyStore().with_key(ALICE)
    mine = p2pkh_script(ALICE.public_key.hash160)
    return wallet_of(
        store,
        Entry(100, mine, height=7),
        Entry(300, mine, height=2),
        Entry(200, mine, height=2),
        Entry(0, mine, BOND, 40, height=1),
        Entry(5, mine, BOND, 70, height=4),
        Entry(0, mine, CASH, 1_000, height=3),
    )


def test_selection_is_per_asset_and_deterministic() -> None:
    wallet = _mixed_wallet()
    assert wallet.balances() == {None: 605, BOND: 110, CASH: 1_000}
    native = wallet.select(None, 350)
    assert [c.value for c in native.coins] == [300, 200]  # oldest, then larger first
    assert native.change == 150 and all(c.asset_id is None for c in native.coins)
    largest = wallet.select(None, 350, order=SelectionOrder.LARGEST_FIRST)
    assert [c.value for c in largest.coins] == [300, 200]
    assert [c.value for c in wallet.select(None, 250, order=SelectionOrder.LARGEST_FIRST)
            .coins] == [300]
    bond = wallet.select(BOND, 50)
    assert [c.quantity for c in bond.coins] == [40, 70] and bond.change == 60
    assert [c.quantity for c in wallet.select(BOND, 50, order=SelectionOrder.LARGEST_FIRST)
            .coins] == [70]
    assert [c.asset_id for c in wallet.select(CASH, 1).coins] == [CASH]
    assert wallet.select(None, 350) == wallet.select(None, 350)


def test_insufficient_funds_names_asset_and_amounts() -> None:
    wallet = _mixed_wallet()
    with pytest.raises(WalletError) as caught:
        wallet.select(BOND, 111)
    assert caught.value.code == "wallet-insufficient-funds"
    assert BOND in caught.value.message and "111" in caught.value.message
    assert "110" in caught.value.message
    with pytest.raises(WalletError) as caught:
        wallet.pay(None, 601, p2pkh_script(BOB.public_key.hash160))
    # the 5 units of native value on a colored coin are not spendable as cash
    assert caught.value.code == "wallet-insufficient-funds" and "600" in caught.value.message
    with pytest.raises(WalletError) as caught:
        wallet.select(CASH, 0)
    assert caught.value.code == "wallet-bad-amount"


def test_selection_input_limit() -> None:
    mine = p2pkh_script(ALICE.public_key.hash160)
    coins = [Coin(outpoint(n), 1, mine) for n in range(SELECTION_INPUTS_MAX + 1)]
    assert len(select_coins(coins, None, SELECTION_INPUTS_MAX).coins) == SELECTION_INPUTS_MAX
    with pytest.raises(WalletError) as caught:
        select_coins(coins, None, SELECTION_INPUTS_MAX + 1)
    assert caught.value.code == "wallet-too-many-inputs"


def test_asset_transfer_carries_units_and_returns_change() -> None:
    store = KeyStore().with_key(ALICE)
    wallet = _mixed_wallet()
    bob_script = p2pkh_script(BOB.public_key.hash160)
    psbt = wallet.pay(BOND, 50, bob_script)
    colored = psbt.colored_outputs()
    mine = p2pkh_script(ALICE.public_key.hash160)
    assert parse_marker(psbt.tx.outputs[0].script_pubkey) is not None
    assert colored[1] == (BOND, 50) and psbt.tx.outputs[1].script_pubkey == bob_script
    assert colored[2] == (BOND, 60) and psbt.tx.outputs[2].script_pubkey == mine
    # the 5 native units on the colored input come back to the sender, uncolored
    assert [(o.value, c) for o, c in zip(psbt.tx.outputs, colored, strict=True)][3:] == [
        (5, (None, 0))]
    tx = psbt.add_signatures(store).finalize()
    verify_all(tx, psbt)


def test_issuance_uses_issuer_first_input_and_metadata() -> None:
    issuer = p2pkh_script(ISSUER_A.public_key.hash160)
    store = KeyStore().with_key(ISSUER_A)
    wallet = wallet_of(store, Entry(10, issuer, height=1))
    definition_ref = b"u=" + sha256(b"KR-BOND-2030")  # whatever ledger.assets defines
    psbt = wallet.issue(1_000_000, p2pkh_script(ALICE.public_key.hash160),
                        metadata=definition_ref)
    marker = parse_marker(psbt.tx.outputs[1].script_pubkey)
    assert marker is not None and marker.metadata == definition_ref
    assert marker.quantities == (1_000_000,)
    assert psbt.colored_outputs() == [(BOND, 1_000_000), (None, 0), (None, 0)]
    assert psbt.tx.outputs[2].value == 10
    effects = check_asset_rules(psbt.tx, psbt.spent_outputs(), issuer_scripts=[issuer])
    assert effects.issued_asset_id == BOND and effects.issued_quantity == 1_000_000
    tx = psbt.add_signatures(store).finalize()
    verify_all(tx, psbt)
    with pytest.raises(WalletError) as caught:
        wallet_of(store).issue(1, issuer)
    assert caught.value.code == "wallet-no-issuing-coin"
    # with uncolored coins at two scripts the issuing script must be named
    two = KeyStore().with_key(ISSUER_A).with_key(ISSUER_B)
    both = wallet_of(two, Entry(1, issuer, height=2),
                     Entry(1, p2pkh_script(ISSUER_B.public_key.hash160), height=1))
    with pytest.raises(WalletError) as caught:
        both.issue(5, issuer)
    assert caught.value.code == "wallet-issuer-ambiguous"
    named = both.issue(5, issuer, issuer_script=issuer)
    assert named.colored_outputs()[0] == (BOND, 5)


# --- two-party delivery versus payment ----------------------------------------------------


def test_delivery_versus_payment_signed_by_each_owner() -> None:
    alice_script = p2pkh_script(ALICE.public_key.hash160)
    bob_script = p2pkh_script(BOB.public_key.hash160)
    alice_store = KeyStore().with_key(ALICE)
    bob_store = KeyStore().with_key(BOB)
    utxos = [
        (outpoint(1), Entry(0, alice_script, BOND, 30, height=2)),
        (outpoint(2), Entry(3, alice_script, BOND, 20, height=3)),
        (outpoint(3), Entry(0, bob_script, CASH, 9_000, height=2)),
        (outpoint(4), Entry(11, bob_script, None, 0, height=2)),
    ]
    alice = Wallet.from_utxos(alice_store, utxos)
    bob = Wallet.from_utxos(bob_store, utxos)
    # Alice delivers 45 bond units, Bob pays 8,500 cash units, in one transaction
    psbt = build_transfer([alice.leg(BOND, 45, bob_script), bob.leg(CASH, 8_500, alice_script)])

    # each party reviews what it receives before signing
    received: dict[tuple[bytes, str | None], int] = {}
    for output, (asset, quantity) in zip(psbt.tx.outputs, psbt.colored_outputs(), strict=True):
        slot = (output.script_pubkey, asset)
        received[slot] = received.get(slot, 0) + quantity
    assert received[(bob_script, BOND)] == 45 and received[(alice_script, CASH)] == 8_500
    assert received[(alice_script, BOND)] == 5 and received[(bob_script, CASH)] == 500

    signed_by_alice = psbt.add_signatures(alice_store)
    signed_by_bob = psbt.add_signatures(bob_store)
    assert signed_by_alice.missing_inputs() == (2,)
    assert signed_by_bob.missing_inputs() == (0, 1)
    tx = combine(signed_by_alice, signed_by_bob).finalize()
    verify_all(tx, psbt)
    effects = check_asset_rules(tx, psbt.spent_outputs(), issuer_scripts=())
    assert effects.issued_quantity == 0
    assert sum(o.value for o in tx.outputs) == 3  # native value conserved, no fees
    # Alice's signature alone does not make the swap: Bob's input stays unsigned
    with pytest.raises(WalletError):
        signed_by_alice.finalize()


# --- Hypothesis: any selection conserves value and units ------------------------------------

ASSETS = [None, BOND, CASH]
PARTY_SCRIPTS = [p2pkh_script(key(f"party-{n}").public_key.hash160) for n in range(3)]
RECIPIENT_SCRIPTS = [p2pkh_script(key(f"recipient-{n}").public_key.hash160) for n in range(3)]

Party = tuple[list[Coin], str | None, int, SelectionOrder]


@st.composite
def parties(draw: st.DrawFn) -> list[Party]:
    """One to three parties, each with its own coins and one payment to make."""
    result = []
    for party in range(draw(st.integers(1, 3))):
        coins = []
        for n in range(draw(st.integers(1, 10))):
            asset = draw(st.sampled_from(ASSETS))
            quantity = 0 if asset is None else draw(st.integers(1, 10**12))
            coins.append(Coin(outpoint(100 * party + n, draw(st.integers(0, 3))),
                              draw(st.integers(0, 10**6)), PARTY_SCRIPTS[party], asset, quantity,
                              draw(st.integers(0, 50))))
        asset = draw(st.sampled_from(ASSETS))
        amount = draw(st.integers(1, 2 * 10**12 if asset else 2 * 10**6))
        result.append((coins, asset, amount, draw(st.sampled_from(list(SelectionOrder)))))
    return result


def holdings(tx: Transaction, colors: list[tuple[str | None, int]],
             script: bytes) -> dict[str | None, int]:
    """{None: native value, asset: units} of the outputs of ``tx`` paying ``script``."""
    result: dict[str | None, int] = {}
    for output, (asset, quantity) in zip(tx.outputs, colors, strict=True):
        if output.script_pubkey == script:
            result[None] = result.get(None, 0) + output.value
            if asset is not None:
                result[asset] = result.get(asset, 0) + quantity
    return {a: q for a, q in result.items() if q}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parties())
def test_any_selection_conserves_value_and_units(case: list[Party]) -> None:
    legs: list[Leg] = []
    payers: list[int] = []
    for party, (coins, asset, amount, order) in enumerate(case):
        available = sum(c.amount_of(asset) for c in coins
                        if c.asset_id == asset and (asset is not None or c.value > 0))
        try:
            selection = select_coins(coins, asset, amount, order=order)
        except WalletError as error:
            assert error.code == "wallet-insufficient-funds" and available < amount
            continue
        assert available >= amount and selection.total >= amount
        # the last coin taken was needed: the selection stops as soon as it suffices
        assert selection.total - selection.coins[-1].amount_of(asset) < amount
        legs.append(Leg(selection.coins, asset, amount, RECIPIENT_SCRIPTS[party],
                        PARTY_SCRIPTS[party]))
        payers.append(party)
    if not legs:
        return
    psbt = build_transfer(legs)
    tx, spent = psbt.tx, psbt.spent_outputs()
    colors = color_outputs(tx, spent)
    check_asset_rules(tx, spent, issuer_scripts=())
    assert sum(i.value for i in psbt.inputs) == sum(o.value for o in tx.outputs)
    for party, leg in zip(payers, legs, strict=True):
        # the recipient gets exactly the payment; the payer keeps everything else
        paid = {leg.asset_id: leg.amount}
        assert holdings(tx, colors, RECIPIENT_SCRIPTS[party]) == paid
        before: dict[str | None, int] = {None: sum(c.value for c in leg.coins)}
        if leg.asset_id is not None:
            before[leg.asset_id] = leg.total
        before[leg.asset_id] -= leg.amount
        assert holdings(tx, colors, PARTY_SCRIPTS[party]) == {
            a: q for a, q in before.items() if q}


# --- cross-check with the independent bitcoin-utils library (tests only) ---------------------

bitcoinutils = pytest.importorskip("bitcoinutils")
from bitcoinutils import setup as bu_setup  # noqa: E402
from bitcoinutils.keys import PrivateKey as BuPrivateKey  # noqa: E402
from bitcoinutils.script import Script as BuScript  # noqa: E402
from bitcoinutils.transactions import Transaction as BuTransaction  # noqa: E402

bu_setup.setup("mainnet")
if hasattr(bu_setup, "set_security_warnings"):
    bu_setup.set_security_warnings(False)


def _ecdsa_verifies(pubkey_sec: bytes, sig_with_hashtype: bytes, digest: bytes) -> bool:
    """Verification by python-ecdsa (bitcoin-utils' backend), independent of coincurve."""
    import ecdsa
    from ecdsa.util import sigdecode_der

    verifying_key = ecdsa.VerifyingKey.from_string(pubkey_sec, curve=ecdsa.SECP256k1)
    try:
        return bool(verifying_key.verify_digest(sig_with_hashtype[:-1], digest,
                                                sigdecode=sigdecode_der))
    except ecdsa.BadSignatureError:
        return False


@pytest.mark.parametrize("hash_type", [SIGHASH_ALL, SIGHASH_NONE,
                                       SIGHASH_SINGLE | SIGHASH_ANYONECANPAY])
def test_wallet_p2pkh_spend_verifies_with_bitcoin_utils(hash_type: int) -> None:
    old = key("alice-old", compressed=False)
    store = KeyStore().with_key(ALICE).with_key(old)
    wallet = wallet_of(store, Entry(700, p2pkh_script(ALICE.public_key.hash160), height=5),
                       Entry(500, p2pkh_script(old.public_key.hash160), height=3))
    psbt = wallet.pay(None, 1_000, p2pkh_script(BOB.public_key.hash160), hash_type=hash_type)
    tx = psbt.add_signatures(store).finalize()
    theirs = BuTransaction.from_raw(tx.serialize().hex())
    assert theirs.to_bytes(False) == tx.serialize()
    assert theirs.get_txid() == tx.txid
    for index, (info, signer) in enumerate(zip(psbt.inputs, (old, ALICE), strict=True)):
        digest = theirs.get_transaction_digest(
            index, BuScript.from_raw(info.script_pubkey.hex()), hash_type)
        assert digest == psbt.sighash(index)
        signature, pubkey = [data for _, data in iter_ops(tx.inputs[index].script_sig)]
        assert signature is not None and pubkey == signer.public_key.sec
        assert signature[-1] == hash_type
        assert _ecdsa_verifies(signer.public_key.sec, signature, digest)
        assert not _ecdsa_verifies(BOB.public_key.sec, signature, digest)


def test_bitcoin_utils_cosigns_a_wallet_multisig_spend() -> None:
    """A 2-of-3 escrow where one signature comes from bitcoin-utils and one from our
    key store; the combined transaction also parses and hashes identically there."""
    redeem, alice, _, _ = _multisig_parties()
    escrow = p2sh_script(hash160(redeem))
    psbt = wallet_of(alice, Entry(77, escrow)).pay(None, 77, p2pkh_script(CAROL.public_key.hash160))
    unsigned = BuTransaction.from_raw(psbt.tx.serialize().hex())
    bu_bob = BuPrivateKey(secret_exponent=int.from_bytes(BOB.secret, "big"))
    bu_signature = bytes.fromhex(
        bu_bob.sign_input(unsigned, 0, BuScript.from_raw(redeem.hex()), SIGHASH_ALL))
    cosigned = psbt.with_signature(0, BOB.public_key.sec, bu_signature).add_signatures(alice)
    tx = cosigned.finalize()
    verify_all(tx, psbt)
    theirs = BuTransaction.from_raw(tx.serialize().hex())
    assert theirs.to_bytes(False) == tx.serialize() and theirs.get_txid() == tx.txid
    digest = theirs.get_transaction_digest(0, BuScript.from_raw(redeem.hex()), SIGHASH_ALL)
    pushes = [data for _, data in iter_ops(tx.inputs[0].script_sig)]
    assert pushes[0] == b"" and pushes[-1] == redeem
    assert _ecdsa_verifies(ALICE.public_key.sec, pushes[1], digest)  # type: ignore[arg-type]
    assert pushes[2] == bu_signature


# --- end to end against the UTXO state: issue, then swap, block by block -----------------


def test_dvp_end_to_end_against_the_state() -> None:
    from ledger.assets import AssetDefinition
    from ledger.block import make_block
    from ledger.state import LedgerRules, apply_block, balances, check_tx, state_from_genesis

    issuer_a = p2pkh_script(ISSUER_A.public_key.hash160)
    issuer_b = p2pkh_script(ISSUER_B.public_key.hash160)
    alice_script = p2pkh_script(ALICE.public_key.hash160)
    bob_script = p2pkh_script(BOB.public_key.hash160)
    genesis_hash = sha256(b"wallet-test-genesis")
    state = state_from_genesis(genesis_hash, [(issuer_a, 10), (issuer_b, 20), (alice_script, 3),
                                              (bob_script, 4)], index_scripts=True)
    rules = LedgerRules(frozenset({issuer_a, issuer_b}))
    bond_terms = AssetDefinition("KR-BOND-2030", "Test bond 2030", "bond", "securities-a",
                                 "KRW", maturity="2030-06-30", coupon_bp=350)
    cash_terms = AssetDefinition("KRW-CASH", "Cash deposit token", "cash", "securities-b", "KRW")
    store_a, store_b = KeyStore().with_key(ISSUER_A), KeyStore().with_key(ISSUER_B)
    issue_bond = Wallet.from_utxos(store_a, state.items()).issue(
        100, alice_script, definition=bond_terms)
    issue_cash = Wallet.from_utxos(store_b, state.items()).issue(
        50_000, bob_script, definition=cash_terms)
    txs = [p.add_signatures(s).finalize() for p, s in ((issue_bond, store_a),
                                                       (issue_cash, store_b))]
    block = make_block(ISSUER_A, height=1, prev_hash=genesis_hash, time_ms=0,
                       proposer="securities-a", round_=0, txs=txs)
    state = apply_block(state, block, rules)
    assert balances(state, alice_script) == {None: 3, BOND: 100}
    assert state.definition_hash(BOND) == bond_terms.definition_hash

    alice_store, bob_store = KeyStore().with_key(ALICE), KeyStore().with_key(BOB)
    alice = Wallet.from_state(alice_store, state)  # through the state's script index
    bob = Wallet.from_state(bob_store, state)
    assert alice == Wallet.from_utxos(alice_store, state.items())
    assert alice.balances() == {None: 3, BOND: 100}
    swap = build_transfer([alice.leg(BOND, 40, bob_script), bob.leg(CASH, 41_000, alice_script)])
    # before signing, each party checks the counterparty's inputs against its own state
    swap.check_spent_outputs(state.get)
    lying = replace(swap, inputs=(swap.inputs[0], replace(swap.inputs[1], quantity=90_000)))
    with pytest.raises(WalletError) as caught:
        lying.check_spent_outputs(state.get)
    assert caught.value.code == "wallet-spent-mismatch"
    tx = combine(swap.add_signatures(alice_store), swap.add_signatures(bob_store)).finalize()
    effects = check_tx(state, tx, rules)
    assert effects.issued_quantity == 0
    # without Bob's signature the state refuses the swap (scripts are checked)
    bob_input = len(tx.inputs) - 1
    with pytest.raises(ScriptError):
        check_tx(state, tx.with_script_sig(bob_input, b""), rules)
    block2 = make_block(ISSUER_B, height=2, prev_hash=block.hash, time_ms=1,
                        proposer="securities-b", round_=0, txs=[tx])
    state = apply_block(state, block2, rules)
    assert balances(state, alice_script) == {None: 3, BOND: 60, CASH: 41_000}
    assert balances(state, bob_script) == {None: 4, BOND: 40, CASH: 9_000}

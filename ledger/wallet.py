"""The wallet: keys, the spendable outputs they control, coin selection, building and
(partially) signing transactions.

Owns:
- ``KeyStore``: private keys by P2PKH address and m-of-n multisig redeem scripts by
  P2SH address (n <= 15); WIF import/export. Immutable: ``with_*`` returns a new store.
  Secrets never appear in ``repr``/``str``.
- ``Coin`` and ``Wallet``: a frozen view of the outputs a key store controls, fed from
  the UTXO state (any ``(OutPoint, entry)`` pairs whose entry has ``value``,
  ``script_pubkey``, ``asset_id``, ``quantity``, ``height``), with balances by asset
  and by address, and deterministic coin selection per asset (see ``SelectionOrder``).
- ``Leg`` / ``build_transfer`` / ``build_issuance``: transactions that follow the
  ledger's rules by construction: no fees (native value in == out exactly), Open
  Assets markers whose coloring carries every input unit to an output (payment plus
  change back to the sender), issuance from the issuer's first input.
- ``PartiallySignedTx``: an unsigned transaction plus what each input spends and the
  signatures collected so far by public key. Several parties add signatures from
  their own key stores and ``combine`` the results; ``finalize`` orders multisig
  signatures as the redeem script requires and checks every input with the
  interpreter. This is how a two-party delivery-versus-payment is signed.

Pure: no I/O, no clock, no randomness (keys come in from the caller). Imports
``ledger.keys``, ``ledger.tx``, ``ledger.sighash``, ``ledger.script``,
``ledger.address``, ``ledger.interpreter``, ``ledger.oap``, ``ledger.assets``,
``ledger.state`` (read models only), ``ledger.hashing``, ``ledger.errors``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ledger.address import (
    P2PKH_VERSION_MAINNET,
    P2SH_VERSION_MAINNET,
    p2pkh_address,
    p2sh_address,
    script_to_address,
)
from ledger.assets import AssetDefinition
from ledger.errors import ScriptError, WalletError
from ledger.hashing import hash160
from ledger.interpreter import verify_input
from ledger.keys import WIF_VERSION_MAINNET, PrivateKey, PublicKey, verify_der
from ledger.oap import SpentOutput, asset_id, build_marker, check_asset_rules, color_outputs
from ledger.script import (
    MULTISIG_KEYS_STANDARD_MAX,
    OP_RETURN,
    SCRIPT_ELEMENT_BYTES_MAX,
    ScriptTemplate,
    classify,
    multisig_params,
    multisig_script,
    multisig_script_sig,
    p2pk_script,
    p2pk_script_sig,
    p2pkh_script,
    p2pkh_script_sig,
    p2sh_multisig_script_sig,
    p2sh_script,
)
from ledger.sighash import SIGHASH_ALL, SIGHASH_ANYONECANPAY, SIGHASH_SINGLE, legacy_sighash
from ledger.state import LedgerState, utxos_of
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

SELECTION_INPUTS_MAX = 500  # coins one selection may spend (bounds tx size and signing work)
COINS_PER_SCRIPT_MAX = 10_000  # coins read per held script from an indexed state
TX_LEGS_MAX = 16  # legs (party payments) in one built transaction
TX_VERSION = 1
_DEFINED_BASE_TYPES = (1, 2, 3)  # ALL, NONE, SINGLE


# ---------------------------------------------------------------------------
# Key store


@dataclass(frozen=True)
class KeyStore:
    """Private keys (by HASH160 of their SEC public key) and multisig redeem scripts
    (by HASH160 of the script). ``with_*`` methods return a new store.

    A P2SH address is "held" when the store knows its redeem script, even with only
    some (or none) of its keys: the wallet tracks shared-custody outputs and signs
    what it can; the other signatures come from the co-signers' stores.
    """

    p2pkh_version: int = P2PKH_VERSION_MAINNET
    p2sh_version: int = P2SH_VERSION_MAINNET
    wif_version: int = WIF_VERSION_MAINNET
    _keys: Mapping[bytes, PrivateKey] = field(default_factory=dict, repr=False)
    # HASH160 -> SEC public key of each key, derived once (a derivation is an EC
    # multiplication, as costly as a signature)
    _pubkeys: Mapping[bytes, bytes] = field(default_factory=dict, repr=False)
    _redeem_scripts: Mapping[bytes, bytes] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (
            f"KeyStore(keys={len(self._keys)}, redeem_scripts={len(self._redeem_scripts)}, "
            f"addresses={list(self.addresses())!r})"
        )

    __str__ = __repr__

    # -- adding -------------------------------------------------------------

    def with_key(self, key: PrivateKey) -> KeyStore:
        sec = key.public_key.sec
        pubkey_hash = hash160(sec)
        return replace(self, _keys={**self._keys, pubkey_hash: key},
                       _pubkeys={**self._pubkeys, pubkey_hash: sec})

    def with_wif(self, wif: str) -> KeyStore:
        """Import a key in Wallet Import Format (EncodingError when it does not decode)."""
        return self.with_key(PrivateKey.from_wif(wif, self.wif_version))

    def with_redeem_script(self, redeem_script: bytes) -> KeyStore:
        """Hold a P2SH m-of-n multisig redeem script (n <= 15)."""
        params = multisig_params(redeem_script)
        if params is None or len(params[1]) > MULTISIG_KEYS_STANDARD_MAX:
            raise WalletError(
                f"redeem script {redeem_script.hex()} is not an m-of-n multisig with n <= "
                f"{MULTISIG_KEYS_STANDARD_MAX}",
                code="wallet-bad-multisig",
            )
        scripts = dict(self._redeem_scripts)
        scripts[hash160(redeem_script)] = redeem_script
        return replace(self, _redeem_scripts=scripts)

    def with_multisig(self, m: int, pubkeys: Sequence[PublicKey | bytes]) -> KeyStore:
        """Hold the m-of-n multisig over ``pubkeys`` in the given order (no sorting)."""
        secs = [key.sec if isinstance(key, PublicKey) else bytes(key) for key in pubkeys]
        if not 1 <= m <= len(secs) <= MULTISIG_KEYS_STANDARD_MAX:
            raise WalletError(
                f"multisig {m}-of-{len(secs)}: need 1 <= m <= n <= {MULTISIG_KEYS_STANDARD_MAX}",
                code="wallet-bad-multisig",
            )
        for sec in secs:
            PublicKey.parse(sec)  # raises KeyError_ for a key not on the curve
        return self.with_redeem_script(multisig_redeem_script(m, secs))

    # -- looking up ---------------------------------------------------------

    def key_for_hash(self, pubkey_hash20: bytes) -> PrivateKey | None:
        return self._keys.get(pubkey_hash20)

    def key_for_pubkey(self, pubkey_sec: bytes) -> PrivateKey | None:
        pubkey_hash = hash160(pubkey_sec)
        return self._keys.get(pubkey_hash) if self._pubkeys.get(pubkey_hash) == pubkey_sec else None

    def pubkey_for_hash(self, pubkey_hash20: bytes) -> bytes | None:
        """The SEC public key of a held key, by its HASH160."""
        return self._pubkeys.get(pubkey_hash20)

    def redeem_script_for_hash(self, script_hash20: bytes) -> bytes | None:
        return self._redeem_scripts.get(script_hash20)

    def redeem_script_for(self, script_pubkey: bytes) -> bytes | None:
        """The redeem script behind a P2SH output script, when this store holds it."""
        if classify(script_pubkey) is not ScriptTemplate.P2SH:
            return None
        return self._redeem_scripts.get(script_pubkey[2:22])

    def public_keys(self) -> tuple[PublicKey, ...]:
        return tuple(PublicKey(self._pubkeys[h]) for h in sorted(self._pubkeys))

    def redeem_scripts(self) -> tuple[bytes, ...]:
        return tuple(self._redeem_scripts[h] for h in sorted(self._redeem_scripts))

    def p2pkh_addresses(self) -> tuple[str, ...]:
        return tuple(p2pkh_address(h, self.p2pkh_version) for h in sorted(self._keys))

    def p2sh_addresses(self) -> tuple[str, ...]:
        return tuple(p2sh_address(h, self.p2sh_version) for h in sorted(self._redeem_scripts))

    def addresses(self) -> tuple[str, ...]:
        return self.p2pkh_addresses() + self.p2sh_addresses()

    def scripts(self) -> frozenset[bytes]:
        """Every output script this store holds: P2PKH and P2PK of each key, P2SH of
        each redeem script."""
        held = {p2pkh_script(h) for h in self._keys}
        held.update(p2pk_script(sec) for sec in self._pubkeys.values())
        held.update(p2sh_script(h) for h in self._redeem_scripts)
        return frozenset(held)

    def address_of(self, script_pubkey: bytes) -> str | None:
        return script_to_address(
            script_pubkey, p2pkh_version=self.p2pkh_version, p2sh_version=self.p2sh_version
        )

    def p2pkh_script_of(self, key: PrivateKey | PublicKey) -> bytes:
        public = key.public_key if isinstance(key, PrivateKey) else key
        return p2pkh_script(public.hash160)

    def export_wif(self, address: str) -> str:
        """The WIF of the key behind a P2PKH address this store holds."""
        for pubkey_hash, key in self._keys.items():
            if p2pkh_address(pubkey_hash, self.p2pkh_version) == address:
                return key.to_wif(self.wif_version)
        raise WalletError(f"no private key for address {address}", code="wallet-unknown-key")


def multisig_redeem_script(m: int, pubkeys_sec: Sequence[bytes]) -> bytes:
    """``OP_m <keys> OP_n OP_CHECKMULTISIG`` for a P2SH output (n <= 15)."""
    return multisig_script(m, pubkeys_sec)


# ---------------------------------------------------------------------------
# Coins and the wallet view


class UtxoLike(Protocol):
    """What the wallet reads from a UTXO entry (``ledger.state.UtxoEntry`` has it)."""

    @property
    def value(self) -> int: ...
    @property
    def script_pubkey(self) -> bytes: ...
    @property
    def asset_id(self) -> str | None: ...
    @property
    def quantity(self) -> int: ...
    @property
    def height(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Coin:
    """One unspent output the wallet may spend (``redeem_script`` set for P2SH)."""

    outpoint: OutPoint
    value: int
    script_pubkey: bytes
    asset_id: str | None = None
    quantity: int = 0
    height: int = 0
    redeem_script: bytes | None = None

    def amount_of(self, asset: str | None) -> int:
        """Units of ``asset`` this coin carries; native value when ``asset`` is None."""
        if asset is None:
            return self.value
        return self.quantity if self.asset_id == asset else 0

    @property
    def spent_output(self) -> SpentOutput:
        return (self.script_pubkey, self.asset_id, self.quantity)


class SelectionOrder(enum.Enum):
    """Deterministic coin orders; ties always broken by (txid, output index).

    OLDEST_FIRST (default): lowest height first, then the larger amount; spends aged
    outputs first so the set of outputs stays small and audits read in time order.
    LARGEST_FIRST: the larger amount first, then the lowest height; fewest inputs.
    """

    OLDEST_FIRST = "oldest-first"
    LARGEST_FIRST = "largest-first"


def _order_key(
    order: SelectionOrder, asset: str | None
) -> Callable[[Coin], tuple[int, int, bytes, int]]:
    def key(coin: Coin) -> tuple[int, int, bytes, int]:
        amount = coin.amount_of(asset)
        tie = (coin.outpoint.txid_le, coin.outpoint.index)
        if order is SelectionOrder.LARGEST_FIRST:
            return (-amount, coin.height, *tie)
        return (coin.height, -amount, *tie)

    return key


@dataclass(frozen=True, slots=True)
class Selection:
    """Coins chosen to pay ``amount`` of ``asset_id`` (None: native value)."""

    asset_id: str | None
    amount: int
    coins: tuple[Coin, ...]

    @property
    def total(self) -> int:
        return sum(coin.amount_of(self.asset_id) for coin in self.coins)

    @property
    def change(self) -> int:
        return self.total - self.amount


def _asset_name(asset: str | None) -> str:
    return "native value" if asset is None else f"asset {asset}"


def select_coins(
    coins: Iterable[Coin],
    asset: str | None,
    amount: int,
    *,
    order: SelectionOrder = SelectionOrder.OLDEST_FIRST,
    inputs_max: int = SELECTION_INPUTS_MAX,
) -> Selection:
    """Pick coins carrying at least ``amount`` of ``asset`` in the deterministic
    ``order``. Native payments (``asset`` None) use uncolored coins only, so asset
    units are never moved by accident."""
    _check_amount(asset, amount)
    if asset is None:
        eligible = [c for c in coins if c.asset_id is None and c.value > 0]
    else:
        eligible = [c for c in coins if c.asset_id == asset and c.quantity > 0]
    eligible.sort(key=_order_key(order, asset))
    chosen: list[Coin] = []
    total = 0
    for coin in eligible:
        if total >= amount:
            break
        if len(chosen) == inputs_max:
            raise WalletError(
                f"paying {amount} of {_asset_name(asset)} needs more than {inputs_max} inputs",
                code="wallet-too-many-inputs",
            )
        chosen.append(coin)
        total += coin.amount_of(asset)
    if total < amount:
        raise WalletError(
            f"insufficient funds: need {amount} of {_asset_name(asset)}, have {total} "
            f"in {len(chosen)} spendable outputs",
            code="wallet-insufficient-funds",
        )
    return Selection(asset, amount, tuple(chosen))


def _check_amount(asset: str | None, amount: int) -> None:
    if amount <= 0:
        raise WalletError(
            f"amount {amount} of {_asset_name(asset)} must be positive", code="wallet-bad-amount"
        )


@dataclass(frozen=True, slots=True)
class Leg:
    """One party's part of a transaction: it spends ``coins`` to pay ``amount`` of
    ``asset_id`` (None: native value) to ``recipient_script``; everything else those
    coins carry (unit change and all their native value) returns to ``change_script``."""

    coins: tuple[Coin, ...]
    asset_id: str | None
    amount: int
    recipient_script: bytes
    change_script: bytes

    @property
    def total(self) -> int:
        return sum(coin.amount_of(self.asset_id) for coin in self.coins)


@dataclass(frozen=True)
class Wallet:
    """A frozen view of the coins a key store holds. Coins are kept in (txid, index)
    order; build a new view from the state after each committed block."""

    keystore: KeyStore
    coins: tuple[Coin, ...] = ()

    @classmethod
    def from_utxos(
        cls, keystore: KeyStore, utxos: Iterable[tuple[OutPoint, UtxoLike]]
    ) -> Wallet:
        """The coins among ``utxos`` whose script the key store holds."""
        held = keystore.scripts()
        coins = [
            Coin(
                outpoint,
                entry.value,
                entry.script_pubkey,
                entry.asset_id,
                entry.quantity,
                entry.height,
                keystore.redeem_script_for(entry.script_pubkey),
            )
            for outpoint, entry in utxos
            if entry.script_pubkey in held
        ]
        coins.sort(key=lambda coin: (coin.outpoint.txid_le, coin.outpoint.index))
        return cls(keystore, tuple(coins))

    @classmethod
    def from_state(
        cls,
        keystore: KeyStore,
        state: LedgerState,
        *,
        coins_per_script_max: int = COINS_PER_SCRIPT_MAX,
    ) -> Wallet:
        """The coins the key store holds in ``state``: through the state's script index
        when it keeps one (at most ``coins_per_script_max`` per script), else one scan."""
        utxos: Iterable[tuple[OutPoint, UtxoLike]]
        if state.has_script_index:
            utxos = [
                pair
                for script in sorted(keystore.scripts())
                for pair in utxos_of(state, script, limit=coins_per_script_max)
            ]
        else:
            utxos = state.items()
        return cls.from_utxos(keystore, utxos)

    def without(self, outpoints: Iterable[OutPoint]) -> Wallet:
        """This view minus coins already being spent (e.g. by a pending transaction)."""
        gone = set(outpoints)
        return replace(self, coins=tuple(c for c in self.coins if c.outpoint not in gone))

    def coins_of(
        self, asset: str | None = None, *, script_pubkey: bytes | None = None
    ) -> tuple[Coin, ...]:
        """Coins of one asset (None: uncolored coins), optionally at one script."""
        return tuple(
            c
            for c in self.coins
            if c.asset_id == asset and (script_pubkey is None or c.script_pubkey == script_pubkey)
        )

    def balance(self, asset: str | None) -> int:
        """Units of ``asset``; for None, the native value of every coin (colored or not)."""
        return sum(coin.amount_of(asset) for coin in self.coins)

    def balances(self) -> dict[str | None, int]:
        """``{None: native value of all coins, asset_id: units, ...}``."""
        result: dict[str | None, int] = {None: 0}
        for coin in self.coins:
            result[None] += coin.value
            if coin.asset_id is not None:
                result[coin.asset_id] = result.get(coin.asset_id, 0) + coin.quantity
        return result

    def balances_by_address(self) -> dict[str, dict[str | None, int]]:
        """Balances (as ``balances``) per address; P2PK coins under their P2PKH address."""
        result: dict[str, dict[str | None, int]] = {}
        for coin in self.coins:
            address = self.keystore.address_of(coin.script_pubkey)
            if address is None and classify(coin.script_pubkey) is ScriptTemplate.P2PK:
                address = p2pkh_address(
                    hash160(coin.script_pubkey[1:-1]), self.keystore.p2pkh_version
                )
            key = address if address is not None else coin.script_pubkey.hex()
            entry = result.setdefault(key, {None: 0})
            entry[None] += coin.value
            if coin.asset_id is not None:
                entry[coin.asset_id] = entry.get(coin.asset_id, 0) + coin.quantity
        return result

    def select(
        self,
        asset: str | None,
        amount: int,
        *,
        order: SelectionOrder = SelectionOrder.OLDEST_FIRST,
        inputs_max: int = SELECTION_INPUTS_MAX,
    ) -> Selection:
        return select_coins(self.coins, asset, amount, order=order, inputs_max=inputs_max)

    def leg(
        self,
        asset: str | None,
        amount: int,
        recipient_script: bytes,
        *,
        change_script: bytes | None = None,
        order: SelectionOrder = SelectionOrder.OLDEST_FIRST,
    ) -> Leg:
        """Select coins and describe this wallet's part of a transfer. Change goes to
        ``change_script``, by default the script of the first selected coin."""
        selection = self.select(asset, amount, order=order)
        change = change_script if change_script is not None else selection.coins[0].script_pubkey
        return Leg(selection.coins, asset, amount, recipient_script, change)

    def pay(
        self,
        asset: str | None,
        amount: int,
        recipient_script: bytes,
        *,
        change_script: bytes | None = None,
        order: SelectionOrder = SelectionOrder.OLDEST_FIRST,
        hash_type: int = SIGHASH_ALL,
    ) -> PartiallySignedTx:
        """An unsigned transfer of ``amount`` of ``asset`` (None: native value)."""
        leg = self.leg(asset, amount, recipient_script, change_script=change_script, order=order)
        return build_transfer([leg], hash_type=hash_type)

    def issue(
        self,
        quantity: int,
        recipient_script: bytes,
        *,
        issuer_script: bytes | None = None,
        definition: AssetDefinition | None = None,
        metadata: bytes = b"",
        change_script: bytes | None = None,
        hash_type: int = SIGHASH_ALL,
        data_outputs: Sequence[bytes] = (),
    ) -> PartiallySignedTx:
        """An unsigned issuance of ``quantity`` new units of the asset of
        ``issuer_script``, funded by that script's oldest uncolored coin. ``issuer_script``
        may be left out only when all the wallet's uncolored coins share one script (the
        asset id must never depend on which coin happens to be oldest). The marker metadata is
        ``definition.reference()`` (``b"d=" + sha256``, which the state requires on an
        asset's first issuance) when ``definition`` is given, else ``metadata``."""
        if definition is not None:
            metadata = definition.reference()
        candidates = [
            coin
            for coin in self.coins
            if coin.asset_id is None
            and (issuer_script is None or coin.script_pubkey == issuer_script)
        ]
        if not candidates:
            where = "" if issuer_script is None else f" at script {issuer_script.hex()}"
            raise WalletError(
                f"no uncolored output{where} to fund the issuance (its script issues the asset)",
                code="wallet-no-issuing-coin",
            )
        if len({coin.script_pubkey for coin in candidates}) > 1:
            raise WalletError(
                "the wallet's uncolored outputs pay several scripts; name the issuer_script "
                "whose asset is issued",
                code="wallet-issuer-ambiguous",
            )
        candidates.sort(key=_order_key(SelectionOrder.OLDEST_FIRST, None))
        coin = candidates[0]
        change = change_script if change_script is not None else coin.script_pubkey
        return build_issuance(
            coin, quantity, recipient_script, metadata=metadata, change_script=change,
            hash_type=hash_type, data_outputs=data_outputs,
        )


# ---------------------------------------------------------------------------
# Building transactions


def _check_spendable(script: bytes, what: str) -> None:
    if script[:1] == bytes([OP_RETURN]) or not script:
        raise WalletError(f"{what} is not a spendable output script: {script.hex() or 'empty'}",
                          code="wallet-unspendable-script")


def _check_leg(leg: Leg, position: int) -> None:
    _check_amount(leg.asset_id, leg.amount)
    _check_spendable(leg.recipient_script, f"leg {position} recipient")
    _check_spendable(leg.change_script, f"leg {position} change")
    if not leg.coins:
        raise WalletError(f"leg {position} spends no coins", code="wallet-bad-leg")
    for coin in leg.coins:
        if coin.asset_id != leg.asset_id:
            raise WalletError(
                f"leg {position} pays {_asset_name(leg.asset_id)} but spends {coin.outpoint} "
                f"carrying {_asset_name(coin.asset_id)}",
                code="wallet-bad-leg",
            )
    if leg.total < leg.amount:
        raise WalletError(
            f"insufficient funds: leg {position} needs {leg.amount} of "
            f"{_asset_name(leg.asset_id)}, its coins carry {leg.total}",
            code="wallet-insufficient-funds",
        )


def build_transfer(
    legs: Sequence[Leg], *, hash_type: int = SIGHASH_ALL, lock_time: int = 0
) -> PartiallySignedTx:
    """One unsigned transaction carrying every leg.

    Layout (what the Open Assets coloring needs to carry every unit): inputs are the
    colored legs' coins in leg order, then the native legs' coins. When any leg moves
    an asset, output 0 is the marker and, per colored leg, the recipient's output and
    the unit change follow, in leg order, so each leg's inputs fill exactly its own
    outputs. Then native outputs: per native leg, the payment and its change; per
    colored leg, the native value of its coins back to its change script. Zero-valued
    change outputs are left out. Native value in == out exactly (no fees).
    """
    _check_hash_type(hash_type)
    if not 1 <= len(legs) <= TX_LEGS_MAX:
        raise WalletError(f"{len(legs)} legs (need 1..{TX_LEGS_MAX})", code="wallet-bad-leg")
    for position, leg in enumerate(legs):
        _check_leg(leg, position)
    colored = [leg for leg in legs if leg.asset_id is not None]
    native = [leg for leg in legs if leg.asset_id is None]
    coins = [coin for leg in colored for coin in leg.coins]
    coins += [coin for leg in native for coin in leg.coins]
    seen: set[OutPoint] = set()
    for coin in coins:
        if coin.outpoint in seen:
            raise WalletError(f"output {coin.outpoint} is spent by two legs",
                              code="wallet-duplicate-input")
        seen.add(coin.outpoint)

    outputs: list[TxOut] = []
    if colored:
        quantities: list[int] = []
        colored_outputs: list[TxOut] = []
        for leg in colored:
            colored_outputs.append(TxOut(0, leg.recipient_script))
            quantities.append(leg.amount)
            if leg.total > leg.amount:
                colored_outputs.append(TxOut(0, leg.change_script))
                quantities.append(leg.total - leg.amount)
        outputs.append(TxOut(0, build_marker(quantities)))
        outputs.extend(colored_outputs)
    for leg in native:
        outputs.append(TxOut(leg.amount, leg.recipient_script))
        if leg.total > leg.amount:
            outputs.append(TxOut(leg.total - leg.amount, leg.change_script))
    for leg in colored:
        value = sum(coin.value for coin in leg.coins)
        if value:
            outputs.append(TxOut(value, leg.change_script))

    tx = Transaction(
        TX_VERSION, tuple(TxIn(coin.outpoint) for coin in coins), tuple(outputs), lock_time
    )
    psbt = PartiallySignedTx.create(tx, coins, hash_type=hash_type)
    _assert_conserves(psbt, issuer_scripts=())
    return psbt


def build_issuance(
    issuing_coin: Coin,
    quantity: int,
    recipient_script: bytes,
    *,
    metadata: bytes = b"",
    change_script: bytes | None = None,
    hash_type: int = SIGHASH_ALL,
    data_outputs: Sequence[bytes] = (),
) -> PartiallySignedTx:
    """Issue ``quantity`` units of ``asset_id(issuing_coin.script_pubkey)``.

    Input 0 spends the (uncolored) issuing coin, whose script names the asset.
    Outputs: 0 the issued units to ``recipient_script``, 1 the marker (one quantity,
    ``metadata``), 2 the coin's native value back to ``change_script`` (default: the
    issuing script) when non-zero, then ``data_outputs`` (zero-valued OP_RETURN
    scripts, e.g. the asset's terms: ``ledger.assets.terms_output``).
    """
    _check_hash_type(hash_type)
    issued = asset_id(issuing_coin.script_pubkey)
    _check_amount(issued, quantity)
    _check_spendable(recipient_script, "issuance recipient")
    if issuing_coin.asset_id is not None:
        raise WalletError(
            f"issuing coin {issuing_coin.outpoint} carries {issuing_coin.asset_id}; "
            "issue from an uncolored output",
            code="wallet-issuing-coin-colored",
        )
    change = change_script if change_script is not None else issuing_coin.script_pubkey
    _check_spendable(change, "issuance change")
    outputs = [TxOut(0, recipient_script), TxOut(0, build_marker([quantity], metadata))]
    if issuing_coin.value:
        outputs.append(TxOut(issuing_coin.value, change))
    for script in data_outputs:
        if script[:1] != bytes([OP_RETURN]):
            raise WalletError("a data output must be an OP_RETURN script",
                              code="wallet-bad-data-output")
        outputs.append(TxOut(0, script))
    tx = Transaction(TX_VERSION, (TxIn(issuing_coin.outpoint),), tuple(outputs), 0)
    psbt = PartiallySignedTx.create(tx, [issuing_coin], hash_type=hash_type)
    _assert_conserves(psbt, issuer_scripts=(issuing_coin.script_pubkey,))
    return psbt


def _assert_conserves(psbt: PartiallySignedTx, *, issuer_scripts: Sequence[bytes]) -> None:
    """Invariant after building: value conserved, coloring valid and lossless."""
    tx = psbt.tx
    assert sum(i.value for i in psbt.inputs) == sum(o.value for o in tx.outputs)
    check_asset_rules(tx, psbt.spent_outputs(), issuer_scripts=issuer_scripts)


def _check_hash_type(hash_type: int) -> None:
    base = hash_type & ~SIGHASH_ANYONECANPAY
    if base not in _DEFINED_BASE_TYPES:
        raise WalletError(f"hash type 0x{hash_type:02x} is not a defined sighash type",
                          code="wallet-bad-hash-type")


# ---------------------------------------------------------------------------
# Partially signed transactions


@dataclass(frozen=True, slots=True)
class SigningInput:
    """What input i spends, as a signer needs to know it (and to review the deal)."""

    script_pubkey: bytes
    value: int
    asset_id: str | None = None
    quantity: int = 0
    redeem_script: bytes | None = None
    hash_type: int = SIGHASH_ALL

    @property
    def script_code(self) -> bytes:
        """The script the signature commits to: the redeem script for P2SH."""
        return self.redeem_script if self.redeem_script is not None else self.script_pubkey


# Per input: (pubkey SEC, DER signature + hash-type byte), sorted by pubkey.
InputSignatures = tuple[tuple[bytes, bytes], ...]


def _signers(info: SigningInput) -> tuple[int, tuple[bytes, ...]] | None:
    """(signatures needed, pubkeys allowed) for a known template; () pubkeys for
    P2PKH, whose key is only known by hash. None when the wallet cannot sign it."""
    template = classify(info.script_pubkey)
    if template is ScriptTemplate.P2PKH:
        return 1, ()
    if template is ScriptTemplate.P2PK:
        return 1, (info.script_pubkey[1:-1],)
    if template is ScriptTemplate.MULTISIG:
        return multisig_params(info.script_pubkey)
    if template is ScriptTemplate.P2SH and info.redeem_script is not None:
        params = multisig_params(info.redeem_script)
        if params is not None and len(params[1]) <= MULTISIG_KEYS_STANDARD_MAX:
            return params
    return None


def _accepts(info: SigningInput, pubkey_sec: bytes) -> bool:
    signers = _signers(info)
    if signers is None:
        return False
    if classify(info.script_pubkey) is ScriptTemplate.P2PKH:
        return hash160(pubkey_sec) == info.script_pubkey[3:23]
    return pubkey_sec in signers[1]


@dataclass(frozen=True, slots=True)
class PartiallySignedTx:
    """An unsigned transaction, what each input spends, and the signatures collected
    so far (per input, by public key). Every operation returns a new value."""

    tx: Transaction
    inputs: tuple[SigningInput, ...]
    signatures: tuple[InputSignatures, ...]

    def __post_init__(self) -> None:
        assert len(self.inputs) == len(self.tx.inputs) == len(self.signatures)
        assert all(txin.script_sig == b"" for txin in self.tx.inputs), "tx must be unsigned"

    @classmethod
    def create(
        cls, tx: Transaction, spent: Sequence[Coin | SigningInput], *, hash_type: int = SIGHASH_ALL
    ) -> PartiallySignedTx:
        """Wrap an unsigned ``tx``; ``spent`` describes each input's prevout in order."""
        _check_hash_type(hash_type)
        if len(spent) != len(tx.inputs):
            raise WalletError(
                f"{len(spent)} spent outputs described for {len(tx.inputs)} inputs",
                code="wallet-bad-inputs",
            )
        if any(txin.script_sig for txin in tx.inputs):
            raise WalletError("transaction already carries scriptSigs", code="wallet-bad-inputs")
        infos: list[SigningInput] = []
        for index, item in enumerate(spent):
            if isinstance(item, Coin):
                assert item.outpoint == tx.inputs[index].prevout
                info = SigningInput(item.script_pubkey, item.value, item.asset_id, item.quantity,
                                    item.redeem_script, hash_type)
            else:
                info = item
            _check_redeem_script(info, index)
            _check_single_has_output(tx, index, info.hash_type)
            infos.append(info)
        return cls(tx, tuple(infos), tuple(() for _ in infos))

    # -- review -------------------------------------------------------------

    def spent_outputs(self) -> list[SpentOutput]:
        """Per input ``(script_pubkey, asset_id, quantity)``, as ``color_outputs`` takes."""
        return [(i.script_pubkey, i.asset_id, i.quantity) for i in self.inputs]

    def colored_outputs(self) -> list[tuple[str | None, int]]:
        """What each output will carry once committed (the OAP coloring)."""
        return color_outputs(self.tx, self.spent_outputs())

    def check_spent_outputs(self, lookup: Callable[[OutPoint], UtxoLike | None]) -> None:
        """Check what each input claims to spend against the signer's own view of the
        state (e.g. ``state.get``): a counterparty could otherwise misdescribe its inputs
        (asset, quantity) and make ``colored_outputs`` show a deal that is not real."""
        for index, (txin, info) in enumerate(zip(self.tx.inputs, self.inputs, strict=True)):
            entry = lookup(txin.prevout)
            if entry is None:
                raise WalletError(f"input {index} spends {txin.prevout}, which is not unspent",
                                  code="wallet-spent-mismatch")
            claimed = (info.script_pubkey, info.value, info.asset_id, info.quantity)
            actual = (entry.script_pubkey, entry.value, entry.asset_id, entry.quantity)
            if claimed != actual:
                raise WalletError(
                    f"input {index} spends {txin.prevout}: described as {claimed[1:]} at "
                    f"{claimed[0].hex()}, the state holds {actual[1:]} at {actual[0].hex()}",
                    code="wallet-spent-mismatch",
                )

    def sighash(self, input_index: int) -> bytes:
        info = self.inputs[input_index]
        return legacy_sighash(self.tx, input_index, info.script_code, info.hash_type)

    # -- signing ------------------------------------------------------------

    def add_signatures(
        self, keystore: KeyStore, *, input_indices: Iterable[int] | None = None
    ) -> PartiallySignedTx:
        """Sign every input (or the given ones) the key store holds a key for.

        A P2SH input without its redeem script takes it from the key store. Raises
        ``wallet-unknown-key`` when the store can sign none of the inputs asked for.
        """
        indices = range(len(self.inputs)) if input_indices is None else tuple(input_indices)
        infos = list(self.inputs)
        signatures = list(self.signatures)
        signable = 0
        for index in indices:
            info = infos[index]
            if info.redeem_script is None:
                redeem = keystore.redeem_script_for(info.script_pubkey)
                if redeem is not None:
                    info = replace(info, redeem_script=redeem)
                    infos[index] = info
            keys = _keys_for(info, keystore)
            if not keys:
                continue
            signable += 1
            message = legacy_sighash(self.tx, index, info.script_code, info.hash_type)
            collected = dict(signatures[index])
            for key, sec in keys:
                if sec not in collected:
                    collected[sec] = key.sign(message) + bytes([info.hash_type & 0xFF])
            signatures[index] = tuple(sorted(collected.items()))
        if signable == 0:
            raise WalletError(
                f"the key store holds no key for inputs {list(indices)} of tx {self.tx.txid}",
                code="wallet-unknown-key",
            )
        return PartiallySignedTx(self.tx, tuple(infos), tuple(signatures))

    def with_signature(
        self, input_index: int, pubkey_sec: bytes, signature: bytes
    ) -> PartiallySignedTx:
        """Add one signature (DER + hash-type byte) made elsewhere; it is verified."""
        info = self.inputs[input_index]
        self._check_signature(input_index, info, pubkey_sec, signature)
        collected = dict(self.signatures[input_index])
        collected[pubkey_sec] = signature
        signatures = list(self.signatures)
        signatures[input_index] = tuple(sorted(collected.items()))
        return PartiallySignedTx(self.tx, self.inputs, tuple(signatures))

    def _check_signature(
        self, input_index: int, info: SigningInput, pubkey_sec: bytes, signature: bytes
    ) -> None:
        if not _accepts(info, pubkey_sec):
            raise WalletError(
                f"input {input_index}: key {pubkey_sec.hex()} may not sign its script",
                code="wallet-unknown-key",
            )
        if not signature or signature[-1] != info.hash_type & 0xFF:
            raise WalletError(
                f"input {input_index}: signature hash type does not match "
                f"0x{info.hash_type:02x}",
                code="wallet-bad-signature",
            )
        message = legacy_sighash(self.tx, input_index, info.script_code, info.hash_type)
        if not verify_der(pubkey_sec, signature[:-1], message):
            raise WalletError(
                f"input {input_index}: signature by {pubkey_sec.hex()} does not verify",
                code="wallet-bad-signature",
            )

    def combine(self, other: PartiallySignedTx) -> PartiallySignedTx:
        """The union of both parties' signatures over the same unsigned transaction.
        Signatures coming from ``other`` are verified before they are accepted."""
        if self.tx.serialize() != other.tx.serialize():
            raise WalletError(
                f"cannot combine signatures of different transactions {self.tx.txid} and "
                f"{other.tx.txid}",
                code="wallet-combine-mismatch",
            )
        infos: list[SigningInput] = []
        for index, (mine, theirs) in enumerate(zip(self.inputs, other.inputs, strict=True)):
            if replace(mine, redeem_script=None) != replace(theirs, redeem_script=None) or (
                None not in (mine.redeem_script, theirs.redeem_script)
                and mine.redeem_script != theirs.redeem_script
            ):
                raise WalletError(
                    f"input {index}: the two partial transactions describe different spent "
                    "outputs or hash types",
                    code="wallet-combine-mismatch",
                )
            infos.append(mine if mine.redeem_script is not None else theirs)
        result = PartiallySignedTx(self.tx, tuple(infos), self.signatures)
        for index, collected in enumerate(other.signatures):
            known = dict(result.signatures[index])
            for sec, signature in collected:
                if known.get(sec) != signature:
                    result = result.with_signature(index, sec, signature)
        return result

    # -- completion ---------------------------------------------------------

    def missing_inputs(self) -> tuple[int, ...]:
        """Indices of inputs that still lack enough signatures."""
        return tuple(
            index for index, info in enumerate(self.inputs)
            if not self._input_complete(index, info)
        )

    def _input_complete(self, index: int, info: SigningInput) -> bool:
        signers = _signers(info)
        if signers is None:
            return False
        needed, _ = signers
        usable = sum(1 for sec, _ in self.signatures[index] if _accepts(info, sec))
        return usable >= needed

    @property
    def is_complete(self) -> bool:
        return not self.missing_inputs()

    def finalize(self, *, verify: bool = True) -> Transaction:
        """The signed transaction: scriptSigs built from the collected signatures
        (multisig: the first m signers in the order of the script's public keys).
        With ``verify`` (default) every input is checked by the interpreter."""
        missing = self.missing_inputs()
        if missing:
            raise WalletError(
                f"tx {self.tx.txid}: inputs {list(missing)} lack signatures",
                code="wallet-incomplete",
            )
        tx = self.tx
        for index, info in enumerate(self.inputs):
            tx = tx.with_script_sig(index, self._script_sig(index, info))
        if verify:
            for index, info in enumerate(self.inputs):
                try:
                    verify_input(tx, index, info.script_pubkey, info.value)
                except ScriptError as error:
                    raise WalletError(
                        f"tx {tx.txid} input {index} does not verify: {error.code}: "
                        f"{error.message}",
                        code="wallet-verify-failed",
                    ) from error
        return tx

    def _script_sig(self, index: int, info: SigningInput) -> bytes:
        collected = dict(self.signatures[index])
        template = classify(info.script_pubkey)
        if template is ScriptTemplate.P2PKH:
            sec = next(s for s in sorted(collected) if _accepts(info, s))
            return p2pkh_script_sig(collected[sec], sec)
        if template is ScriptTemplate.P2PK:
            return p2pk_script_sig(collected[info.script_pubkey[1:-1]])
        signers = _signers(info)
        assert signers is not None
        needed, pubkeys = signers
        ordered = [collected[sec] for sec in pubkeys if sec in collected][:needed]
        if template is ScriptTemplate.MULTISIG:
            return multisig_script_sig(ordered)
        assert info.redeem_script is not None
        return p2sh_multisig_script_sig(ordered, info.redeem_script)

    # -- transport ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (hex strings) to pass between the parties."""
        return {
            "tx": self.tx.serialize().hex(),
            "inputs": [
                {
                    "script_pubkey": info.script_pubkey.hex(),
                    "value": info.value,
                    "asset_id": info.asset_id,
                    "quantity": info.quantity,
                    "redeem_script": None if info.redeem_script is None
                    else info.redeem_script.hex(),
                    "hash_type": info.hash_type,
                    "signatures": {sec.hex(): sig.hex() for sec, sig in sigs},
                }
                for info, sigs in zip(self.inputs, self.signatures, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartiallySignedTx:
        """Parse ``to_dict`` output; every signature is verified on the way in."""
        try:
            tx = Transaction.parse(bytes.fromhex(data["tx"]))
            infos = []
            signatures = []
            for index, item in enumerate(data["inputs"]):
                redeem = item["redeem_script"]
                info = SigningInput(
                    bytes.fromhex(item["script_pubkey"]),
                    int(item["value"]),
                    item["asset_id"],
                    int(item["quantity"]),
                    None if redeem is None else bytes.fromhex(redeem),
                    int(item["hash_type"]),
                )
                _check_hash_type(info.hash_type)
                _check_redeem_script(info, index)
                _check_single_has_output(tx, index, info.hash_type)
                infos.append(info)
                signatures.append(
                    tuple(sorted(
                        (bytes.fromhex(sec), bytes.fromhex(sig))
                        for sec, sig in item["signatures"].items()
                    ))
                )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise WalletError(f"partially signed tx does not decode: {error!r}",
                              code="wallet-decode") from None
        if len(infos) != len(tx.inputs) or any(txin.script_sig for txin in tx.inputs):
            raise WalletError("partially signed tx: inputs do not match the unsigned tx",
                              code="wallet-decode")
        unsigned = cls(tx, tuple(infos), tuple(() for _ in infos))
        result = unsigned
        for index, collected in enumerate(signatures):
            for sec, signature in collected:
                result = result.with_signature(index, sec, signature)
        return result


def _check_single_has_output(tx: Transaction, index: int, hash_type: int) -> None:
    # Bitcoin signs the constant "one" for SINGLE without a matching output: such a
    # signature would authorise spending the input in any transaction. Never make one.
    if hash_type & ~SIGHASH_ANYONECANPAY == SIGHASH_SINGLE and index >= len(tx.outputs):
        raise WalletError(
            f"input {index}: SIGHASH_SINGLE needs output {index}; the tx has "
            f"{len(tx.outputs)} outputs",
            code="wallet-single-no-output",
        )


def _check_redeem_script(info: SigningInput, index: int) -> None:
    if info.redeem_script is None:
        return
    if len(info.redeem_script) > SCRIPT_ELEMENT_BYTES_MAX or (
        classify(info.script_pubkey) is not ScriptTemplate.P2SH
        or info.script_pubkey[2:22] != hash160(info.redeem_script)
    ):
        raise WalletError(
            f"input {index}: redeem script does not hash to its P2SH output script",
            code="wallet-bad-redeem-script",
        )


def _keys_for(info: SigningInput, keystore: KeyStore) -> list[tuple[PrivateKey, bytes]]:
    """The (key, SEC public key) pairs of ``keystore`` that may sign this input."""
    signers = _signers(info)
    if signers is None:
        return []
    if classify(info.script_pubkey) is ScriptTemplate.P2PKH:
        pubkey_hash = info.script_pubkey[3:23]
        key = keystore.key_for_hash(pubkey_hash)
        sec = keystore.pubkey_for_hash(pubkey_hash)
        return [] if key is None or sec is None else [(key, sec)]
    pairs = []
    for sec in signers[1]:
        key = keystore.key_for_pubkey(sec)
        if key is not None:
            pairs.append((key, sec))
    return pairs


def combine(first: PartiallySignedTx, second: PartiallySignedTx) -> PartiallySignedTx:
    """``first.combine(second)``: the signatures of both over the same transaction."""
    return first.combine(second)


__all__ = [
    "SELECTION_INPUTS_MAX",
    "Coin",
    "InputSignatures",
    "KeyStore",
    "Leg",
    "PartiallySignedTx",
    "Selection",
    "SelectionOrder",
    "SigningInput",
    "UtxoLike",
    "Wallet",
    "build_issuance",
    "build_transfer",
    "combine",
    "multisig_redeem_script",
    "select_coins",
]

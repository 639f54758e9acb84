"""The UTXO state and its transitions: check_tx, validate_block, apply_block.

Owns:
- ``UtxoEntry`` (value, script, asset id, quantity, height) and ``LedgerState``: the
  unspent outputs keyed by the 36-byte serialized outpoint, the asset id ->
  definition hash bindings, per-asset supply, a bounded journal of recently spent
  outpoints, an optional script index, and an incremental multiset hash.
- ``check_tx``: every ledger rule for one transaction against a state (plus what
  earlier transactions of the same block did): inputs exist and are unspent, scripts
  verify, native value is conserved exactly, the Open Assets rules of ``ledger.oap``,
  asset definition bindings.
- ``validate_block`` -> ``BlockDelta`` (no mutation) and ``apply_delta`` /
  ``apply_block`` (all-or-nothing).
- ``state_from_genesis``: the only place native value is created.
- ``balances``, ``asset_holders``, ``utxos_of``: read models the wallet needs.

Ownership rule (docs/decisions/0012-utxo-state.md): a ``LedgerState`` is a *linear*
value. ``apply_delta``/``apply_block`` move its dictionaries into the returned state
and mark the argument stale; any later use of the stale object is a programmer error
(assertion). Validation never mutates, so a block that fails validation leaves the
state, and its hash, exactly as they were. ``copy()`` makes an independent O(n) copy
for the rare caller that needs to keep the old state.

Pure: no I/O, no clock. Imports ``ledger.tx``, ``ledger.oap``, ``ledger.assets``,
``ledger.interpreter``, ``ledger.script``, ``ledger.address``, ``ledger.membership``,
``ledger.hashing``, ``ledger.serialization``, ``ledger.errors``.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Protocol

from ledger.address import address_to_script
from ledger.assets import (
    definition_from_terms,
    issuing_script,
    parse_definition_reference,
    parse_terms_output,
)
from ledger.errors import (
    AssetError,
    BlockError,
    DoubleSpendError,
    MissingInputError,
    TxError,
    ValidationError,
)
from ledger.governance import (
    GOVERNANCE_TX_VERSION,
    GovernanceError,
    MembershipSchedule,
    apply_signed_change,
    change_from_tx,
)
from ledger.hashing import display_hex, sha256d
from ledger.interpreter import verify_input
from ledger.keys import PublicKey
from ledger.membership import Genesis
from ledger.oap import (
    ASSET_ID_VERSION,
    QUANTITY_MAX,
    ColoredOutput,
    asset_id,
    check_asset_rules,
    color_transfers,
    parse_marker,
)
from ledger.script import OP_RETURN, ScriptTemplate, classify, is_unspendable, p2pkh_script
from ledger.serialization import var_bytes
from ledger.tx import (
    COINBASE_INDEX,
    NULL_TXID,
    OutPoint,
    Transaction,
    TxIn,
    TxOut,
    index_bytes,
    output_keys,
)

VALUE_MAX = 21_000_000 * 100_000_000  # Bitcoin's MAX_MONEY bounds every output and sum
OUTPOINT_KEY_BYTES = 36
SPENT_HISTORY_BLOCKS = 100  # how many blocks of spent outpoints the journal remembers
SPENT_HISTORY_KEYS_MAX = 500_000  # and never more outpoints than this
# Accumulator elements of outputs created by recent blocks, kept by the state until
# spent (decision 0121): a payment usually spends a recent output, whose element (a
# 256-byte SHAKE output, ~1.6 µs) was computed when its block's delta was. ~450 bytes
# per entry: this bound holds a node's cache to ~7 MB.
ELEMENT_CACHE_ENTRIES_MAX = 16_384
UTXOS_OF_LIMIT_DEFAULT = 10_000  # utxos_of returns at most this many unless told
STATE_HASH_TAG = b"capital-ledger/state/v1"
ACCUMULATOR_BITS = 2048  # AdHash modulus 2**2048 (see 0012 for why not 2**256)
_ACCUMULATOR_MASK = (1 << ACCUMULATOR_BITS) - 1
_ACCUMULATOR_BYTES = ACCUMULATOR_BITS // 8


class UtxoEntry(NamedTuple):
    """One unspent output. A NamedTuple, not a dataclass: a million of these must fit in
    a node's memory, and a tuple is the most compact immutable record CPython has."""

    value: int
    script_pubkey: bytes
    asset_id: str | None
    quantity: int
    height: int


# ``UtxoEntry(value, script, None, 0, height)`` without the named tuple's Python-level
# ``__new__`` (a lambda in 3.11): the same tuple subclass, fields in declaration order.
assert UtxoEntry._fields == ("value", "script_pubkey", "asset_id", "quantity", "height")
_new_tuple = tuple.__new__


class HeaderLike(Protocol):
    @property
    def height(self) -> int: ...

    @property
    def hash(self) -> bytes: ...

    @property
    def prev_hash(self) -> bytes: ...


class BlockLike(Protocol):
    """What the state needs of ``ledger.block.Block``."""

    @property
    def header(self) -> HeaderLike: ...

    @property
    def txs(self) -> tuple[Transaction, ...]: ...


# index_bytes' table of the usual small output indexes, for inlining it per input
_SMALL_INDEXES = 256
_INDEX_BYTES = tuple(index_bytes(index) for index in range(_SMALL_INDEXES))


def outpoint_key(outpoint: OutPoint) -> bytes:
    index = outpoint.index  # index_bytes, inlined (intake calls this per input)
    return outpoint.txid_le + (_INDEX_BYTES[index] if index < _SMALL_INDEXES
                               else index_bytes(index))


def key_outpoint(key: bytes) -> OutPoint:
    assert len(key) == OUTPOINT_KEY_BYTES
    return OutPoint(key[:32], struct.unpack("<I", key[32:])[0])


# ---------------------------------------------------------------------------
# Rules


@dataclass(frozen=True, slots=True)
class LedgerRules:
    """Genesis-derived parameters of the transition function.

    ``issuer_scripts``: output scripts that may issue assets (the issuing script of an
    issuance is the script of the output its first input spends).
    ``require_definition``: the first issuance of an asset must carry an asset
    definition reference (``b"d=" + sha256``) in its marker metadata.
    """

    issuer_scripts: frozenset[bytes] = frozenset()
    asset_id_version: int = ASSET_ID_VERSION
    require_definition: bool = True
    # Member issuers' identity keys: each may also issue from its per-definition
    # issuing script (ledger.assets.issuing_script, decision 0070).
    # (member id, key) of each member issuer.
    issuer_keys: tuple[tuple[str, PublicKey], ...] = ()

    @classmethod
    def from_genesis(
        cls,
        genesis: Genesis,
        *,
        extra_issuer_scripts: Iterable[bytes] = (),
        require_definition: bool = True,
    ) -> LedgerRules:
        """Issuers are the members with ``may_issue``: the P2PKH scripts of their identity
        key (compressed and uncompressed encodings), plus ``extra_issuer_scripts`` (e.g. a
        member's P2SH multisig issuing script, agreed at genesis)."""
        scripts = set(extra_issuer_scripts)
        keys: list[tuple[str, PublicKey]] = []
        for member in genesis.members:
            if member.may_issue:
                keys.append((member.id, member.public_key.compressed()))
                for key in (member.public_key.compressed(), member.public_key.uncompressed()):
                    scripts.add(p2pkh_script(key.hash160))
        return cls(frozenset(scripts), require_definition=require_definition,
                   issuer_keys=tuple(keys))


# (rules, membership view) -> the rules with that view's issuers; a few entries, kept
# with their keys so an id is never reused while cached.
_RULES_IN_FORCE: dict[tuple[int, int], tuple[LedgerRules, Genesis, LedgerRules]] = {}
_RULES_IN_FORCE_MAX = 16


def rules_in_force(rules: LedgerRules, view: Genesis) -> LedgerRules:
    """``rules`` plus the issuers of the membership in force (decision 0062): a member
    with ``may_issue`` whose key ``rules`` does not list (a member added by governance,
    an issuer's rotated key) issues as genesis issuers do: from its identity key's P2PKH
    scripts and its per-definition issuing scripts. What ``rules`` list stays (a
    genesis issuer keeps its scripts after a rotation or removal)."""
    cached = _RULES_IN_FORCE.get((id(rules), id(view)))
    if cached is not None and cached[0] is rules and cached[1] is view:
        return cached[2]
    listed = {(member_id, key.sec) for member_id, key in rules.issuer_keys}
    extra = [(m.id, key) for m in view.members if m.may_issue
             and (m.id, (key := m.public_key.compressed()).sec) not in listed]
    amended = rules
    if extra:
        scripts = set(rules.issuer_scripts)
        for _, key in extra:
            scripts.update(p2pkh_script(k.hash160) for k in (key, key.uncompressed()))
        amended = LedgerRules(frozenset(scripts), rules.asset_id_version,
                              rules.require_definition, (*rules.issuer_keys, *extra))
    if len(_RULES_IN_FORCE) >= _RULES_IN_FORCE_MAX:
        _RULES_IN_FORCE.clear()
    _RULES_IN_FORCE[(id(rules), id(view))] = (rules, view, amended)
    return amended


def contract_issuer(
    rules: LedgerRules, script: bytes, definition_hashes: Iterable[bytes]
) -> tuple[str, bytes] | None:
    """(member id, definition hash) when ``script`` is that member's issuing script for
    that definition (``ledger.assets.issuing_script``), else None."""
    for digest in definition_hashes:
        for member_id, key in rules.issuer_keys:
            if issuing_script(key, digest) == script:
                return member_id, digest
    return None


class _IssuerScripts(Collection[bytes]):
    """The scripts that may issue in one transaction: the rules' fixed issuer scripts,
    plus a member's issuing script for the definition this issuance names (its marker
    reference) or its asset is bound to. Derived lazily: only an issuance asks."""

    def __init__(self, rules: LedgerRules, definition_hashes: Callable[[bytes], list[bytes]]):
        self._rules = rules
        self._definition_hashes = definition_hashes

    def __contains__(self, script: object) -> bool:
        if not isinstance(script, bytes):
            return False
        if script in self._rules.issuer_scripts:
            return True
        if not self._rules.issuer_keys or classify(script) is not ScriptTemplate.P2PKH:
            return False
        return contract_issuer(self._rules, script, self._definition_hashes(script)) is not None

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._rules.issuer_scripts)

    def __len__(self) -> int:
        return len(self._rules.issuer_scripts)


# ---------------------------------------------------------------------------
# The multiset accumulator


def _element(tag: bytes, payload: bytes) -> int:
    return int.from_bytes(hashlib.shake_256(tag + payload).digest(_ACCUMULATOR_BYTES), "little")


def entry_bytes(key: bytes, entry: UtxoEntry) -> bytes:
    """Canonical bytes of one unspent output: what the state hash commits to."""
    asset = entry.asset_id.encode("ascii") if entry.asset_id is not None else b""
    return b"".join(
        (
            key,
            struct.pack("<q", entry.value),
            var_bytes(entry.script_pubkey),
            var_bytes(asset),
            struct.pack("<QQ", entry.quantity, entry.height),
        )
    )


_UTXO_TAG = b"utxo\x00"
_OP_RETURN_BYTE = bytes([OP_RETURN])
_ENTRY_HEAD = struct.Struct("<36sqB")  # key, value, a script length under 0xFD
_ENTRY_TAIL = struct.Struct("<BQQ")  # an empty asset id, quantity, height
_SHORT_SCRIPT_BYTES = 0xFD  # a CompactSize below this is its one byte
_SHORT_SIZES = tuple(bytes((size,)) for size in range(_SHORT_SCRIPT_BYTES))
_QUANTITY_HEIGHT = struct.Struct("<QQ")


def _entry_element(key: bytes, entry: UtxoEntry) -> int:
    """``_element(b"utxo\\x00", entry_bytes(key, entry))``; an output with a short
    script and asset id (nearly all) is encoded with two struct calls instead of five
    pieces (``tests/unit/test_state_hash_pinned.py`` and ``test_core_cost_fifth.py``
    hold both to the same bytes)."""
    value, script, asset, quantity, height = entry
    if len(key) != OUTPOINT_KEY_BYTES or len(script) >= _SHORT_SCRIPT_BYTES:
        data = _UTXO_TAG + entry_bytes(key, entry)
    elif asset is None:
        data = (_UTXO_TAG + _ENTRY_HEAD.pack(key, value, len(script)) + script
                + _ENTRY_TAIL.pack(0, quantity, height))
    else:  # a colored output (Open Assets): its asset id's bytes in the same way (0127)
        asset_bytes = asset.encode("ascii")
        if len(asset_bytes) >= _SHORT_SCRIPT_BYTES:
            data = _UTXO_TAG + entry_bytes(key, entry)
        else:
            data = b"".join((_UTXO_TAG, _ENTRY_HEAD.pack(key, value, len(script)), script,
                             _SHORT_SIZES[len(asset_bytes)], asset_bytes,
                             _QUANTITY_HEIGHT.pack(quantity, height)))
    return int.from_bytes(hashlib.shake_256(data).digest(_ACCUMULATOR_BYTES), "little")


def _entries_sum(entries: Iterable[tuple[bytes, UtxoEntry]]) -> int:
    """The sum (not reduced) of the entries' accumulator elements."""
    total = 0
    for key, entry in entries:
        total += _entry_element(key, entry)
    return total


def _spent_sum(elements: Mapping[bytes, tuple[UtxoEntry, int]],
               entries: Iterable[tuple[bytes, UtxoEntry]]) -> int:
    """``_entries_sum(entries)``, taking the element of an entry from ``elements`` when
    it holds this very entry object under this key (the element is a function of the
    key and the entry, and entries are immutable), computing it otherwise."""
    total = 0
    for key, entry in entries:
        cached = elements.get(key)
        if cached is not None and cached[0] is entry:
            total += cached[1]
        else:
            total += _entry_element(key, entry)
    return total


def _binding_element(asset_id: str, definition_hash: bytes) -> int:
    return _element(b"asset-definition\x00", var_bytes(asset_id.encode("ascii")) + definition_hash)


def _state_hash(height: int, head_hash: bytes, accumulator: int, utxo_count: int,
                schedule: MembershipSchedule | None = None) -> bytes:
    # The governance history enters the hash only once a change was applied, so a chain
    # without governance keeps the state hashes it always had.
    governance = b"" if schedule is None or not schedule.sequence else schedule.digest
    return sha256d(
        STATE_HASH_TAG
        + struct.pack("<QQ", height, utxo_count)
        + head_hash
        + accumulator.to_bytes(_ACCUMULATOR_BYTES, "little")
        + governance
    )


# ---------------------------------------------------------------------------
# The state


class LedgerState:
    """The unspent outputs after block ``height`` (whose hash is ``head_hash``)."""

    __slots__ = (
        "_accumulator",
        "_bindings",
        "_elements",
        "_script_index",
        "_spent_journal",
        "_spent_recent",
        "_stale",
        "_supply",
        "_utxos",
        "head_hash",
        "height",
        "native_total",
        "schedule",
    )

    def __init__(
        self,
        *,
        height: int,
        head_hash: bytes,
        utxos: dict[bytes, UtxoEntry],
        bindings: dict[str, bytes],
        supply: dict[str, int],
        accumulator: int,
        native_total: int,
        script_index: dict[bytes, set[bytes]] | None,
        spent_recent: dict[bytes, int],
        spent_journal: deque[tuple[int, tuple[bytes, ...]]],
        schedule: MembershipSchedule | None = None,
        elements: dict[bytes, tuple[UtxoEntry, int]] | None = None,
    ) -> None:
        assert len(head_hash) == 32
        # Membership and parameters by height (ledger.governance); None: a state built
        # without its genesis membership, which refuses governance transactions.
        self.schedule = schedule
        self.height = height
        self.head_hash = head_hash
        self._utxos = utxos
        self._bindings = bindings
        self._supply = supply
        self._accumulator = accumulator
        self.native_total = native_total
        self._script_index = script_index
        self._spent_recent = spent_recent
        self._spent_journal = spent_journal
        # key -> (entry, its accumulator element) for outputs of recent blocks (a cache:
        # bounded by ELEMENT_CACHE_ENTRIES_MAX, never part of the state's value)
        self._elements: dict[bytes, tuple[UtxoEntry, int]] = {} if elements is None else elements
        self._stale = False

    # -- reads -------------------------------------------------------------

    def _live(self) -> None:
        assert not self._stale, "LedgerState used after apply moved it (see ownership rule)"

    def get(self, outpoint: OutPoint) -> UtxoEntry | None:
        self._live()
        return self._utxos.get(outpoint_key(outpoint))

    def get_key(self, key: bytes) -> UtxoEntry | None:
        self._live()
        return self._utxos.get(key)

    def __contains__(self, outpoint: object) -> bool:
        self._live()
        return isinstance(outpoint, OutPoint) and outpoint_key(outpoint) in self._utxos

    def __len__(self) -> int:
        self._live()
        return len(self._utxos)

    def items(self) -> Iterator[tuple[OutPoint, UtxoEntry]]:
        """Every unspent output, in outpoint-key order (deterministic)."""
        self._live()
        for key in sorted(self._utxos):
            yield key_outpoint(key), self._utxos[key]

    def was_recently_spent(self, key: bytes) -> bool:
        self._live()
        return key in self._spent_recent

    def holds_output_of(self, txid_le: bytes, output_count: int) -> bool:
        """Whether some output ``txid_le:0..output_count-1`` is unspent or recently
        spent (``get_key`` or ``was_recently_spent`` of each, in one call)."""
        return self.holds_any_of(output_keys(txid_le, output_count))

    def holds_any_of(self, keys: Collection[bytes]) -> bool:
        """Whether some of these outpoint keys is unspent or recently spent
        (``holds_output_of`` given a transaction's stored ``output_keys``)."""
        self._live()
        return not (self._utxos.keys().isdisjoint(keys)
                    and self._spent_recent.keys().isdisjoint(keys))

    def definition_hash(self, asset_id: str) -> bytes | None:
        self._live()
        return self._bindings.get(asset_id)

    def bindings(self) -> dict[str, bytes]:
        self._live()
        return dict(self._bindings)

    def supply(self, asset_id: str) -> int:
        self._live()
        return self._supply.get(asset_id, 0)

    def supplies(self) -> dict[str, int]:
        self._live()
        return dict(self._supply)

    @property
    def has_script_index(self) -> bool:
        return self._script_index is not None

    @property
    def state_hash(self) -> bytes:
        """SHA-256d over (height, head hash, UTXO count, multiset accumulator)."""
        self._live()
        return _state_hash(self.height, self.head_hash, self._accumulator, len(self._utxos),
                           self.schedule)

    @property
    def is_stale(self) -> bool:
        return self._stale

    def copy(self) -> LedgerState:
        """An independent copy (O(n)); the ownership rule makes this rarely needed."""
        self._live()
        index = (
            {script: set(keys) for script, keys in self._script_index.items()}
            if self._script_index is not None
            else None
        )
        return LedgerState(
            height=self.height,
            head_hash=self.head_hash,
            utxos=dict(self._utxos),
            bindings=dict(self._bindings),
            supply=dict(self._supply),
            accumulator=self._accumulator,
            native_total=self.native_total,
            script_index=index,
            spent_recent=dict(self._spent_recent),
            spent_journal=deque(self._spent_journal),
            schedule=self.schedule,
            elements=dict(self._elements),
        )

    def recompute_accumulator(self) -> int:
        """The accumulator from scratch (O(n)): for audits and tests of the incremental one."""
        self._live()
        total = 0
        for key, entry in self._utxos.items():
            total += _entry_element(key, entry)
        for asset, digest in self._bindings.items():
            total += _binding_element(asset, digest)
        return total & _ACCUMULATOR_MASK

    @property
    def accumulator(self) -> int:
        self._live()
        return self._accumulator


# ---------------------------------------------------------------------------
# Genesis


def genesis_allocation_tx(
    genesis_hash: bytes, allocations: Sequence[tuple[bytes, int]]
) -> Transaction:
    """The one coinbase-shaped transaction that creates all native value at genesis.

    Its single input has the null outpoint and pushes the genesis hash, so its txid
    (and thus the outpoints of the allocations) is fixed by the genesis record.
    """
    assert len(genesis_hash) == 32
    script_sig = bytes([len(genesis_hash)]) + genesis_hash
    inputs = (TxIn(OutPoint(NULL_TXID, COINBASE_INDEX), script_sig),)
    outputs = tuple(TxOut(value, script) for script, value in allocations)
    return Transaction(1, inputs, outputs, 0)


def state_from_genesis(
    genesis_hash: bytes,
    allocations: Sequence[tuple[bytes, int]],
    *,
    index_scripts: bool = False,
    schedule: MembershipSchedule | None = None,
) -> LedgerState:
    """The state at height 0: the allocations (script, value) of the genesis allocation
    transaction, uncolored. Assets are issued later, by member issuers, in blocks."""
    total = 0
    for position, (script, value) in enumerate(allocations):
        if not 0 <= value <= VALUE_MAX:
            raise TxError(
                f"genesis allocation {position}: value {value} outside 0..{VALUE_MAX}",
                code="tx-value-range",
            )
        if is_unspendable(script):
            raise TxError(f"genesis allocation {position} pays an unspendable script",
                          code="tx-value-burned")
        total += value
    if total > VALUE_MAX:
        raise TxError(f"genesis allocations total {total} exceeds {VALUE_MAX}",
                      code="tx-value-range")
    tx = genesis_allocation_tx(genesis_hash, allocations)
    utxos: dict[bytes, UtxoEntry] = {}
    accumulator = 0
    index: dict[bytes, set[bytes]] | None = {} if index_scripts else None
    for position, output in enumerate(tx.outputs):
        key = tx.hash_le + struct.pack("<I", position)
        entry = UtxoEntry(output.value, output.script_pubkey, None, 0, 0)
        utxos[key] = entry
        accumulator += _entry_element(key, entry)
        if index is not None:
            index.setdefault(output.script_pubkey, set()).add(key)
    return LedgerState(
        height=0,
        head_hash=genesis_hash,
        utxos=utxos,
        bindings={},
        supply={},
        accumulator=accumulator & _ACCUMULATOR_MASK,
        native_total=total,
        script_index=index,
        spent_recent={},
        spent_journal=deque(),
        schedule=schedule,
    )


# ---------------------------------------------------------------------------
# One transaction


@dataclass(slots=True)
class BlockOverlay:
    """What earlier transactions of the block being validated did (mutable scratch).

    ``spent``: keys spent so far in the block; ``created``: outputs created so far in
    the block and not yet spent; ``bindings`` / ``supply_delta``: asset changes so far.
    """

    spent: set[bytes] = field(default_factory=set)
    created: dict[bytes, UtxoEntry] = field(default_factory=dict)
    bindings: dict[str, bytes] = field(default_factory=dict)
    supply_delta: dict[str, int] = field(default_factory=dict)
    schedule: MembershipSchedule | None = None  # after the block's governance txs so far

    def absorb_plain(self, spent: Iterable[tuple[bytes, UtxoEntry]],
                     created: Iterable[tuple[bytes, UtxoEntry]], spent_all: list[bytes],
                     spent_from_base: list[tuple[bytes, UtxoEntry]]) -> None:
        """``absorb`` of a transaction that issues, binds and governs nothing, given its
        spent and created entries (``plain_payment_parts``): its spent keys appended to
        ``spent_all`` and those spent from the base state to ``spent_from_base``, as the
        callers of ``absorb`` do with its effects and result (decision 0127)."""
        created_in_block = self.created
        for key, entry in spent:
            self.spent.add(key)
            spent_all.append(key)
            if created_in_block.pop(key, None) is None:
                spent_from_base.append((key, entry))
        for key, entry in created:
            assert key not in created_in_block, "txid collision inside a block"
            created_in_block[key] = entry

    def absorb(self, effects: TxEffects) -> list[tuple[bytes, UtxoEntry]]:
        """Record one accepted transaction; return the entries it spent from the base
        state (those not created earlier in the block)."""
        from_base: list[tuple[bytes, UtxoEntry]] = []
        for key, entry in effects.spent:
            self.spent.add(key)
            if self.created.pop(key, None) is None:
                from_base.append((key, entry))
        for key, entry in effects.created:
            assert key not in self.created, "txid collision inside a block"
            self.created[key] = entry
        if effects.new_binding is not None:
            self.bindings[effects.new_binding[0]] = effects.new_binding[1]
        if effects.schedule_after is not None:
            self.schedule = effects.schedule_after
        if effects.issued_asset_id is not None:
            asset = effects.issued_asset_id
            self.supply_delta[asset] = self.supply_delta.get(asset, 0) + effects.issued_quantity
        return from_base


@dataclass(frozen=True, slots=True)
class TxEffects:
    """What one valid transaction does to the state."""

    tx: Transaction
    spent: tuple[tuple[bytes, UtxoEntry], ...]
    created: tuple[tuple[bytes, UtxoEntry], ...]
    issued_asset_id: str | None
    issued_quantity: int
    new_binding: tuple[str, bytes] | None
    schedule_after: MembershipSchedule | None = None  # a governance tx's new schedule


# ``TxEffects`` of a transaction that issues nothing, built without the frozen
# dataclass's __init__ (one object.__setattr__ per field; decision 0116). The field
# list is asserted so a new field cannot be silently left unset.
assert [f.name for f in fields(TxEffects)] == [
    "tx", "spent", "created", "issued_asset_id", "issued_quantity", "new_binding",
    "schedule_after"]
_new_effects = object.__new__
_set_effects_tx = TxEffects.__dict__["tx"].__set__
_set_effects_spent = TxEffects.__dict__["spent"].__set__
_set_effects_created = TxEffects.__dict__["created"].__set__
_set_effects_asset = TxEffects.__dict__["issued_asset_id"].__set__
_set_effects_quantity = TxEffects.__dict__["issued_quantity"].__set__
_set_effects_binding = TxEffects.__dict__["new_binding"].__set__
_set_effects_schedule = TxEffects.__dict__["schedule_after"].__set__


def _plain_effects(tx: Transaction, spent: tuple[tuple[bytes, UtxoEntry], ...],
                   created: tuple[tuple[bytes, UtxoEntry], ...]) -> TxEffects:
    """``TxEffects(tx, spent, created, None, 0, None)``, equal to it field by field."""
    effects: TxEffects = _new_effects(TxEffects)
    _set_effects_tx(effects, tx)
    _set_effects_spent(effects, spent)
    _set_effects_created(effects, created)
    _set_effects_asset(effects, None)
    _set_effects_quantity(effects, 0)
    _set_effects_binding(effects, None)
    _set_effects_schedule(effects, None)
    return effects


def _governance_effects(
    state: LedgerState, tx: Transaction, overlay: BlockOverlay | None
) -> TxEffects:
    """A governance transaction: no value moves; the change must be accepted by the
    schedule as the block so far left it (ledger.governance.check_signed_change)."""
    schedule = overlay.schedule if overlay is not None and overlay.schedule else state.schedule
    if schedule is None:
        raise GovernanceError(f"tx {tx.txid}: this state has no membership schedule",
                              code="governance-unavailable")
    after = apply_signed_change(schedule, change_from_tx(tx), height=state.height + 1)
    return TxEffects(tx, (), (), None, 0, None, after)


def _spends_null(tx: Transaction) -> bool:
    """``is_coinbase()`` or any ``prevout.is_null()``, in one pass (a loop, not a
    generator: one input is the usual case)."""
    for txin in tx.inputs:
        prevout = txin.prevout
        if prevout.index == COINBASE_INDEX and prevout.txid_le == NULL_TXID:
            return True
    return False


def _check_structure(tx: Transaction) -> bool:
    """The structural rules; whether ``tx`` has an unspendable (OP_RETURN) output."""
    if _spends_null(tx):
        raise TxError(
            f"tx {tx.txid}: coinbase transactions are not accepted (no block reward; native "
            "value is created only by the genesis allocation)",
            code="tx-coinbase",
        )
    if not tx.outputs:
        raise TxError(f"tx {tx.txid} has no outputs", code="tx-no-outputs")
    total = 0
    has_op_return = False
    for index, output in enumerate(tx.outputs):
        value = output.value
        if not 0 <= value <= VALUE_MAX:
            raise TxError(
                f"tx {tx.txid} output {index}: value {value} outside 0..{VALUE_MAX}",
                code="tx-value-range",
            )
        if output.script_pubkey[:1] == _OP_RETURN_BYTE:  # is_unspendable, inlined
            if value:
                raise TxError(
                    f"tx {tx.txid} output {index}: {value} native units sent to an "
                    "unspendable OP_RETURN output would be destroyed",
                    code="tx-value-burned",
                )
            has_op_return = True
        total += value
    if total > VALUE_MAX:
        raise TxError(f"tx {tx.txid}: outputs total {total} exceeds {VALUE_MAX}",
                      code="tx-value-range")
    return has_op_return


def check_tx(
    state: LedgerState,
    tx: Transaction,
    rules: LedgerRules,
    *,
    spent_in_block: AbstractSet[bytes] = frozenset(),
    overlay: BlockOverlay | None = None,
    verify_scripts: bool = True,
    strict: bool = True,
    script_verified: Callable[[Transaction], bool] | None = None,
) -> TxEffects:
    """Check ``tx`` against ``state`` (and ``overlay``, the block so far); raise or return
    its effects. Never mutates ``state`` or ``overlay``.

    Raises ``TxError`` (structure, value), ``MissingInputError`` ("missing-input"),
    ``DoubleSpendError`` ("double-spend-in-block", "double-spend", "duplicate-input"),
    ``AssetError`` (see ``ledger.oap.check_asset_rules`` and the definition rules) or
    ``ScriptError``. ``script_verified(tx)`` returning True skips script verification:
    the node's intake caches txids whose scripts it verified against the same prevouts
    (a prevout's script cannot change while it is unspent, so the cache stays valid).
    """
    if tx.version == GOVERNANCE_TX_VERSION:
        return _governance_effects(state, tx, overlay)
    has_op_return = _check_structure(tx)
    spent = _spent_entries(state, tx, overlay, spent_in_block)
    has_colored_input = _check_value_conserved(tx, spent)
    if has_colored_input or has_op_return:
        assets = _check_assets(state, overlay, tx, spent, rules)
        created = _created_entries(tx, assets, height=state.height + 1)
    else:
        assets = _NO_ASSETS
        created = _plain_created_entries(tx, height=state.height + 1)
    if verify_scripts and not (script_verified is not None and script_verified(tx)):
        for index, (_, entry) in enumerate(spent):
            verify_input(tx, index, entry.script_pubkey, entry.value, strict=strict)
    if assets is _NO_ASSETS:
        return _plain_effects(tx, tuple(spent), tuple(created))
    return TxEffects(tx, tuple(spent), tuple(created), assets.issued_asset_id,
                     assets.issued_quantity, assets.new_binding)


def plain_payment_effects(
    state: LedgerState, tx: Transaction, overlay: BlockOverlay, *, scripts_checked: bool
) -> TxEffects | None:
    """``check_tx(state, tx, rules, overlay=overlay, ...)``'s effects for a plain payment
    or a plain Open Assets transfer that passes every rule, in one pass and without the
    general path's calls; None for anything else — governance, an OP_RETURN output other
    than a transfer's marker, a colored input without one, scripts not yet checked
    (``scripts_checked``: ``script_verified(tx)`` or scripts not asked for) or any
    failed rule — and the caller then runs ``check_tx``, which decides and names the
    error. Like the script fast paths (decision 0013) it may only say "valid", with the
    same checks as ``check_tx`` (decisions 0121, 0125)."""
    parts = plain_payment_parts(state, tx, overlay, scripts_checked=scripts_checked)
    return None if parts is None else _plain_effects(tx, parts[0], parts[1])


_Entries = tuple[tuple[bytes, UtxoEntry], ...]


def plain_payment_parts(
    state: LedgerState, tx: Transaction, overlay: BlockOverlay, *, scripts_checked: bool
) -> tuple[_Entries, _Entries] | None:
    """``plain_payment_effects``' spent and created entries, without building its
    ``TxEffects`` (whose other fields are None, 0, None): for callers that only fold
    them into the block's overlay (``ledger.selection``, ``validate_block``; 0127)."""
    if not scripts_checked or tx.version == GOVERNANCE_TX_VERSION or not tx.outputs:
        return None
    total = 0
    marked = False  # output 0 is an OP_RETURN of value 0: a transfer's marker, maybe
    for output in tx.outputs:  # _check_structure's value rules
        value = output.value
        if not 0 <= value <= VALUE_MAX:
            return None
        if output.script_pubkey[:1] == _OP_RETURN_BYTE:
            if value or marked or output is not tx.outputs[0]:
                return None
            marked = True
        total += value
    if total > VALUE_MAX:
        return None
    state._live()
    utxos, created_in_block, spent_before = state._utxos, overlay.created, overlay.spent
    spent: list[tuple[bytes, UtxoEntry]] = []
    value_in = 0
    colored = False
    for txin in tx.inputs:  # _spends_null, _spent_entries, _check_value_conserved
        prevout = txin.prevout
        if prevout.index == COINBASE_INDEX and prevout.txid_le == NULL_TXID:
            return None
        index = prevout.index
        key = prevout.txid_le + (_INDEX_BYTES[index] if index < _SMALL_INDEXES
                                 else index_bytes(index))
        if key in spent_before:
            return None
        entry = created_in_block.get(key)
        if entry is None:
            entry = utxos.get(key)
            if entry is None:
                return None
        if entry.asset_id is not None:
            colored = True
        value_in += entry.value
        spent.append((key, entry))
    if value_in != total or (len(spent) > 1 and len({key for key, _ in spent}) != len(spent)):
        return None
    height = state.height + 1
    if marked:
        transfer = _plain_transfer_created(tx, spent, height)
        return None if transfer is None else (tuple(spent), transfer)
    if colored:
        return None
    created = tuple([(key, _new_tuple(UtxoEntry, (output.value, output.script_pubkey, None,
                                                   0, height)))
                     for key, output in zip(tx.output_keys, tx.outputs, strict=True)])
    return tuple(spent), created


def _plain_transfer_created(
    tx: Transaction, spent: list[tuple[bytes, UtxoEntry]], height: int
) -> tuple[tuple[bytes, UtxoEntry], ...] | None:
    """The entries a plain Open Assets transfer creates — output 0 a valid marker (so
    nothing is issued), no other OP_RETURN output, at least one input (checked by the
    caller) — colored as ``color_transaction`` colors them; None when the marker does
    not parse, its coloring is invalid or some input's units would not all be carried
    (``check_asset_rules`` then decides and names the error). The coloring is the
    order-based one of ``ledger.oap.color_transfers``, as ``_color_with_marker`` uses it
    with the marker at index 0."""
    if not spent:
        return None
    marker = parse_marker(tx.outputs[0].script_pubkey)
    if marker is None:
        return None
    quantities = marker.quantities
    if len(quantities) > len(tx.outputs) - 1:
        return None
    outputs = tx.outputs
    colors = color_transfers(
        [(entry.asset_id, entry.quantity) for _, entry in spent],
        [quantities[index - 1] if index <= len(quantities) else 0
         for index in range(1, len(outputs))])
    if colors is None:
        return None
    units: dict[str, int] = {}  # per asset: units in minus units out
    for _, entry in spent:
        if entry.asset_id is not None and entry.quantity > 0:
            units[entry.asset_id] = units.get(entry.asset_id, 0) + entry.quantity
    for asset, quantity in colors:
        if asset is not None:
            units[asset] -= quantity
    if any(units.values()):
        return None  # units left uncolored: check_asset_rules refuses
    return tuple([(key, _new_tuple(UtxoEntry, (
        output.value, output.script_pubkey, asset, quantity, height)))
        for key, output, (asset, quantity)
        in zip(tx.output_keys[1:], outputs[1:], colors, strict=True)])


def _spent_entries(
    state: LedgerState,
    tx: Transaction,
    overlay: BlockOverlay | None,
    spent_in_block: AbstractSet[bytes],
) -> list[tuple[bytes, UtxoEntry]]:
    """The unspent entry each input spends, in input order; raises for a duplicate input,
    an output spent earlier in the block or before, and a missing one."""
    created_in_block: Mapping[bytes, UtxoEntry] = overlay.created if overlay is not None else {}
    spent_before = overlay.spent if overlay is not None else spent_in_block
    seen: set[bytes] = set()
    spent: list[tuple[bytes, UtxoEntry]] = []
    several = len(tx.inputs) > 1  # one input cannot repeat itself
    for index, txin in enumerate(tx.inputs):
        prevout = txin.prevout
        key = prevout.txid_le + index_bytes(prevout.index)  # outpoint_key, inlined
        if several:
            if key in seen:
                raise DoubleSpendError(
                    f"tx {tx.txid} input {index}: spends {txin.prevout} twice in one "
                    "transaction",
                    code="duplicate-input",
                )
            seen.add(key)
        if key in spent_before or key in spent_in_block:
            raise DoubleSpendError(
                f"tx {tx.txid} input {index}: {txin.prevout} already spent earlier in this block",
                code="double-spend-in-block",
            )
        entry = created_in_block.get(key)
        if entry is None:
            entry = state.get_key(key)
        if entry is None:
            if state.was_recently_spent(key):
                raise DoubleSpendError(
                    f"tx {tx.txid} input {index}: {txin.prevout} was already spent",
                    code="double-spend",
                )
            raise MissingInputError(
                f"tx {tx.txid} input {index}: {txin.prevout} is not an unspent output",
                code="missing-input",
            )
        spent.append((key, entry))
    return spent


def _check_value_conserved(tx: Transaction, spent: Sequence[tuple[bytes, UtxoEntry]]) -> bool:
    """Raise unless the native value is conserved; whether some spent entry is colored
    (both from one pass over the spent entries, loops rather than generators)."""
    value_in = 0
    colored = False
    for _, entry in spent:
        value_in += entry.value
        if entry.asset_id is not None:
            colored = True
    value_out = 0
    for output in tx.outputs:
        value_out += output.value
    if value_in != value_out:
        raise TxError(
            f"tx {tx.txid}: inputs carry {value_in} native units, outputs {value_out}; "
            "value must be conserved exactly (no fees, no reward)",
            code="value-not-conserved",
        )
    return colored


@dataclass(frozen=True, slots=True)
class _TxAssets:
    """The asset side of one transaction: each output's (asset id, quantity), or None
    when no input is colored and there is no marker; what it issues; the definition
    binding it makes."""

    colored: tuple[ColoredOutput, ...] | None
    issued_asset_id: str | None
    issued_quantity: int
    new_binding: tuple[str, bytes] | None


_NO_ASSETS = _TxAssets(None, None, 0, None)


def _check_assets(
    state: LedgerState,
    overlay: BlockOverlay | None,
    tx: Transaction,
    spent: Sequence[tuple[bytes, UtxoEntry]],
    rules: LedgerRules,
) -> _TxAssets:
    """The asset rules (``check_asset_rules``), the definition of a new issuance and its
    supply limit; raises ``AssetError``."""
    if state.schedule is not None and len(state.schedule.epochs) > 1:
        rules = rules_in_force(rules, state.schedule.at(state.height + 1))
    asset_effects = check_asset_rules(
        tx,
        [(entry.script_pubkey, entry.asset_id, entry.quantity) for _, entry in spent],
        issuer_scripts=_IssuerScripts(
            rules, lambda script: _named_definitions(state, overlay, tx, script, rules)
        ),
        version=rules.asset_id_version,
    )
    colored = asset_effects.coloring.outputs
    if asset_effects.issued_asset_id is None:
        return _TxAssets(colored, None, 0, None)
    issued_asset = sys.intern(asset_effects.issued_asset_id)
    issued_quantity = asset_effects.issued_quantity
    new_binding = _check_definition(
        state, overlay, tx, issued_asset, asset_effects.metadata, rules
    )
    issuing = spent[0][1].script_pubkey
    if issuing not in rules.issuer_scripts:
        _check_contract_terms(state, overlay, tx, issuing, new_binding, rules)
    supply = (
        state.supply(issued_asset)
        + (overlay.supply_delta.get(issued_asset, 0) if overlay is not None else 0)
        + issued_quantity
    )
    if supply > QUANTITY_MAX:
        raise AssetError(
            f"tx {tx.txid}: issuing {issued_quantity} units of {issued_asset} would "
            f"bring its supply to {supply}, above {QUANTITY_MAX}",
            code="asset-supply-overflow",
        )
    return _TxAssets(colored, issued_asset, issued_quantity, new_binding)


def _created_entries(
    tx: Transaction, assets: _TxAssets, *, height: int
) -> list[tuple[bytes, UtxoEntry]]:
    """The UTXO entries ``tx`` creates (its spendable outputs, colored as checked)."""
    colored = assets.colored
    issued_asset = assets.issued_asset_id
    created: list[tuple[bytes, UtxoEntry]] = []
    txid_le = tx.hash_le
    for index, output in enumerate(tx.outputs):
        if is_unspendable(output.script_pubkey):
            continue  # unspendable: never enters the UTXO set (value is 0, see above)
        if colored is not None and colored[index][0] is not None:
            asset, quantity = colored[index]
            if asset == issued_asset:
                asset = issued_asset  # one interned string per asset id
        else:
            asset, quantity = None, 0
        created.append(
            (txid_le + struct.pack("<I", index),
             UtxoEntry(output.value, output.script_pubkey, asset, quantity, height))
        )
    return created


def _plain_created_entries(tx: Transaction, *, height: int) -> list[tuple[bytes, UtxoEntry]]:
    """``_created_entries`` of a transaction without colored inputs or OP_RETURN
    outputs (checked by the caller): every output, uncolored."""
    return [(key, _new_tuple(UtxoEntry, (output.value, output.script_pubkey, None, 0, height)))
            for key, output in zip(tx.output_keys, tx.outputs, strict=True)]


def _named_definitions(
    state: LedgerState,
    overlay: BlockOverlay | None,
    tx: Transaction,
    issuing: bytes,
    rules: LedgerRules,
) -> list[bytes]:
    """Definition hashes an issuance from ``issuing`` names: its first marker's
    reference, and the definition the asset is already bound to."""
    found: list[bytes] = []
    for output in tx.outputs:
        marker = parse_marker(output.script_pubkey)
        if marker is not None:
            reference = parse_definition_reference(marker.metadata)
            if reference is not None:
                found.append(reference)
            break
    issued = asset_id(issuing, rules.asset_id_version)
    bound = overlay.bindings.get(issued) if overlay is not None else None
    if bound is None:
        bound = state.definition_hash(issued)
    if bound is not None and bound not in found:
        found.append(bound)
    return found


def _check_contract_terms(
    state: LedgerState,
    overlay: BlockOverlay | None,
    tx: Transaction,
    issuing: bytes,
    new_binding: tuple[str, bytes] | None,
    rules: LedgerRules,
) -> None:
    """An issuance from a member's per-definition issuing script carries the terms on its
    first issuance (decision 0070): an OP_RETURN terms output whose canonical bytes hash
    to the definition, naming that member as issuer. Later issuances may repeat them."""
    matched = contract_issuer(rules, issuing, _named_definitions(state, overlay, tx, issuing,
                                                                 rules))
    assert matched is not None, "check_asset_rules let a non-issuer issue"
    member_id, digest = matched
    carried = [terms for out in tx.outputs
               if (terms := parse_terms_output(out.script_pubkey)) is not None]
    if not carried:
        if new_binding is not None:
            raise AssetError(
                f"tx {tx.txid}: first issuance of {new_binding[0]} carries no terms output "
                "(OP_RETURN 'CLT1' + canonical definition)", code="asset-terms-missing")
        return
    definition = definition_from_terms(carried[0], digest)
    if definition.issuer != member_id:
        raise AssetError(
            f"tx {tx.txid}: terms name issuer {definition.issuer!r}, the issuing key is "
            f"{member_id}'s", code="asset-issuer-mismatch")


def _check_definition(
    state: LedgerState,
    overlay: BlockOverlay | None,
    tx: Transaction,
    issued_asset: str,
    metadata: bytes,
    rules: LedgerRules,
) -> tuple[str, bytes] | None:
    """The (asset id, definition hash) binding this issuance makes, if it is the first."""
    reference = parse_definition_reference(metadata)
    bound = overlay.bindings.get(issued_asset) if overlay is not None else None
    if bound is None:
        bound = state.definition_hash(issued_asset)
    if bound is not None:
        if reference is not None and reference != bound:
            raise AssetError(
                f"tx {tx.txid}: issuance of {issued_asset} references definition "
                f"{reference.hex()} but the asset is bound to {bound.hex()}",
                code="asset-rebind",
            )
        return None
    if reference is None:
        if rules.require_definition:
            raise AssetError(
                f"tx {tx.txid}: first issuance of {issued_asset} carries no asset definition "
                "reference (marker metadata b'd=' + sha256 of the definition)",
                code="asset-definition-missing",
            )
        return None
    return (issued_asset, reference)


# ---------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True, slots=True)
class BlockDelta:
    """The validated effect of one block on a given state (base height and head).

    ``spent``: keys removed from the base state; ``created``: net new entries (outputs
    created and spent inside the block appear in neither). ``state_hash`` is the hash
    the state will have once the delta is applied.
    """

    base_height: int
    base_head_hash: bytes
    height: int
    head_hash: bytes
    spent: tuple[tuple[bytes, UtxoEntry], ...]
    created: tuple[tuple[bytes, UtxoEntry], ...]
    bindings: tuple[tuple[str, bytes], ...]
    supply_delta: tuple[tuple[str, int], ...]
    accumulator: int
    utxo_count: int
    spent_all: tuple[bytes, ...]  # every key spent in the block (for the journal)
    tx_count: int
    schedule: MembershipSchedule | None = None  # the schedule after the block
    # the accumulator element of each ``created`` entry, in order (what the delta's
    # accumulator added; ``apply_delta`` keeps them for when the entries are spent)
    created_elements: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @property
    def state_hash(self) -> bytes:
        return _state_hash(self.height, self.head_hash, self.accumulator, self.utxo_count,
                           self.schedule)


def _rewrap(error: ValidationError, prefix: str) -> ValidationError:
    message = f"{prefix}: {error.message}"
    try:
        wrapped = type(error)(message, code=error.code)
    except TypeError:  # a subclass with its own constructor: keep the code, lose the class
        wrapped = ValidationError(message, code=error.code)
    return wrapped


def validate_block(
    state: LedgerState,
    block: BlockLike,
    rules: LedgerRules,
    *,
    verify_scripts: bool = True,
    strict: bool = True,
    script_verified: Callable[[Transaction], bool] | None = None,
) -> BlockDelta:
    """Validate every transaction of ``block`` in order against ``state``; mutate nothing.

    Errors keep their class and code; the message names the block height, tx index
    and txid.
    """
    header = block.header
    if header.height != state.height + 1:
        raise BlockError(
            f"block {header.height} does not follow the state at height {state.height}",
            code="block-height",
        )
    if header.prev_hash != state.head_hash:
        raise BlockError(
            f"block {header.height} links to {display_hex(header.prev_hash)} but the state's "
            f"head is {display_hex(state.head_hash)}",
            code="block-prev-hash",
        )
    overlay = BlockOverlay()
    spent_from_base: list[tuple[bytes, UtxoEntry]] = []
    spent_all: list[bytes] = []
    for tx_index, tx in enumerate(block.txs):
        parts = plain_payment_parts(
            state, tx, overlay,
            scripts_checked=not verify_scripts or (script_verified is not None
                                                   and script_verified(tx)))
        if parts is not None:
            overlay.absorb_plain(parts[0], parts[1], spent_all, spent_from_base)
            continue
        try:
            effects = check_tx(
                state,
                tx,
                rules,
                spent_in_block=overlay.spent,
                overlay=overlay,
                verify_scripts=verify_scripts,
                strict=strict,
                script_verified=script_verified,
            )
        except ValidationError as error:
            raise _rewrap(error, f"block {header.height} tx {tx_index} ({tx.txid})") from error
        spent_all.extend(key for key, _ in effects.spent)
        spent_from_base.extend(overlay.absorb(effects))

    return delta_from_overlay(
        state, header, overlay, spent_from_base, spent_all, tx_count=len(block.txs)
    )


def delta_from_overlay(
    state: LedgerState,
    header: HeaderLike,
    overlay: BlockOverlay,
    spent_from_base: Sequence[tuple[bytes, UtxoEntry]],
    spent_all: Sequence[bytes],
    *,
    tx_count: int,
) -> BlockDelta:
    """The delta of a block whose transactions were checked, in order, into ``overlay``
    (by ``validate_block`` or ``ledger.selection``): no second pass over the block."""
    created = tuple(overlay.created.items())
    created_elements = tuple([_entry_element(key, entry) for key, entry in created])
    accumulator = state.accumulator - _spent_sum(state._elements, spent_from_base)
    for element in created_elements:
        accumulator += element
    for asset, digest in overlay.bindings.items():
        accumulator += _binding_element(asset, digest)
    return BlockDelta(
        base_height=state.height,
        base_head_hash=state.head_hash,
        height=header.height,
        head_hash=header.hash,
        spent=tuple(spent_from_base),
        created=created,
        bindings=tuple(overlay.bindings.items()),
        supply_delta=tuple(overlay.supply_delta.items()),
        accumulator=accumulator & _ACCUMULATOR_MASK,
        utxo_count=len(state) - len(spent_from_base) + len(overlay.created),
        spent_all=tuple(spent_all),
        tx_count=tx_count,
        schedule=overlay.schedule if overlay.schedule is not None else state.schedule,
        created_elements=created_elements,
    )


def apply_delta(state: LedgerState, delta: BlockDelta) -> LedgerState:
    """Apply a validated delta in place and hand the result over to a new state object.

    ``state`` becomes stale. Cannot fail for a delta validated against this very state
    (checked by assertions: base height and head hash).
    """
    state._live()
    assert (delta.base_height, delta.base_head_hash) == (state.height, state.head_hash), (
        "delta was validated against a different state"
    )
    utxos = state._utxos
    index = state._script_index
    for key, entry in delta.spent:
        removed = utxos.pop(key)
        assert removed == entry
        if index is not None:
            keys = index[entry.script_pubkey]
            keys.discard(key)
            if not keys:
                del index[entry.script_pubkey]
    for key, entry in delta.created:
        assert key not in utxos, "txid collision with the state"
        utxos[key] = entry
        if index is not None:
            index.setdefault(entry.script_pubkey, set()).add(key)
    bindings = state._bindings
    for asset, digest in delta.bindings:
        assert asset not in bindings
        bindings[asset] = digest
    supply = state._supply
    for asset, quantity in delta.supply_delta:
        supply[asset] = supply.get(asset, 0) + quantity

    journal = state._spent_journal
    recent = state._spent_recent
    journal.append((delta.height, delta.spent_all))
    for key in delta.spent_all:
        recent[key] = delta.height
    while journal and (
        journal[0][0] <= delta.height - SPENT_HISTORY_BLOCKS or len(recent) > SPENT_HISTORY_KEYS_MAX
    ):
        old_height, old_keys = journal.popleft()
        for key in old_keys:
            if recent.get(key) == old_height:
                del recent[key]

    assert len(utxos) == delta.utxo_count
    elements = _remember_elements(state._elements, delta)
    new_state = LedgerState(
        height=delta.height,
        head_hash=delta.head_hash,
        utxos=utxos,
        bindings=bindings,
        supply=supply,
        accumulator=delta.accumulator,
        native_total=state.native_total,
        script_index=index,
        spent_recent=recent,
        spent_journal=journal,
        schedule=delta.schedule,
        elements=elements,
    )
    state._stale = True
    return new_state


def _remember_elements(elements: dict[bytes, tuple[UtxoEntry, int]],
                       delta: BlockDelta) -> dict[bytes, tuple[UtxoEntry, int]]:
    """The element cache after ``delta``: its spent entries out, its created entries in
    (with the elements its accumulator added); past ELEMENT_CACHE_ENTRIES_MAX the
    older half is dropped (insertion order: the oldest blocks' entries)."""
    for key, _ in delta.spent:
        elements.pop(key, None)
    if len(delta.created_elements) == len(delta.created):
        for (key, entry), element in zip(delta.created, delta.created_elements, strict=True):
            elements[key] = (entry, element)
    if len(elements) > ELEMENT_CACHE_ENTRIES_MAX:
        kept = list(elements.items())[-(ELEMENT_CACHE_ENTRIES_MAX // 2):]
        elements = dict(kept)
    return elements


def apply_block(
    state: LedgerState,
    block: BlockLike,
    rules: LedgerRules,
    *,
    verify_scripts: bool = True,
    strict: bool = True,
    script_verified: Callable[[Transaction], bool] | None = None,
) -> LedgerState:
    """All-or-nothing: validate the whole block, then apply it. On any error ``state``
    is untouched (and still usable); on success ``state`` is stale (ownership moved)."""
    delta = validate_block(
        state,
        block,
        rules,
        verify_scripts=verify_scripts,
        strict=strict,
        script_verified=script_verified,
    )
    return apply_delta(state, delta)


# ---------------------------------------------------------------------------
# Read models


def _as_script(address_or_script: str | bytes, p2pkh_version: int, p2sh_version: int) -> bytes:
    if isinstance(address_or_script, bytes):
        return address_or_script
    return address_to_script(
        address_or_script, p2pkh_version=p2pkh_version, p2sh_version=p2sh_version
    )


def utxos_of(
    state: LedgerState,
    address_or_script: str | bytes,
    *,
    limit: int = UTXOS_OF_LIMIT_DEFAULT,
    p2pkh_version: int = 0x00,
    p2sh_version: int = 0x05,
) -> list[tuple[OutPoint, UtxoEntry]]:
    """The unspent outputs paying a script (at most ``limit``, in outpoint-key order).

    Uses the script index when the state keeps one; otherwise scans the whole set.
    """
    script = _as_script(address_or_script, p2pkh_version, p2sh_version)
    state._live()
    if state._script_index is not None:
        keys: Iterable[bytes] = sorted(state._script_index.get(script, ()))
    else:
        keys = sorted(k for k, e in state._utxos.items() if e.script_pubkey == script)
    result: list[tuple[OutPoint, UtxoEntry]] = []
    for key in keys:
        if len(result) >= limit:
            break
        result.append((key_outpoint(key), state._utxos[key]))
    return result


def balances(
    state: LedgerState,
    address_or_script: str | bytes,
    *,
    p2pkh_version: int = 0x00,
    p2sh_version: int = 0x05,
) -> dict[str | None, int]:
    """Holdings of one address or script: ``None`` -> native value, asset id -> units."""
    script = _as_script(address_or_script, p2pkh_version, p2sh_version)
    state._live()
    if state._script_index is not None:
        entries: Iterable[UtxoEntry] = (
            state._utxos[key] for key in state._script_index.get(script, ())
        )
    else:
        entries = (e for e in state._utxos.values() if e.script_pubkey == script)
    totals: dict[str | None, int] = {None: 0}
    for entry in entries:
        totals[None] += entry.value
        if entry.asset_id is not None:
            totals[entry.asset_id] = totals.get(entry.asset_id, 0) + entry.quantity
    return totals


def asset_holders(state: LedgerState, asset_id: str) -> dict[bytes, int]:
    """Units of ``asset_id`` per holding script (full scan)."""
    state._live()
    holders: dict[bytes, int] = {}
    for entry in state._utxos.values():
        if entry.asset_id == asset_id:
            holders[entry.script_pubkey] = holders.get(entry.script_pubkey, 0) + entry.quantity
    return holders

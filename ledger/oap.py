"""Open Assets Protocol (OAP/1.0): marker outputs, asset ids, the coloring function,
and the ledger's stricter asset rules on top of it.

Owns:
- ``parse_marker`` / ``build_marker``: the marker output (OP_RETURN + one push of
  ``4f41 0100 <CompactSize count> <LEB128 quantities> <CompactSize len> <metadata>``).
- ``asset_id`` / ``asset_id_bytes``: RIPEMD160(SHA256(script)), Base58Check version 23.
- ``color_outputs`` / ``color_transaction``: the coloring function exactly as the
  specification (OpenAssets/open-assets-protocol ``specification.mediawiki``) and its
  reference implementation (OpenAssets/openassets ``openassets/protocol.py``) define it.
- ``check_asset_rules``: what this ledger refuses although OAP would accept it
  (invalid coloring, destroyed units, issuance by a non-member); see
  docs/decisions/0011-open-assets-rules.md.

Pure: no I/O. Imports ``ledger.script``, ``ledger.tx``, ``ledger.hashing``, ``ledger.base58``,
``ledger.errors`` only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ledger.base58 import b58check_decode, b58check_encode
from ledger.errors import AssetError, EncodingError, ScriptError
from ledger.hashing import hash160
from ledger.script import (
    OP_RETURN,
    is_unspendable,
    length_prefixed_push,
    read_op,
)
from ledger.serialization import compact_size
from ledger.tx import Transaction

MARKER_TAG = b"\x4f\x41"  # "OA"
MARKER_VERSION = b"\x01\x00"  # major version 1, little-endian
MARKER_PREFIX = MARKER_TAG + MARKER_VERSION
LEB128_BYTES_MAX = 9  # the spec: a quantity whose LEB128 encoding exceeds 9 bytes is invalid
QUANTITY_MAX = 2**63 - 1  # the largest quantity 9 LEB128 bytes can carry, per the spec
ASSET_ID_VERSION = 23  # Base58Check version byte of asset ids ("A..."); testnet uses 115
ASSET_ID_HASH_BYTES = 20
# Asset ids and parsed markers kept per exact script bytes (both are pure functions of
# them; decision 0121): an issuer's asset id is a Base58Check encoding (a big-integer
# division loop) needed by every transfer's coloring, and each marker is parsed by the
# well-formedness check and again by the coloring.
ASSET_ID_CACHE_ENTRIES_MAX = 4096
MARKER_CACHE_ENTRIES_MAX = 4096

# (asset_id or None, quantity) of one output; uncolored outputs are (None, 0).
ColoredOutput = tuple[str | None, int]
# (script_pubkey, asset_id or None, quantity) of the output an input spends.
SpentOutput = tuple[bytes, str | None, int]

UNCOLORED: ColoredOutput = (None, 0)


@dataclass(frozen=True, slots=True)
class Marker:
    """A parsed OAP marker payload: one quantity per colorable output, plus metadata."""

    quantities: tuple[int, ...]
    metadata: bytes = b""


# ---------------------------------------------------------------------------
# Asset ids


def asset_id_bytes(script_pubkey: bytes) -> bytes:
    """The 20-byte asset id hash: RIPEMD160(SHA256(script_pubkey))."""
    return hash160(script_pubkey)


def asset_id(script_pubkey: bytes, version: int = ASSET_ID_VERSION) -> str:
    """The asset id issued by ``script_pubkey`` in Base58Check ("A..." on mainnet)."""
    return _asset_id(bytes(script_pubkey), version)


@lru_cache(maxsize=ASSET_ID_CACHE_ENTRIES_MAX)
def _asset_id(script_pubkey: bytes, version: int) -> str:
    return b58check_encode(bytes([version]) + hash160(script_pubkey))


def asset_id_to_bytes(text: str, version: int = ASSET_ID_VERSION) -> bytes:
    """Decode a Base58Check asset id to its 20-byte hash; refuses other versions."""
    payload = b58check_decode(text)
    if len(payload) != 1 + ASSET_ID_HASH_BYTES or payload[0] != version:
        raise EncodingError(
            f"asset id {text!r} is not a version-{version} 20-byte Base58Check id",
            code="asset-id-format",
        )
    return payload[1:]


# ---------------------------------------------------------------------------
# Marker output


def leb128_encode(value: int) -> bytes:
    """Unsigned LEB128, minimal form (0 encodes as one zero byte)."""
    assert value >= 0
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Truncated(Exception):
    """Internal: the payload ended early or broke a limit; the marker is invalid."""


class _Cursor:
    """A read cursor over a marker payload; every failure means "not a marker"."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _Truncated
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def compact_size(self) -> int:
        # Non-canonical CompactSize encodings are accepted, as the reference
        # implementation (python-bitcoinlib's VarIntSerializer) accepts them.
        first = self.take(1)[0]
        if first < 0xFD:
            return first
        width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
        return int.from_bytes(self.take(width), "little")

    def leb128(self) -> int:
        result = 0
        for position in range(LEB128_BYTES_MAX):
            byte = self.take(1)[0]
            result |= (byte & 0x7F) << (7 * position)
            if not byte & 0x80:
                return result
        raise _Truncated  # a tenth byte would be needed: longer than the spec allows


def _single_push_after_op_return(script: bytes) -> bytes | None:
    """The data of ``OP_RETURN <one push>`` with nothing after it, else None.

    Any push opcode is accepted (0x00..0x4e, minimal or not), as the reference
    implementation's script iterator accepts them.
    """
    if len(script) < 2 or not is_unspendable(script):
        return None
    try:
        _, data, end = read_op(script, 1)
    except ScriptError:
        return None  # truncated push
    if data is None or end != len(script):
        return None  # OP_1NEGATE, OP_1.. push no data bytes; or opcodes after the push
    return data


def parse_marker_payload(payload: bytes) -> Marker | None:
    """Decode an OAP payload (tag, version, quantities, metadata); None if malformed."""
    if payload[:4] != MARKER_PREFIX:
        return None
    cursor = _Cursor(payload)
    cursor.pos = 4
    try:
        count = cursor.compact_size()
        if count > cursor.remaining():
            return None  # each quantity takes at least one byte: cannot fit
        quantities = tuple(cursor.leb128() for _ in range(count))
        metadata = cursor.take(cursor.compact_size())
    except _Truncated:
        return None
    if cursor.remaining():
        return None  # trailing bytes: malformed
    return Marker(quantities, metadata)


def parse_marker(script: bytes) -> Marker | None:
    """The marker carried by an output script, or None when it is not a valid marker."""
    return _parsed_marker(bytes(script))


@lru_cache(maxsize=MARKER_CACHE_ENTRIES_MAX)
def _parsed_marker(script: bytes) -> Marker | None:
    payload = _single_push_after_op_return(script)
    if payload is None:
        return None
    return parse_marker_payload(payload)


def is_marker_shaped(script: bytes) -> bool:
    """OP_RETURN + one push starting with the OAP tag and version (valid or not)."""
    payload = _single_push_after_op_return(script)
    return payload is not None and payload[:4] == MARKER_PREFIX


def build_marker_payload(quantities: Sequence[int], metadata: bytes = b"") -> bytes:
    for position, quantity in enumerate(quantities):
        if not 0 <= quantity <= QUANTITY_MAX:
            raise AssetError(
                f"marker quantity {quantity} for output slot {position} outside 0..{QUANTITY_MAX}",
                code="asset-quantity-range",
            )
    return (
        MARKER_PREFIX
        + compact_size(len(quantities))
        + b"".join(leb128_encode(q) for q in quantities)
        + compact_size(len(metadata))
        + metadata
    )


def build_marker(quantities: Sequence[int], metadata: bytes = b"") -> bytes:
    """The marker output script: OP_RETURN + one minimal push of the OAP payload."""
    return bytes([OP_RETURN]) + length_prefixed_push(build_marker_payload(quantities, metadata))


# ---------------------------------------------------------------------------
# Coloring


@dataclass(frozen=True, slots=True)
class Coloring:
    """The result of coloring one transaction.

    ``marker_index`` is the output whose marker was used (None when the transaction
    is not a valid Open Assets transaction); ``first_marker_index`` is the first
    output that parses as a marker, whether or not its coloring is valid.
    """

    outputs: tuple[ColoredOutput, ...]
    marker_index: int | None
    marker: Marker | None
    first_marker_index: int | None
    issuance_asset_id: str | None

    @property
    def is_open_assets(self) -> bool:
        return self.marker_index is not None


def _color_with_marker(
    spent: Sequence[SpentOutput],
    output_count: int,
    marker_index: int,
    quantities: tuple[int, ...],
    issuance_id: str,
) -> tuple[ColoredOutput, ...] | None:
    """Color with one marker; None when that marker is invalid for this transaction."""
    if len(quantities) > output_count - 1:
        return None  # more quantities than colorable outputs

    def quantity_of(output_index: int) -> int:
        # The quantity list skips the marker output itself.
        slot = output_index if output_index < marker_index else output_index - 1
        return quantities[slot] if slot < len(quantities) else 0

    result: list[ColoredOutput] = []
    for index in range(marker_index):
        quantity = quantity_of(index)
        result.append((issuance_id, quantity) if quantity > 0 else UNCOLORED)
    result.append(UNCOLORED)  # the marker output

    transfers = color_transfers([(asset, units) for _, asset, units in spent],
                                [quantity_of(index)
                                 for index in range(marker_index + 1, output_count)])
    if transfers is None:
        return None
    result.extend(transfers)
    return tuple(result)


def color_transfers(inputs: Sequence[tuple[str | None, int]],
                    quantities: Sequence[int]) -> list[ColoredOutput] | None:
    """Order-based coloring of the transfer outputs (those after the marker), in order,
    from the inputs' ``(asset id, units)`` in order: each output takes its quantity of
    units from the inputs left to right (uncolored inputs carry none). None when the
    inputs carry fewer units than the outputs need or one output would mix two assets.
    Units left over are not this function's concern (``check_asset_rules``)."""
    result: list[ColoredOutput] = []
    input_index = -1
    input_asset: str | None = None
    input_left = 0
    for quantity in quantities:
        output_asset: str | None = None
        need = quantity
        while need > 0:
            if input_left == 0:
                input_index += 1
                if input_index >= len(inputs):
                    return None  # fewer input units than output units
                input_asset, input_left = inputs[input_index]
                if input_asset is None:
                    input_left = 0  # uncolored inputs carry no units
                continue
            step = min(input_left, need)
            need -= step
            input_left -= step
            if output_asset is None:
                output_asset = input_asset
            elif output_asset != input_asset:
                return None  # one output would mix two assets
        result.append((output_asset, quantity) if quantity > 0 else UNCOLORED)
    return result


def color_transaction(
    tx: Transaction, spent: Sequence[SpentOutput], *, version: int = ASSET_ID_VERSION
) -> Coloring:
    """Color every output of ``tx`` given the outputs its inputs spend (in input order).

    The first marker output that parses *and* colors validly is used, as the spec
    ("the first valid marker output") and the reference implementation do; when none
    does, every output is uncolored.
    """
    assert len(spent) == len(tx.inputs), "spent must describe every input, in order"
    uncolored = tuple(UNCOLORED for _ in tx.outputs)
    first_marker_index: int | None = None
    if tx.is_coinbase() or not tx.inputs:
        return Coloring(uncolored, None, None, None, None)
    issuance_id: str | None = None
    for index, output in enumerate(tx.outputs):
        if not is_unspendable(output.script_pubkey):
            continue
        marker = parse_marker(output.script_pubkey)
        if marker is None:
            continue
        if first_marker_index is None:
            first_marker_index = index
        if issuance_id is None:
            issuance_id = asset_id(spent[0][0], version)
        colored = _color_with_marker(
            spent, len(tx.outputs), index, marker.quantities, issuance_id
        )
        if colored is not None:
            return Coloring(colored, index, marker, first_marker_index, issuance_id)
    return Coloring(uncolored, None, None, first_marker_index, None)


def color_outputs(
    tx: Transaction, spent: Sequence[SpentOutput], *, version: int = ASSET_ID_VERSION
) -> list[ColoredOutput]:
    """Per output ``(asset_id or None, quantity)`` as the OAP coloring function defines."""
    return list(color_transaction(tx, spent, version=version).outputs)


# ---------------------------------------------------------------------------
# The ledger's stricter rules


@dataclass(frozen=True, slots=True)
class AssetEffects:
    """What a transaction does to assets once it passed ``check_asset_rules``."""

    coloring: Coloring
    issued_asset_id: str | None  # the asset issued by this tx, if any
    issued_quantity: int  # total units issued (0 when none)
    metadata: bytes  # the used marker's metadata (b"" when not an OAP tx)


def check_asset_rules(
    tx: Transaction,
    spent: Sequence[SpentOutput],
    *,
    issuer_scripts: Collection[bytes],
    version: int = ASSET_ID_VERSION,
) -> AssetEffects:
    """Color ``tx`` and refuse what this ledger does not allow although OAP would.

    Raises ``AssetError`` with code:
    - ``asset-malformed-marker``: an OP_RETURN output carries the OAP tag but does not parse.
    - ``asset-invalid-coloring``: the first marker output colors invalidly (more
      quantities than outputs, fewer input units than output units, an output mixing
      assets). A later marker would be used by OAP; this ledger refuses the ambiguity.
    - ``asset-units-destroyed``: colored input units not all carried to spendable
      transfer outputs (per asset, units in == units out).
    - ``asset-issuer-not-member``: issuance outputs whose issuing script (the script of
      the output spent by input 0) is not one of ``issuer_scripts``.
    """
    _check_markers_well_formed(tx)
    coloring = color_transaction(tx, spent, version=version)
    _check_first_marker_used(tx, coloring)
    issued_quantity, output_units = _issued_and_transferred(tx, coloring)
    _check_units_conserved(tx, _input_units(spent), output_units)
    issued_asset = coloring.issuance_asset_id if issued_quantity else None
    if issued_quantity and spent[0][0] not in issuer_scripts:
        raise AssetError(
            f"tx {tx.txid} input 0: issuing script {spent[0][0].hex()} is not a member "
            f"issuer's; it may not issue {issued_asset}",
            code="asset-issuer-not-member",
        )
    metadata = coloring.marker.metadata if coloring.marker is not None else b""
    return AssetEffects(coloring, issued_asset, issued_quantity, metadata)


def _check_markers_well_formed(tx: Transaction) -> None:
    for index, output in enumerate(tx.outputs):
        script = output.script_pubkey
        if is_marker_shaped(script) and parse_marker(script) is None:
            raise AssetError(
                f"tx {tx.txid} output {index}: OP_RETURN carries the OAP tag but is not a "
                "well-formed marker",
                code="asset-malformed-marker",
            )


def _check_first_marker_used(tx: Transaction, coloring: Coloring) -> None:
    if coloring.first_marker_index is not None and (
        coloring.marker_index != coloring.first_marker_index
    ):
        raise AssetError(
            f"tx {tx.txid} output {coloring.first_marker_index}: the marker's coloring is "
            "invalid (quantity list longer than the outputs, fewer input units than output "
            "units, or an output mixing assets)",
            code="asset-invalid-coloring",
        )


def _input_units(spent: Sequence[SpentOutput]) -> dict[str, int]:
    """Units of each asset the inputs carry."""
    input_units: dict[str, int] = {}
    for _, spent_asset, spent_quantity in spent:
        if spent_asset is not None and spent_quantity > 0:
            input_units[spent_asset] = input_units.get(spent_asset, 0) + spent_quantity
    return input_units


def _issued_and_transferred(tx: Transaction, coloring: Coloring) -> tuple[int, dict[str, int]]:
    """Units issued (outputs before the marker) and units of each asset transferred
    (outputs after it); raises when colored units land on an unspendable output."""
    issued_quantity = 0
    output_units: dict[str, int] = {}
    marker_index = coloring.marker_index
    for index, (colored_asset, quantity) in enumerate(coloring.outputs):
        if colored_asset is None:
            continue
        if is_unspendable(tx.outputs[index].script_pubkey):
            raise AssetError(
                f"tx {tx.txid} output {index}: {quantity} units of {colored_asset} assigned to "
                "an unspendable OP_RETURN output",
                code="asset-units-destroyed",
            )
        assert marker_index is not None
        if index < marker_index:
            issued_quantity += quantity
        else:
            output_units[colored_asset] = output_units.get(colored_asset, 0) + quantity
    return issued_quantity, output_units


def _check_units_conserved(
    tx: Transaction, input_units: Mapping[str, int], output_units: Mapping[str, int]
) -> None:
    for spent_asset, units_in in input_units.items():
        units_out = output_units.get(spent_asset, 0)
        if units_out != units_in:
            # Order-based coloring never assigns more units than the inputs carry, so a
            # difference means units left uncolored: they would be destroyed.
            raise AssetError(
                f"tx {tx.txid}: inputs carry {units_in} units of {spent_asset} but transfer "
                f"outputs carry {units_out}; the rest would be destroyed",
                code="asset-units-destroyed",
            )
    assert set(output_units) <= set(input_units), "coloring created units from nothing"

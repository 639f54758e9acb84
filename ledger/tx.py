"""Bitcoin legacy (pre-segwit) transactions: types, serialization, txid.

Owns: ``OutPoint``, ``TxIn``, ``TxOut``, ``Transaction`` as frozen values with
bit-exact Bitcoin serialization. Parsing is bounded and refuses truncated input and
trailing bytes; the segwit marker is refused (this ledger is legacy-only).

"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property

from ledger.errors import DecodeError
from ledger.hashing import display_hex, hash_from_display_hex, sha256d
from ledger.serialization import ByteReader, compact_size, var_bytes

TX_BYTES_MAX = 1_000_000  # one transaction never exceeds this (blocks are 2 MB by default)
TX_INPUTS_MAX = 10_000
TX_OUTPUTS_MAX = 10_000
SCRIPT_BYTES_MAX = 10_000  # Bitcoin's MAX_SCRIPT_SIZE
SEQUENCE_FINAL = 0xFFFFFFFF
COINBASE_INDEX = 0xFFFFFFFF
NULL_TXID = bytes(32)


@dataclass(frozen=True, slots=True)
class OutPoint:
    """A reference to one output: ``txid_le`` in internal (little-endian) byte order."""

    txid_le: bytes
    index: int

    def __post_init__(self) -> None:
        assert len(self.txid_le) == 32
        assert 0 <= self.index <= 0xFFFFFFFF

    @property
    def txid(self) -> str:
        """The txid as Bitcoin displays it (byte-reversed hex)."""
        return display_hex(self.txid_le)

    @classmethod
    def from_txid(cls, txid: str, index: int) -> OutPoint:
        return cls(hash_from_display_hex(txid), index)

    def serialize(self) -> bytes:
        return self.txid_le + struct.pack("<I", self.index)

    def is_null(self) -> bool:
        return self.txid_le == NULL_TXID and self.index == COINBASE_INDEX

    def __str__(self) -> str:
        return f"{self.txid}:{self.index}"


@dataclass(frozen=True, slots=True)
class TxIn:
    prevout: OutPoint
    script_sig: bytes = b""
    sequence: int = SEQUENCE_FINAL

    def serialize(self) -> bytes:
        return self.prevout.serialize() + var_bytes(self.script_sig) + struct.pack(
            "<I", self.sequence
        )


@dataclass(frozen=True, slots=True)
class TxOut:
    value: int
    script_pubkey: bytes

    def serialize(self) -> bytes:
        return struct.pack("<q", self.value) + var_bytes(self.script_pubkey)


@dataclass(frozen=True)
class Transaction:
    """A legacy Bitcoin transaction. Immutable; derived values are cached."""

    version: int
    inputs: tuple[TxIn, ...]
    outputs: tuple[TxOut, ...]
    lock_time: int = 0
    _cache: dict[str, object] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def parse(cls, raw: bytes) -> Transaction:
        """Parse exactly one transaction; truncated input or trailing bytes raise."""
        if len(raw) > TX_BYTES_MAX:
            raise DecodeError(
                f"transaction of {len(raw)} bytes exceeds {TX_BYTES_MAX}", code="tx-oversized"
            )
        raw = bytes(raw)
        tx = _parse_fast(raw)
        if tx is None:
            # The careful path: same result for good input, precise errors for bad.
            reader = ByteReader(raw, "transaction")
            tx = cls._read_careful(reader)
            reader.finish()
            tx._cache["serialized"] = raw
        return tx

    @classmethod
    def read(cls, reader: ByteReader) -> Transaction:
        """Read one transaction at the reader's position (e.g. inside a block)."""
        start = reader.position
        parsed = _parse_fast_at(reader.buffer, start)
        if parsed is None:
            return cls._read_careful(reader)
        tx, end = parsed
        reader.skip(end - start)  # the fast parser kept these exact bytes
        return tx

    @classmethod
    def _read_careful(cls, reader: ByteReader) -> Transaction:
        """``read`` field by field: the authority on malformed input and its errors."""
        version = reader.read_i32()
        input_count = reader.read_compact_size(TX_INPUTS_MAX)
        if input_count == 0:
            # A zero input count is the segwit marker; legacy-only ledger.
            raise DecodeError("transaction has no inputs (segwit encoding is not accepted)",
                              code="tx-no-inputs")
        inputs = []
        for _ in range(input_count):
            prevout = OutPoint(reader.read(32), reader.read_u32())
            script_sig = reader.read_var_bytes(SCRIPT_BYTES_MAX)
            inputs.append(TxIn(prevout, script_sig, reader.read_u32()))
        output_count = reader.read_compact_size(TX_OUTPUTS_MAX)
        outputs = []
        for _ in range(output_count):
            value = reader.read_i64()
            outputs.append(TxOut(value, reader.read_var_bytes(SCRIPT_BYTES_MAX)))
        lock_time = reader.read_u32()
        return cls(version, tuple(inputs), tuple(outputs), lock_time)

    def serialize(self) -> bytes:
        cached = self._cache.get("serialized")
        if isinstance(cached, bytes):  # parsed transactions: the bytes read
            return cached
        if cached is None:
            parts = [struct.pack("<i", self.version), compact_size(len(self.inputs))]
            parts.extend(txin.serialize() for txin in self.inputs)
            parts.append(compact_size(len(self.outputs)))
            parts.extend(txout.serialize() for txout in self.outputs)
            parts.append(struct.pack("<I", self.lock_time))
            cached = b"".join(parts)
            self._cache["serialized"] = cached
        assert isinstance(cached, bytes)
        return cached

    @cached_property
    def hash_le(self) -> bytes:
        """SHA-256d of the serialization, internal byte order (used in outpoints, Merkle).

        A cached_property: computed once, then an instance attribute (read several
        times per transaction by the pool, selection and state, and by ``__hash__``).
        """
        return sha256d(self.serialize())

    @cached_property
    def output_keys(self) -> tuple[bytes, ...]:
        """Each output's outpoint key (``hash_le`` + u32 index, ``ledger.state.
        outpoint_key``), in order; computed once per transaction object (the intake,
        the pool and the state each need them)."""
        return output_keys(self.hash_le, len(self.outputs))

    @property
    def txid(self) -> str:
        """The txid as Bitcoin displays it: byte-reversed hex of ``hash_le``."""
        return display_hex(self.hash_le)

    @cached_property
    def size_bytes(self) -> int:
        """Bytes of the serialization. Like ``hash_le`` a cached_property: the fast
        parser stores it with the bytes it read; read by the pool and the selection."""
        return len(self.serialize())

    def is_coinbase(self) -> bool:
        return len(self.inputs) == 1 and self.inputs[0].prevout.is_null()

    def outpoint(self, index: int) -> OutPoint:
        assert 0 <= index < len(self.outputs)
        return OutPoint(self.hash_le, index)

    def with_script_sig(self, input_index: int, script_sig: bytes) -> Transaction:
        """A copy with one input's scriptSig replaced (used when signing)."""
        inputs = list(self.inputs)
        old = inputs[input_index]
        inputs[input_index] = TxIn(old.prevout, script_sig, old.sequence)
        return Transaction(self.version, tuple(inputs), self.outputs, self.lock_time)

    def __hash__(self) -> int:
        return hash(self.hash_le)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Transaction) and self.serialize() == other.serialize()


# u32 little-endian encodings of the first output indexes, packed once (0116)
_SMALL_INDEXES = 256
_INDEX_BYTES = tuple(struct.pack("<I", index) for index in range(_SMALL_INDEXES))


def index_bytes(index: int) -> bytes:
    """``struct.pack("<I", index)``; a tuple lookup for the usual small indexes."""
    return _INDEX_BYTES[index] if 0 <= index < _SMALL_INDEXES else struct.pack("<I", index)


def output_keys(txid_le: bytes, output_count: int) -> tuple[bytes, ...]:
    """The outpoint keys ``txid_le`` + u32 index of outputs ``0..output_count-1``."""
    if output_count == 2:  # a payment and its change: most transactions
        return (txid_le + _INDEX_BYTES[0], txid_le + _INDEX_BYTES[1])
    if output_count == 1:
        return (txid_le + _INDEX_BYTES[0],)
    if output_count <= _SMALL_INDEXES:
        return tuple([txid_le + suffix for suffix in _INDEX_BYTES[:output_count]])
    return tuple([txid_le + index_bytes(index) for index in range(output_count)])


class _NotFast(Exception):
    """The fast parser met something it leaves to the careful one."""


_U32 = struct.Struct("<I")
_sha256 = hashlib.sha256
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")


def _compact_size_at(raw: bytes, pos: int, limit: int) -> tuple[int, int]:
    first = raw[pos]
    if first < 0xFD:
        value, pos = first, pos + 1
    elif first == 0xFD:
        value, pos = int.from_bytes(raw[pos + 1 : pos + 3], "little"), pos + 3
        if value < 0xFD or pos > len(raw):
            raise _NotFast
    else:
        raise _NotFast  # 4- and 8-byte sizes never occur in a valid transaction here
    if value > limit:
        raise _NotFast
    return value, pos


# Direct constructors for the fast parser. The values they receive are already of
# the checked shape (32-byte txids and u32/i64 integers straight from struct), so
# the dataclasses' __init__ and __post_init__ checks would only cost time (a third
# of a parse). Field lists are asserted so a new field cannot be silently skipped.
assert [f.name for f in fields(OutPoint)] == ["txid_le", "index"]
assert [f.name for f in fields(TxIn)] == ["prevout", "script_sig", "sequence"]
assert [f.name for f in fields(TxOut)] == ["value", "script_pubkey"]
assert [f.name for f in fields(Transaction)] == [
    "version", "inputs", "outputs", "lock_time", "_cache"]
_new = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_set_attribute = object.__setattr__
_set_txid_le = _slot_setter(OutPoint, "txid_le")
_set_index = _slot_setter(OutPoint, "index")
_set_prevout = _slot_setter(TxIn, "prevout")
_set_script_sig = _slot_setter(TxIn, "script_sig")
_set_sequence = _slot_setter(TxIn, "sequence")
_set_value = _slot_setter(TxOut, "value")
_set_script_pubkey = _slot_setter(TxOut, "script_pubkey")
_INPUT_HEAD = struct.Struct("<32sIB")  # outpoint and the first byte of the script size
_OUTPUT_HEAD = struct.Struct("<qB")  # value and the first byte of the script size
_VERSION_HEAD = struct.Struct("<iB")  # version and the first byte of the input count


def _parse_fast(raw: bytes) -> Transaction | None:
    """Parse a well-formed transaction with few Python calls; None for anything
    unusual (truncation, non-canonical or oversized sizes, trailing bytes, no
    inputs), which ``Transaction._read_careful`` then handles with its precise errors."""
    parsed = _parse_fast_at(raw, 0)
    if parsed is None or parsed[1] != len(raw):
        return None
    return parsed[0]


def _parse_fast_at(raw: bytes, start: int) -> tuple[Transaction, int] | None:
    """The transaction starting at ``raw[start]`` and the offset just past it, when
    it is well formed and usual; None otherwise (see ``_parse_fast``). Script spans
    are cached relative to ``start``, i.e. to the transaction's own serialization."""
    try:
        version, input_count = _VERSION_HEAD.unpack_from(raw, start)
        pos = start + 5
        if input_count >= 0xFD:
            input_count, pos = _compact_size_at(raw, start + 4, TX_INPUTS_MAX)
        if input_count == 0:
            return None
        inputs = []
        # Where each scriptSig (length prefix included) starts and ends: the legacy
        # sighash cuts the serialization there instead of re-walking it.
        script_spans: list[int] = []
        for _ in range(input_count):
            txid_le, index, size = _INPUT_HEAD.unpack_from(raw, pos)
            script_spans.append(pos + 36 - start)
            if size < 0xFD:
                pos += 37
            else:
                size, pos = _compact_size_at(raw, pos + 36, SCRIPT_BYTES_MAX)
            end = pos + size
            script_sig = raw[pos:end]
            script_spans.append(end - start)
            sequence = _U32.unpack_from(raw, end)[0]
            pos = end + 4
            prevout = _new(OutPoint)
            _set_txid_le(prevout, txid_le)
            _set_index(prevout, index)
            txin = _new(TxIn)
            _set_prevout(txin, prevout)
            _set_script_sig(txin, script_sig)
            _set_sequence(txin, sequence)
            inputs.append(txin)
        output_count = raw[pos]
        if output_count < 0xFD:  # the one-byte CompactSize, inlined (under the limit)
            pos += 1
        else:
            output_count, pos = _compact_size_at(raw, pos, TX_OUTPUTS_MAX)
        outputs = []
        for _ in range(output_count):
            value, size = _OUTPUT_HEAD.unpack_from(raw, pos)
            if size < 0xFD:
                pos += 9
            else:
                size, pos = _compact_size_at(raw, pos + 8, SCRIPT_BYTES_MAX)
            txout = _new(TxOut)
            _set_value(txout, value)
            _set_script_pubkey(txout, raw[pos : pos + size])
            outputs.append(txout)
            pos += size
        lock_time = _U32.unpack_from(raw, pos)[0]
    except (_NotFast, struct.error, IndexError):
        return None
    end = pos + 4
    serialized = raw if start == 0 and end == len(raw) else raw[start:end]
    tx: Transaction = _new(Transaction)
    # The exact bytes read, and the txid hashed from them once: ``hash_le`` is a
    # cached_property, whose cache is this same instance dict entry; so are the size
    # and the output keys (decision 0116: every parsed transaction needs both, and a
    # cached_property's first read takes a lock in Python).
    txid_le = _sha256(_sha256(serialized).digest()).digest()
    _set_attribute(tx, "__dict__", {
        "version": version, "inputs": tuple(inputs), "outputs": tuple(outputs),
        "lock_time": lock_time,
        "_cache": {"script_spans": tuple(script_spans), "serialized": serialized},
        "hash_le": txid_le, "size_bytes": end - start,
        "output_keys": output_keys(txid_le, output_count)})
    return tx, end

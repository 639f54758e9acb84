"""Bitcoin's legacy (pre-segwit) signature hash: the 32-byte message an input signs.

Owns: the hash-type constants and ``legacy_sighash``, bit-for-bit as Bitcoin Core's
``SignatureHash`` for ``SigVersion::BASE``: ALL / NONE / SINGLE with or without
ANYONECANPAY, OP_CODESEPARATOR removed from the script code, and the SINGLE
"index out of range" quirk (the message is the number one, not an error). The
FindAndDelete of the signature itself is the interpreter's business, not this one's.

Performance: the per-transaction pieces that do not depend on the input being
signed (version, each input's outpoint and sequence, the serialized outputs) are
sliced once out of the transaction's cached serialization and cached on it, so
signing or verifying n inputs neither re-serializes nor re-encodes anything.
SIGHASH_ALL without ANYONECANPAY (nearly every signature) takes a shorter road:
the serialization with every scriptSig cut out is cached as n + 1 segments, and
the message is those segments joined with empty scripts and the signed script
code spliced in at the input's place.

"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from ledger.hashing import sha256d
from ledger.serialization import compact_size, var_bytes
from ledger.tx import Transaction

SIGHASH_ALL = 1
SIGHASH_NONE = 2
SIGHASH_SINGLE = 3
SIGHASH_ANYONECANPAY = 0x80
SIGHASH_BASE_MASK = 0x1F  # Bitcoin compares (hash_type & 0x1f) with NONE and SINGLE

# Bitcoin returns uint256(1) when SINGLE signs an input with no matching output;
# in internal byte order that is 0x01 followed by 31 zero bytes.
SIGHASH_SINGLE_OUT_OF_RANGE = b"\x01" + bytes(31)

_OP_CODESEPARATOR = 0xAB
_OP_PUSHDATA1 = 0x4C
_OP_PUSHDATA2 = 0x4D
_OP_PUSHDATA4 = 0x4E
_EMPTY_SCRIPT = b"\x00"  # compact-size 0: an empty scriptSig
_ZERO_SEQUENCE = b"\x00\x00\x00\x00"
_NULL_OUTPUT = struct.pack("<q", -1) + b"\x00"  # SINGLE blanks earlier outputs to this
_HASH_TYPE = struct.Struct("<I")
_SIGHASH_ALL_BYTES = _HASH_TYPE.pack(SIGHASH_ALL)
_sha256 = hashlib.sha256
_ONE_BYTE_SIZE_MAX = 0xFD  # a CompactSize below this is its one byte
_SHORT_SIZES = tuple(bytes((size,)) for size in range(_ONE_BYTE_SIZE_MAX))


class _SighashPieces(NamedTuple):
    """Serialization pieces of one transaction that every input's sighash reuses,
    sliced out of the transaction's own serialization (no re-encoding)."""

    version: bytes
    input_count: bytes
    outpoints: tuple[bytes, ...]
    sequences: tuple[bytes, ...]
    outputs_all: bytes  # compact-size count followed by every output
    lock_time: bytes


def _compact_size_len(n: int) -> int:
    return 1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9


def _pieces(tx: Transaction) -> _SighashPieces:
    cached = tx._cache.get("sighash_pieces")
    if cached is None:
        raw = tx.serialize()
        count_len = _compact_size_len(len(tx.inputs))
        pos = 4 + count_len
        outpoints: list[bytes] = []
        sequences: list[bytes] = []
        for txin in tx.inputs:
            outpoints.append(raw[pos : pos + 36])
            script_len = len(txin.script_sig)
            pos += 36 + _compact_size_len(script_len) + script_len
            sequences.append(raw[pos : pos + 4])
            pos += 4
        end = len(raw) - 4
        assert pos < end, "serialization does not match the transaction's inputs"
        cached = _SighashPieces(
            version=raw[:4],
            input_count=raw[4 : 4 + count_len],
            outpoints=tuple(outpoints),
            sequences=tuple(sequences),
            outputs_all=raw[pos:end],
            lock_time=raw[end:],
        )
        tx._cache["sighash_pieces"] = cached
    assert isinstance(cached, _SighashPieces)
    return cached


def _script_spans(tx: Transaction, raw: bytes) -> tuple[int, ...]:
    """Offsets in ``raw`` where each input's scriptSig (with its length prefix) starts
    and ends, flattened: (start_0, end_0, start_1, end_1, ...)."""
    pos = 4 + _compact_size_len(len(tx.inputs))
    spans: list[int] = []
    for txin in tx.inputs:
        start = pos + 36
        script_len = len(txin.script_sig)
        end = start + _compact_size_len(script_len) + script_len
        spans.append(start)
        spans.append(end)
        pos = end + 4
    return tuple(spans)


def _blanked_segments(tx: Transaction) -> tuple[bytes, ...]:
    """The serialization of ``tx`` cut around every scriptSig: n + 1 byte strings.

    Joining them with one compact-size zero (an empty script) between each gives
    the SIGHASH_ALL message body of an input before its own script is spliced in.
    """
    cached = tx._cache.get("sighash_segments")
    if cached is None:
        raw = tx.serialize()
        spans = tx._cache.get("script_spans")
        if spans is None:
            spans = _script_spans(tx, raw)
        assert isinstance(spans, tuple) and len(spans) == 2 * len(tx.inputs)
        segments: list[bytes] = []
        previous_end = 0
        for k in range(0, len(spans), 2):
            segments.append(raw[previous_end : spans[k]])
            previous_end = spans[k + 1]
        segments.append(raw[previous_end:])
        cached = tuple(segments)
        tx._cache["sighash_segments"] = cached
    assert isinstance(cached, tuple)
    return cached


def remove_codeseparators(script_code: bytes) -> bytes:
    """``script_code`` without its OP_CODESEPARATOR opcodes (push data is kept intact).

    Like Bitcoin, the walk stops at a truncated push and keeps the rest verbatim.
    """
    if _OP_CODESEPARATOR not in script_code:
        return script_code
    pieces: list[bytes] = []
    start = 0
    pos = 0
    length = len(script_code)
    while pos < length:
        opcode = script_code[pos]
        pos += 1
        if opcode <= _OP_PUSHDATA4:
            if opcode < _OP_PUSHDATA1:
                size = opcode
            else:
                width = {_OP_PUSHDATA1: 1, _OP_PUSHDATA2: 2, _OP_PUSHDATA4: 4}[opcode]
                if pos + width > length:
                    break
                size = int.from_bytes(script_code[pos : pos + width], "little")
                pos += width
            if pos + size > length:
                break
            pos += size
        elif opcode == _OP_CODESEPARATOR:
            pieces.append(script_code[start : pos - 1])
            start = pos
    pieces.append(script_code[start:])
    return b"".join(pieces)


def _usual_payment_sighash(tx: Transaction, input_index: int, script_code: bytes,
                           hash_type: int) -> bytes | None:
    """SIGHASH_ALL of a parsed one-input transaction's input 0 for a short script
    code without an OP_CODESEPARATOR byte, in as few steps as can be (decision 0127):
    what ``legacy_sighash``'s one-input road computes, from the same cached bytes and
    spans; None for anything else."""
    if hash_type != SIGHASH_ALL or input_index != 0 or len(tx.inputs) != 1:
        return None
    cache = tx._cache
    spans = cache.get("script_spans")
    raw = cache.get("serialized")
    if (spans is None or type(raw) is not bytes or len(script_code) >= _ONE_BYTE_SIZE_MAX
            or _OP_CODESEPARATOR in script_code):
        return None
    return _sha256(_sha256(b"".join((
        raw[: spans[0]], _SHORT_SIZES[len(script_code)], script_code,  # type: ignore[index]
        raw[spans[1] :], _SIGHASH_ALL_BYTES))).digest()).digest()  # type: ignore[index]


def legacy_sighash(
    tx: Transaction, input_index: int, script_code: bytes, hash_type: int
) -> bytes:
    """The 32-byte legacy signature hash (internal byte order) of one input.

    ``hash_type`` is the full 32-bit value Bitcoin serializes (the signature's last
    byte when called from the interpreter); only its low five bits and the 0x80 bit
    select the mode, exactly as Bitcoin does.
    """
    if (usual := _usual_payment_sighash(tx, input_index, script_code, hash_type)) is not None:
        return usual
    assert 0 <= input_index < len(tx.inputs), "input_index out of range"
    base_type = hash_type & SIGHASH_BASE_MASK
    anyone_can_pay = bool(hash_type & SIGHASH_ANYONECANPAY)
    if base_type == SIGHASH_SINGLE and input_index >= len(tx.outputs):
        return SIGHASH_SINGLE_OUT_OF_RANGE
    if not anyone_can_pay and base_type != SIGHASH_NONE and base_type != SIGHASH_SINGLE:
        spans = tx._cache.get("script_spans")
        if spans is not None and len(tx.inputs) == 1:
            # One input (most payments): its script is the only one to replace, so
            # the message is the serialization with that span swapped, no segments.
            assert isinstance(spans, tuple) and len(spans) == 2
            raw = tx.serialize()
            if len(script_code) < _ONE_BYTE_SIZE_MAX and _OP_CODESEPARATOR not in script_code:
                # var_bytes of a short script with nothing to remove, inlined (0116)
                signed_script = _SHORT_SIZES[len(script_code)] + script_code
            else:
                signed_script = var_bytes(remove_codeseparators(script_code))
            hash_type_bytes = (_SIGHASH_ALL_BYTES if hash_type == SIGHASH_ALL
                               else _HASH_TYPE.pack(hash_type & 0xFFFFFFFF))
            message = b"".join((raw[: spans[0]], signed_script, raw[spans[1] :],
                                hash_type_bytes))  # one copy, not three concatenations
            return _sha256(_sha256(message).digest()).digest()  # sha256d, inlined
    signed_script = var_bytes(remove_codeseparators(script_code))
    if not anyone_can_pay and base_type != SIGHASH_NONE and base_type != SIGHASH_SINGLE:
        segments = _blanked_segments(tx)
        return sha256d(
            _EMPTY_SCRIPT.join(segments[: input_index + 1])
            + signed_script
            + _EMPTY_SCRIPT.join(segments[input_index + 1 :])
            + _HASH_TYPE.pack(hash_type & 0xFFFFFFFF)
        )
    pieces = _pieces(tx)
    blank_other_sequences = base_type in (SIGHASH_NONE, SIGHASH_SINGLE)

    parts: list[bytes] = [pieces.version]
    if anyone_can_pay:
        parts += [b"\x01", pieces.outpoints[input_index], signed_script,
                  pieces.sequences[input_index]]
    else:
        parts.append(pieces.input_count)
        for index, outpoint in enumerate(pieces.outpoints):
            parts.append(outpoint)
            if index == input_index:
                parts.append(signed_script)
                parts.append(pieces.sequences[index])
            else:
                parts.append(_EMPTY_SCRIPT)
                parts.append(_ZERO_SEQUENCE if blank_other_sequences else pieces.sequences[index])
    if base_type == SIGHASH_NONE:
        parts.append(b"\x00")
    elif base_type == SIGHASH_SINGLE:
        parts.append(compact_size(input_index + 1))
        parts.extend(_NULL_OUTPUT for _ in range(input_index))
        parts.append(tx.outputs[input_index].serialize())
    else:
        parts.append(pieces.outputs_all)
    parts.append(pieces.lock_time)
    parts.append(struct.pack("<I", hash_type & 0xFFFFFFFF))
    return sha256d(b"".join(parts))

"""Bounded reading and writing of Bitcoin's wire encodings.

Owns: ``ByteReader`` (reads that refuse truncated input and, at ``finish``,
trailing bytes), CompactSize integers and length-prefixed byte strings.

"""

from __future__ import annotations

import struct

from ledger.errors import DecodeError

# The largest length prefix we ever accept for one byte string; anything larger
# cannot fit in a block and is refused before allocating.
BYTES_LEN_MAX = 4_000_000


class ByteReader:
    """Cursor over immutable bytes; every read checks the bytes are there."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str = "data") -> None:
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def position(self) -> int:
        return self._pos

    @property
    def buffer(self) -> bytes:
        """The whole input, for parsers that read ahead from ``position`` and then
        consume what they used with ``read``."""
        return self._data

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def read(self, n: int) -> bytes:
        assert n >= 0
        end = self._pos + n
        if end > len(self._data):
            raise self._truncated(n)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def _truncated(self, n: int) -> DecodeError:
        return DecodeError(
            f"{self._what} truncated: needed {n} bytes at offset {self._pos}, "
            f"{len(self._data) - self._pos} left",
            code="truncated",
        )

    def skip(self, n: int) -> None:
        """``read(n)`` without building the bytes (a caller that already holds them)."""
        assert n >= 0
        end = self._pos + n
        if end > len(self._data):
            raise self._truncated(n)
        self._pos = end

    def read_u8(self) -> int:
        return self.read(1)[0]

    def read_u32(self) -> int:
        value: int = struct.unpack("<I", self.read(4))[0]
        return value

    def read_i32(self) -> int:
        value: int = struct.unpack("<i", self.read(4))[0]
        return value

    def read_u64(self) -> int:
        value: int = struct.unpack("<Q", self.read(8))[0]
        return value

    def read_i64(self) -> int:
        value: int = struct.unpack("<q", self.read(8))[0]
        return value

    def read_compact_size(self, limit: int = BYTES_LEN_MAX) -> int:
        first = self.read_u8()
        if first < 0xFD:
            value = first
        elif first == 0xFD:
            value = struct.unpack("<H", self.read(2))[0]
            if value < 0xFD:
                raise DecodeError(f"{self._what}: non-canonical CompactSize", code="non-canonical")
        elif first == 0xFE:
            value = struct.unpack("<I", self.read(4))[0]
            if value <= 0xFFFF:
                raise DecodeError(f"{self._what}: non-canonical CompactSize", code="non-canonical")
        else:
            value = struct.unpack("<Q", self.read(8))[0]
            if value <= 0xFFFFFFFF:
                raise DecodeError(f"{self._what}: non-canonical CompactSize", code="non-canonical")
        if value > limit:
            raise DecodeError(
                f"{self._what}: size {value} exceeds limit {limit}", code="oversized"
            )
        return int(value)

    def read_var_bytes(self, limit: int = BYTES_LEN_MAX) -> bytes:
        return self.read(self.read_compact_size(limit))

    def finish(self) -> None:
        """Refuse trailing bytes: a parse must consume its input exactly."""
        if self._pos != len(self._data):
            raise DecodeError(
                f"{self._what}: {len(self._data) - self._pos} trailing bytes after offset "
                f"{self._pos}",
                code="trailing-bytes",
            )


def compact_size(n: int) -> bytes:
    assert 0 <= n <= 0xFFFFFFFFFFFFFFFF
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


def var_bytes(data: bytes) -> bytes:
    return compact_size(len(data)) + data

"""ledger.hashing: RIPEMD-160 (both the hashlib path and the pure-Python fallback)
against the published test vectors, and the display order of hashes."""

from __future__ import annotations

import pytest

from ledger.hashing import (
    _ripemd160_python,
    display_hex,
    hash_from_display_hex,
    ripemd160,
    sha256d,
)

pytestmark = pytest.mark.unit

# From the RIPEMD-160 page of its authors (Dobbertin, Bosselaers, Preneel).
RIPEMD160_VECTORS = [
    (b"", "9c1185a5c5e9fc54612808977ee8f548b2258d31"),
    (b"a", "0bdc9d2d256b3ee9daae347be6f4dc835a467ffe"),
    (b"abc", "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc"),
    (b"message digest", "5d0689ef49d2fae572b881b123a85ffa21595f36"),
    (b"abcdefghijklmnopqrstuvwxyz", "f71c27109c692c1b56bbdceb5b9d2865b3708dbc"),
    (b"1234567890" * 8, "9b752e45573d4b39f4dbd3323cab82bf63326bfb"),
]


@pytest.mark.parametrize(("data", "expected"), RIPEMD160_VECTORS)
def test_ripemd160_vectors(data: bytes, expected: str) -> None:
    assert _ripemd160_python(data).hex() == expected
    assert ripemd160(data).hex() == expected


def test_display_hex_reverses_the_bytes() -> None:
    # The genesis block of Bitcoin: its header hashes to this, shown byte-reversed.
    header = bytes.fromhex(
        "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd"
        "7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c")
    assert display_hex(sha256d(header)) == (
        "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f")
    assert display_hex(b"\x01\x02") == "0201"
    assert hash_from_display_hex("0201") == b"\x01\x02"
    assert hash_from_display_hex(display_hex(sha256d(header))) == sha256d(header)

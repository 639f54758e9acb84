"""Base58 and Base58Check, as Bitcoin encodes addresses, WIF keys and OAP asset ids.

Owns: encode/decode of Base58 (Bitcoin alphabet) and the 4-byte SHA-256d checksum.
"""

from __future__ import annotations

from ledger.errors import EncodingError
from ledger.hashing import sha256d

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {char: value for value, char in enumerate(ALPHABET)}
BASE58_TEXT_MAX = 1_000  # longer text is refused before the quadratic decode


def b58encode(data: bytes) -> str:
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, remainder = divmod(number, 58)
        digits.append(ALPHABET[remainder])
    return "1" * leading_zeros + "".join(reversed(digits))


def b58decode(text: str) -> bytes:
    if len(text) > BASE58_TEXT_MAX:
        raise EncodingError(f"Base58 text of {len(text)} characters is too long",
                            code="base58-too-long")
    number = 0
    for position, char in enumerate(text):
        value = _INDEX.get(char)
        if value is None:
            raise EncodingError(f"invalid Base58 character {char!r} at position {position}",
                                code="base58-char")
        number = number * 58 + value
    leading_ones = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * leading_ones + body


def b58check_encode(payload: bytes) -> str:
    return b58encode(payload + sha256d(payload)[:4])


def b58check_decode(text: str) -> bytes:
    raw = b58decode(text)
    if len(raw) < 4:
        raise EncodingError("Base58Check text too short for a checksum", code="base58-short")
    payload, checksum = raw[:-4], raw[-4:]
    if sha256d(payload)[:4] != checksum:
        raise EncodingError("Base58Check checksum mismatch", code="base58-checksum")
    return payload

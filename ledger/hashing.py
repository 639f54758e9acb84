"""Hash functions of the Bitcoin protocol: SHA-256d, HASH160, RIPEMD-160.

Owns: the hash primitives. RIPEMD-160 comes from hashlib when the OpenSSL build
offers it and from a small pure-Python implementation otherwise (OpenSSL 3 drops it
from the default provider on some systems).

"""

from __future__ import annotations

import hashlib
import struct


def display_hex(hash_le: bytes) -> str:
    """A hash as people read it: Bitcoin shows hashes (txids, block hashes) with the
    bytes reversed, so ``hash_le`` (the order the protocol hashes and stores) prints
    back to front."""
    return hash_le[::-1].hex()


def hash_from_display_hex(text: str) -> bytes:
    """The inverse of ``display_hex``: the protocol-order bytes of a displayed hash.
    Raises ``ValueError`` for text that is not hex."""
    return bytes.fromhex(text)[::-1]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256d(data: bytes) -> bytes:
    """Double SHA-256, as Bitcoin hashes transactions and block headers."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


# RIPEMD-160 (Dobbertin, Bosselaers, Preneel 1996): message word order (r), rotation
# amounts (s) and constants (k) of the left and right lines.
_RIPEMD_R_LEFT = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    7, 4, 13, 1, 10, 6, 15, 3, 12, 0, 9, 5, 2, 14, 11, 8,
    3, 10, 14, 4, 9, 15, 8, 1, 2, 7, 0, 6, 13, 11, 5, 12,
    1, 9, 11, 10, 0, 8, 12, 4, 13, 3, 7, 15, 14, 5, 6, 2,
    4, 0, 5, 9, 7, 12, 2, 10, 14, 1, 3, 8, 11, 6, 15, 13,
)
_RIPEMD_R_RIGHT = (
    5, 14, 7, 0, 9, 2, 11, 4, 13, 6, 15, 8, 1, 10, 3, 12,
    6, 11, 3, 7, 0, 13, 5, 10, 14, 15, 8, 12, 4, 9, 1, 2,
    15, 5, 1, 3, 7, 14, 6, 9, 11, 8, 12, 2, 10, 0, 4, 13,
    8, 6, 4, 1, 3, 11, 15, 0, 5, 12, 2, 13, 9, 7, 10, 14,
    12, 15, 10, 4, 1, 5, 8, 7, 6, 2, 13, 14, 0, 3, 9, 11,
)
_RIPEMD_S_LEFT = (
    11, 14, 15, 12, 5, 8, 7, 9, 11, 13, 14, 15, 6, 7, 9, 8,
    7, 6, 8, 13, 11, 9, 7, 15, 7, 12, 15, 9, 11, 7, 13, 12,
    11, 13, 6, 7, 14, 9, 13, 15, 14, 8, 13, 6, 5, 12, 7, 5,
    11, 12, 14, 15, 14, 15, 9, 8, 9, 14, 5, 6, 8, 6, 5, 12,
    9, 15, 5, 11, 6, 8, 13, 12, 5, 12, 13, 14, 11, 8, 5, 6,
)
_RIPEMD_S_RIGHT = (
    8, 9, 9, 11, 13, 15, 15, 5, 7, 7, 8, 11, 14, 14, 12, 6,
    9, 13, 15, 7, 12, 8, 9, 11, 7, 7, 12, 7, 6, 15, 13, 11,
    9, 7, 15, 11, 8, 6, 6, 14, 12, 13, 5, 14, 13, 13, 7, 5,
    15, 5, 8, 11, 14, 14, 6, 14, 6, 9, 12, 9, 12, 5, 15, 8,
    8, 5, 12, 9, 12, 5, 14, 6, 8, 13, 6, 5, 15, 13, 11, 11,
)
_RIPEMD_K_LEFT = (0x00000000, 0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xA953FD4E)
_RIPEMD_K_RIGHT = (0x50A28BE6, 0x5C4DD124, 0x6D703EF3, 0x7A6D76E9, 0x00000000)


def _ripemd160_python(data: bytes) -> bytes:
    # Straightforward rendering of the RIPEMD-160 definition (Dobbertin, Bosselaers,
    # Preneel 1996): two parallel lines of five rounds of sixteen steps each.
    r_left, r_right = _RIPEMD_R_LEFT, _RIPEMD_R_RIGHT
    s_left, s_right = _RIPEMD_S_LEFT, _RIPEMD_S_RIGHT
    k_left, k_right = _RIPEMD_K_LEFT, _RIPEMD_K_RIGHT
    mask = 0xFFFFFFFF

    def rol(x: int, n: int) -> int:
        return ((x << n) | (x >> (32 - n))) & mask

    def f(j: int, x: int, y: int, z: int) -> int:
        if j < 16:
            return x ^ y ^ z
        if j < 32:
            return (x & y) | (~x & mask & z)
        if j < 48:
            return ((x | (~y & mask)) ^ z) & mask
        if j < 64:
            return (x & z) | (y & ~z & mask)
        return (x ^ (y | (~z & mask))) & mask

    h = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0]
    padded = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", 8 * len(data))
    for offset in range(0, len(padded), 64):
        x = struct.unpack("<16I", padded[offset : offset + 64])
        al, bl, cl, dl, el = h
        ar, br, cr, dr, er = h
        for j in range(80):
            rnd = j // 16
            t = rol((al + f(j, bl, cl, dl) + x[r_left[j]] + k_left[rnd]) & mask, s_left[j])
            t = (t + el) & mask
            al, el, dl, cl, bl = el, dl, rol(cl, 10), bl, t
            t = rol(
                (ar + f(79 - j, br, cr, dr) + x[r_right[j]] + k_right[rnd]) & mask, s_right[j]
            )
            t = (t + er) & mask
            ar, er, dr, cr, br = er, dr, rol(cr, 10), br, t
        t = (h[1] + cl + dr) & mask
        h[1] = (h[2] + dl + er) & mask
        h[2] = (h[3] + el + ar) & mask
        h[3] = (h[4] + al + br) & mask
        h[4] = (h[0] + bl + cr) & mask
        h[0] = t
    return struct.pack("<5I", *h)


def _has_hashlib_ripemd160() -> bool:
    try:
        hashlib.new("ripemd160", b"")
    except ValueError:
        return False
    return True


_HASHLIB_RIPEMD160 = _has_hashlib_ripemd160()


# Copying a ready hash object skips OpenSSL's by-name algorithm lookup that
# hashlib.new does on every call (a third of a HASH160 on the verification path).
_RIPEMD160_PROTOTYPE = hashlib.new("ripemd160") if _HASHLIB_RIPEMD160 else None


def ripemd160(data: bytes) -> bytes:
    if _RIPEMD160_PROTOTYPE is not None:
        h = _RIPEMD160_PROTOTYPE.copy()
        h.update(data)
        return h.digest()
    return _ripemd160_python(data)


def hash160(data: bytes) -> bytes:
    """RIPEMD-160 of SHA-256: public-key hashes, script hashes, OAP asset ids."""
    return ripemd160(hashlib.sha256(data).digest())

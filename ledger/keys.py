"""secp256k1 keys and ECDSA signatures; the only module that imports coincurve.

Owns: ``PrivateKey`` (WIF import/export, deterministic RFC 6979 signing with low-S
DER output), ``PublicKey`` (compressed and uncompressed SEC encodings) and the
verification primitive ``verify_der`` used by the script interpreter. Private key
material never appears in ``repr`` or ``str``.

"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import coincurve
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT as _CONTEXT

from ledger.base58 import b58check_decode, b58check_encode
from ledger.errors import EncodingError, KeyError_
from ledger.hashing import hash160

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
WIF_VERSION_MAINNET = 0x80
# Parsed public keys kept for reuse: member and wallet keys recur in every block, and
# parsing (a square root for compressed keys) is a tenth of a verification.
PUBLIC_KEY_CACHE_ENTRIES_MAX = 4096


MESSAGE_BYTES = 32  # ECDSA here signs 32-byte digests only
DER_SIGNATURE_BYTES_MAX = 72  # SEQUENCE of two INTEGERs of up to 33 bytes each


@lru_cache(maxsize=PUBLIC_KEY_CACHE_ENTRIES_MAX)
def _parsed_public_key(pubkey_sec: bytes) -> object:
    """libsecp256k1's parsed form of a SEC public key (``secp256k1_pubkey *``), or None
    when it does not parse; what ``coincurve.PublicKey(pubkey_sec).public_key`` holds.
    Keyed by the exact encoding: the parse is a pure function of these bytes."""
    parsed = _ffi.new("secp256k1_pubkey *")
    if not _lib.secp256k1_ec_pubkey_parse(_CONTEXT.ctx, parsed, pubkey_sec, len(pubkey_sec)):
        return None
    return parsed


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A secp256k1 public key in SEC encoding (33 bytes compressed, 65 uncompressed)."""

    sec: bytes

    @classmethod
    def parse(cls, data: bytes) -> PublicKey:
        if len(data) not in (33, 65):
            raise KeyError_(f"public key of {len(data)} bytes (need 33 or 65)", code="pubkey-size")
        try:
            coincurve.PublicKey(data)
        except ValueError as error:
            raise KeyError_(f"not a point on secp256k1: {error}", code="pubkey-invalid") from None
        return cls(bytes(data))

    @property
    def is_compressed(self) -> bool:
        return len(self.sec) == 33

    @property
    def hash160(self) -> bytes:
        return hash160(self.sec)

    def compressed(self) -> PublicKey:
        return PublicKey(coincurve.PublicKey(self.sec).format(compressed=True))

    def uncompressed(self) -> PublicKey:
        return PublicKey(coincurve.PublicKey(self.sec).format(compressed=False))

    def verify(self, signature_der: bytes, message32: bytes) -> bool:
        return verify_der(self.sec, signature_der, message32)

    def tweaked(self, tweak32: bytes) -> PublicKey:
        """``P + t*G`` (compressed): the public half of :meth:`PrivateKey.tweaked`."""
        _check_tweak(tweak32)
        return PublicKey(coincurve.PublicKey(self.sec).add(tweak32).format(compressed=True))


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A secp256k1 private key; ``compressed`` selects the public key encoding."""

    secret: bytes
    compressed: bool = True

    def __post_init__(self) -> None:
        if len(self.secret) != 32 or not 0 < int.from_bytes(self.secret, "big") < SECP256K1_ORDER:
            raise KeyError_("private key out of range for secp256k1", code="privkey-invalid")

    def __repr__(self) -> str:
        return f"PrivateKey(<hidden>, compressed={self.compressed})"

    __str__ = __repr__

    @classmethod
    def generate(cls, entropy32: bytes) -> PrivateKey:
        """A key from caller-supplied randomness (the core takes no randomness itself)."""
        return cls(entropy32)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(
            coincurve.PrivateKey(self.secret).public_key.format(compressed=self.compressed)
        )

    def tweaked(self, tweak32: bytes) -> PrivateKey:
        """``(d + t) mod n``, compressed: a key only the holder of ``d`` can derive, whose
        public key anyone can compute from ``P`` and ``t`` (pay-to-contract)."""
        _check_tweak(tweak32)
        return PrivateKey(bytes(coincurve.PrivateKey(self.secret).add(tweak32).secret))

    def sign(self, message32: bytes) -> bytes:
        """DER signature over a 32-byte digest; RFC 6979 nonce, low-S (BIP 62).

        The two calls coincurve's ``PrivateKey(secret).sign(message32, hasher=None)``
        makes, on its context, without building its key object: that derives the
        public key and its x-only form (two point multiplications, more than the
        signature itself) on every call (decision 0127; ``tests/unit/
        test_core_cost_fifth.py`` holds both to the same bytes)."""
        assert len(message32) == MESSAGE_BYTES
        context = _CONTEXT.ctx
        signature = _ffi.new("secp256k1_ecdsa_signature *")
        if not _lib.secp256k1_ecdsa_sign(context, signature, message32, self.secret,
                                         _ffi.NULL, _ffi.NULL):
            raise KeyError_("signing failed", code="privkey-invalid")
        der = _ffi.new("unsigned char[]", DER_SIGNATURE_BYTES_MAX)
        length = _ffi.new("size_t *", DER_SIGNATURE_BYTES_MAX)
        _lib.secp256k1_ecdsa_signature_serialize_der(context, der, length, signature)
        return bytes(_ffi.buffer(der, length[0]))

    def to_wif(self, version: int = WIF_VERSION_MAINNET) -> str:
        suffix = b"\x01" if self.compressed else b""
        return b58check_encode(bytes([version]) + self.secret + suffix)

    @classmethod
    def from_wif(cls, wif: str, version: int = WIF_VERSION_MAINNET) -> PrivateKey:
        payload = b58check_decode(wif)
        if not payload or payload[0] != version:
            raise EncodingError("WIF has the wrong version byte", code="wif-version")
        if len(payload) == 34 and payload[-1] == 0x01:
            return cls(payload[1:33], compressed=True)
        if len(payload) == 33:
            return cls(payload[1:33], compressed=False)
        raise EncodingError(f"WIF payload of {len(payload)} bytes", code="wif-size")


def _check_tweak(tweak32: bytes) -> None:
    if len(tweak32) != 32 or not 0 < int.from_bytes(tweak32, "big") < SECP256K1_ORDER:
        raise KeyError_("key tweak out of range for secp256k1", code="key-tweak-invalid")


def verify_der(pubkey_sec: bytes, signature_der: bytes, message32: bytes) -> bool:
    """Verify a DER ECDSA signature; False (never an exception) for any bad input.

    libsecp256k1 refuses high-S signatures; callers that must accept them (Bitcoin's
    historical consensus) normalise first with ``normalize_s``.

    The calls are coincurve's own ``PublicKey.verify(..., hasher=None)`` makes, on its
    context, without building its key object and signature wrapper per call (decision
    0116; ``tests/unit/test_core_cost_second.py`` holds both to the same verdicts).
    """
    try:
        if len(message32) != MESSAGE_BYTES:
            return False
        public_key = _parsed_public_key(bytes(pubkey_sec))
        if public_key is None:
            return False
        signature = _ffi.new("secp256k1_ecdsa_signature *")
        context = _CONTEXT.ctx
        if not _lib.secp256k1_ecdsa_signature_parse_der(context, signature, signature_der,
                                                        len(signature_der)):
            return False
        return bool(_lib.secp256k1_ecdsa_verify(context, signature, message32, public_key))
    except (ValueError, TypeError):
        return False


def normalize_s(signature_der: bytes) -> bytes:
    """The low-S form of a parseable DER signature (unchanged when already low-S)."""
    r, s = parse_der_integers(signature_der)
    if s > SECP256K1_ORDER // 2:
        s = SECP256K1_ORDER - s
    return encode_der(r, s)


def parse_der_integers(signature_der: bytes) -> tuple[int, int]:
    """(r, s) from a strictly-shaped DER SEQUENCE of two INTEGERs; raises KeyError_."""
    data = signature_der
    if len(data) < 8 or data[0] != 0x30 or data[1] != len(data) - 2:
        raise KeyError_("signature is not a DER sequence", code="sig-der")
    values = []
    pos = 2
    for _ in range(2):
        if pos + 2 > len(data) or data[pos] != 0x02:
            raise KeyError_("signature integer missing", code="sig-der")
        length = data[pos + 1]
        start, end = pos + 2, pos + 2 + length
        if length == 0 or end > len(data):
            raise KeyError_("signature integer truncated", code="sig-der")
        values.append(int.from_bytes(data[start:end], "big"))
        pos = end
    if pos != len(data):
        raise KeyError_("trailing bytes in DER signature", code="sig-der")
    return values[0], values[1]


def encode_der(r: int, s: int) -> bytes:
    def integer(value: int) -> bytes:
        body = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
        if body[0] & 0x80:
            body = b"\x00" + body
        return b"\x02" + bytes([len(body)]) + body

    content = integer(r) + integer(s)
    return b"\x30" + bytes([len(content)]) + content

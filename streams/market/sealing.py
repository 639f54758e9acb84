"""Sealing for one reader: secp256k1 ECDH + HKDF-SHA256 + AES-256-GCM (``cryptography``).

Owns: ``seal`` / ``unseal`` (a short secret, e.g. a negotiation key, encrypted to one
public key with a fresh ephemeral key), ``encrypt`` / ``decrypt`` (a negotiation
message under its 32-byte negotiation key) and ``fresh_key``. Randomness comes from
``os.urandom`` unless the caller passes bytes (tests).

Layout of a sealed blob: ephemeral public key (33 bytes, compressed SEC) | nonce (12)
| AES-GCM ciphertext with its 16-byte tag. The additional data binds a blob to its
place (negotiation id and reader role), so it cannot be replayed elsewhere.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ledger.errors import ValidationError
from ledger.keys import PrivateKey

KEY_BYTES = 32
NONCE_BYTES = 12
SEC_COMPRESSED_BYTES = 33
TAG_BYTES = 16
HKDF_INFO = b"capital-ledger/market/seal/v1"
SEALED_BYTES_MAX = 64 * 1024


class SealError(ValidationError):
    code = "seal-invalid"


def fresh_key() -> bytes:
    """A fresh 32-byte symmetric key (one per negotiation)."""
    return os.urandom(KEY_BYTES)


def _private(key: PrivateKey) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(key.secret, "big"), ec.SECP256K1())


def _public(sec: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), sec)
    except ValueError:
        raise SealError("not a secp256k1 public key", code="seal-bad-key") from None


def _derive(shared: bytes, ephemeral_sec: bytes, recipient_sec: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral_sec,
                info=HKDF_INFO + recipient_sec).derive(shared)


def _compressed(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.CompressedPoint)


def seal(recipient_sec: bytes, secret: bytes, aad: bytes, *,
         entropy: bytes | None = None) -> bytes:
    """``secret`` encrypted so that only the holder of ``recipient_sec``'s key reads it."""
    recipient = _public(recipient_sec)
    recipient_compressed = _compressed(recipient)
    seed = entropy if entropy is not None else os.urandom(KEY_BYTES + NONCE_BYTES)
    ephemeral = PrivateKey(seed[:KEY_BYTES])
    ephemeral_sec = ephemeral.public_key.sec
    shared = _private(ephemeral).exchange(ec.ECDH(), recipient)
    nonce = seed[KEY_BYTES:KEY_BYTES + NONCE_BYTES]
    key = _derive(shared, ephemeral_sec, recipient_compressed)
    return ephemeral_sec + nonce + AESGCM(key).encrypt(nonce, secret, aad)


def unseal(key: PrivateKey, blob: bytes, aad: bytes) -> bytes:
    """The secret of a blob sealed to ``key``; SealError when it is not (or was changed)."""
    if not SEC_COMPRESSED_BYTES + NONCE_BYTES + TAG_BYTES <= len(blob) <= SEALED_BYTES_MAX:
        raise SealError("sealed blob has an impossible length")
    ephemeral_sec = blob[:SEC_COMPRESSED_BYTES]
    nonce = blob[SEC_COMPRESSED_BYTES:SEC_COMPRESSED_BYTES + NONCE_BYTES]
    shared = _private(key).exchange(ec.ECDH(), _public(ephemeral_sec))
    derived = _derive(shared, ephemeral_sec, _compressed(_private(key).public_key()))
    try:
        return AESGCM(derived).decrypt(nonce, blob[SEC_COMPRESSED_BYTES + NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError("sealed blob does not open with this key") from None


def encrypt(key: bytes, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> bytes:
    """nonce (12) | AES-256-GCM ciphertext+tag of ``plaintext`` under the negotiation key."""
    assert len(key) == KEY_BYTES
    chosen = nonce if nonce is not None else os.urandom(NONCE_BYTES)
    return chosen + AESGCM(key).encrypt(chosen, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if not NONCE_BYTES + TAG_BYTES <= len(blob) <= SEALED_BYTES_MAX:
        raise SealError("ciphertext has an impossible length")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError("message does not decrypt under the negotiation key") from None

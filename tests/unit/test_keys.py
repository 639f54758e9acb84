"""secp256k1 keys and signatures (ledger.keys), checked against known values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import EncodingError, KeyError_
from ledger.hashing import hash160, sha256
from ledger.keys import (
    SECP256K1_ORDER,
    PrivateKey,
    PublicKey,
    encode_der,
    normalize_s,
    parse_der_integers,
    verify_der,
)

pytestmark = pytest.mark.unit

# Private key 1: public key is the secp256k1 generator G (SEC 2, section 2.4.1).
G_COMPRESSED = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
G_UNCOMPRESSED = ("0479be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
                  "483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8")
# Well-known: the address of private key 1 (compressed), used across Bitcoin docs.
KEY_ONE_HASH160 = "751e76e8199196d454941c45d1b3a323f1433bd6"


def test_generator_point_and_hash160() -> None:
    one = PrivateKey((1).to_bytes(32, "big"))
    assert one.public_key.sec.hex() == G_COMPRESSED
    assert PrivateKey((1).to_bytes(32, "big"), compressed=False).public_key.sec.hex() == (
        G_UNCOMPRESSED)
    assert one.public_key.hash160.hex() == KEY_ONE_HASH160
    assert hash160(bytes.fromhex(G_COMPRESSED)).hex() == KEY_ONE_HASH160
    assert one.public_key.uncompressed().compressed() == one.public_key


@pytest.mark.parametrize("secret", [0, SECP256K1_ORDER, SECP256K1_ORDER + 1])
def test_out_of_range_private_keys(secret: int) -> None:
    with pytest.raises(KeyError_):
        PrivateKey(secret.to_bytes(32, "big"))


def test_public_key_parse() -> None:
    assert PublicKey.parse(bytes.fromhex(G_COMPRESSED)).is_compressed
    with pytest.raises(KeyError_) as caught:
        PublicKey.parse(b"\x02" + bytes(31))
    assert caught.value.code == "pubkey-size"
    with pytest.raises(KeyError_) as caught:
        PublicKey.parse(b"\x02" + b"\xff" * 32)  # x >= p: not on the curve
    assert caught.value.code == "pubkey-invalid"


def test_private_key_is_hidden() -> None:
    key = PrivateKey(b"\x5a" * 32)
    assert "5a5a" not in repr(key) and "5a5a" not in str(key)


def test_wif_errors() -> None:
    key = PrivateKey(b"\x01" * 32)
    assert PrivateKey.from_wif(key.to_wif()) == key
    with pytest.raises(EncodingError) as caught:
        PrivateKey.from_wif(key.to_wif(version=0xEF))
    assert caught.value.code == "wif-version"


@settings(max_examples=50, deadline=None)
@given(secret=st.integers(1, SECP256K1_ORDER - 1), message=st.binary(min_size=1, max_size=64))
def test_sign_verify_low_s(secret: int, message: bytes) -> None:
    key = PrivateKey(secret.to_bytes(32, "big"))
    digest = sha256(message)
    sig = key.sign(digest)
    r, s = parse_der_integers(sig)
    assert 0 < s <= SECP256K1_ORDER // 2
    assert encode_der(r, s) == sig
    assert verify_der(key.public_key.sec, sig, digest)
    assert not verify_der(key.public_key.sec, sig, sha256(digest))
    high = encode_der(r, SECP256K1_ORDER - s)
    assert not verify_der(key.public_key.sec, high, digest)  # libsecp256k1 refuses high S
    assert normalize_s(high) == sig


def test_signing_is_deterministic() -> None:
    key = PrivateKey(b"\x02" * 32)
    assert key.sign(bytes(32)) == key.sign(bytes(32))
    assert key.sign(bytes(32)) != key.sign(b"\x01" * 32)


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x06\x02\x01\x01\x02\x01", b"\x00" * 70])
def test_verify_der_is_false_for_junk(junk: bytes) -> None:
    assert not verify_der(bytes.fromhex(G_COMPRESSED), junk, bytes(32))
    assert not verify_der(b"\x02" + bytes(32), junk, bytes(32))


def test_parse_der_integers_refuses_bad_shapes() -> None:
    sig = PrivateKey(b"\x03" * 32).sign(bytes(32))
    for bad in (sig[:-1], sig + b"\x00", b"\x31" + sig[1:], sig[:2] + b"\x03" + sig[3:]):
        with pytest.raises(KeyError_):
            parse_der_integers(bad)

"""Base58, Base58Check, addresses and WIF against Bitcoin Core's vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.address import (
    address_to_script,
    p2pkh_address,
    p2sh_address,
    script_to_address,
)
from ledger.base58 import b58check_decode, b58check_encode, b58decode, b58encode
from ledger.errors import EncodingError
from ledger.keys import PrivateKey
from ledger.script import multisig_script, op_return_script, p2pk_script

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent.parent / "data" / "bitcoin"
BASE58 = json.loads((DATA / "base58_encode_decode.json").read_text())
KEY_IO = json.loads((DATA / "key_io_valid.json").read_text())
MAINNET_ADDRESSES = [(text, script) for text, script, meta in KEY_IO
                     if meta["chain"] == "main" and not meta["isPrivkey"]
                     and ((script.startswith("76a914") and len(script) == 50)
                          or (script.startswith("a914") and len(script) == 46))]
MAINNET_WIFS = [(text, secret, meta["isCompressed"]) for text, secret, meta in KEY_IO
                if meta["chain"] == "main" and meta["isPrivkey"]]


def test_vector_selection_is_not_empty() -> None:
    assert len(BASE58) >= 15
    assert len(MAINNET_ADDRESSES) >= 4
    assert len(MAINNET_WIFS) >= 2


@pytest.mark.parametrize(("hex_data", "text"), BASE58)
def test_core_base58_vectors(hex_data: str, text: str) -> None:
    assert b58encode(bytes.fromhex(hex_data)) == text
    assert b58decode(text) == bytes.fromhex(hex_data)


@pytest.mark.parametrize(("address", "script_hex"), MAINNET_ADDRESSES)
def test_core_mainnet_legacy_addresses(address: str, script_hex: str) -> None:
    script = bytes.fromhex(script_hex)
    assert address_to_script(address) == script
    assert script_to_address(script) == address
    if script_hex.startswith("76a914"):
        assert p2pkh_address(script[3:23]) == address
    else:
        assert p2sh_address(script[2:22]) == address


@pytest.mark.parametrize(("wif", "secret_hex", "compressed"), MAINNET_WIFS)
def test_core_mainnet_wif(wif: str, secret_hex: str, compressed: bool) -> None:
    key = PrivateKey.from_wif(wif)
    assert key.secret.hex() == secret_hex
    assert key.compressed is compressed
    assert key.to_wif() == wif


@given(st.binary(max_size=64))
def test_base58check_round_trip(payload: bytes) -> None:
    assert b58check_decode(b58check_encode(payload)) == payload
    assert b58decode(b58encode(payload)) == payload


def test_bad_checksum_character_and_version() -> None:
    address = MAINNET_ADDRESSES[0][0]
    flipped = address[:-1] + ("2" if address[-1] != "2" else "3")
    with pytest.raises(EncodingError) as caught:
        address_to_script(flipped)
    assert caught.value.code == "base58-checksum"
    with pytest.raises(EncodingError) as caught:
        address_to_script(address[:5] + "0" + address[6:])  # '0' is not in the alphabet
    assert caught.value.code == "base58-char"
    testnet = b58check_encode(b"\x6f" + bytes(20))
    with pytest.raises(EncodingError) as caught:
        address_to_script(testnet)
    assert caught.value.code == "address-version"
    assert address_to_script(testnet, p2pkh_version=0x6F)[:3] == bytes.fromhex("76a914")
    with pytest.raises(EncodingError) as caught:
        address_to_script(b58check_encode(b"\x00" + bytes(19)))
    assert caught.value.code == "address-length"
    with pytest.raises(EncodingError):
        b58check_decode("1")


def test_scripts_without_address() -> None:
    key = PrivateKey(b"\x07" * 32).public_key.sec
    assert script_to_address(p2pk_script(key)) is None
    assert script_to_address(multisig_script(1, [key])) is None
    assert script_to_address(op_return_script(b"x")) is None
    assert script_to_address(b"") is None

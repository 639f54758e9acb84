"""Addresses as the seed platform's clients write them.

Owns: :func:`address_script` (a plain Base58Check address or an Open Assets asset
address, the OAP specification's form: Base58Check of the namespace byte 0x13, then the
address's version byte and hash; testnet ones start with ``bX``) and
:func:`asset_address` (the OAP form of a plain address). The PoC's client used testnet
version bytes (0x6f, 0xc4); they name the same hash and so the same script here.
"""

from __future__ import annotations

from ledger.base58 import b58check_decode, b58check_encode
from ledger.errors import ValidationError
from ledger.membership import ChainParams
from ledger.script import p2pkh_script, p2sh_script
from streams.api.problems import ApiProblem

OAP_NAMESPACE = 0x13
TESTNET_P2PKH_VERSION = 0x6F
TESTNET_P2SH_VERSION = 0xC4
ADDRESS_CHARS_MAX = 64
HASH160_BYTES = 20


def address_script(text: str, params: ChainParams, *, what: str = "address") -> bytes:
    """The output script an address pays; 400 ``address-invalid`` otherwise."""
    invalid = ApiProblem(400, "address-invalid",
                         f"{what} {text[:ADDRESS_CHARS_MAX]!r} is not a Base58Check or Open "
                         "Assets address of this chain")
    if not isinstance(text, str) or not 0 < len(text) <= ADDRESS_CHARS_MAX:
        raise invalid
    try:
        payload = b58check_decode(text)
    except (ValidationError, ValueError):
        raise invalid from None
    if len(payload) == HASH160_BYTES + 2 and payload[0] == OAP_NAMESPACE:
        payload = payload[1:]
    if len(payload) != HASH160_BYTES + 1:
        raise invalid
    version, body = payload[0], payload[1:]
    if version in (params.p2pkh_version, TESTNET_P2PKH_VERSION):
        return p2pkh_script(body)
    if version in (params.p2sh_version, TESTNET_P2SH_VERSION):
        return p2sh_script(body)
    raise invalid


def asset_address(address: str) -> str:
    """The Open Assets form of a plain Base58Check address."""
    return b58check_encode(bytes([OAP_NAMESPACE]) + b58check_decode(address))

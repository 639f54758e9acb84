"""Base58Check addresses for P2PKH and P2SH output scripts.

Owns: address <-> output script conversion. Version bytes default to Bitcoin
mainnet (0x00 for P2PKH, 0x05 for P2SH) and are parameters, so a network with its
own version bytes (see ``ledger.membership.ChainParams``) passes its own.

"""

from __future__ import annotations

from ledger.base58 import b58check_decode, b58check_encode
from ledger.errors import EncodingError
from ledger.script import ScriptTemplate, classify, p2pkh_script, p2sh_script

P2PKH_VERSION_MAINNET = 0x00
P2SH_VERSION_MAINNET = 0x05
ADDRESS_TEXT_MAX = 64  # a Base58Check address of one version byte and 20 bytes is <= 35


def p2pkh_address(pubkey_hash20: bytes, version: int = P2PKH_VERSION_MAINNET) -> str:
    assert len(pubkey_hash20) == 20 and 0 <= version <= 0xFF
    return b58check_encode(bytes([version]) + pubkey_hash20)


def p2sh_address(script_hash20: bytes, version: int = P2SH_VERSION_MAINNET) -> str:
    assert len(script_hash20) == 20 and 0 <= version <= 0xFF
    return b58check_encode(bytes([version]) + script_hash20)


def address_to_script(
    address: str,
    *,
    p2pkh_version: int = P2PKH_VERSION_MAINNET,
    p2sh_version: int = P2SH_VERSION_MAINNET,
) -> bytes:
    """The output script an address pays to; EncodingError for a bad checksum,
    wrong length or a version byte that is neither ``p2pkh_version`` nor ``p2sh_version``."""
    if len(address) > ADDRESS_TEXT_MAX:
        raise EncodingError(f"address of {len(address)} characters is too long",
                            code="address-length")
    payload = b58check_decode(address)
    if len(payload) != 21:
        raise EncodingError(f"address {address!r} carries {len(payload)} bytes (need 21)",
                            code="address-length")
    version, body = payload[0], payload[1:]
    if version == p2pkh_version:
        return p2pkh_script(body)
    if version == p2sh_version:
        return p2sh_script(body)
    raise EncodingError(f"address {address!r} has unknown version byte 0x{version:02x}",
                        code="address-version")


def script_to_address(
    script_pubkey: bytes,
    *,
    p2pkh_version: int = P2PKH_VERSION_MAINNET,
    p2sh_version: int = P2SH_VERSION_MAINNET,
) -> str | None:
    """The address of a P2PKH or P2SH output script; None for any other script."""
    template = classify(script_pubkey)
    if template is ScriptTemplate.P2PKH:
        return p2pkh_address(script_pubkey[3:23], p2pkh_version)
    if template is ScriptTemplate.P2SH:
        return p2sh_address(script_pubkey[2:22], p2sh_version)
    return None

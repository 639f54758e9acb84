"""The state hash pinned to values (issue 8: it was only ever compared with itself).

A change to what the state hash commits to (entry encoding, accumulator, tag, order of
fields) changes these constants: the nodes' heartbeats and the projector's audit compare
state hashes across versions, so such a change must be deliberate. Each field of an
unspent output entry changes the hash.
"""

from __future__ import annotations

import dataclasses

import pytest

from ledger.membership import INSTITUTION_IDS
from ledger.state import (
    LedgerRules,
    UtxoEntry,
    _entry_element,
    _state_hash,
    apply_block,
    entry_bytes,
    state_from_genesis,
)
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.tools.loadgen import Lanes, certified_blocks, lane_chains

pytestmark = pytest.mark.unit

P2PKH = bytes.fromhex("76a914") + b"\x22" * 20 + bytes.fromhex("88ac")
TIME_MS = 1_764_000_000_000


def test_state_hash_of_fixed_allocations_is_pinned() -> None:
    state = state_from_genesis(b"\x01" * 32, [(b"\x51", 1000), (P2PKH, 7)])
    assert state.state_hash.hex() == (
        "6ee8d8338735098f06fee2c70bdc79cbbcc3fee2bacfc2664cc6172608d7788b")


def test_state_hash_after_a_fixed_genesis_and_block_is_pinned() -> None:
    genesis, keys = build_genesis(chain_id="pinned", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("pinned"))
    lanes = Lanes("pinned", 3)
    genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
    state = state_from_genesis(genesis.hash_le, genesis.allocations)
    assert state.state_hash.hex() == (
        "b99857c976c6cf609a48bcb66a80741b762be0d0528dddeb5809259ee9e73d06")
    txs = [chain[0] for chain in lane_chains(lanes, genesis.hash_le, 1)]
    ((block, _),) = certified_blocks(genesis, keys, [txs], time_ms=TIME_MS)
    assert block.hash.hex() == (
        "fa15cc96f4b4a8f8f3edffe94e1aab1296d79db1f774205954cedb32804baf47")
    after = apply_block(state, block, LedgerRules.from_genesis(genesis), verify_scripts=True)
    assert after.state_hash.hex() == (
        "3a9c939d2768f166012c8489ab7c93fc5d2499d6383e25ded29165a31e7ad77b")


BASE = UtxoEntry(1000, P2PKH, None, 0, 1)
KEY = b"\x33" * 32 + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(("name", "variant"), [
    ("value", BASE._replace(value=1001)),
    ("script_pubkey", BASE._replace(script_pubkey=P2PKH[:-1] + b"\xad")),
    ("asset_id", BASE._replace(asset_id="AJk2Gx5V67S2wNuwTK5hef3TpHunfbjcmX", quantity=1)),
    ("quantity", BASE._replace(quantity=2)),
    ("height", BASE._replace(height=2)),
])
def test_each_field_of_an_entry_changes_the_state_hash(name: str, variant: UtxoEntry) -> None:
    assert entry_bytes(KEY, variant) != entry_bytes(KEY, BASE), name
    base = _state_hash(1, b"\x44" * 32, _entry_element(KEY, BASE), 1)
    changed = _state_hash(1, b"\x44" * 32, _entry_element(KEY, variant), 1)
    assert changed != base, name


def test_the_outpoint_key_changes_the_state_hash() -> None:
    other = b"\x33" * 32 + b"\x01\x00\x00\x00"
    assert _entry_element(other, BASE) != _entry_element(KEY, BASE)

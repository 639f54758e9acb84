"""Inclusion proofs (ledger/proof.py): a proof verifies offline; any changed value fails.

The chain is certified with a test genesis's keys (``certified_blocks``); every leaf of
the proof document is mutated in turn and each mutation must be refused.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.block import merkle_root
from ledger.hashing import display_hex, sha256d
from ledger.membership import INSTITUTION_IDS, Genesis
from ledger.proof import (
    ProofError,
    build_proof,
    merkle_branch,
    merkle_root_from_branch,
    verify_proof,
)
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.tools.loadgen import Lanes, certified_blocks, interleave, lane_chains

pytestmark = pytest.mark.unit

TIME_MS = 1_764_000_000_000


@pytest.fixture(scope="module")
def chain() -> tuple[Genesis, list[Any]]:
    lanes = Lanes("proof-test", 3)
    genesis, keys = build_genesis(chain_id="proof-test", time_ms=TIME_MS,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("proof-test"))
    genesis = dataclasses.replace(genesis, allocations=lanes.allocations())
    txs = list(interleave(lane_chains(lanes, genesis.hash_le, 3)))  # 9 txs
    return genesis, certified_blocks(genesis, keys, [txs[:7], txs[7:]], time_ms=TIME_MS)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8, 9, 16, 17])
def test_branch_folds_to_the_root_for_every_leaf(count: int) -> None:
    leaves = [sha256d(bytes([i])) for i in range(count)]
    root = merkle_root(leaves)
    for index in range(count):
        branch = merkle_branch(leaves, index)
        assert merkle_root_from_branch(leaves[index], index, branch) == root


def test_proof_verifies_for_every_tx(chain: tuple[Genesis, list[Any]]) -> None:
    genesis, blocks = chain
    for block, qc in blocks:
        for tx in block.txs:
            proof = build_proof(genesis, block, qc, tx.txid)
            # a JSON round trip, as a file would carry it
            result = verify_proof(json.loads(json.dumps(proof)),
                                  trusted_genesis_hash=display_hex(genesis.hash_le))
            assert (result.txid, result.height, result.block_hash) == (
                tx.txid, block.height, block.hash_hex)
            assert result.voters == qc.voters and result.quorum == 3


def _leaves(document: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _leaves(value, (*path, index))
    else:
        yield path


def _mutations(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    assert isinstance(value, str)
    changed = []
    hexdigits = "0123456789abcdef"
    is_hex = value != "" and all(c in hexdigits for c in value)
    # hex: change the first, a middle and the last digit; text: change one character
    for position in sorted({0, len(value) // 2, max(len(value) - 1, 0)}):
        if not value:
            changed.append("x")
            break
        old = value[position]
        new = hexdigits[(hexdigits.index(old) + 1) % 16] if is_hex else chr(ord(old) ^ 1)
        changed.append(value[:position] + new + value[position + 1:])
    return changed


def _set(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    mutated = copy.deepcopy(document)
    target = mutated
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return mutated


def test_any_changed_value_fails(chain: tuple[Genesis, list[Any]]) -> None:
    genesis, blocks = chain
    block, qc = blocks[0]
    tried = 0
    # tx 6 is the last of 7 leaves: position 7 would name its padding copy
    for position in (5, 6):
        proof = build_proof(genesis, block, qc, block.txs[position].txid)
        verify_proof(proof)
        tried += _mutate_all(proof)
    assert tried > 120


def _mutate_all(proof: dict[str, Any]) -> int:
    tried = 0
    for path in _leaves(proof):
        original = proof
        for step in path:
            original = original[step]
        for mutated_value in _mutations(original):
            mutated = _set(proof, path, mutated_value)
            with pytest.raises(ProofError):
                verify_proof(mutated)
            tried += 1
    return tried


def test_removed_fields_and_foreign_chain_fail(chain: tuple[Genesis, list[Any]]) -> None:
    genesis, blocks = chain
    block, qc = blocks[1]
    proof = build_proof(genesis, block, qc, block.txs[0].txid)
    for name in ("tx_hex", "merkle_branch", "header_hex", "certificate_hex", "genesis",
                 "proposer_signature_hex", "position", "txid", "format"):
        broken = {k: v for k, v in proof.items() if k != name}
        with pytest.raises(ProofError):
            verify_proof(broken)
    with pytest.raises(ProofError) as caught:
        verify_proof(proof, trusted_genesis_hash="00" * 32)
    assert caught.value.code == "proof-chain-id"
    for hostile in (None, [], "proof", {"format": 1}, {**proof, "merkle_branch": ["zz"]},
                    {**proof, "position": -1}, {**proof, "merkle_branch": ["00"] * 40}):
        with pytest.raises(ProofError):
            verify_proof(hostile)
    # a certificate with one vote fewer than the quorum
    short = dict(proof)
    from ledger.block import QuorumCertificate
    short["certificate_hex"] = QuorumCertificate(qc.height, qc.round, qc.block_hash,
                                                 qc.votes[:2]).serialize().hex()
    short.pop("voters")
    with pytest.raises(ProofError) as caught:
        verify_proof(short)
    assert caught.value.code == "proof-certificate"


def _standalone() -> Any:
    """docs/examples/verify_proof.py, the verifier written from docs/audit.md alone."""
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "verify_proof.py"
    spec = importlib.util.spec_from_file_location("verify_proof_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_standalone_verifier_agrees(chain: tuple[Genesis, list[Any]],
                                                   tmp_path: Path) -> None:
    genesis, blocks = chain
    standalone = _standalone()
    trusted = display_hex(genesis.hash_le)
    block, qc = blocks[0]
    proof = json.loads(json.dumps(build_proof(genesis, block, qc, block.txs[6].txid)))
    assert standalone.verify(proof, trusted)[:3] == (block.txs[6].txid, block.hash_hex, 1)
    refused = 0
    for path in _leaves(proof):
        original = proof
        for step in path:
            original = original[step]
        mutated = _set(proof, path, _mutations(original)[0])
        with pytest.raises((ValueError, KeyError, TypeError, IndexError, struct.error)):
            standalone.verify(mutated, trusted)
        refused += 1
    assert refused > 30
    # and as a program: exit 0 valid, 1 invalid
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(proof))
    bad.write_text(json.dumps({**proof, "position": proof["position"] + 1}))
    script = str(Path(standalone.__file__))
    assert subprocess.run([sys.executable, script, str(good), trusted],
                          capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([sys.executable, script, str(bad)],
                          capture_output=True, timeout=60).returncode == 1


def test_hostile_types_anywhere_raise_only_proof_errors(chain: tuple[Genesis, list[Any]]
                                                        ) -> None:
    """Any leaf replaced by any JSON type: refused with ProofError, never another error."""
    genesis, blocks = chain
    block, qc = blocks[0]
    proof = build_proof(genesis, block, qc, block.txs[0].txid)
    hostile: list[Any] = [None, [], {}, 0, -1, 2**70, "", "zz", True, 1.5, [1], {"a": 1}]
    for path in _leaves(proof):
        original = proof
        for step in path:
            original = original[step]
        for value in hostile:
            if type(value) is type(original) and value == original:
                continue
            mutated = _set(proof, path, value)
            try:
                verify_proof(mutated)
            except ProofError:
                continue
            raise AssertionError(f"{path} = {value!r} was accepted")
    for name in ("genesis", "merkle_branch"):
        for value in hostile:
            with pytest.raises(ProofError):
                verify_proof({**proof, name: value})

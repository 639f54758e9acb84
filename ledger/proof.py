"""Inclusion proofs: that a transaction is in a block a quorum of members certified.

Owns: ``merkle_branch`` (the sibling hashes from a leaf to the root), ``merkle_root_from_branch``,
``build_proof`` (the self-contained JSON document: the transaction, its branch, the block
header and the proposer's signature, the quorum certificate, the genesis record with the
membership and keys in force) and ``verify_proof``, which checks such a document with
nothing but this module's arguments — no Kafka, no database, no clock. The document is
hostile input: every field is type- and size-checked and every failure is a
``ProofError`` with a stable code. The format is specified in docs/audit.md so that a
third party can check a proof with its own short script.

What a valid proof shows: the transaction hashes into the Merkle root of a block header
signed by the eligible proposer and acked by a quorum of the members in force at its
height (genesis, amended by the governance changes the proof carries, each signed by a
majority of the membership it amends; the chain identified by the genesis hash). Which
certified block a height *committed* is decided by the votes log (decision 0020);
``capledger audit replay`` checks that. A proof cannot show that no later change it
omits applied at its height: a verifier that must rule that out compares the number of
the last change carried with the chain's (``capledger status``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.block import (
    HASH_BYTES,
    SIGNATURE_BYTES_MAX,
    Block,
    BlockHeader,
    QuorumCertificate,
    check_certified_block,
    proposer_for,
)
from ledger.errors import ValidationError
from ledger.governance import (
    PAYLOAD_BYTES_MAX,
    SignedChange,
    apply_signed_change,
    schedule_from_genesis,
)
from ledger.hashing import display_hex, sha256d
from ledger.membership import Genesis
from ledger.tx import Transaction

PROOF_FORMAT = "capital-ledger/inclusion-proof/v1"
MERKLE_DEPTH_MAX = 32  # 2**32 transactions per block: far above any block limit
TX_BYTES_MAX = 1_000_000
HEADER_BYTES_MAX = 1_024
CERTIFICATE_BYTES_MAX = 256 * 256  # QC_VOTES_MAX votes of at most 256 bytes
GOVERNANCE_CHANGES_MAX = 10_000  # governance changes a proof may carry


class ProofError(ValidationError):
    """An inclusion proof that does not hold; ``code`` names the failed check."""

    code = "proof"


@dataclass(frozen=True, slots=True)
class ProofResult:
    txid: str
    block_hash: str
    height: int
    voters: tuple[str, ...]
    quorum: int
    genesis_hash: str


def merkle_branch(hashes_le: Sequence[bytes], index: int) -> list[bytes]:
    """The siblings of leaf ``index`` on its way to the root, bottom-up, computed the way
    ``ledger.block.merkle_root`` builds the tree (an odd level repeats its last hash)."""
    assert 0 <= index < len(hashes_le)
    branch: list[bytes] = []
    level = list(hashes_le)
    position = index
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        branch.append(level[position ^ 1])
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
        position //= 2
    return branch


def merkle_root_from_branch(leaf_le: bytes, index: int, branch: Sequence[bytes]) -> bytes:
    """Fold a branch: at each level the running hash is the right child when the
    position is odd, the left one when even. Unique: a position past the last leaf
    (a padding copy) is refused."""
    running = leaf_le
    position = index
    for sibling in branch:
        if position & 1 and sibling == running:
            # A right child equal to its left one is the copy Bitcoin's tree makes of the
            # last node of an odd level, never a real node (a block has no duplicate
            # txids): the position names a padding copy, not the transaction.
            raise ProofError(f"position {index} names the padding copy of another leaf",
                             code="proof-merkle")
        pair = sibling + running if position & 1 else running + sibling
        running = sha256d(pair)
        position >>= 1
    if position != 0:
        raise ProofError(f"position {index} is beyond a tree of depth {len(branch)}",
                         code="proof-merkle")
    return running


def build_proof(genesis: Genesis, block: Block, qc: QuorumCertificate, txid: str,
                governance: Sequence[tuple[SignedChange, int]] = ()) -> dict[str, Any]:
    """The proof document for ``txid`` (display hex) in a certified ``block``.

    ``governance``: every governance change committed below the block's height, with the
    height that carried it, in sequence order: the verifier rebuilds from genesis the
    membership in force at the block (decision 0061). Omitted when empty, so a proof of
    a chain without governance is byte for byte what it was."""
    hashes = [tx.hash_le for tx in block.txs]
    position = next((i for i, tx in enumerate(block.txs) if tx.txid == txid), None)
    if position is None:
        raise ProofError(f"tx {txid} is not in block {block.hash_hex}", code="proof-tx")
    header = block.header
    return {
        "format": PROOF_FORMAT,
        "txid": txid,
        "tx_hex": block.txs[position].serialize().hex(),
        "position": position,
        "merkle_branch": [sibling.hex() for sibling in merkle_branch(hashes, position)],
        "header_hex": header.serialize().hex(),
        "proposer_signature_hex": block.proposer_signature.hex(),
        "certificate_hex": qc.serialize().hex(),
        "genesis": genesis.to_dict(),
        # informative copies: the verifier recomputes each of these
        "block_hash": header.hash_hex,
        "height": header.height,
        "genesis_hash": display_hex(genesis.hash_le),
        "voters": list(qc.voters),
        **({"governance": [{"change_hex": signed.serialize().hex(), "carried_height": height}
                           for signed, height in governance]} if governance else {}),
    }


def _membership(document: Mapping[str, Any], genesis: Genesis, height: int) -> Genesis:
    """The membership in force at ``height``: genesis amended by the governance changes
    the proof carries, each checked as the nodes checked it (a majority of the
    membership it amends signed it, in sequence order, carried below ``height``)."""
    raw = document.get("governance", [])
    if not isinstance(raw, list) or len(raw) > GOVERNANCE_CHANGES_MAX:
        raise ProofError("field 'governance' is not a list of changes", code="proof-format")
    schedule = schedule_from_genesis(genesis)
    for item in raw:
        if not isinstance(item, dict):
            raise ProofError("a governance entry is not an object", code="proof-format")
        carried = _field(item, "carried_height", int)
        if not 0 < carried < height:
            raise ProofError(f"a governance change carried at height {carried}, not below "
                             f"{height}", code="proof-governance")
        try:
            signed = SignedChange.parse(_hex(item.get("change_hex"), "change_hex",
                                             PAYLOAD_BYTES_MAX))
            schedule = apply_signed_change(schedule, signed, height=carried)
        except ProofError:
            raise
        except ValidationError as error:
            raise ProofError(f"governance change: {error.message} [{error.code}]",
                             code="proof-governance") from None
    return schedule.at(height)


def _field(document: Mapping[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProofError(f"field {name!r} missing or not a {kind.__name__}",
                         code="proof-format")
    return value


def _hex(text: Any, name: str, bytes_max: int) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * bytes_max:
        raise ProofError(f"field {name!r} is not hex of at most {bytes_max} bytes",
                         code="proof-format")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProofError(f"field {name!r} is not hex", code="proof-format") from None


def _genesis(document: Mapping[str, Any], trusted_genesis_hash: str | None) -> Genesis:
    data = _field(document, "genesis", dict)
    try:
        genesis = Genesis.from_dict(data)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    except (ValidationError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProofError(f"genesis record unusable: {error}", code="proof-genesis") from None
    if canonical != genesis.canonical_bytes():
        # The parser is lenient (e.g. a missing flag reads as false); the record that is
        # hashed must be the one carried, byte for byte once canonically serialized.
        raise ProofError("genesis record is not in its canonical form",
                         code="proof-genesis")
    shown = display_hex(genesis.hash_le)
    if trusted_genesis_hash is not None and shown != trusted_genesis_hash.lower():
        raise ProofError(f"the proof's genesis hashes to {shown}, not the trusted "
                         f"{trusted_genesis_hash}", code="proof-chain-id")
    return genesis


def _parsed(document: Mapping[str, Any]) -> tuple[Transaction, BlockHeader, QuorumCertificate,
                                                  bytes]:
    try:
        tx = Transaction.parse(_hex(document.get("tx_hex"), "tx_hex", TX_BYTES_MAX))
        header = BlockHeader.parse(_hex(document.get("header_hex"), "header_hex",
                                        HEADER_BYTES_MAX))
        qc = QuorumCertificate.parse(_hex(document.get("certificate_hex"), "certificate_hex",
                                          CERTIFICATE_BYTES_MAX))
    except ProofError:
        raise
    except ValidationError as error:
        raise ProofError(f"undecodable: {error.message}", code="proof-decode") from None
    signature = _hex(document.get("proposer_signature_hex"), "proposer_signature_hex",
                     SIGNATURE_BYTES_MAX)
    return tx, header, qc, signature


def verify_proof(document: Any, *, trusted_genesis_hash: str | None = None) -> ProofResult:
    """Check a proof document (parsed JSON); raise ``ProofError`` naming the failed check.

    Every field the verifier relies on is recomputed: the txid from the transaction
    bytes, the Merkle root from the branch, the block hash from the header bytes, the
    chain id from the genesis record; informative copies in the document must agree.
    """
    if not isinstance(document, dict) or document.get("format") != PROOF_FORMAT:
        raise ProofError(f"not a {PROOF_FORMAT} document", code="proof-format")
    chain = _genesis(document, trusted_genesis_hash)
    tx, header, qc, signature = _parsed(document)
    genesis = _membership(document, chain, header.height)
    txid = _field(document, "txid", str)
    if tx.txid != txid:
        raise ProofError(f"the transaction hashes to {tx.txid}, not {txid}", code="proof-txid")
    position = _field(document, "position", int)
    raw_branch = _field(document, "merkle_branch", list)
    if not 0 <= position < 2**MERKLE_DEPTH_MAX or len(raw_branch) > MERKLE_DEPTH_MAX:
        raise ProofError("position or branch out of bounds", code="proof-merkle")
    branch = [_hex(item, "merkle_branch", HASH_BYTES) for item in raw_branch]
    if any(len(item) != HASH_BYTES for item in branch):
        raise ProofError("a branch hash is not 32 bytes", code="proof-merkle")
    if merkle_root_from_branch(tx.hash_le, position, branch) != header.merkle_root:
        raise ProofError("the Merkle branch does not lead to the header's Merkle root",
                         code="proof-merkle")
    if header.proposer != proposer_for(genesis, header.height, header.round):
        raise ProofError(f"{header.proposer} is not the proposer of height {header.height} "
                         f"round {header.round}", code="proof-proposer")
    member = genesis.member(header.proposer)
    if member is None or not member.public_key.verify(signature, header.hash):
        raise ProofError("the proposer's signature over the header does not verify",
                         code="proof-proposer")
    # The certificate checked against the header alone (a block without its other
    # transactions has the same hash: the hash covers the header only).
    try:
        check_certified_block(Block(header, (), signature), qc, genesis,
                              genesis_hash=chain.hash_le)
    except ValidationError as error:
        raise ProofError(f"quorum certificate: {error.message} [{error.code}]",
                         code="proof-certificate") from None
    result = ProofResult(txid, header.hash_hex, header.height, qc.voters,
                         genesis.params.quorum, display_hex(chain.hash_le))
    _check_informative(document, result)
    return result


def _check_informative(document: Mapping[str, Any], result: ProofResult) -> None:
    """The human-readable copies must not say something the bytes do not."""
    for name, value in (("block_hash", result.block_hash), ("height", result.height),
                        ("genesis_hash", result.genesis_hash),
                        ("voters", list(result.voters))):
        # compared as JSON so that true is not 1 and 1.0 is not 1
        if name in document and json.dumps(document[name]) != json.dumps(value):
            raise ProofError(f"field {name!r} says {document[name]!r}, the proof {value!r}",
                             code="proof-inconsistent")

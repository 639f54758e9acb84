"""Pre-signed transaction workloads for the demo, the tests and the benchmark.

Owns: deterministic lanes of P2PKH payments (and ``certified_blocks``: such payments cut
into blocks certified by test keys, without nodes). A lane is one key with one genesis
allocation; its transactions form a chain (each spends the previous one's change), so
any number of lanes submitted concurrently never conflict, and each transaction is
the typical 1-input / 2-output P2PKH payment. Keys come from a seed (they are test
keys, never real ones).

"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ledger.assets import AssetDefinition
from ledger.block import (
    VOTE_ACK,
    Block,
    QuorumCertificate,
    make_block,
    proposer_for,
    sign_vote,
)
from ledger.hashing import hash160
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.oap import build_marker
from ledger.script import (
    multisig_script,
    p2pkh_script,
    p2pkh_script_sig,
    p2sh_multisig_script_sig,
    p2sh_script,
)
from ledger.sighash import SIGHASH_ALL, legacy_sighash
from ledger.state import genesis_allocation_tx
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

LANE_VALUE = 10_000_000
PAYMENT_VALUE = 1


def lane_key(seed: str, lane: int) -> PrivateKey:
    for attempt in range(100):
        secret = hashlib.sha256(f"capledger-loadgen/{seed}/{lane}/{attempt}".encode()).digest()
        try:
            return PrivateKey(secret)
        except Exception:  # out of range: astronomically rare, draw again
            continue
    raise AssertionError("no valid key")


def sink_script(seed: str) -> bytes:
    return p2pkh_script(lane_key(seed, -1).public_key.hash160)


# Load mixes: which lanes pay from a P2SH 2-of-3 multisig output instead of P2PKH, or
# (``oap``) every lane moves units of an Open Assets asset (decision 0112).
MIXES = ("p2pkh", "multisig", "mixed", "oap")
OAP_ISSUER = "securities-a"  # a member that may issue (genesis PROFILES)
OAP_UNITS_PER_LANE = 1_000_000_000
OAP_DEFINITION = AssetDefinition("BENCH-OAP-1", "Load generator asset", "other",
                                 issuer=OAP_ISSUER, unit="UNIT")
MULTISIG_KEY_LANE_OFFSET = 1_000_000  # lane_key indexes of a lane's 2nd and 3rd keys


def lane_redeem_script(seed: str, lane: int) -> bytes:
    """A multisig lane's redeem script: 2 of 3 keys (its own key first)."""
    keys = [lane_key(seed, lane + n * MULTISIG_KEY_LANE_OFFSET) for n in range(3)]
    return multisig_script(2, [key.public_key.sec for key in keys])


@dataclass(frozen=True, slots=True)
class Lanes:
    """``count`` lanes; ``mix`` says which are multisig: none (``p2pkh``), all
    (``multisig``) or every other one (``mixed``, odd lanes). ``oap`` lanes hold no
    genesis allocation: an issuance by ``OAP_ISSUER`` funds them (``oap_workload``)."""

    seed: str
    count: int
    mix: str = "p2pkh"

    def __post_init__(self) -> None:
        assert self.mix in MIXES, self.mix

    def keys(self) -> list[PrivateKey]:
        return [lane_key(self.seed, lane) for lane in range(self.count)]

    def is_multisig(self, lane: int) -> bool:
        return self.mix == "multisig" or (self.mix == "mixed" and lane % 2 == 1)

    def lane_script(self, lane: int, key: PrivateKey) -> bytes:
        if self.is_multisig(lane):
            return p2sh_script(hash160(lane_redeem_script(self.seed, lane)))
        return p2pkh_script(key.public_key.hash160)

    def allocations(self) -> tuple[tuple[bytes, int], ...]:
        """Genesis allocations: one output of LANE_VALUE per lane, in lane order (none
        for ``oap``: the issuer's allocation, ``oap_issuer_value``, funds the lanes)."""
        if self.mix == "oap":
            return ()
        return tuple(
            (self.lane_script(lane, key), LANE_VALUE) for lane, key in enumerate(self.keys())
        )


def sign_p2pkh_payment(
    key: PrivateKey, prevout: OutPoint, value: int, pay_script: bytes, amount: int
) -> Transaction:
    """Spend one P2PKH output of ``key``: pay ``amount`` to ``pay_script``, change back."""
    own = p2pkh_script(key.public_key.hash160)
    unsigned = Transaction(
        1,
        (TxIn(prevout),),
        (TxOut(value - amount, own), TxOut(amount, pay_script)),
        0,
    )
    digest = legacy_sighash(unsigned, 0, own, SIGHASH_ALL)
    script_sig = p2pkh_script_sig(key.sign(digest) + bytes([SIGHASH_ALL]), key.public_key.sec)
    return unsigned.with_script_sig(0, script_sig)


def sign_multisig_payment(
    keys: Sequence[PrivateKey], redeem_script: bytes, prevout: OutPoint, value: int,
    pay_script: bytes, amount: int,
) -> Transaction:
    """Spend one P2SH multisig output, signed by ``keys`` (in the redeem script's key
    order): pay ``amount`` to ``pay_script``, change back to the same P2SH script."""
    own = p2sh_script(hash160(redeem_script))
    unsigned = Transaction(1, (TxIn(prevout),), (TxOut(value - amount, own),
                                                  TxOut(amount, pay_script)), 0)
    digest = legacy_sighash(unsigned, 0, redeem_script, SIGHASH_ALL)
    sigs = [key.sign(digest) + bytes([SIGHASH_ALL]) for key in keys]
    return unsigned.with_script_sig(0, p2sh_multisig_script_sig(sigs, redeem_script))


def _payer(lanes: Lanes, lane: int, key: PrivateKey
           ) -> Callable[[OutPoint, int, bytes, int], Transaction]:
    if not lanes.is_multisig(lane):
        return functools.partial(sign_p2pkh_payment, key)
    redeem = lane_redeem_script(lanes.seed, lane)
    signers = (key, lane_key(lanes.seed, lane + MULTISIG_KEY_LANE_OFFSET))  # keys 1 and 2
    return functools.partial(sign_multisig_payment, signers, redeem)


def lane_chains(
    lanes: Lanes, genesis_hash: bytes, per_lane: int
) -> list[list[Transaction]]:
    """``per_lane`` chained payments for every lane, starting at the genesis outputs."""
    allocation_tx = genesis_allocation_tx(genesis_hash, lanes.allocations())
    sink = sink_script(lanes.seed)
    chains: list[list[Transaction]] = []
    for lane, key in enumerate(lanes.keys()):
        prevout, value = OutPoint(allocation_tx.hash_le, lane), LANE_VALUE
        pay = _payer(lanes, lane, key)
        chain = []
        for _ in range(per_lane):
            tx = pay(prevout, value, sink, PAYMENT_VALUE)
            chain.append(tx)
            prevout, value = OutPoint(tx.hash_le, 0), value - PAYMENT_VALUE
        chains.append(chain)
    return chains


# ---------------------------------------------------------------- Open Assets lanes


def oap_issuer_value(lanes: Lanes) -> int:
    """Native value the issuer's genesis allocation needs to fund every lane."""
    return lanes.count * LANE_VALUE


def oap_issuance(lanes: Lanes, issuer_key: PrivateKey, prevout: OutPoint,
                 value: int) -> Transaction:
    """One issuance by ``issuer_key`` (spending its P2PKH output ``prevout``): each
    lane's key gets an output of LANE_VALUE carrying OAP_UNITS_PER_LANE units of the
    issuer's asset; the marker (after the issuance outputs) names the definition."""
    own = p2pkh_script(issuer_key.public_key.hash160)
    lane_keys = lanes.keys()
    outputs = [TxOut(LANE_VALUE, p2pkh_script(key.public_key.hash160)) for key in lane_keys]
    outputs.append(TxOut(0, build_marker([OAP_UNITS_PER_LANE] * lanes.count,
                                         OAP_DEFINITION.reference())))
    if value > lanes.count * LANE_VALUE:
        outputs.append(TxOut(value - lanes.count * LANE_VALUE, own))
    unsigned = Transaction(1, (TxIn(prevout),), tuple(outputs), 0)
    digest = legacy_sighash(unsigned, 0, own, SIGHASH_ALL)
    script_sig = p2pkh_script_sig(issuer_key.sign(digest) + bytes([SIGHASH_ALL]),
                                  issuer_key.public_key.sec)
    return unsigned.with_script_sig(0, script_sig)


def sign_oap_transfer(key: PrivateKey, prevout: OutPoint, value: int, units: int,
                      pay_script: bytes, amount: int) -> Transaction:
    """Move ``amount`` units (and ``PAYMENT_VALUE``) of a P2PKH asset output holding
    ``units`` to ``pay_script``: marker first (a pure transfer), then the asset change
    back to ``key`` (output 1), then the payment (output 2)."""
    own = p2pkh_script(key.public_key.hash160)
    unsigned = Transaction(1, (TxIn(prevout),), (
        TxOut(0, build_marker([units - amount, amount])),
        TxOut(value - PAYMENT_VALUE, own),
        TxOut(PAYMENT_VALUE, pay_script),
    ), 0)
    digest = legacy_sighash(unsigned, 0, own, SIGHASH_ALL)
    script_sig = p2pkh_script_sig(key.sign(digest) + bytes([SIGHASH_ALL]), key.public_key.sec)
    return unsigned.with_script_sig(0, script_sig)


def oap_workload(lanes: Lanes, genesis: Genesis, issuer_key: PrivateKey,
                 count: int) -> list[Transaction]:
    """``count`` transactions: the issuance funding every lane, then each lane's chain
    of one-unit transfers (each spends the previous one's asset change), interleaved."""
    assert lanes.mix == "oap" and count >= 1
    issuer_script = p2pkh_script(issuer_key.public_key.hash160)
    allocation_tx = genesis_allocation_tx(genesis.hash_le, genesis.allocations)
    index, value = next((i, v) for i, (script, v) in enumerate(genesis.allocations)
                        if script == issuer_script and v >= oap_issuer_value(lanes))
    issuance = oap_issuance(lanes, issuer_key, OutPoint(allocation_tx.hash_le, index), value)
    sink = sink_script(lanes.seed)
    per_lane = -(-(count - 1) // lanes.count)
    chains: list[list[Transaction]] = []
    for lane, key in enumerate(lanes.keys()):
        prevout, value, units = OutPoint(issuance.hash_le, lane), LANE_VALUE, OAP_UNITS_PER_LANE
        chain = []
        for _ in range(per_lane):
            tx = sign_oap_transfer(key, prevout, value, units, sink, 1)
            chain.append(tx)
            prevout, value, units = OutPoint(tx.hash_le, 1), value - PAYMENT_VALUE, units - 1
        chains.append(chain)
    return [issuance, *list(interleave(chains))[:count - 1]]


def interleave(chains: list[list[Transaction]]) -> Iterator[Transaction]:
    """Round-robin over lanes: tx i of every lane before tx i+1 of any lane."""
    longest = max((len(chain) for chain in chains), default=0)
    for position in range(longest):
        for chain in chains:
            if position < len(chain):
                yield chain[position]


def certified_blocks(
    genesis: Genesis,
    keys: Mapping[str, PrivateKey],
    blocks_txs: Sequence[Sequence[Transaction]],
    *,
    time_ms: int,
) -> list[tuple[Block, QuorumCertificate]]:
    """A chain of blocks certified without running nodes: each block proposed (round 0)
    by the eligible member and acked by the first ``quorum`` members, with the tx-log
    ranges contiguous (one offset per tx). ``keys`` are every member's identity keys
    (a test chain's, e.g. from ``streams.cli.genesis.build_genesis``). Transactions are
    not validated here: build valid ones (``lane_chains``) for a valid chain. For
    projector tests and benchmarks that must not spend CPU on five node processes."""
    genesis_hash = genesis.hash_le
    voters = genesis.member_ids[: genesis.params.quorum]
    chain: list[tuple[Block, QuorumCertificate]] = []
    prev_hash, offset = genesis_hash, 0
    for height, txs in enumerate(blocks_txs, start=1):
        proposer = proposer_for(genesis, height, 0)
        block = make_block(keys[proposer], height=height, prev_hash=prev_hash,
                           time_ms=time_ms + height, proposer=proposer, round_=0, txs=txs,
                           tx_offset_start=offset, tx_offset_end=offset + len(txs))
        votes = tuple(
            sign_vote(keys[voter], genesis_hash, voter=voter, height=height, round_=0,
                      kind=VOTE_ACK, block_hash=block.hash)
            for voter in voters
        )
        chain.append((block, QuorumCertificate(height, 0, block.hash, votes)))
        prev_hash, offset = block.hash, offset + len(txs)
    return chain

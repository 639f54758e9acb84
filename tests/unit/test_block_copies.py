"""Members' copies of one committed block are parsed once (streams.kafka.records.
BlockCopies, decision 0128): the same bytes give the block parsed before, anything else
is parsed on its own, and every copy's own fields are still read and checked."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.block import QuorumCertificate, make_block, merkle_root, sign_vote
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS
from streams.kafka import codec
from streams.kafka.records import BlockCopies, committed_from_record, committed_record
from tests.unit.test_block import GENESIS_HASH, fake_tx

pytestmark = pytest.mark.unit

NOW_MS = 1_700_000_000_000
KEY = PrivateKey(b"\x05" * 32)
BLOCK_BYTES_MAX = 2_000_000


def _record(committer: str, *, height: int = 3, txs: int = 3,
            vote_offset: int = 10) -> dict[str, Any]:
    spends = [fake_tx(1_000 + i) for i in range(txs)]
    block = make_block(KEY, height=height, prev_hash=b"\x22" * 32, time_ms=NOW_MS,
                       proposer="koscom", round_=0, txs=spends)
    votes = tuple(sign_vote(KEY, GENESIS_HASH, voter=member, height=height, round_=0,
                            kind="ack", block_hash=block.hash)
                  for member in INSTITUTION_IDS[:3])
    qc = QuorumCertificate(height, 0, block.hash, votes)
    record = committed_record(block, qc, vote_offsets=[vote_offset] * 3, proposal_offset=9,
                              committer=committer, now_ms=NOW_MS)
    return codec.decode(codec.encode("BlockCommitted", record), expected="BlockCommitted").record


def test_an_identical_copy_reuses_the_parsed_block_and_keeps_its_own_fields() -> None:
    copies = BlockCopies()
    first = committed_from_record(_record("koscom"), block_bytes_max=BLOCK_BYTES_MAX,
                                  copies=copies)
    second = committed_from_record(_record("securities-a", vote_offset=20),
                                   block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    assert copies.reused == 1
    assert second.block is first.block
    assert (first.committer, second.committer) == ("koscom", "securities-a")
    assert second.vote_offsets == (20, 20, 20)
    plain = committed_from_record(_record("securities-a"), block_bytes_max=BLOCK_BYTES_MAX)
    assert plain.block == second.block and plain.block.hash == second.block.hash


def test_other_bytes_or_another_limit_are_parsed_on_their_own() -> None:
    copies = BlockCopies()
    one = committed_from_record(_record("koscom"), block_bytes_max=BLOCK_BYTES_MAX,
                                copies=copies)
    other = committed_from_record(_record("koscom", txs=2), block_bytes_max=BLOCK_BYTES_MAX,
                                  copies=copies)
    assert copies.reused == 0 and other.block.hash != one.block.hash
    again = committed_from_record(_record("koscom"), block_bytes_max=BLOCK_BYTES_MAX - 1,
                                  copies=copies)
    assert copies.reused == 0 and again.block is not one.block
    assert again.block == one.block


def test_a_tampered_copy_is_not_taken_for_the_cached_block() -> None:
    copies = BlockCopies()
    good = _record("koscom")
    first = committed_from_record(good, block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    raw = bytes(good["block"])
    value = (1_000).to_bytes(8, "little")  # the first transaction's output value
    assert raw.count(value) == 1
    forged = {**good, "block": raw.replace(value, (999).to_bytes(8, "little"))}
    committed = committed_from_record(forged, block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    assert copies.reused == 0
    assert committed.block.txs[0].outputs[0].value == 999 != first.block.txs[0].outputs[0].value
    # same header (hash), another body: its Merkle root gives it away, as before
    assert committed.block.hash == first.block.hash
    header_root = committed.block.header.merkle_root
    assert merkle_root([tx.hash_le for tx in first.block.txs]) == header_root
    assert merkle_root([tx.hash_le for tx in committed.block.txs]) != header_root


def test_a_copy_with_bad_fields_is_refused_although_its_block_is_cached() -> None:
    copies = BlockCopies()
    committed_from_record(_record("koscom"), block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    bad = {**_record("surveillance"), "committer": "x\x00"}
    with pytest.raises(ValidationError) as caught:
        committed_from_record(bad, block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    assert caught.value.code == "record-member-id"
    short = {**_record("surveillance"), "proposal_offset": -2}
    with pytest.raises(ValidationError) as caught:
        committed_from_record(short, block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    assert caught.value.code == "record-offset-range"


def test_the_cache_is_bounded() -> None:
    copies = BlockCopies(entries_max=2)
    for height in (3, 4, 5):
        committed_from_record(_record("koscom", height=height),
                              block_bytes_max=BLOCK_BYTES_MAX, copies=copies)
    committed_from_record(_record("koscom", height=3), block_bytes_max=BLOCK_BYTES_MAX,
                          copies=copies)
    assert copies.reused == 0  # height 3 was dropped: parsed again
    committed_from_record(_record("koscom", height=5), block_bytes_max=BLOCK_BYTES_MAX,
                          copies=copies)
    assert copies.reused == 1


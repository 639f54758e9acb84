"""``parse_block_reusing`` gives exactly ``Block.parse``'s result (or its error) while
taking the pool's transactions instead of parsing them again (decision 0110)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.block import Block, BlockHeader, make_block, parse_block_reusing
from ledger.errors import DecodeError
from ledger.hashing import sha256d
from ledger.keys import PrivateKey
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

KEY = PrivateKey(hashlib.sha256(b"test-key/reuse").digest())


def tx_number(n: int, script_bytes: int = 1) -> Transaction:
    prev = OutPoint(sha256d(b"prev" + n.to_bytes(8, "little")), 0)
    return Transaction(1, (TxIn(prev, b"\x51" * script_bytes),), (TxOut(n, b"\x51"),))


def parsed(tx: Transaction) -> Transaction:
    """A pool's copy: parsed from the record's bytes, so it keeps them."""
    return Transaction.parse(tx.serialize())


def block_of(txs: tuple[Transaction, ...]) -> Block:
    return make_block(KEY, height=1, prev_hash=bytes(32), time_ms=1, proposer="x",
                      round_=0, txs=txs, tx_offset_start=0, tx_offset_end=10)


POOL = [parsed(tx_number(n, 1 + n % 3)) for n in range(10)]


def assert_same(raw: bytes, pool: list[Transaction] | None) -> Block:
    expected = Block.parse(raw)
    got = parse_block_reusing(raw, lambda header: pool)
    assert got == expected
    assert got.serialize() == raw
    assert [tx.hash_le for tx in got.txs] == [tx.hash_le for tx in expected.txs]
    return got


def test_every_tx_of_the_block_comes_from_the_pool_without_parsing() -> None:
    block = block_of(tuple(POOL[i] for i in (0, 2, 3, 7)))
    got = assert_same(block.serialize(), POOL)
    assert all(a is POOL[i] for a, i in zip(got.txs, (0, 2, 3, 7), strict=True))


def test_a_tx_not_in_the_pool_is_read_where_it_stands() -> None:
    outsider = tx_number(99)
    got = assert_same(block_of((POOL[1], outsider, POOL[4])).serialize(), POOL)
    assert got.txs[0] is POOL[1] and got.txs[2] is POOL[4]
    assert got.txs[1] == outsider and got.txs[1] is not outsider


def test_double_spends_sharing_a_prefix_are_told_apart() -> None:
    twin = Transaction(1, POOL[3].inputs, (TxOut(12345, b"\x52"),))
    pool = [*POOL, parsed(twin)]
    got = assert_same(block_of((POOL[3], pool[-1])).serialize(), pool)
    assert got.txs[0] is POOL[3] and got.txs[1] is pool[-1]


def test_out_of_order_duplicate_and_empty_blocks_parse_as_block_parse() -> None:
    assert_same(block_of((POOL[5], POOL[1])).serialize(), POOL)
    assert_same(block_of((POOL[1], POOL[1])).serialize(), POOL)
    assert_same(block_of(()).serialize(), POOL)
    assert_same(block_of((POOL[0],)).serialize(), None)
    assert_same(block_of((POOL[0],)).serialize(), [])


def test_the_pool_is_asked_with_the_blocks_header() -> None:
    headers: list[BlockHeader] = []

    def lookup(header: BlockHeader) -> list[Transaction]:
        headers.append(header)
        return POOL
    block = block_of((POOL[0],))
    parse_block_reusing(block.serialize(), lookup)
    assert headers == [block.header]


@pytest.mark.parametrize("cut", [0, 10, 90, -1, -5, -40])
def test_truncated_or_extended_bytes_give_block_parses_error(cut: int) -> None:
    raw = block_of(tuple(POOL[:4])).serialize()
    for bad in (raw[:cut] if cut else b"", raw + b"\x00", raw + raw[-5:]):
        with pytest.raises(DecodeError) as usual:
            Block.parse(bad)
        with pytest.raises(DecodeError) as reused:
            parse_block_reusing(bad, lambda header: POOL)
        assert (reused.value.code, reused.value.message) == (usual.value.code,
                                                              usual.value.message)


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(0, 9), max_size=8), position=st.integers(0, 10_000),
       byte=st.integers(0, 255), flip=st.booleans())
def test_mutated_blocks_parse_exactly_as_block_parse(picks: list[int], position: int,
                                                     byte: int, flip: bool) -> None:
    raw = bytearray(block_of(tuple(POOL[i] for i in picks)).serialize())
    if flip:
        raw[position % len(raw)] = byte
    data = bytes(raw)
    try:
        expected: Block | DecodeError = Block.parse(data)
    except DecodeError as error:
        expected = error
    try:
        got: Block | DecodeError = parse_block_reusing(data, lambda header: POOL)
    except DecodeError as error:
        got = error
    if isinstance(expected, Block):
        assert got == expected
    else:
        assert isinstance(got, DecodeError)
        assert (got.code, got.message) == (expected.code, expected.message)

"""The chain-copy file: durable appends, and cutting off whatever does not check."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from streams.node.chainstore import RECORD_HEADER, ChainStore

pytestmark = pytest.mark.unit


def _accept_all(index: int, payload: bytes) -> None:
    return None


def test_appended_records_load_in_order(tmp_path: Path) -> None:
    store = ChainStore(tmp_path / "chain.dat")
    for i in range(5):
        store.append(f"block-{i}".encode())
    store.close()
    payloads, damage = ChainStore(tmp_path / "chain.dat").load(_accept_all)
    assert payloads == [f"block-{i}".encode() for i in range(5)]
    assert damage is None


def test_flipped_byte_cuts_from_that_record_and_keeps_evidence(tmp_path: Path) -> None:
    path = tmp_path / "chain.dat"
    store = ChainStore(path)
    for i in range(4):
        store.append(f"block-{i}".encode())
    store.close()
    raw = bytearray(path.read_bytes())
    second = RECORD_HEADER.size + len(b"block-0")
    raw[second + RECORD_HEADER.size + 2] ^= 0x01
    path.write_bytes(bytes(raw))
    reopened = ChainStore(path)
    payloads, damage = reopened.load(_accept_all)
    assert payloads == [b"block-0"]
    assert damage is not None and damage.record_index == 1
    assert "checksum" in damage.reason
    assert damage.evidence_path is not None and damage.evidence_path.exists()
    assert path.stat().st_size == second
    reopened.append(b"healed-1")
    reopened.close()
    assert ChainStore(path).load(_accept_all)[0] == [b"block-0", b"healed-1"]


def test_verify_rejection_cuts_even_with_a_valid_crc(tmp_path: Path) -> None:
    path = tmp_path / "chain.dat"
    store = ChainStore(path)
    store.append(b"good")
    forged = b"tampered"
    with open(path, "ab") as handle:
        handle.write(struct.pack("<II", len(forged), zlib.crc32(forged)) + forged)

    def verify(index: int, payload: bytes) -> None:
        if payload == forged:
            raise ValueError("Merkle root does not match")

    payloads, damage = ChainStore(path).load(verify)
    assert payloads == [b"good"]
    assert damage is not None and "Merkle" in damage.reason


def test_torn_write_at_the_end_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "chain.dat"
    store = ChainStore(path)
    store.append(b"complete")
    store.close()
    with open(path, "ab") as handle:
        handle.write(struct.pack("<II", 100, 0) + b"partial")
    payloads, damage = ChainStore(path).load(_accept_all)
    assert payloads == [b"complete"]
    assert damage is not None and "truncated" in damage.reason

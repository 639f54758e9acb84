"""Every field of the records a node reads is checked at decode (streams.kafka.records):
each out-of-range value is refused with its own code, and whatever decodes can be handed
to the core (signature check, packing) without raising anything but ValidationError.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.block import QuorumCertificate, check_vote, make_block, sign_vote
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS
from ledger.selection import Rejection
from streams.kafka import codec
from streams.kafka.records import (
    RECORD_CODES,
    RecordError,
    block_from_proposal,
    committed_from_record,
    committed_record,
    proposal_record,
    rejected_from_record,
    rejected_record,
    status_from_record,
    status_record,
    tx_submission_from_record,
    tx_submitted_record,
    vote_from_record,
    vote_record,
)
from tests.unit.test_block import GENESIS, GENESIS_HASH

pytestmark = pytest.mark.unit

NOW_MS = 1_700_000_000_000
KEY = PrivateKey(b"\x05" * 32)
BLOCK_BYTES_MAX = 2_000_000


def _vote() -> dict[str, Any]:
    vote = sign_vote(KEY, GENESIS_HASH, voter="koscom", height=5, round_=1, kind="nack",
                     block_hash=b"\x11" * 32, reason_code="block-tx-range")
    return vote_record(vote, now_ms=NOW_MS)


def _round_trip(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Through the real codec, so only what Avro accepts reaches the checks."""
    return codec.decode(codec.encode(name, record), expected=name).record


@pytest.mark.parametrize(("change", "code"), [
    ({"reason_code": "거부"}, "record-reason-code"),
    ({"reason_code": "x" * 65}, "record-reason-code"),
    ({"reason_code": "a\x00b"}, "record-reason-code"),
    ({"round": -1}, "record-round-range"),
    ({"round": -(2**31)}, "record-round-range"),
    ({"height": -1}, "record-height-range"),
    ({"height": 0}, "record-height-range"),
    ({"height": -(2**63)}, "record-height-range"),
    ({"voter": ""}, "record-member-id"),
    ({"voter": "koscom\x00"}, "record-member-id"),
    ({"voter": "kösc"}, "record-member-id"),
    ({"voter": "k" * 65}, "record-member-id"),
    ({"block_hash": b"\x11" * 31}, "record-hash-length"),
    ({"block_hash": b""}, "record-hash-length"),
    ({"signature": b""}, "record-signature-length"),
    ({"signature": b"\x30" * 74}, "record-signature-length"),
])
def test_vote_fields_out_of_range_are_refused_with_their_code(change: dict[str, Any],
                                                              code: str) -> None:
    record = _round_trip("VoteCast", {**_vote(), **change})
    with pytest.raises(RecordError) as caught:
        vote_from_record(record)
    assert caught.value.code == code
    assert code in RECORD_CODES


@pytest.mark.parametrize("change", [
    {"height": 2**63 - 1, "round": 2**31 - 1},
    {"height": 1, "round": 0},
    {"reason_code": "x" * 64},
    {"voter": "k" * 64},
])
def test_vote_fields_at_the_top_of_their_range_reach_the_signature_check(
    change: dict[str, Any],
) -> None:
    vote = vote_from_record(_round_trip("VoteCast", {**_vote(), **change}))
    with pytest.raises(ValidationError) as caught:
        check_vote(vote, GENESIS, genesis_hash=GENESIS_HASH)
    assert caught.value.code in {"vote-forged", "vote-unknown-voter"}


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(-(2**63), 2**63 - 1),
    round_=st.integers(-(2**31), 2**31 - 1),
    voter=st.sampled_from([*INSTITUTION_IDS, "", "é", "x\x00"]),
    reason=st.text(max_size=80),
    kind=st.sampled_from(["ack", "nack", "timeout"]),
    signature=st.binary(max_size=80),
)
def test_any_avro_vote_is_refused_or_checked_without_crashing(
    height: int, round_: int, voter: str, reason: str, kind: str, signature: bytes,
) -> None:
    record = _round_trip("VoteCast", {**_vote(), "height": height, "round": round_,
                                      "voter": voter, "reason_code": reason, "kind": kind,
                                      "signature": signature})
    try:
        vote = vote_from_record(record)
        check_vote(vote, GENESIS, genesis_hash=GENESIS_HASH)
    except ValidationError:
        pass  # refused with a code: never any other exception


def _block_record() -> dict[str, Any]:
    block = make_block(KEY, height=3, prev_hash=b"\x22" * 32, time_ms=NOW_MS,
                       proposer="koscom", round_=0, txs=[])
    return proposal_record(block, now_ms=NOW_MS)


@pytest.mark.parametrize(("change", "code"), [
    ({"height": -5}, "record-height-range"),
    ({"round": -1}, "record-round-range"),
    ({"proposer": "k\x00"}, "record-member-id"),
    ({"prev_hash": b"\x22" * 33}, "record-hash-length"),
    ({"tx_count": -1}, "record-count-range"),
    ({"height": 4}, "proposal-envelope"),
])
def test_proposal_envelope_fields_are_checked(change: dict[str, Any], code: str) -> None:
    record = _round_trip("BlockProposed", {**_block_record(), **change})
    with pytest.raises(ValidationError) as caught:
        block_from_proposal(record, block_bytes_max=BLOCK_BYTES_MAX)
    assert caught.value.code == code


def _committed() -> dict[str, Any]:
    block = make_block(KEY, height=3, prev_hash=b"\x22" * 32, time_ms=NOW_MS,
                       proposer="koscom", round_=0, txs=[])
    votes = tuple(
        sign_vote(KEY, GENESIS_HASH, voter=member, height=3, round_=0, kind="ack",
                  block_hash=block.hash)
        for member in INSTITUTION_IDS[:4]
    )
    qc = QuorumCertificate(3, 0, block.hash, votes)
    return committed_record(block, qc, vote_offsets=[10, 11, 12, 13], proposal_offset=9,
                            committer="koscom", now_ms=NOW_MS)


def _with_certificate(record: dict[str, Any], **change: Any) -> dict[str, Any]:
    return {**record, "certificate": {**record["certificate"], **change}}


@pytest.mark.parametrize(("make", "code"), [
    (lambda r: {**r, "proposal_offset": -2}, "record-offset-range"),
    (lambda r: {**r, "committer": ""}, "record-member-id"),
    (lambda r: _with_certificate(r, round=-1), "record-round-range"),
    (lambda r: _with_certificate(r, height=0), "record-height-range"),
    (lambda r: _with_certificate(r, block_hash=b"\x01"), "record-hash-length"),
    (lambda r: _with_certificate(r, votes=[]), "record-qc-votes"),
    (lambda r: _with_certificate(r, votes=[{**r["certificate"]["votes"][0],
                                            "vote_offset": -7}]), "record-offset-range"),
    (lambda r: _with_certificate(r, votes=[{**r["certificate"]["votes"][0],
                                            "voter": "x\x00"}]), "record-member-id"),
])
def test_committed_record_fields_are_checked(make: Any, code: str) -> None:
    record = _round_trip("BlockCommitted", make(_committed()))
    with pytest.raises(ValidationError) as caught:
        committed_from_record(record, block_bytes_max=BLOCK_BYTES_MAX)
    assert caught.value.code == code


def test_committed_record_in_range_decodes() -> None:
    committed = committed_from_record(_round_trip("BlockCommitted", _committed()),
                                      block_bytes_max=BLOCK_BYTES_MAX)
    assert committed.vote_offsets == (10, 11, 12, 13) and committed.committer == "koscom"


@pytest.mark.parametrize(("change", "code"), [
    ({"submitter": "a\x00b"}, "record-text"),
    ({"idempotency_key": "k\x00"}, "record-text"),
    ({"idempotency_key": "k\x1b[2J"}, "record-text"),
    ({"submitter": "s" * 129}, "record-text"),
    ({"tx": b"\x00" * 2_000_000}, "tx-oversized"),
])
def test_tx_submission_fields_are_checked(change: dict[str, Any], code: str) -> None:
    record = {**tx_submitted_record(b"\x01\x00", submitter="securities-a",
                                    idempotency_key="k-1", now_ms=int(time.time() * 1000)),
              **change}
    with pytest.raises(RecordError) as caught:
        tx_submission_from_record(_round_trip("TxSubmitted", record))
    assert caught.value.code == code


def test_tx_submission_keeps_unicode_text() -> None:
    record = tx_submitted_record(b"\x01\x00", submitter="증권-a", idempotency_key="주문/1",
                                 now_ms=NOW_MS)
    submission = tx_submission_from_record(_round_trip("TxSubmitted", record))
    assert (submission.submitter, submission.idempotency_key) == ("증권-a", "주문/1")


def _status() -> dict[str, Any]:
    return status_record(institution="koscom", chain_id="c", height=3, head_hash=b"\x01" * 32,
                         state_hash=b"\x02" * 32, consumer_lag=0, version="0.1.0",
                         now_ms=NOW_MS, round_=0, pending_txs=0)


@pytest.mark.parametrize(("change", "code"), [
    ({"institution": "k\x00"}, "record-member-id"),
    ({"height": -1}, "record-height-range"),
    ({"head_hash": b"\x01"}, "record-hash-length"),
    ({"round": -1}, "record-round-range"),
    ({"pending_txs": -1}, "record-count-range"),
    ({"version": "x" * 129}, "record-text"),
])
def test_status_fields_are_checked(change: dict[str, Any], code: str) -> None:
    with pytest.raises(RecordError) as caught:
        status_from_record(_round_trip("NodeStatusReported", {**_status(), **change}))
    assert caught.value.code == code
    assert status_from_record(_round_trip("NodeStatusReported", _status())).height == 3


def test_rejection_records_keep_free_text_but_no_nul() -> None:
    rejection = Rejection(5, "ab" * 32, "증권", "키\n1", "double-spend", "line one\nline two")
    record = _round_trip("TxRejected", rejected_record(
        rejection, stage="commit", institution="koscom", source_topic="p.ledger.tx.v1",
        block_hash=None, now_ms=NOW_MS))
    checked = rejected_from_record(record)
    assert (checked.submitter, checked.idempotency_key, checked.source_offset) == (
        "증권", "키\n1", 5)
    with pytest.raises(RecordError) as caught:
        rejected_from_record({**record, "message": "a\x00"})
    assert caught.value.code == "record-text"


def test_check_text_refuses_exactly_c0_del_and_c1_controls() -> None:
    from streams.kafka.records import check_text

    for code_point in [*range(0x200), 0x2028, 0xFEFF, 0x10FFFF]:
        control = code_point < 0x20 or 0x7F <= code_point < 0xA0
        text = f"a{chr(code_point)}b"
        if control:
            with pytest.raises(ValidationError) as refused:
                check_text("key", text, chars_max=10)
            assert refused.value.code == "record-text"
        else:
            assert check_text("key", text, chars_max=10) == text

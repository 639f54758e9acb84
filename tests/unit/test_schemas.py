"""The event contracts in schemas/: shape, documentation, codec round trips, evolution.

Every schema a topic carries must parse, document every field (recursively: nested
records, enums), type timestamps as timestamp-millis, round-trip through
streams.kafka.codec, and be described in docs/schemas.md. Every historic version in
schemas/history/ must resolve into the current version (a reader with the newer
schema reads old data), checked on generated data with fastavro's resolution.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError
from fastavro.utils import generate_many
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.kafka import codec
from streams.kafka.codec import MARKER, SchemaRegistry, fingerprint
from streams.kafka.topics import TOPICS

pytestmark = pytest.mark.unit

SCHEMAS_DIR = codec.SCHEMAS_DIR
HISTORY_DIR = SCHEMAS_DIR / "history"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"
EVENT_NAMES = sorted({spec.record for spec in TOPICS})
NAMESPACE = "capledger.events"
GENERATED_RECORDS = 50

T0 = datetime(2026, 11, 24, 9, 30, 0, 123000, tzinfo=UTC)
H1 = bytes(range(32))
H2 = bytes(range(32, 64))


def _raw(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _all_schema_files() -> list[Path]:
    return sorted(SCHEMAS_DIR.glob("*.avsc")) + sorted(HISTORY_DIR.glob("*.avsc"))


def _undocumented(schema: Any, where: str) -> list[str]:
    """Paths of fields, records and enums without a non-empty doc."""
    missing: list[str] = []
    if isinstance(schema, list):
        for branch in schema:
            missing += _undocumented(branch, where)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "enum", "fixed") and not str(schema.get("doc", "")).strip():
            missing.append(f"{where} ({kind} {schema.get('name')})")
        if kind == "record":
            for fld in schema["fields"]:
                path = f"{where}.{fld['name']}"
                if not str(fld.get("doc", "")).strip():
                    missing.append(path)
                missing += _undocumented(fld["type"], path)
        elif kind == "array":
            missing += _undocumented(schema["items"], f"{where}[]")
        elif kind == "map":
            missing += _undocumented(schema["values"], f"{where}{{}}")
    return missing


def _fields(schema: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, field) for every field, nested records included."""
    found: list[tuple[str, Any]] = []
    branches = schema if isinstance(schema, list) else [schema]
    for branch in branches:
        if not isinstance(branch, dict):
            continue
        if branch.get("type") == "record":
            for fld in branch["fields"]:
                path = f"{prefix}{fld['name']}"
                found.append((path, fld))
                found += _fields(fld["type"], f"{path}.")
        elif branch.get("type") == "array":
            found += _fields(branch["items"], prefix)
    return found


# ---------------------------------------------------------------- shape


def test_every_topic_record_has_a_schema_file() -> None:
    assert set(EVENT_NAMES) <= {path.stem for path in SCHEMAS_DIR.glob("*.avsc")}
    assert len(EVENT_NAMES) == 9


@pytest.mark.parametrize("path", _all_schema_files(), ids=lambda p: p.name)
def test_schema_parses_as_one_record(path: Path) -> None:
    raw = _raw(path)
    parsed: Any = fastavro.parse_schema(raw, named_schemas={})
    assert parsed["type"] == "record"
    expected_stem = path.stem.split(".")[0]
    assert raw["name"] == expected_stem


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_event_schema_is_namespaced_and_fully_documented(name: str) -> None:
    raw = _raw(SCHEMAS_DIR / f"{name}.avsc")
    assert raw.get("namespace") == NAMESPACE
    assert _undocumented(raw, name) == []


@pytest.mark.parametrize("path", sorted(HISTORY_DIR.glob("*.avsc")), ids=lambda p: p.name)
def test_history_schema_is_documented(path: Path) -> None:
    raw = _raw(path)
    if raw["name"] in EVENT_NAMES:
        assert _undocumented(raw, path.name) == []


def test_documentation_check_can_fail() -> None:
    raw = {"type": "record", "name": "X", "doc": "x",
           "fields": [{"name": "a", "type": "long", "doc": "a"}, {"name": "b", "type": "long"}]}
    assert _undocumented(raw, "X") == ["X.b"]


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_timestamps_are_timestamp_millis(name: str) -> None:
    raw = _raw(SCHEMAS_DIR / f"{name}.avsc")
    stamped = [(path, fld) for path, fld in _fields(raw) if path.endswith("_at")]
    assert stamped, f"{name} has no *_at timestamp"
    for path, fld in stamped:
        assert fld["type"] == {"type": "long", "logicalType": "timestamp-millis"}, path


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_docs_describe_every_field(name: str) -> None:
    """docs/schemas.md has a section per event naming each of its fields."""
    text = DOCS.read_text(encoding="utf-8")
    heading = f"## {name}"
    assert heading in text, f"docs/schemas.md lacks a '{heading}' section"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    for path, _ in _fields(_raw(SCHEMAS_DIR / f"{name}.avsc")):
        assert f"`{path}`" in section, f"docs/schemas.md section {name} lacks `{path}`"


# ---------------------------------------------------------------- round trips

SAMPLES: dict[str, dict[str, Any]] = {
    "TxSubmitted": {
        "tx": bytes.fromhex("0100000000") + b"\x00" * 5,
        "submitter": "securities-a",
        "idempotency_key": "order-42",
        "submitted_at": T0,
        "signature": b"\x30" * 70,
    },
    "MarketEventRecorded": {
        "kind": "order-posted", "stream_id": "0f" * 16,
        "payload": b'{"order_id":"0f0f"}', "writer": "otc-operator",
        "signer_pubkey": b"\x02" + H1, "signature": b"\x30\x06" + H2[:6],
        "recorded_at": T0,
    },
    "TxRejected": {
        "txid": H1, "stage": "intake", "code": "script-sig-verify",
        "message": "input 0 of tx ... : signature does not verify",
        "institution": "koscom", "submitter": "securities-b", "idempotency_key": "k-1",
        "block_hash": None, "source_topic": "ledger.tx.v1", "source_partition": 0,
        "source_offset": 1234, "rejected_at": T0, "signature": b"\x30\x44" + b"\x03" * 68,
    },
    "BlockProposed": {
        "height": 7, "round": 1, "proposer": "surveillance", "block_hash": H1,
        "prev_hash": H2, "tx_count": 2, "block": b"\x01" * 300, "proposed_at": T0,
    },
    "VoteCast": {
        "voter": "securities-b", "height": 7, "round": 1, "kind": "nack",
        "block_hash": H1, "reason_code": "double-spend", "signature": b"\x30" + b"\x01" * 70,
        "voted_at": T0,
    },
    "BlockCommitted": {
        "height": 7, "round": 1, "proposer": "surveillance", "block_hash": H1,
        "prev_hash": H2, "tx_count": 2, "block": b"\x01" * 300,
        "certificate": {
            "height": 7, "round": 1, "block_hash": H1,
            "votes": [
                {"voter": voter, "signature": b"\x30\x44" + bytes([n]) * 68, "vote_offset": n}
                for n, voter in enumerate(("koscom", "securities-a", "surveillance"))
            ],
        },
        "committer": "otc-operator", "proposal_offset": 55, "committed_at": T0,
        "signature": b"\x30\x44" + b"\x07" * 68,
    },
    "MembershipChanged": {
        "change_id": H1, "chain_id": "capledger-dev", "sequence": 1, "kind": "add_member",
        "member_id": "securities-c",
        "member": {"id": "securities-c", "name": "Securities C", "role": "securities",
                   "public_key": b"\x02" + H2, "may_issue": True},
        "params": None, "effective_height": 100, "proposed_by": "koscom",
        "signatures": [{"member_id": m, "signature": b"\x30" * 70}
                       for m in ("koscom", "otc-operator", "surveillance")],
        "proposed_at": T0, "genesis_hash": H2, "carried_height": 80, "txid": H1,
    },
    "AlertRaised": {
        "rule": "large-position-change", "cause": "ab" * 32 + "/1Addr/native", "height": 7,
        "subject": "1Addr", "asset_id": None, "amount": "2500000",
        "evidence": '{"change": "2500000", "threshold": "1000000"}', "raised_at": T0,
    },
    "NodeStatusReported": {
        "institution": "koscom", "chain_id": "capledger-dev", "height": 7, "head_hash": H1,
        "state_hash": H2, "consumer_lag": 0, "version": "0.1.0", "reported_at": T0,
        "round": 0, "pending_txs": 12, "signature": b"\x30\x44" + b"\x04" * 68,
        "broker_outages": 1, "broker_last_outage_ms": 41_250, "condition": "disk-full",
    },
}


def test_samples_cover_every_event() -> None:
    assert sorted(SAMPLES) == EVENT_NAMES


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_round_trip_through_codec(name: str) -> None:
    data = codec.encode(name, SAMPLES[name])
    decoded = codec.decode(data, expected=name)
    assert decoded.name == name
    assert decoded.record == SAMPLES[name]
    # A plain Avro reader decodes the body with the .avsc alone (single-object encoding).
    plain = fastavro.parse_schema(_raw(SCHEMAS_DIR / f"{name}.avsc"), named_schemas={})
    assert fastavro.schemaless_reader(io.BytesIO(data[10:]), plain) == SAMPLES[name]


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_codec_refuses_a_record_missing_a_required_field(name: str) -> None:
    sample = dict(SAMPLES[name])
    required = next(f["name"] for f in _raw(SCHEMAS_DIR / f"{name}.avsc")["fields"]
                    if "default" not in f)
    del sample[required]
    with pytest.raises(codec.InvalidRecordError):
        codec.encode(name, sample)


@pytest.mark.parametrize("name", EVENT_NAMES)
def test_generated_records_round_trip(name: str) -> None:
    """fastavro-generated values of every field round-trip through the codec."""
    parsed = codec.default_registry().schema(name).parsed
    for record in generate_many(parsed, GENERATED_RECORDS):
        data = codec.encode(name, record)
        decoded = codec.decode(data, expected=name)
        # Timestamps come back as datetimes, so compare on the wire: one record, one encoding.
        assert codec.encode(name, decoded.record) == data


@settings(max_examples=50, deadline=None)
@given(
    height=st.integers(min_value=0, max_value=2**63 - 1),
    round_=st.integers(min_value=0, max_value=2**31 - 1),
    kind=st.sampled_from(["ack", "nack", "timeout"]),
    block_hash=st.binary(min_size=32, max_size=32),
    signature=st.binary(min_size=8, max_size=72),
    voted_at_ms=st.integers(min_value=0, max_value=4_102_444_800_000),
)
def test_vote_round_trip_property(
    height: int, round_: int, kind: str, block_hash: bytes, signature: bytes,
    voted_at_ms: int,
) -> None:
    vote = {"voter": "koscom", "height": height, "round": round_, "kind": kind,
            "block_hash": block_hash if kind != "timeout" else bytes(32),
            "reason_code": "double-spend" if kind == "nack" else "",
            "signature": signature, "voted_at": voted_at_ms}
    decoded = codec.decode(codec.encode("VoteCast", vote), expected="VoteCast").record
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert (decoded["voted_at"] - epoch) // timedelta(milliseconds=1) == voted_at_ms
    assert {k: v for k, v in decoded.items() if k != "voted_at"} == {
        k: v for k, v in vote.items() if k != "voted_at"}


# ---------------------------------------------------------------- evolution


def _history_pairs() -> list[tuple[Path, Path]]:
    return [(path, SCHEMAS_DIR / f"{path.stem.split('.')[0]}.avsc")
            for path in sorted(HISTORY_DIR.glob("*.avsc"))]


def _resolves(writer_raw: dict[str, Any], reader_raw: dict[str, Any], count: int) -> None:
    """Write generated data with ``writer_raw``, read it with ``reader_raw``."""
    writer = fastavro.parse_schema(writer_raw, named_schemas={})
    reader = fastavro.parse_schema(reader_raw, named_schemas={})
    for record in generate_many(writer, count):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        fastavro.schemaless_reader(buf, writer, reader)
        assert buf.read() == b""


def test_history_exists_for_the_evolution_rule() -> None:
    assert (HISTORY_DIR / "NodeStatusReported.v1.avsc").exists()


@pytest.mark.parametrize("pair", _history_pairs(), ids=lambda pair: pair[0].name)
def test_every_historic_writer_resolves_into_the_current_reader(pair: tuple[Path, Path]) -> None:
    """Backward compatibility: the current schema reads everything ever written."""
    old, current = pair
    assert current.exists(), f"{old.name} has no current schema"
    _resolves(_raw(old), _raw(current), GENERATED_RECORDS)


def test_resolution_check_can_fail() -> None:
    """Adding a field without a default is not backward compatible: the check catches it."""
    old = _raw(HISTORY_DIR / "NodeStatusReported.v1.avsc")
    bad = json.loads(json.dumps(old))
    bad["fields"].append({"name": "region", "type": "string", "doc": "no default"})
    with pytest.raises(SchemaResolutionError):
        _resolves(old, bad, 1)


def test_reader_with_newer_schema_reads_v1_data() -> None:
    """A v1 heartbeat, framed as a v1 writer would frame it, decodes with the current
    version's defaults (v2's round and pending txs, v3's empty signature, v4's empty
    condition)."""
    v1_raw = _raw(HISTORY_DIR / "NodeStatusReported.v1.avsc")
    v1 = fastavro.parse_schema(v1_raw, named_schemas={})
    old_record = {k: v for k, v in SAMPLES["NodeStatusReported"].items()
                  if k not in ("round", "pending_txs", "signature", "broker_outages",
                               "broker_last_outage_ms", "condition")}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1, old_record)
    canonical = fastavro.schema.to_parsing_canonical_form(v1)
    message = MARKER + fingerprint(canonical) + body.getvalue()

    registry = SchemaRegistry(SCHEMAS_DIR)
    current = registry.schema("NodeStatusReported")
    assert fingerprint(canonical) != current.fingerprint
    decoded = registry.decode(message, expected="NodeStatusReported")
    record = dict(decoded.record)
    # fastavro resolves the bytes default "" as a str; the record checks make it b""
    assert record.pop("signature") in (b"", "")
    assert record == {**old_record, "round": 0, "pending_txs": 0, "broker_outages": 0,
                      "broker_last_outage_ms": 0, "condition": ""}
    from streams.kafka.records import status_from_record
    assert status_from_record(decoded.record).signature == b""
    assert decoded.fingerprint == fingerprint(canonical)


def test_v2_data_still_carries_its_new_fields() -> None:
    data = codec.encode("NodeStatusReported", SAMPLES["NodeStatusReported"])
    assert codec.decode(data).record["pending_txs"] == 12


# ---------------------------------------------------------------- fit with the core types


def test_core_objects_survive_the_event_contracts() -> None:
    """Signed core objects -> records -> codec -> core objects that still verify.

    Proves the schemas carry everything the ledger needs: the block as its bytes, a
    vote's explicit fields (timeout votes included), and a certificate rebuilt from
    (voter, signature) pairs that passes the core's certificate check.
    """
    from ledger.block import (
        VOTE_ACK,
        VOTE_TIMEOUT,
        Block,
        QuorumCertificate,
        Vote,
        check_certified_block,
        check_vote,
        make_block,
        proposer_for,
        sign_vote,
    )
    from ledger.tx import OutPoint, Transaction, TxIn, TxOut
    from streams.common.genesis_files import build_genesis, seeded_entropy

    genesis, keys = build_genesis(chain_id="contract", time_ms=0,
                                  institutions=("otc-operator", "surveillance", "koscom",
                                                "securities-a", "securities-b"),
                                  entropy=seeded_entropy("contract"))
    chain = genesis.hash_le
    txs = [Transaction(1, (TxIn(OutPoint(bytes([n]) * 32, 0), b"\x51"),), (TxOut(n, b"\x51"),))
           for n in range(1, 4)]
    submitted = codec.decode(codec.encode("TxSubmitted", {
        "tx": txs[0].serialize(), "submitter": "securities-a", "idempotency_key": "k",
        "submitted_at": T0, "signature": b""}), expected="TxSubmitted").record
    assert Transaction.parse(submitted["tx"]).hash_le == txs[0].hash_le

    proposer = proposer_for(genesis, 1, 0)
    block = make_block(keys[proposer], height=1, prev_hash=chain, time_ms=1, proposer=proposer,
                       round_=0, txs=txs)
    proposal = codec.decode(codec.encode("BlockProposed", {
        "height": 1, "round": 0, "proposer": proposer, "block_hash": block.hash,
        "prev_hash": chain, "tx_count": len(txs), "block": block.serialize(),
        "proposed_at": T0}), expected="BlockProposed").record
    assert Block.parse(proposal["block"]).hash == proposal["block_hash"] == block.hash

    def vote_record(vote: Vote) -> dict[str, Any]:
        return {"voter": vote.voter, "height": vote.height, "round": vote.round,
                "kind": vote.kind, "block_hash": vote.block_hash,
                "reason_code": vote.reason_code, "signature": vote.signature, "voted_at": T0}

    def vote_from(record: dict[str, Any]) -> Vote:
        return Vote(record["voter"], record["height"], record["round"], record["block_hash"],
                    record["kind"], record["reason_code"], record["signature"])

    voters = ("koscom", "securities-a", "surveillance")
    acks = [sign_vote(keys[v], chain, voter=v, height=1, round_=0, kind=VOTE_ACK,
                      block_hash=block.hash) for v in voters]
    timeout = sign_vote(keys["koscom"], chain, voter="koscom", height=1, round_=0,
                        kind=VOTE_TIMEOUT)
    for vote in [*acks, timeout]:
        record = codec.decode(codec.encode("VoteCast", vote_record(vote)), "VoteCast").record
        assert vote_from(record) == vote
        check_vote(vote_from(record), genesis)

    committed = codec.decode(codec.encode("BlockCommitted", {
        "height": 1, "round": 0, "proposer": proposer, "block_hash": block.hash,
        "prev_hash": chain, "tx_count": len(txs), "block": block.serialize(),
        "certificate": {"height": 1, "round": 0, "block_hash": block.hash, "votes": [
            {"voter": v.voter, "signature": v.signature, "vote_offset": n}
            for n, v in enumerate(acks)]},
        "committer": "otc-operator", "proposal_offset": 0, "committed_at": T0,
        "signature": b"",
    }), expected="BlockCommitted").record
    cert = committed["certificate"]
    qc = QuorumCertificate(cert["height"], cert["round"], cert["block_hash"], tuple(
        Vote(v["voter"], cert["height"], cert["round"], cert["block_hash"], VOTE_ACK, "",
             v["signature"]) for v in cert["votes"]))
    check_certified_block(Block.parse(committed["block"]), qc, genesis)

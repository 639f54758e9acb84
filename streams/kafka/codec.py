"""Avro single-object encoding of capital-ledger events.

Owns: the wire format of every event on the Kafka topics. Each message is the
Avro spec's *single-object encoding*::

    C3 01 | CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form
          | (8 bytes, little-endian) | Avro binary body

so any standard Avro library that knows the schema can decode it (see
docs/decisions/0002-avro-framing.md). Schemas are the ``schemas/*.avsc`` files, one
record per file, record name = file stem; older versions of a record live in
``schemas/history/*.avsc`` so data written with them still decodes: the writer
schema is looked up by fingerprint and resolved into the newest reader schema of
the same record name.

Decoding is strict: the body must be exactly the canonical encoding of the
decoded record under the writer schema (no trailing bytes, no non-minimal
varints), so one event has one byte string.

Performance: records whose fields are all flat (bytes, string, long, int,
boolean, enum, timestamp-millis) — TxSubmitted and VoteCast on the hot path —
are read by a small strict reader that accepts a body only when it is
canonical by construction (minimal varints, in-range ints and enum indexes,
strict UTF-8, nothing left over) and returns the record fastavro would. Any
body it does not accept goes through the general path (fastavro read plus a
canonical re-encode), which decides and words the error, so results and
errors are the same either way.

"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import fastavro.validation
from fastavro.schema import to_parsing_canonical_form

from ledger.errors import ValidationError

MARKER = b"\xc3\x01"
FINGERPRINT_BYTES = 8
HEADER_BYTES = len(MARKER) + FINGERPRINT_BYTES
# The broker accepts messages up to 8 MiB (docker/kafka/server.properties); blocks
# are ~2 MB. Anything bigger is refused before it reaches fastavro.
MESSAGE_BYTES_MAX = 8 * 1024 * 1024

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
HISTORY_DIRNAME = "history"


class CodecError(ValidationError, ValueError):
    """A message or record the codec refuses. ``code`` is stable."""

    code = "avro"


class FramingError(CodecError):
    code = "avro-framing"


class UnknownSchemaError(CodecError):
    code = "avro-unknown-schema"


class MalformedError(CodecError):
    code = "avro-malformed"


class UnexpectedRecordError(CodecError):
    code = "avro-unexpected-record"


class OversizedError(CodecError):
    code = "avro-oversized"


class InvalidRecordError(CodecError):
    """A record given to :func:`encode` that does not match its schema."""

    code = "avro-invalid-record"


# CRC-64-AVRO as defined in the Avro specification ("Schema Fingerprints").
_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The 64-bit Rabin fingerprint the Avro spec calls CRC-64-AVRO."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(canonical_form: str) -> bytes:
    """The 8 header bytes: CRC-64-AVRO of the canonical form, little-endian."""
    return crc64_avro(canonical_form.encode("utf-8")).to_bytes(FINGERPRINT_BYTES, "little")


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One parsed schema file."""

    name: str
    path: Path
    parsed: Any = field(repr=False)
    canonical_form: str
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class Decoded:
    name: str
    record: dict[str, Any]
    fingerprint: bytes


# --- the strict reader for flat records ---------------------------------------------

# One field of a flat record: name, kind (an Avro primitive or "enum" or
# "timestamp-millis") and the enum's symbols (empty otherwise).
_FlatField = tuple[str, str, tuple[str, ...]]
_FLAT_PRIMITIVES = frozenset({"bytes", "string", "long", "int", "boolean"})
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_VARINT_BYTES_MAX = 10  # a 64-bit zigzag value never needs more
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # fastavro's epoch for timestamp-millis


def _flat_plan(parsed: Any) -> tuple[_FlatField, ...] | None:
    """The field list of a record the strict reader handles; None for any other
    (unions, nested records, arrays, maps, fixed, other logical types)."""
    plan: list[_FlatField] = []
    for entry in parsed["fields"]:
        field_type = entry["type"]
        if isinstance(field_type, dict):
            kind = field_type.get("type")
            logical = field_type.get("logicalType")
            if kind == "long" and logical == "timestamp-millis":
                plan.append((entry["name"], "timestamp-millis", ()))
                continue
            if kind == "enum" and logical is None:
                plan.append((entry["name"], "enum", tuple(field_type["symbols"])))
                continue
            if kind in _FLAT_PRIMITIVES and logical is None:
                field_type = kind
        if not isinstance(field_type, str) or field_type not in _FLAT_PRIMITIVES:
            return None
        plan.append((entry["name"], field_type, ()))
    return tuple(plan)


def _read_flat(plan: tuple[_FlatField, ...], body: bytes) -> dict[str, Any] | None:
    """The record in ``body`` if it is the canonical encoding of one; else None
    (the caller then takes the general path, which names the fault)."""
    record: dict[str, Any] = {}
    pos = 0
    end = len(body)
    for name, kind, symbols in plan:
        if pos >= end:
            return None
        byte = body[pos]
        pos += 1
        if kind == "boolean":
            if byte > 1:
                return None
            record[name] = byte == 1
            continue
        # zigzag varint; canonical means minimal: a longer one never ends in 0x00
        number = byte & 0x7F
        if byte & 0x80:
            shift = 7
            while True:
                if pos >= end or shift >= 7 * _VARINT_BYTES_MAX:
                    return None
                byte = body[pos]
                pos += 1
                number |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
            if byte == 0 or number >> 64:
                return None
        value = (number >> 1) ^ -(number & 1)
        if kind == "bytes" or kind == "string":
            if value < 0 or pos + value > end:
                return None
            data = body[pos : pos + value]
            pos += value
            if kind == "bytes":
                record[name] = data
                continue
            try:
                record[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                return None
        elif kind == "long":
            record[name] = value
        elif kind == "timestamp-millis":
            try:
                record[name] = _EPOCH + timedelta(microseconds=value * 1000)
            except OverflowError:
                return None
        elif kind == "int":
            if not _INT_MIN <= value <= _INT_MAX:
                return None
            record[name] = value
        else:
            assert kind == "enum", kind
            if not 0 <= value < len(symbols):
                return None
            record[name] = symbols[value]
    return record if pos == end else None


def _load(path: Path) -> SchemaVersion:
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict) and raw.get("type") == "record", f"{path}: not one record"
    # A fresh named-types dict per file: the same record name exists in several versions.
    parsed: Any = fastavro.parse_schema(raw, named_schemas={})
    canonical = to_parsing_canonical_form(parsed)
    name = str(parsed["name"]).rsplit(".", 1)[-1]
    assert name == path.stem or path.parent.name == HISTORY_DIRNAME, (
        f"{path}: record name {name!r} must equal the file stem"
    )
    return SchemaVersion(name, path, parsed, canonical, fingerprint(canonical))


class SchemaRegistry:
    """All schema versions under one directory, indexed by name and fingerprint."""

    def __init__(self, path: Path | str = SCHEMAS_DIR, *,
                 message_bytes_max: int = MESSAGE_BYTES_MAX) -> None:
        root = Path(path)
        self.message_bytes_max = message_bytes_max
        self.current: dict[str, SchemaVersion] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for file in sorted(root.glob("*.avsc")):
            version = _load(file)
            self.current[version.name] = version
            self._index(version)
        # Flat plans only for current schemas: older writers need resolution.
        self._flat_plans: dict[bytes, tuple[_FlatField, ...]] = {}
        for version in self.current.values():
            plan = _flat_plan(version.parsed)
            if plan is not None:
                self._flat_plans[version.fingerprint] = plan
        for file in sorted((root / HISTORY_DIRNAME).glob("*.avsc")):
            version = _load(file)
            assert version.name in self.current, (
                f"{file}: history of {version.name!r} without a current schema"
            )
            self._index(version)

    def _index(self, version: SchemaVersion) -> None:
        known = self.by_fingerprint.get(version.fingerprint)
        if known is not None and known.canonical_form != version.canonical_form:
            raise AssertionError(f"fingerprint collision: {known.path} and {version.path}")
        self.by_fingerprint.setdefault(version.fingerprint, version)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.current)

    def schema(self, name: str) -> SchemaVersion:
        try:
            return self.current[name]
        except KeyError:
            raise UnknownSchemaError(f"no schema for record {name!r}") from None

    def encode(self, record_name: str, record: Mapping[str, Any]) -> bytes:
        version = self.schema(record_name)
        try:
            fastavro.validation.validate(record, version.parsed, raise_errors=True)
        except fastavro.validation.ValidationError as exc:
            raise InvalidRecordError(f"record for {record_name!r} does not match its schema: "
                                     f"{exc}") from None
        buf = io.BytesIO()
        buf.write(MARKER)
        buf.write(version.fingerprint)
        fastavro.schemaless_writer(buf, version.parsed, dict(record))
        data = buf.getvalue()
        if len(data) > self.message_bytes_max:
            raise OversizedError(f"encoded {record_name!r} is {len(data)} bytes, "
                                 f"over the {self.message_bytes_max}-byte limit")
        return data

    def decode(self, data: bytes, expected: str | frozenset[str] | None = None) -> Decoded:
        if len(data) > self.message_bytes_max:
            raise OversizedError(f"message is {len(data)} bytes, "
                                 f"over the {self.message_bytes_max}-byte limit")
        if len(data) < HEADER_BYTES or data[: len(MARKER)] != MARKER:
            raise FramingError(f"message of {len(data)} bytes does not start with the Avro "
                               f"single-object marker C3 01 and an 8-byte fingerprint")
        fp = bytes(data[len(MARKER):HEADER_BYTES])
        writer = self.by_fingerprint.get(fp)
        if writer is None:
            raise UnknownSchemaError(f"message has unknown schema fingerprint {fp.hex()}")
        if expected is not None and writer.name != expected:
            allowed = frozenset([expected]) if isinstance(expected, str) else expected
            if writer.name not in allowed:
                raise UnexpectedRecordError(
                    f"message holds {writer.name!r}, expected {sorted(allowed)}")
        body = bytes(data[HEADER_BYTES:])
        plan = self._flat_plans.get(fp)
        if plan is not None and self.current[writer.name] is writer:
            flat = _read_flat(plan, body)
            if flat is not None:
                return Decoded(writer.name, flat, fp)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(body), writer.parsed)
            canonical = io.BytesIO()
            fastavro.schemaless_writer(canonical, writer.parsed, record)
        except Exception as exc:  # fastavro raises many types on bad input
            raise MalformedError(f"{writer.name} body of {len(body)} bytes does not decode: "
                                 f"{type(exc).__name__}: {exc}") from None
        if canonical.getvalue() != body:
            raise MalformedError(f"{writer.name} body of {len(body)} bytes is not the canonical "
                                 f"encoding of its record (trailing or non-minimal bytes)")
        reader = self.current[writer.name]
        if reader is not writer:
            try:
                record = fastavro.schemaless_reader(io.BytesIO(body), writer.parsed,
                                                    reader.parsed)
            except Exception as exc:
                raise MalformedError(f"{writer.name} written with {writer.path.name} does not "
                                     f"resolve into {reader.path.name}: {exc}") from None
        assert isinstance(record, dict)
        return Decoded(writer.name, record, fp)


_default: SchemaRegistry | None = None


def default_registry() -> SchemaRegistry:
    """The registry of the repository's schemas/ directory, loaded once."""
    global _default
    if _default is None:
        _default = SchemaRegistry(SCHEMAS_DIR)
    return _default


def encode(record_name: str, record: Mapping[str, Any]) -> bytes:
    return default_registry().encode(record_name, record)


def decode(data: bytes, expected: str | frozenset[str] | None = None) -> Decoded:
    return default_registry().decode(data, expected)

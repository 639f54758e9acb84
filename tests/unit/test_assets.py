"""Asset definitions: canonical bytes, hash, marker reference, registry bindings."""

from __future__ import annotations

import hashlib
import json

import pytest

from ledger.assets import (
    AssetDefinition,
    AssetRegistry,
    definition_reference,
    is_iso_date,
    parse_definition_reference,
)
from ledger.errors import AssetError

pytestmark = pytest.mark.unit

BOND = AssetDefinition(
    security_code="KR6000001234",
    name="증권A 제1회 무보증사채",
    kind="bond",
    issuer="securities-a",
    unit="KRW",
    decimals=0,
    maturity="2029-06-30",
    coupon_bp=325,
)
CASH = AssetDefinition("KRW-DEPOSIT-B", "KRW deposit", "cash", "securities-b", "KRW")


def test_canonical_bytes_are_sorted_compact_utf8_json() -> None:
    raw = BOND.canonical_bytes()
    text = raw.decode("utf-8")
    assert "증권A" in text  # not \u-escaped
    assert " " not in text.replace(BOND.name, "")
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert BOND.definition_hash == hashlib.sha256(raw).digest()
    assert AssetDefinition.from_dict(json.loads(text)) == BOND


def test_hash_changes_with_any_field() -> None:
    other = AssetDefinition.from_dict({**BOND.to_dict(), "coupon_bp": 326})
    assert other.definition_hash != BOND.definition_hash


def _fields(definition: AssetDefinition) -> dict[str, object]:
    data = definition.to_dict()
    data.pop("format")
    return data


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "swap"},
        {"maturity": "2029-02-30"},
        {"maturity": "20290630"},
        {"maturity": None},  # a bond needs a maturity
        {"coupon_bp": -1},
        {"coupon_bp": 2.5},  # never floats
        {"decimals": 19},
        {"security_code": "kr 1"},
        {"issuer": "Securities A"},
        {"name": ""},
        {"unit": "K R W"},
    ],
)
def test_invalid_definitions_refused(changes: dict[str, object]) -> None:
    with pytest.raises(AssetError) as info:
        AssetDefinition(**{**_fields(BOND), **changes})  # type: ignore[arg-type]
    assert info.value.code == "asset-definition-invalid"


@pytest.mark.parametrize(
    ("text", "valid"),
    [("2024-02-29", True), ("2023-02-29", False), ("1900-02-29", False), ("2000-02-29", True),
     ("2029-12-31", True), ("2029-13-01", False), ("2029-04-31", False), ("2029-4-01", False),
     ("0000-01-01", False), ("2029-01-00", False)],
)
def test_iso_dates(text: str, valid: bool) -> None:
    assert is_iso_date(text) is valid


def test_cash_cannot_carry_coupon() -> None:
    with pytest.raises(AssetError):
        AssetDefinition("KRW-X", "cash", "cash", "securities-a", "KRW", coupon_bp=100)


def test_reference_round_trip() -> None:
    ref = BOND.reference()
    assert ref == b"d=" + BOND.definition_hash
    assert parse_definition_reference(ref) == BOND.definition_hash
    assert parse_definition_reference(b"") is None
    assert parse_definition_reference(b"u=https://example.com/x") is None
    assert parse_definition_reference(definition_reference(bytes(32)) + b"x") is None


def test_registry_binds_once() -> None:
    registry = AssetRegistry().bind("Abond", BOND, issuer="securities-a")
    assert registry.definition("Abond") == BOND
    assert registry.bind("Abond", BOND) is registry  # same definition: no-op
    with pytest.raises(AssetError) as info:
        registry.bind("Abond", CASH)
    assert info.value.code == "asset-rebind"
    with pytest.raises(AssetError) as info:
        registry.definition("Aother")
    assert info.value.code == "asset-unknown"
    with pytest.raises(AssetError) as info:
        AssetRegistry().bind("Acash", CASH, issuer="securities-a")
    assert info.value.code == "asset-issuer-mismatch"


def test_registry_bind_by_hash_needs_registered_definition() -> None:
    with pytest.raises(AssetError) as info:
        AssetRegistry().bind_hash("Acash", CASH.definition_hash)
    assert info.value.code == "asset-definition-unknown"
    registry = AssetRegistry().register(CASH).bind_hash("Acash", CASH.definition_hash)
    assert registry.find("Acash") == CASH
    assert registry.asset_ids() == ("Acash",)

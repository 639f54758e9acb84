"""Asset definitions: what an asset id stands for (a bond, cash, an equity ...).

Owns: ``AssetDefinition`` (a frozen record with canonical bytes and a SHA-256
``definition_hash``), the marker-metadata reference that carries that hash in an
issuance (``definition_reference`` / ``parse_definition_reference``), and
``AssetRegistry``, an immutable binding of asset id -> definition that refuses to
rebind an asset id to a different definition. The ledger state records only the
hash an asset id was issued under; the registry resolves it to the record. See
docs/decisions/0011-open-assets-rules.md.

``issuing_public_key`` / ``issuing_script`` / ``issuing_private_key``: a member
issuer's per-asset issuing key, ``P + H(P || definition hash) * G`` (pay-to-contract,
decision 0070): one member issues any number of assets, each asset id is bound to its
definition by construction, and every node checks it from the member's public key.

``terms_output`` / ``parse_terms_output``: the definition's canonical bytes in an
``OP_RETURN`` output of the issuance (tag ``CLT1``), so every node and every projection
has the terms from the chain itself, not only their hash.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ledger.errors import AssetError
from ledger.keys import PrivateKey, PublicKey
from ledger.script import OP_RETURN, length_prefixed_push, p2pkh_script

ASSET_KINDS = ("bond", "cash", "equity", "fund", "deposit", "other")
DEFINITION_FORMAT_VERSION = 1
DEFINITION_REFERENCE_PREFIX = b"d="  # marker metadata: b"d=" + 32-byte SHA-256
DEFINITION_HASH_BYTES = 32
TEXT_CHARS_MAX = 200
SECURITY_CODE_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,31}$")
INSTITUTION_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
UNIT_PATTERN = re.compile(r"^[A-Za-z0-9]{1,16}$")
ISO_DATE_PATTERN = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})$")
DECIMALS_MAX = 18
FACE_VALUE_MAX = 10**15  # minor units of one unit's face value
COUPON_BP_MAX = 100_000  # 1000 % a year: anything above is a data-entry error


def is_iso_date(text: str) -> bool:
    """``YYYY-MM-DD`` naming a real Gregorian calendar day (no clock, no datetime)."""
    match = ISO_DATE_PATTERN.match(text)
    if match is None:
        return False
    year, month, day = (int(part) for part in match.groups())
    if year < 1 or not 1 <= month <= 12:
        return False
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]
    return 1 <= day <= days


def _refuse(message: str, code: str = "asset-definition-invalid") -> AssetError:
    return AssetError(message, code=code)


@dataclass(frozen=True, slots=True)
class AssetDefinition:
    """One asset's terms. Money-like fields are ints: coupon in basis points per year,
    quantities in minor units (``decimals`` says where the decimal point is)."""

    security_code: str  # e.g. an ISIN or the issuer's code: "KR6000001234"
    name: str
    kind: str  # one of ASSET_KINDS
    issuer: str  # institution id of the issuing member, e.g. "securities-a"
    unit: str  # currency or unit of account: "KRW", "SHARE"
    decimals: int = 0
    maturity: str | None = None  # ISO date "YYYY-MM-DD"; required for bonds
    coupon_bp: int | None = None  # annual coupon in basis points; bonds only
    # Added for the market (decision 0070); left out of the canonical bytes when None,
    # so definitions written before keep their hash.
    issue_date: str | None = None  # ISO date "YYYY-MM-DD"
    face_value: int | None = None  # face value of one unit, in minor units of ``unit``

    def __post_init__(self) -> None:
        if not SECURITY_CODE_PATTERN.match(self.security_code):
            raise _refuse(f"security_code {self.security_code!r} is not 1-32 of A-Z 0-9 . _ -")
        if not self.name.strip() or len(self.name) > TEXT_CHARS_MAX:
            raise _refuse(f"name of {self.security_code} must be 1..{TEXT_CHARS_MAX} characters")
        if self.kind not in ASSET_KINDS:
            raise _refuse(f"kind {self.kind!r} of {self.security_code} not in {ASSET_KINDS}")
        if not INSTITUTION_ID_PATTERN.match(self.issuer):
            raise _refuse(f"issuer {self.issuer!r} of {self.security_code} is not an id")
        if not UNIT_PATTERN.match(self.unit):
            raise _refuse(f"unit {self.unit!r} of {self.security_code} is not 1-16 alphanumerics")
        if type(self.decimals) is not int or not 0 <= self.decimals <= DECIMALS_MAX:
            raise _refuse(f"decimals {self.decimals!r} of {self.security_code} not in 0..18")
        if self.maturity is not None and not (
            isinstance(self.maturity, str) and is_iso_date(self.maturity)
        ):
            raise _refuse(f"maturity {self.maturity!r} of {self.security_code} is not YYYY-MM-DD")
        if self.coupon_bp is not None and (
            type(self.coupon_bp) is not int or not 0 <= self.coupon_bp <= COUPON_BP_MAX
        ):
            raise _refuse(f"coupon_bp {self.coupon_bp!r} of {self.security_code} not in 0..100000")
        if self.issue_date is not None and not (
            isinstance(self.issue_date, str) and is_iso_date(self.issue_date)
        ):
            raise _refuse(
                f"issue_date {self.issue_date!r} of {self.security_code} is not YYYY-MM-DD"
            )
        if self.face_value is not None and (
            type(self.face_value) is not int or not 0 < self.face_value <= FACE_VALUE_MAX
        ):
            raise _refuse(f"face_value {self.face_value!r} of {self.security_code} not in "
                          f"1..{FACE_VALUE_MAX}")
        if (self.issue_date is not None and self.maturity is not None
                and self.issue_date > self.maturity):
            raise _refuse(f"{self.security_code} matures before it is issued")
        if self.kind == "bond" and self.maturity is None:
            raise _refuse(f"bond {self.security_code} needs a maturity date")
        if self.kind != "bond" and self.coupon_bp is not None:
            raise _refuse(f"{self.kind} {self.security_code} cannot carry a coupon")

    def to_dict(self) -> dict[str, Any]:
        optional = {
            name: value
            for name, value in (("issue_date", self.issue_date), ("face_value", self.face_value))
            if value is not None
        }
        return {
            **optional,
            "format": DEFINITION_FORMAT_VERSION,
            "security_code": self.security_code,
            "name": self.name,
            "kind": self.kind,
            "issuer": self.issuer,
            "unit": self.unit,
            "decimals": self.decimals,
            "maturity": self.maturity,
            "coupon_bp": self.coupon_bp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssetDefinition:
        if data.get("format", DEFINITION_FORMAT_VERSION) != DEFINITION_FORMAT_VERSION:
            raise _refuse(f"asset definition format {data.get('format')!r} is not supported")
        known = {"format", *cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise _refuse(f"asset definition has unknown fields {sorted(unknown)}")
        try:
            return cls(
                security_code=str(data["security_code"]),
                name=str(data["name"]),
                kind=str(data["kind"]),
                issuer=str(data["issuer"]),
                unit=str(data["unit"]),
                decimals=data.get("decimals", 0),
                maturity=data.get("maturity"),
                coupon_bp=data.get("coupon_bp"),
                issue_date=data.get("issue_date"),
                face_value=data.get("face_value"),
            )
        except KeyError as error:
            raise _refuse(f"asset definition lacks field {error.args[0]!r}") from None

    def canonical_bytes(self) -> bytes:
        """Sorted-key, separator-free JSON in UTF-8: the bytes the hash commits to."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @property
    def definition_hash(self) -> bytes:
        return hashlib.sha256(self.canonical_bytes()).digest()

    def reference(self) -> bytes:
        """The marker metadata that issues an asset under this definition."""
        return definition_reference(self.definition_hash)


def definition_reference(definition_hash: bytes) -> bytes:
    assert len(definition_hash) == DEFINITION_HASH_BYTES
    return DEFINITION_REFERENCE_PREFIX + definition_hash


def parse_definition_reference(metadata: bytes) -> bytes | None:
    """The definition hash carried by marker metadata, or None if it carries none."""
    if (
        len(metadata) == len(DEFINITION_REFERENCE_PREFIX) + DEFINITION_HASH_BYTES
        and metadata.startswith(DEFINITION_REFERENCE_PREFIX)
    ):
        return metadata[len(DEFINITION_REFERENCE_PREFIX) :]
    return None


@dataclass(frozen=True)
class AssetRegistry:
    """Immutable asset id -> definition bindings, plus definitions known by hash.

    ``register`` adds a definition (by its hash) before or after issuance; ``bind``
    ties an asset id to a definition and refuses a different one for a bound id.
    Every operation returns a new registry (the registry is small: one entry per asset).
    """

    _definitions: Mapping[bytes, AssetDefinition] = field(default_factory=dict)
    _bindings: Mapping[str, bytes] = field(default_factory=dict)

    def register(self, definition: AssetDefinition) -> AssetRegistry:
        digest = definition.definition_hash
        if digest in self._definitions:
            return self
        return AssetRegistry({**self._definitions, digest: definition}, self._bindings)

    def bind(
        self, asset_id: str, definition: AssetDefinition, *, issuer: str | None = None
    ) -> AssetRegistry:
        """Bind ``asset_id`` to ``definition``; ``issuer`` (if given) must match its issuer."""
        if issuer is not None and definition.issuer != issuer:
            raise AssetError(
                f"asset {asset_id}: definition {definition.security_code} names issuer "
                f"{definition.issuer!r} but {issuer!r} issued it",
                code="asset-issuer-mismatch",
            )
        digest = definition.definition_hash
        bound = self._bindings.get(asset_id)
        if bound is not None:
            if bound != digest:
                raise AssetError(
                    f"asset {asset_id} is already bound to definition {bound.hex()}; "
                    f"refusing {digest.hex()} ({definition.security_code})",
                    code="asset-rebind",
                )
            return self
        return AssetRegistry(
            {**self._definitions, digest: definition}, {**self._bindings, asset_id: digest}
        )

    def bind_hash(self, asset_id: str, definition_hash: bytes) -> AssetRegistry:
        """Bind by hash (as the ledger state records it); the record must be registered."""
        definition = self._definitions.get(definition_hash)
        if definition is None:
            raise AssetError(
                f"asset {asset_id}: no registered definition with hash {definition_hash.hex()}",
                code="asset-definition-unknown",
            )
        return self.bind(asset_id, definition)

    def definition(self, asset_id: str) -> AssetDefinition:
        digest = self._bindings.get(asset_id)
        if digest is None:
            raise AssetError(f"asset {asset_id} has no bound definition", code="asset-unknown")
        return self._definitions[digest]

    def find(self, asset_id: str) -> AssetDefinition | None:
        digest = self._bindings.get(asset_id)
        return None if digest is None else self._definitions[digest]

    def by_hash(self, definition_hash: bytes) -> AssetDefinition | None:
        return self._definitions.get(definition_hash)

    def asset_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._bindings))

    def __len__(self) -> int:
        return len(self._bindings)


ISSUER_TWEAK_TAG = b"capital-ledger/asset-issuer/v1\x00"


def issuer_tweak(member_key: PublicKey, definition_hash: bytes) -> bytes:
    """SHA-256(tag || compressed member key || definition hash): the issuing key's tweak."""
    assert len(definition_hash) == DEFINITION_HASH_BYTES
    return hashlib.sha256(
        ISSUER_TWEAK_TAG + member_key.compressed().sec + definition_hash
    ).digest()


def issuing_public_key(member_key: PublicKey, definition_hash: bytes) -> PublicKey:
    """The public key whose P2PKH script issues the asset of ``definition_hash``."""
    return member_key.compressed().tweaked(issuer_tweak(member_key, definition_hash))


def issuing_script(member_key: PublicKey, definition_hash: bytes) -> bytes:
    """P2PKH script of :func:`issuing_public_key`; its asset id is the asset's id."""
    return p2pkh_script(issuing_public_key(member_key, definition_hash).hash160)


def issuing_private_key(member_key: PrivateKey, definition_hash: bytes) -> PrivateKey:
    """The member's private issuing key for one definition (only the member can derive it)."""
    public = member_key.public_key
    return PrivateKey(member_key.secret).tweaked(issuer_tweak(public, definition_hash))


TERMS_TAG = b"CLT1"  # OP_RETURN payload: tag + canonical definition bytes
TERMS_BYTES_MAX = 4_096


def terms_output(definition: AssetDefinition) -> bytes:
    """``OP_RETURN <"CLT1" + canonical bytes>``: the terms, carried by an issuance."""
    payload = TERMS_TAG + definition.canonical_bytes()
    assert len(payload) <= TERMS_BYTES_MAX, f"terms of {definition.security_code} too long"
    return bytes([OP_RETURN]) + length_prefixed_push(payload)


def parse_terms_output(script: bytes) -> bytes | None:
    """The canonical definition bytes of a terms output, or None if it is not one."""
    if len(script) < 2 or script[0] != OP_RETURN:
        return None
    opcode, body = script[1], script[2:]
    if opcode < 0x4C:
        size, data = opcode, body
    elif opcode == 0x4C and body:
        size, data = body[0], body[1:]
    elif opcode == 0x4D and len(body) >= 2:
        size, data = int.from_bytes(body[:2], "little"), body[2:]
    else:
        return None
    if size != len(data) or not data.startswith(TERMS_TAG) or size > TERMS_BYTES_MAX:
        return None
    return data[len(TERMS_TAG):]


def definition_from_terms(canonical: bytes, expected_hash: bytes) -> AssetDefinition:
    """The definition whose canonical bytes are ``canonical`` and hash ``expected_hash``;
    AssetError ``asset-terms-mismatch`` / ``asset-terms-invalid`` otherwise."""
    if hashlib.sha256(canonical).digest() != expected_hash:
        raise AssetError("terms output does not hash to the referenced definition",
                         code="asset-terms-mismatch")
    try:
        data = json.loads(canonical.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
        definition = AssetDefinition.from_dict(data)
    except (ValueError, UnicodeDecodeError, AssetError) as error:
        raise AssetError(f"terms output is not an asset definition: {error}",
                         code="asset-terms-invalid") from None
    if definition.canonical_bytes() != canonical:
        raise AssetError("terms output is not in canonical form", code="asset-terms-invalid")
    return definition

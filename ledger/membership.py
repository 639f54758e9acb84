"""Membership and chain parameters fixed by genesis (changed later only by governance).

Owns: ``Member`` (institution id, name, role, identity public key), ``ChainParams``
(quorum, block interval, block size limit, proposer timeout, networks' version
bytes) and ``Genesis`` with its canonical JSON form and hash. Parsing takes a
``dict`` (the shell reads the file); nothing here touches the filesystem.

"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ledger.errors import ValidationError
from ledger.hashing import sha256d
from ledger.keys import PublicKey

INSTITUTION_IDS = ("otc-operator", "surveillance", "koscom", "securities-a", "securities-b")


class GenesisError(ValidationError):
    code = "genesis"


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    name: str
    role: str
    public_key: PublicKey
    may_issue: bool = False


@dataclass(frozen=True, slots=True)
class SubmitKey:
    """A registered external system (a member's back office) and the key that signs its
    transaction envelopes: ``name`` is its principal (``<member>-backoffice``), ``member``
    the member it submits for. Not an identity key: it cannot vote, propose or issue."""

    name: str
    member: str
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class ChainParams:
    quorum: int
    block_interval_ms: int = 500
    block_bytes_max: int = 2_000_000
    block_txs_max: int = 10_000
    proposer_timeout_ms: int = 3_000
    p2pkh_version: int = 0x00
    p2sh_version: int = 0x05


@dataclass(frozen=True)
class Genesis:
    """The chain's founding record: its hash is the previous hash of block 1."""

    chain_id: str
    time_ms: int
    members: tuple[Member, ...]
    params: ChainParams
    # Native value created at genesis: (output script, value) pairs, the outputs of the
    # genesis allocation transaction (ledger.state.state_from_genesis). The only place
    # native value is created: no fees, no block reward.
    allocations: tuple[tuple[bytes, int], ...] = ()
    # Registered external systems' envelope keys (back offices), decision 0061.
    submit_keys: tuple[SubmitKey, ...] = ()
    _by_id: dict[str, Member] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        ids = [member.id for member in self.members]
        if len(set(ids)) != len(ids) or not ids:
            raise GenesisError("genesis members must be non-empty with unique ids")
        if not len(ids) // 2 < self.params.quorum <= len(ids):
            raise GenesisError(
                f"quorum {self.params.quorum} must be a majority of {len(ids)} members",
                code="genesis-quorum",
            )
        self._by_id.update({member.id: member for member in self.members})
        names = [key.name for key in self.submit_keys]
        if len(set(names)) != len(names) or set(names) & set(ids) or any(
            key.member not in self._by_id for key in self.submit_keys
        ):
            raise GenesisError("submit keys need unique names, not member ids, each of a "
                               "member", code="genesis-submit-keys")

    def member(self, member_id: str) -> Member | None:
        return self._by_id.get(member_id)

    def submit_key(self, name: str) -> SubmitKey | None:
        return next((key for key in self.submit_keys if key.name == name), None)

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(member.id for member in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "time_ms": self.time_ms,
            "members": [
                {
                    "id": m.id,
                    "name": m.name,
                    "role": m.role,
                    "public_key": m.public_key.sec.hex(),
                    "may_issue": m.may_issue,
                }
                for m in self.members
            ],
            "params": {
                "quorum": self.params.quorum,
                "block_interval_ms": self.params.block_interval_ms,
                "block_bytes_max": self.params.block_bytes_max,
                "block_txs_max": self.params.block_txs_max,
                "proposer_timeout_ms": self.params.proposer_timeout_ms,
                "p2pkh_version": self.params.p2pkh_version,
                "p2sh_version": self.params.p2sh_version,
            },
            # Present only when there are allocations, so a genesis without them keeps
            # the hash it had before allocations existed.
            **(
                {"allocations": [
                    {"script": script.hex(), "value": value} for script, value in self.allocations
                ]}
                if self.allocations
                else {}
            ),
            # Likewise present only when there are registered submit keys.
            **(
                {"submit_keys": [
                    {"name": k.name, "member": k.member, "public_key": k.public_key.sec.hex()}
                    for k in self.submit_keys
                ]}
                if self.submit_keys
                else {}
            ),
        }

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def hash_le(self) -> bytes:
        return sha256d(self.canonical_bytes())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Genesis:
        try:
            members = tuple(
                Member(
                    id=str(m["id"]),
                    name=str(m["name"]),
                    role=str(m["role"]),
                    public_key=PublicKey.parse(bytes.fromhex(m["public_key"])),
                    may_issue=bool(m.get("may_issue", False)),
                )
                for m in data["members"]
            )
            raw_params = data.get("params", {})
            params = ChainParams(
                quorum=int(raw_params.get("quorum", len(members) // 2 + 1)),
                **{
                    key: int(raw_params[key])
                    for key in (
                        "block_interval_ms",
                        "block_bytes_max",
                        "block_txs_max",
                        "proposer_timeout_ms",
                        "p2pkh_version",
                        "p2sh_version",
                    )
                    if key in raw_params
                },
            )
            allocations = tuple(
                (bytes.fromhex(str(item["script"])), int(item["value"]))
                for item in data.get("allocations", ())
            )
            if any(value < 0 for _, value in allocations):
                raise GenesisError("genesis allocation with a negative value")
            submit_keys = tuple(
                SubmitKey(str(item["name"]), str(item["member"]),
                          PublicKey.parse(bytes.fromhex(str(item["public_key"]))))
                for item in data.get("submit_keys", ())
            )
            return cls(str(data["chain_id"]), int(data["time_ms"]), members, params, allocations,
                       submit_keys)
        except (KeyError, TypeError, ValueError) as error:
            raise GenesisError(f"malformed genesis: {error!r}") from None

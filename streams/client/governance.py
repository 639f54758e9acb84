"""Governance change files: draft a change, collect member signatures, submit it.

Owns: the JSON file a change travels in between the members before it is submitted
(``change_to_json`` / ``change_from_json``, format ``capledger-governance-change/v1``),
``draft_change`` (a change from command-line values) and ``submit_change`` (the
governance transaction sent through the tx log, its outcome read back). The rules
that accept or refuse a change are ``ledger.governance``; decision 0061.

A change file is hostile input: sizes and types are checked, the change id it states
must be the id of the change it holds, and each signature must verify against the
key of the member it names in the membership the signer gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ledger.errors import ValidationError
from ledger.governance import (
    KIND_ADD,
    KIND_PARAMS,
    KIND_REMOVE,
    KIND_ROTATE,
    KINDS,
    GovernanceError,
    MembershipChange,
    SignedChange,
    governance_tx,
)
from ledger.keys import PrivateKey, PublicKey
from ledger.membership import ChainParams, Genesis, Member
from streams.client.submit import SubmitResult, submit_tx

CHANGE_FILE_FORMAT = "capledger-governance-change/v1"
CHANGE_FILE_BYTES_MAX = 64 * 1024
PARAM_NAMES = ("quorum", "block_interval_ms", "block_bytes_max", "block_txs_max",
               "proposer_timeout_ms")


class ChangeFileError(GovernanceError):
    code = "governance-file"


def _member_json(member: Member | None) -> dict[str, Any] | None:
    if member is None:
        return None
    return {"id": member.id, "name": member.name, "role": member.role,
            "public_key": member.public_key.sec.hex(), "may_issue": member.may_issue}


def change_to_json(signed: SignedChange) -> dict[str, Any]:
    change = signed.change
    params = change.params
    return {
        "format": CHANGE_FILE_FORMAT,
        "change_id": change.change_id.hex(),
        "change": {
            "genesis_hash": change.genesis_hash.hex(),
            "sequence": change.sequence,
            "kind": change.kind,
            "effective_height": change.effective_height,
            "member_id": change.member_id,
            "member": _member_json(change.member),
            "params": None if params is None else {n: getattr(params, n) for n in PARAM_NAMES},
        },
        "signatures": [{"member_id": m, "signature": s.hex()} for m, s in signed.signatures],
    }


def _member_from_json(data: Any) -> Member | None:
    if data is None:
        return None
    return Member(str(data["id"]), str(data["name"]), str(data["role"]),
                  PublicKey.parse(bytes.fromhex(str(data["public_key"]))),
                  may_issue=bool(data["may_issue"]))


def change_from_json(data: Any) -> SignedChange:
    """The signed change a change file holds; ``ChangeFileError`` when malformed."""
    try:
        if data.get("format") != CHANGE_FILE_FORMAT:
            raise ChangeFileError(f"not a {CHANGE_FILE_FORMAT} file")
        raw = data["change"]
        params = raw["params"]
        change = MembershipChange(
            genesis_hash=bytes.fromhex(str(raw["genesis_hash"])),
            sequence=int(raw["sequence"]),
            kind=str(raw["kind"]),
            effective_height=int(raw["effective_height"]),
            member_id=str(raw["member_id"]),
            member=_member_from_json(raw["member"]),
            params=None if params is None else ChainParams(*(int(params[n]) for n in PARAM_NAMES)),
        )
        signatures = tuple((str(s["member_id"]), bytes.fromhex(str(s["signature"])))
                           for s in data["signatures"])
    except ChangeFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as error:
        raise ChangeFileError(f"malformed change file: {error!r}") from None
    if len(change.genesis_hash) != 32 or change.kind not in KINDS:
        raise ChangeFileError("change names no chain or an unknown kind")
    if data.get("change_id") != change.change_id.hex():
        raise ChangeFileError("the change id stated does not match the change",
                              code="governance-file-id")
    return SignedChange(change, signatures)


def read_change_file(path: Path) -> SignedChange:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(CHANGE_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise ChangeFileError(f"cannot read {path}: {error.strerror}") from None
    if len(raw) > CHANGE_FILE_BYTES_MAX:
        raise ChangeFileError(f"{path} is over {CHANGE_FILE_BYTES_MAX} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ChangeFileError(f"{path} is not JSON: {error}") from None
    return change_from_json(data)


def write_change_file(path: Path, signed: SignedChange) -> None:
    path.write_text(json.dumps(change_to_json(signed), indent=2) + "\n")


def draft_change(genesis: Genesis, *, kind: str, sequence: int, effective_height: int,
                 member_id: str = "", public_key_hex: str = "", name: str = "",
                 role: str = "member", may_issue: bool = False,
                 params: dict[str, int] | None = None,
                 current: Genesis | None = None) -> SignedChange:
    """A change with no signatures yet. ``current``: the membership the change amends
    (default genesis), for the fields a rotation or parameter change keeps."""
    view = current or genesis
    try:
        key = PublicKey.parse(bytes.fromhex(public_key_hex)) if public_key_hex else None
    except ValueError:
        raise ChangeFileError("--public-key is not hex") from None
    member: Member | None = None
    change_params: ChainParams | None = None
    if kind == KIND_ADD:
        if key is None:
            raise ChangeFileError("add_member needs --public-key")
        member = Member(member_id, name or member_id, role, key, may_issue)
    elif kind == KIND_ROTATE:
        old = view.member(member_id)
        if old is None or key is None:
            raise ChangeFileError("rotate_key needs a current --member and --public-key")
        member = Member(old.id, old.name, old.role, key, old.may_issue)
    elif kind == KIND_PARAMS:
        now = {n: getattr(view.params, n) for n in PARAM_NAMES}
        change_params = ChainParams(*({**now, **(params or {})}[n] for n in PARAM_NAMES))
        member_id = ""
    elif kind != KIND_REMOVE:
        raise ChangeFileError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    change = MembershipChange(genesis.hash_le, sequence, kind, effective_height,
                              member_id, member, change_params)
    return SignedChange(change)


async def submit_change(signed: SignedChange, *, bootstrap: str, genesis: Genesis,
                        submitter: str, signing_key: PrivateKey, topic_prefix: str,
                        timeout_s: float) -> SubmitResult:
    """Send the governance transaction and wait for its outcome. The client reads the
    blocks log from the start, so it knows every membership change before it checks
    the certificates of later blocks."""
    return await submit_tx(governance_tx(signed), bootstrap=bootstrap, genesis=genesis,
                           submitter=submitter, signing_key=signing_key,
                           topic_prefix=topic_prefix, timeout_s=timeout_s,
                           watch_from_start=True)

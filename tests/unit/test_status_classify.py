"""streams.cli.status.classify: which nodes agree, disagree, lag or have gone silent."""

from __future__ import annotations

import dataclasses

import pytest

from ledger.hashing import display_hex
from streams.cli.exit_codes import CONFLICT, DEGRADED, OK
from streams.cli.status import exit_code_for
from streams.client.status import (
    BEHIND,
    DISAGREES,
    MISSING,
    SILENT,
    WRONG_CHAIN,
    Heartbeat,
    classify,
    report_json,
)

MEMBERS = ("otc-operator", "surveillance", "koscom", "securities-a", "securities-b")
NOW_MS = 1_800_000_000_000
HEAD = bytes(range(32))
STATE = bytes(range(32, 64))


def beat(institution: str, *, height: int = 7, head: bytes = HEAD, state: bytes = STATE,
         age_ms: int = 500, chain_id: str = "test") -> Heartbeat:
    return Heartbeat(institution, chain_id, height, head, state, 0, "0.1.0", NOW_MS - age_ms)


def all_agree() -> dict[str, Heartbeat]:
    return {name: beat(name) for name in MEMBERS}


def flags_of(beats: dict[str, Heartbeat], **kwargs: object) -> dict[str, tuple[str, ...]]:
    report = classify(beats, now_ms=NOW_MS, members=MEMBERS, **kwargs)  # type: ignore[arg-type]
    return {view.institution: view.flags for view in report.nodes}


def test_five_agreeing_nodes_are_healthy() -> None:
    report = classify(all_agree(), now_ms=NOW_MS, members=MEMBERS, chain_id="test")
    assert [view.institution for view in report.nodes] == list(MEMBERS)
    assert all(view.flags == () and view.state == "OK" for view in report.nodes)
    assert report.healthy and not report.disagreement
    assert exit_code_for(report) == OK and report.height_max == 7


@pytest.mark.parametrize("field", ["head", "state"])
def test_one_different_hash_at_the_same_height_disagrees(field: str) -> None:
    beats = all_agree()
    other = bytes(32)
    beats["koscom"] = beat("koscom", **{field: other})  # type: ignore[arg-type]
    flags = flags_of(beats)
    assert flags["koscom"] == (DISAGREES,)
    assert all(flags[name] == () for name in MEMBERS if name != "koscom")
    report = classify(beats, now_ms=NOW_MS, members=MEMBERS)
    assert report.disagreement and exit_code_for(report) == CONFLICT


def test_a_tie_has_no_reference_so_everyone_at_that_height_disagrees() -> None:
    beats = {name: beat(name, height=3) for name in MEMBERS[:2]}
    beats.update({name: beat(name, height=3, head=bytes(32)) for name in MEMBERS[2:4]})
    beats["securities-b"] = beat("securities-b", height=4)
    flags = flags_of(beats)
    assert all(flags[name] == (DISAGREES,) for name in MEMBERS[:4])
    assert flags["securities-b"] == ()


def test_different_heights_are_not_a_disagreement() -> None:
    beats = all_agree()
    beats["koscom"] = beat("koscom", height=6, head=bytes(32), state=bytes(32))
    assert flags_of(beats)["koscom"] == ()


def test_behind_by_more_than_the_limit() -> None:
    beats = all_agree()
    beats["surveillance"] = beat("surveillance", height=7 - 3)
    assert flags_of(beats, behind_blocks_max=3)["surveillance"] == ()
    assert flags_of(beats, behind_blocks_max=2)["surveillance"] == (BEHIND,)
    report = classify(beats, now_ms=NOW_MS, members=MEMBERS, behind_blocks_max=2)
    assert exit_code_for(report) == DEGRADED and not report.disagreement


def test_silent_after_the_limit_and_missing_when_never_reported() -> None:
    beats = all_agree()
    beats["securities-a"] = beat("securities-a", age_ms=5_001)
    beats["otc-operator"] = beat("otc-operator", age_ms=5_000)
    del beats["securities-b"]
    flags = flags_of(beats, silent_after_ms=5_000)
    assert flags["securities-a"] == (SILENT,)
    assert flags["otc-operator"] == ()
    assert flags["securities-b"] == (MISSING,)
    report = classify(beats, now_ms=NOW_MS, members=MEMBERS)
    assert exit_code_for(report) == DEGRADED


def test_a_silent_node_that_forked_still_disagrees_first() -> None:
    beats = all_agree()
    beats["koscom"] = beat("koscom", head=bytes(32), age_ms=60_000)
    assert flags_of(beats)["koscom"] == (DISAGREES, SILENT)


def test_another_chain_is_flagged_and_left_out_of_the_comparison() -> None:
    beats = all_agree()
    beats["koscom"] = beat("koscom", height=99, head=bytes(32), chain_id="other")
    flags = flags_of(beats, chain_id="test")
    assert flags["koscom"] == (WRONG_CHAIN,)
    assert all(flags[name] == () for name in MEMBERS if name != "koscom")
    report = classify(beats, now_ms=NOW_MS, members=MEMBERS, chain_id="test")
    assert report.height_max == 7 and exit_code_for(report) == CONFLICT


def test_without_members_the_reporters_in_genesis_order_and_none_is_not_healthy() -> None:
    beats = {name: beat(name) for name in ("securities-b", "koscom", "zeta")}
    report = classify(beats, now_ms=NOW_MS)
    assert [view.institution for view in report.nodes] == ["koscom", "securities-b", "zeta"]
    empty = classify({}, now_ms=NOW_MS)
    assert not empty.healthy and exit_code_for(empty) == DEGRADED


def test_json_shows_hashes_in_display_order() -> None:
    beats = all_agree()
    beats["koscom"] = dataclasses.replace(beats["koscom"], height=8)
    data = report_json(classify(beats, now_ms=NOW_MS, members=MEMBERS))
    node = next(item for item in data["nodes"] if item["institution"] == "koscom")
    assert node["head_hash"] == display_hex(HEAD) and node["height"] == 8
    assert data["height_max"] == 8 and data["healthy"] is True

"""streams.node.signing_guard: one process per key, never two different votes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.errors import ValidationError
from streams.node.signing_guard import (
    SLOT_BYTES,
    SLOTS_FILENAME,
    KeyLockError,
    SigningGuard,
    hold_key_lock,
    release_locks,
)

pytestmark = pytest.mark.unit

A = bytes([1]) * 32
B = bytes([2]) * 32
ZERO = bytes(32)


def test_a_second_different_vote_is_refused_across_restarts(tmp_path: Path) -> None:
    guard = SigningGuard(tmp_path)
    assert guard.permit(5, 0, "ack", A, "")
    assert guard.permit(5, 0, "ack", A, "")  # the same vote again (resend) is fine
    assert not guard.permit(5, 0, "ack", B, "")
    assert not guard.permit(5, 0, "nack", A, "tx-invalid")
    restarted = SigningGuard(tmp_path)  # a new process reads what was signed
    assert not restarted.permit(5, 0, "ack", B, "")
    assert restarted.permit(5, 0, "timeout", ZERO, "")  # timeout after an ack is allowed
    assert not SigningGuard(tmp_path).permit(4, 3, "ack", A, "")  # older position
    assert SigningGuard(tmp_path).permit(5, 1, "ack", B, "")  # next round


def test_no_ack_after_own_timeout(tmp_path: Path) -> None:
    guard = SigningGuard(tmp_path)
    assert guard.permit(7, 2, "timeout", ZERO, "")
    assert not SigningGuard(tmp_path).permit(7, 2, "ack", A, "")


def test_damaged_state_stops_the_node(tmp_path: Path) -> None:
    (tmp_path / "signed-votes.json").write_text("{not json")
    with pytest.raises(ValidationError) as caught:
        SigningGuard(tmp_path)
    assert caught.value.code == "signing-state"


def test_key_lock_refuses_a_second_process(tmp_path: Path) -> None:
    hold_key_lock(tmp_path / "chain", "koscom", tmp_path / "node")
    try:
        code = (
            "import sys; from pathlib import Path\n"
            "from streams.node.signing_guard import hold_key_lock, KeyLockError\n"
            "try:\n"
            f"    hold_key_lock(Path({str(tmp_path / 'chain')!r}), 'koscom', "
            f"Path({str(tmp_path / 'other-node')!r}))\n"
            "except KeyLockError as e:\n"
            "    print(e.code); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 3 and "key-locked" in out.stdout, out.stderr
    finally:
        release_locks()
    with pytest.raises(KeyLockError):
        hold_key_lock(tmp_path / "chain", "koscom", tmp_path / "node")
        hold_key_lock(tmp_path / "chain", "koscom", tmp_path / "node")
    release_locks()


# ---- the slots file (decision 0120): one fdatasync per vote, a torn write loses nothing


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"fsync": 0, "fdatasync": 0, "replace": 0}
    for name in calls:
        real = getattr(os, name)

        def counted(*args: object, _name: str = name, _real: object = real) -> object:
            calls[_name] += 1
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(os, name, counted)
    return calls


def test_each_vote_costs_one_fdatasync_and_no_rename(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    guard = SigningGuard(tmp_path)
    assert guard.permit(1, 0, "ack", A, "")  # creates the file whole: fsyncs it and its dir
    calls = _counting(monkeypatch)
    for height in range(2, 12):
        assert guard.permit(height, 0, "ack", A, "")
    assert guard.permit(11, 0, "ack", A, "")  # the same vote again: nothing written
    assert calls == {"fsync": 0, "fdatasync": 10, "replace": 0}
    assert (tmp_path / SLOTS_FILENAME).stat().st_size == SLOT_BYTES * 2
    restarted = SigningGuard(tmp_path)
    assert restarted.last == guard.last and restarted.last is not None
    assert restarted.last.height == 11


def _slot_of(path: Path, height: int) -> int:
    raw = path.read_bytes()
    index = next(i for i in range(2) if f'"height":{height},'.encode()
                 in raw[i * SLOT_BYTES:(i + 1) * SLOT_BYTES])
    return index


def test_a_torn_newest_slot_leaves_the_state_before_it(tmp_path: Path) -> None:
    guard = SigningGuard(tmp_path)
    assert guard.permit(5, 0, "ack", A, "")
    assert guard.permit(6, 0, "ack", A, "")  # torn below: this vote never left
    path = tmp_path / SLOTS_FILENAME
    index = _slot_of(path, 6)
    with open(path, "r+b") as handle:  # a machine crash half-way through the write
        handle.seek(index * SLOT_BYTES + 20)
        handle.write(b"\x00" * 30)
    restarted = SigningGuard(tmp_path)
    assert restarted.last is not None and restarted.last.height == 5
    assert not restarted.permit(5, 0, "ack", B, "")  # what did leave is still guarded
    assert restarted.permit(6, 0, "ack", B, "")
    assert _slot_of(path, 6) == index  # written over the torn slot, not the good one
    assert SigningGuard(tmp_path).last == restarted.last


def test_a_torn_first_write_names_nothing(tmp_path: Path) -> None:
    path = tmp_path / SLOTS_FILENAME
    path.write_bytes(b" " * SLOT_BYTES + b'{"sequence":1,"hei' + b" " * (SLOT_BYTES - 18))
    assert SigningGuard(tmp_path).last is None


def test_both_slots_damaged_stops_the_node(tmp_path: Path) -> None:
    (tmp_path / SLOTS_FILENAME).write_bytes(b"x" * SLOT_BYTES * 2)
    with pytest.raises(ValidationError) as caught:
        SigningGuard(tmp_path)
    assert caught.value.code == "signing-state"


def test_the_earlier_versions_file_is_honoured_then_replaced(tmp_path: Path) -> None:
    old = tmp_path / "signed-votes.json"
    old.write_text(json.dumps({"height": 9, "round": 1, "decision": ["ack", A.hex(), ""],
                               "timed_out": False}))
    guard = SigningGuard(tmp_path)
    assert not guard.permit(9, 1, "ack", B, "")  # signed by the earlier version
    assert not guard.permit(9, 0, "ack", A, "")
    assert guard.permit(9, 1, "timeout", ZERO, "")  # the first state in the slots
    assert not old.exists()
    restarted = SigningGuard(tmp_path)
    assert restarted.last is not None and restarted.last.timed_out
    assert restarted.last.decision == ("ack", A.hex(), "")  # carried over
    assert not restarted.permit(9, 1, "ack", B, "")

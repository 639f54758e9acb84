"""streams.node.signing_guard: one process per key, never two different votes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ledger.errors import ValidationError
from streams.node.signing_guard import (
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

"""What survives an API restart without a private copy: the idempotency store's file
(bounded, hostile lines skipped) and custodial sessions sealed in the bearer token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.api.custody import load_accounts, resume_session, seal_session
from streams.api.idempotency import IdempotencyStore
from streams.api.problems import ApiProblem

TOKEN_KEY = bytes(range(32))
PASSWORD = "correct horse battery"


def test_idempotency_answers_survive_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "idempotency.jsonl"
    first = IdempotencyStore(path=path)
    first.remember("user-a@securities-a", "post-kukmin-1", "f1", 200, {"order_id": "o-1"})
    assert path.stat().st_mode & 0o077 == 0
    again = IdempotencyStore(path=path)
    stored = again.lookup("user-a@securities-a", "post-kukmin-1", "f1")
    assert stored is not None and stored.body == {"order_id": "o-1"}
    with pytest.raises(ApiProblem) as refused:
        again.lookup("user-a@securities-a", "post-kukmin-1", "other body")
    assert refused.value.code == "idempotency-key-reused"


def test_idempotency_file_is_bounded_and_bad_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "idempotency.jsonl"
    path.write_text('not json\n{"caller": 1}\n[]\n', encoding="utf-8")
    os.chmod(path, 0o600)
    store = IdempotencyStore(3, path=path)
    for n in range(10):
        store.remember("c", f"key-{n:05d}", "f", 200, n)
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 6
    reopened = IdempotencyStore(3, path=path)
    assert reopened.lookup("c", "key-00000", "f") is None
    stored = reopened.lookup("c", "key-00009", "f")
    assert stored is not None and stored.body == 9


def test_sealed_session_resumes_after_restart_only_for_its_subject(tmp_path: Path) -> None:
    accounts = load_accounts(tmp_path, create=True)
    accounts.store("securities-a").open_account("user-a", PASSWORD)
    holder = accounts.store("securities-a").authenticate("user-a", PASSWORD)
    sealed = seal_session(TOKEN_KEY, holder)
    assert holder.token.hex() not in sealed
    restarted = load_accounts(tmp_path)  # a new process: same custody key, new objects
    resumed = resume_session(TOKEN_KEY, restarted, "user-a@securities-a", sealed)
    assert resumed is not None and resumed.key == "securities-a/user-a"
    assert restarted.check(resumed).user_id == "user-a"
    assert resume_session(TOKEN_KEY, restarted, "user-b@securities-a", sealed) is None
    assert resume_session(bytes(32), restarted, "user-a@securities-a", sealed) is None
    assert resume_session(TOKEN_KEY, restarted, "user-a@securities-a", "!!") is None
    assert resume_session(TOKEN_KEY, restarted, "user-a@securities-a", None) is None


def test_claimed_write_is_pending_after_a_restart_until_answered(tmp_path: Path) -> None:
    import asyncio

    from streams.api.idempotency import nonce_for

    path = tmp_path / "idempotency.jsonl"
    first = IdempotencyStore(path=path)
    first.begin("user-a@securities-a", "post-dies-0001")
    asyncio.run(first.claim("user-a@securities-a", "post-dies-0001", "f1"))
    # the process dies here: a new store sees the claim, not an answer
    again = IdempotencyStore(path=path)
    stored = again.lookup("user-a@securities-a", "post-dies-0001", "f1")
    assert stored is not None and stored.pending and stored.body is None
    with pytest.raises(ApiProblem) as refused:  # the claim keeps the request's fingerprint
        again.lookup("user-a@securities-a", "post-dies-0001", "f2")
    assert refused.value.code == "idempotency-key-reused"
    again.remember("user-a@securities-a", "post-dies-0001", "f1", 200, {"order_id": "o-1"},
                   durable=False)
    answered = IdempotencyStore(path=path).lookup("user-a@securities-a", "post-dies-0001", "f1")
    assert answered is not None and not answered.pending and answered.body == {"order_id": "o-1"}
    # the nonce a write carries: fixed per caller and key, 128 bits of hex
    nonce = nonce_for("user-a@securities-a", "post-dies-0001")
    assert nonce == nonce_for("user-a@securities-a", "post-dies-0001")
    assert len(nonce) == 32 and int(nonce, 16) >= 0
    assert nonce != nonce_for("user-b@securities-b", "post-dies-0001")
    assert nonce != nonce_for("user-a@securities-a", "post-dies-0002")

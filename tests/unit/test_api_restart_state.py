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


def _issuance_like_tx() -> object:
    from ledger.tx import OutPoint, Transaction, TxIn, TxOut

    return Transaction(1, (TxIn(OutPoint.from_txid("ab" * 32, 0)),),
                       (TxOut(600, b"\x51"), TxOut(0, b"\x6a\x02hi")), 0)


def test_recorded_transaction_survives_a_restart_and_is_checked(tmp_path: Path) -> None:
    """A transaction-sending write records its signed transaction with the claim
    before sending it (decision 0083): a new store finds that very transaction; a
    record that does not parse to its own txid is refused, never guessed at."""
    import asyncio
    import json

    from ledger.tx import Transaction
    from streams.api.chain_writes import recorded_tx

    tx = _issuance_like_tx()
    assert isinstance(tx, Transaction)
    path = tmp_path / "idempotency.jsonl"
    first = IdempotencyStore(path=path)
    first.begin("securities-a", "issue-dies-0001")
    asyncio.run(first.claim("securities-a", "issue-dies-0001", "f1"))
    claimed = first.lookup("securities-a", "issue-dies-0001", "f1")
    assert claimed is not None and claimed.recorded_tx is None  # nothing sent yet
    assert recorded_tx(claimed) is None
    asyncio.run(first.record_tx("securities-a", "issue-dies-0001", "f1", tx.txid,
                                tx.serialize().hex()))
    again = IdempotencyStore(path=path).lookup("securities-a", "issue-dies-0001", "f1")
    assert again is not None and again.pending
    resent = recorded_tx(again)
    assert resent is not None and resent.txid == tx.txid and resent == tx
    with pytest.raises(ApiProblem) as refused:
        IdempotencyStore(path=path).lookup("securities-a", "issue-dies-0001", "f2")
    assert refused.value.code == "idempotency-key-reused"
    # a record whose bytes are not its txid's transaction (a damaged file)
    lines = path.read_text(encoding="utf-8").splitlines()
    damaged = json.loads(lines[-1])
    damaged["body"]["tx"] = damaged["body"]["tx"][:-2] + "01"
    path.write_text("\n".join([*lines, json.dumps(damaged)]) + "\n", encoding="utf-8")
    with pytest.raises(ApiProblem) as unreadable:
        recorded_tx(IdempotencyStore(path=path).lookup("securities-a", "issue-dies-0001",
                                                       "f1"))
    assert unreadable.value.status == 409
    assert unreadable.value.code == "idempotency-record-unreadable"
    # answered: the answer, not the record, is what a retry gets from then on
    answered = IdempotencyStore(path=path)
    answered.remember("securities-a", "issue-dies-0001", "f1", 200, {"txid": tx.txid},
                      durable=False)
    final = IdempotencyStore(path=path).lookup("securities-a", "issue-dies-0001", "f1")
    assert final is not None and not final.pending and final.recorded_tx is None


def test_a_transaction_too_large_to_record_is_not_sent(tmp_path: Path) -> None:
    import asyncio

    from streams.api import idempotency

    store = IdempotencyStore(path=tmp_path / "idempotency.jsonl")
    store.begin("c", "pay-large-0001")
    asyncio.run(store.claim("c", "pay-large-0001", "f"))
    with pytest.raises(ApiProblem) as refused:
        asyncio.run(store.record_tx("c", "pay-large-0001", "f", "00" * 32,
                                    "ab" * idempotency.LINE_CHARS_MAX))
    assert (refused.value.status, refused.value.code) == (413, "transaction-too-large")
    kept = store.lookup("c", "pay-large-0001", "f")
    assert kept is not None and kept.pending and kept.recorded_tx is None

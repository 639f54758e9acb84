"""Writes that send a ledger transaction (issuance, a transfer): once per
Idempotency-Key, across a crash of the API process.

Owns: :func:`once_on_chain`. Decision 0083: the key is claimed (pending, fsynced)
before anything is built; the signed transaction is recorded with the claim (txid and
raw bytes, fsynced) *before* it goes to the broker; only then is it sent. A retry that
finds the claim with a recorded transaction never builds another one (which would
spend other coins and move the money twice): it answers from the projection when the
transaction is there, else sends that very transaction again — at most one copy can
commit, the copies spend the same outputs — and answers its outcome. A claim without
a recorded transaction means nothing was sent: the write runs afresh. An undecided
write (202) stays pending, so a later retry learns its outcome; a committed or a
rejected one is the key's answer from then on. The same key with another body is
refused (``idempotency-key-reused``, 422) before anything else.

Fault points for the tests (``CAPLEDGER_API_FAULT``, decision 0082): ``before-write``
kills the process once the transaction is recorded and before it is sent;
``after-write`` once the broker acknowledged it, before its outcome is known. Both
fire on a write's first sending only, never when a retry sends the recorded one again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ledger.errors import ValidationError
from ledger.tx import Transaction
from streams.api.auth import Principal
from streams.api.context import deps_of, projection, services
from streams.api.idempotency import Stored, keyed_write
from streams.api.problems import PROBLEM_MEDIA_TYPE, ApiProblem, problem_body
from streams.api.submission import PROJECTED_WAIT_S, Submitted
from streams.market.service import DUPLICATE_CODES  # a resent copy refused for its first

BeforeSend = Callable[[Transaction], Awaitable[None]]
AfterSend = Callable[[Transaction], None]
# the write: given the recorded transaction to send again (None: build one), the hook
# that records a transaction before it is sent and the one told once it was sent
Run = Callable[[Transaction | None, BeforeSend, AfterSend], Awaitable[Submitted]]
Answer = Callable[[str, int], dict[str, Any]]  # (txid, height) -> the committed answer
Refused = Callable[[Submitted], ApiProblem]  # a rejected transaction -> the problem


def fault_point(request: Request, name: str) -> None:
    """Tests only: the process dies here (SIGKILL) when started with this fault point
    (``CAPLEDGER_API_FAULT``); unset in any deployment."""
    if deps_of(request).fault_point == name:
        os.kill(os.getpid(), signal.SIGKILL)


def recorded_tx(stored: Stored | None) -> Transaction | None:
    """The transaction a pending claim recorded before sending it, checked: the file is
    input like any other, and a record that does not parse to its own txid is refused
    rather than guessed at (building another could move the money twice)."""
    found = None if stored is None else stored.recorded_tx
    if found is None:
        return None
    txid, raw = found
    try:
        tx = Transaction.parse(bytes.fromhex(raw))
    except (ValueError, ValidationError):
        tx = None
    if tx is None or tx.txid != txid:
        raise ApiProblem(409, "idempotency-record-unreadable",
                         "the transaction recorded for this Idempotency-Key is unreadable; "
                         "ask the operator to check the ledger for it")
    return tx


async def once_on_chain(request: Request, caller: Principal, run: Run, answer: Answer,
                        refused: Refused) -> JSONResponse:
    """Run a transaction-sending write once per Idempotency-Key (module docstring)."""
    store = services(request).idempotency
    write = keyed_write(store, caller.subject, request.headers.get("idempotency-key"),
                        request.method, request.url.path, await request.body())
    if write.answered is not None:
        return _response(write.answered.status, write.answered.body,
                         {"Idempotent-Replayed": "true"})
    key, print_, stored = write.key, write.print_, write.stored
    started_s = time.perf_counter()
    store.begin(caller.subject, key)
    try:
        if stored is None:
            await store.claim(caller.subject, key, print_)
        claimed_s = time.perf_counter()
        resend = recorded_tx(stored)

        async def record(tx: Transaction) -> None:
            if resend is None:
                await store.record_tx(caller.subject, key, print_, tx.txid,
                                      tx.serialize().hex())
                fault_point(request, "before-write")

        row = None if resend is None else await projection(request).tx(resend.txid)
        if row is not None:  # the first run's transaction committed: answer it
            sent = Submitted(row.txid, True, True, height=row.height)
        else:
            sent = await run(resend, record, lambda _: None if resend is not None
                             else fault_point(request, "after-write"))
        status, body = await _outcome(request, sent, resend is not None, answer, refused)
    finally:
        store.end(caller.subject, key)
    if status != 202:  # undecided: the claim stays pending, a retry learns the outcome
        store.remember(caller.subject, key, print_, status, body, durable=False)
    headers = {"Server-Timing": f"claim;dur={(claimed_s - started_s) * 1000:.1f}, "
                                f"write;dur={(time.perf_counter() - claimed_s) * 1000:.1f}"}
    if stored is not None:
        headers["Idempotent-Replayed"] = "true"
    return _response(status, body, headers)


async def _outcome(request: Request, sent: Submitted, resent: bool, answer: Answer,
                   refused: Refused) -> tuple[int, dict[str, Any]]:
    """The answer to a sent transaction, once the projection shows it if committed. A
    resent copy is rejected (``duplicate``) when the first copy committed before: the
    projection, waited on, tells; until it does, the write is pending (202)."""
    found = projection(request)
    if sent.committed and sent.height is not None:
        await found.wait_for_tx(sent.txid, timeout_s=PROJECTED_WAIT_S)
        return 200, answer(sent.txid, sent.height)
    if resent and await found.wait_for_tx(sent.txid, timeout_s=PROJECTED_WAIT_S):
        row = await found.tx(sent.txid)
        assert row is not None
        return 200, answer(sent.txid, row.height)
    if not sent.decided or (resent and sent.code in DUPLICATE_CODES):
        return 202, {"txid": sent.txid, "status": "pending"}
    problem = refused(sent)
    return problem.status, problem_body(problem.status, problem.code, problem.detail,
                                        **problem.extra)


def _response(status: int, body: Any, headers: dict[str, str]) -> JSONResponse:
    if status >= 400:
        return JSONResponse(body, status_code=status, headers=headers,
                            media_type=PROBLEM_MEDIA_TYPE)
    return JSONResponse(body, status_code=status, headers=headers)

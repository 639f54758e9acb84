"""What a request handler may use: the running services and the caller.

Owns: :class:`ApiDeps` (what the app factory is given: the projection DSN, Kafka
bootstrap and topic prefix, genesis, access file, clock, the market service),
:class:`Services` (what the lifespan starts from them), and the FastAPI dependencies
``services`` and ``principal`` / ``writer`` / ``reader`` that refuse with a problem
when something is missing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, Request

from ledger.membership import Genesis
from streams.api.auth import AccessConfig, Principal, SignInGuard, authenticate, check_token
from streams.api.idempotency import IdempotencyStore
from streams.api.problems import ApiProblem

BASIC_CHARS_MAX = 1024
BASIC_CHECKED_S = 60.0
BASIC_CHECKED_MAX = 1_000
SESSIONS_MAX = 10_000


@dataclass(frozen=True, slots=True)
class ApiDeps:
    """Everything the API depends on, passed in (no globals, no environment reads)."""

    dsn: str
    bootstrap: str
    genesis: Genesis
    access: AccessConfig
    topic_prefix: str = ""
    clock_s: Callable[[], float] = time.time
    # The market service runs in this process when given: built in the lifespan (its
    # Kafka clients need the running loop), started and stopped with the API.
    market_factory: Callable[[], Any] | None = None
    accounts: Any = None  # streams.market.accounts directory of custodial accounts
    submit_wait_s: float = 20.0
    # koscom's identity key: signs the envelope of every transaction the API submits
    # (intake refuses an unsigned one, decision 0060). None: the API submits nothing.
    submit_key: Any = None  # ledger.keys.PrivateKey
    start_kafka: bool = True  # unit tests build the app without a broker
    # The API's own state directory (the access directory): the idempotency store's
    # file lives there, so a restart replays answers it gave. None: in memory only.
    state_dir: Path | None = None
    # Tests only: a named point where the process kills itself (SIGKILL), to prove a
    # write survives dying between Kafka's acknowledgement and the answer. From
    # CAPLEDGER_API_FAULT: "after-write" (acknowledged, not answered) or "before-write"
    # (a ledger transaction recorded, not sent; decision 0083).
    fault_point: str | None = None


@dataclass(slots=True)
class Services:
    """What the lifespan started; None until then (requests get ``not-ready``)."""

    projection: Any = None  # streams.api.projection.Projection
    ledger: Any = None  # streams.client.ledger_client.LedgerClient
    status: Any = None  # streams.client.status.StatusWatcher
    status_error: str | None = None
    market: Any = None  # streams.market.service.MarketService
    # the market projector's committed positions, pushed by its NOTIFY (with market)
    watch: Any = None  # streams.api.market_reads.ProjectedWatch
    idempotency: IdempotencyStore = field(default_factory=IdempotencyStore)
    sign_in_guard: SignInGuard = field(default_factory=SignInGuard)
    # HMAC of a checked Basic header -> (principal, checked at): JSON-RPC clients send
    # their key and secret on every call; scrypt runs once a minute per client, not per call.
    basic_checked: dict[bytes, tuple[Principal, float]] = field(default_factory=dict)
    # Custodial users' sessions opened in this process: token subject -> the market's
    # principal (only it may use the user's key). A cache: after a restart the sealed
    # session in the bearer token resumes it (decision 0081).
    sessions: dict[str, Any] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started_at_s: float = 0.0

    def remember_session(self, subject: str, holder: Any) -> None:
        if len(self.sessions) >= SESSIONS_MAX:
            self.sessions.clear()
        self.sessions[subject] = holder


def deps_of(request: Request) -> ApiDeps:
    deps: ApiDeps = request.app.state.deps
    return deps


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def projection(request: Request) -> Any:
    found = services(request).projection
    if found is None:
        raise ApiProblem(503, "not-ready", "the projection database is not connected yet")
    return found


def ledger_client(request: Request) -> Any:
    found = services(request).ledger
    if found is None:
        raise ApiProblem(503, "not-ready", "the Kafka writer is not started")
    return found


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiProblem(401, "token-missing", "send Authorization: Bearer <access_token>",
                         headers={"WWW-Authenticate": 'Bearer realm="capital-ledger"'})
    return value.strip()


def principal(request: Request) -> Principal:
    deps = deps_of(request)
    return check_token(_bearer(request), deps.access.token_key, now_s=int(deps.clock_s()))


def writer(caller: Principal = Depends(principal)) -> Principal:  # noqa: B008
    if not caller.may_write:
        raise ApiProblem(403, "read-only-scope", f"scope {caller.scope!r} may only read")
    return caller


def market_principal(request: Request, caller: Principal) -> Any:
    """The market's principal of a signed-in custodial user: from this process's cache,
    else resumed from the sealed session the bearer token carries (so an API restart
    keeps the session); 401 ``session-expired`` when neither opens."""
    if caller.kind != "user" or caller.scope != "user":
        raise ApiProblem(403, "custodial-user-only",
                         "only the account's own user signs with its custodial key")
    found = services(request)
    holder = found.sessions.get(caller.subject)
    if holder is None:
        from streams.api.custody import resume_session

        deps = deps_of(request)
        if deps.accounts is not None:
            holder = resume_session(deps.access.token_key, deps.accounts, caller.subject,
                                    caller.session)
        if holder is None:
            raise ApiProblem(401, "session-expired", "sign in again to use your custodial key")
        found.remember_session(caller.subject, holder)
    return holder


def basic_credentials(request: Request, *, realm: str) -> tuple[str, str]:
    """(name, secret) of an HTTP Basic header; 401 ``credentials-missing`` otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    missing = ApiProblem(401, "credentials-missing", "send HTTP Basic credentials",
                         headers={"WWW-Authenticate": f'Basic realm="{realm}"'})
    if scheme.lower() != "basic" or not value or len(value) > BASIC_CHARS_MAX:
        raise missing
    try:
        name, sep, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise missing from None
    if not sep:
        raise missing
    return name, secret


def basic_client(request: Request, *, realm: str) -> Principal:
    """The API client whose key and secret are in the Basic header (failed attempts
    bounded per name; a checked header remembered for ``BASIC_CHECKED_S``)."""
    deps = deps_of(request)
    found = services(request)
    name, secret = basic_credentials(request, realm=realm)
    now_s = deps.clock_s()
    digest = hmac.new(deps.access.token_key, f"{name}:{secret}".encode(), "sha256").digest()
    remembered = found.basic_checked.get(digest)
    if remembered is not None and now_s - remembered[1] < BASIC_CHECKED_S:
        return remembered[0]
    found.sign_in_guard.check(name, now_s)
    try:
        identity = authenticate(deps.access, "client", name, secret)
    except ApiProblem:
        found.sign_in_guard.failed(name, now_s)
        raise
    holder = Principal(identity.name, "client", identity.scope, identity.firm,
                       identity.accounts, int(now_s))
    if len(found.basic_checked) >= BASIC_CHECKED_MAX:
        found.basic_checked.clear()
    found.basic_checked[digest] = (holder, now_s)
    return holder


def check_network(request: Request) -> None:
    """The optional ``network`` header names the chain (seed PoC clients send it)."""
    network = request.headers.get("network")
    if network is None:
        return
    deps = deps_of(request)
    if network not in (deps.genesis.chain_id, "testnet", "mainnet", "regtest"):
        raise ApiProblem(400, "network-unknown",
                         f"network {network[:64]!r} is not this chain ({deps.genesis.chain_id})")

"""The API server's FastAPI application, built from its dependencies.

Owns: :func:`create_app` (middleware, problem handlers, routers, the OpenAPI document
at ``/api/openapi.json``), the lifespan that starts and stops the services (the
projection pool, the Kafka writer and outcome watcher, the heartbeat watcher), the
token endpoints (``POST /oauth2/token``, ``POST /v1/oauth2/token``, ``POST
/api/login``), ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel, Field

from streams.api import account_routes, chain_routes, market_routes, rpc, seed_v1
from streams.api.auth import Principal, authenticate, mint_token, principal_of
from streams.api.context import ApiDeps, Services, basic_credentials, deps_of, services
from streams.api.middleware import BodyLimit, RequestMetrics, SecurityHeaders
from streams.api.problems import ApiProblem, install_problem_handlers

OPENAPI_PATH = "/api/openapi.json"
STATIC_DIR = Path(__file__).resolve().parent / "static"
API_VERSION = "1.0.0"
STATUS_POLL_MS = 250
FORM_CHARS_MAX = 4096
logger = logging.getLogger("capledger.api")


class TokenAnswer(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    scope: str


class Login(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


def _token(deps: ApiDeps, holder: Principal) -> TokenAnswer:
    now_s = int(deps.clock_s())
    ttl = deps.access.token_ttl_s
    token = mint_token(holder, deps.access.token_key, now_s=now_s, ttl_s=ttl)
    return TokenAnswer(access_token=token, expires_in=ttl, scope=holder.scope)


def _sign_in(request: Request, kind: str, name: str, secret: str) -> Principal:
    """A custodial user (the market's custody store checks the password and the API
    keeps the market's principal for the session), else an access-file identity.
    Failed attempts per name are bounded (``SignInGuard``)."""
    deps = deps_of(request)
    guard = services(request).sign_in_guard
    now_s = deps.clock_s()
    guard.check(name, now_s)
    try:
        holder = _check_credentials(request, kind, name, secret)
    except ApiProblem:
        guard.failed(name, now_s)
        raise
    guard.succeeded(name)
    return holder


def _check_credentials(request: Request, kind: str, name: str, secret: str) -> Principal:
    deps = deps_of(request)
    if deps.accounts is not None:
        from streams.api.custody import custody_login, seal_session

        market_principal = custody_login(deps.accounts, name, secret)
        if market_principal is not None:
            subject = f"{market_principal.user_id}@{market_principal.firm}"
            services(request).remember_session(subject, market_principal)
            return Principal(subject, "user", "user", market_principal.firm, (subject,),
                             session=seal_session(deps.access.token_key, market_principal))
    identity = authenticate(deps.access, kind, name, secret)
    return principal_of(identity, now_s=int(deps.clock_s()), ttl_s=deps.access.token_ttl_s)


async def client_credentials_token(request: Request) -> TokenAnswer:
    """OAuth2 client credentials (RFC 6749 4.4): HTTP Basic key:secret, form body
    ``grant_type=client_credentials``. A custodial user's key is ``user@firm``."""
    deps = deps_of(request)
    body = (await request.body())[:FORM_CHARS_MAX].decode("utf-8", "replace")
    form = parse_qs(body)
    if form.get("grant_type") != ["client_credentials"]:
        raise ApiProblem(400, "unsupported-grant-type",
                         "send the form body grant_type=client_credentials",
                         error="unsupported_grant_type")
    name, secret = basic_credentials(request, realm="capital-ledger")
    return _token(deps, _sign_in(request, "client", name, secret))


async def _run_status(found: Services) -> None:
    while True:
        try:
            await found.status.poll(timeout_ms=STATUS_POLL_MS)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a broker hiccup: report it, keep watching
            found.status_error = f"{type(error).__name__}: {error}"
            await asyncio.sleep(STATUS_POLL_MS / 1000)


# A settlement left unfinished (the process stopped after sending its DvP, or a
# request ended without the ledger's verdict: brokers away) is tried again after these
# pauses, doubling up to the last; with none left, the check runs at the last.
FINISH_RETRY_FIRST_S = 5.0
FINISH_RETRY_MAX_S = 60.0


async def _finish_settlements(market: Any, *,
                              sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                              first_pause_s: float = FINISH_RETRY_FIRST_S,
                              max_pause_s: float = FINISH_RETRY_MAX_S) -> None:
    """Settlements whose DvP was sent but not confirmed are finished with no request
    needed: at start (decision 0132), then whenever one is left (decision 0133)."""
    pause = first_pause_s
    while True:
        if market.left_unfinished():
            try:
                finished = await market.finish_settlements()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # brokers away: try again after the pause
                logger.warning("unfinished settlements not finished: %s: %s",
                               type(error).__name__, error)
                finished = []
            if finished:
                logger.warning("finished %d settlement(s) left unconfirmed: %s",
                               len(finished), ", ".join(finished))
        left = market.left_unfinished()
        if left:
            logger.warning("%d settlement(s) unfinished, tried again in %.0f s: %s",
                           len(left), pause, ", ".join(left))
            await sleep(pause)
            pause = min(pause * 2, max_pause_s)
        else:
            pause = first_pause_s
            await sleep(max_pause_s)


async def start_services(deps: ApiDeps, found: Services) -> None:
    from streams.api.projection import Projection

    found.started_at_s = deps.clock_s()
    if deps.state_dir is not None:
        from streams.api.idempotency import IDEMPOTENCY_FILE, IdempotencyStore

        found.idempotency = IdempotencyStore(path=deps.state_dir / IDEMPOTENCY_FILE)
    found.projection = Projection(deps.dsn)
    await found.projection.open()
    if not deps.start_kafka:
        return
    if deps.market_factory is not None:
        from streams.api.market_reads import ProjectedWatch

        found.market = deps.market_factory()
        await found.market.start()
        found.tasks.append(asyncio.create_task(_finish_settlements(found.market),
                                               name="api-unfinished-settlements"))
        found.watch = ProjectedWatch(deps.dsn)
        found.tasks.append(asyncio.create_task(found.watch.run(), name="api-projected"))
    from streams.client.ledger_client import LedgerClient
    from streams.client.status import StatusWatcher

    if deps.submit_key is not None:
        client = LedgerClient(deps.bootstrap, deps.genesis, submitter="koscom",
                              signing_key=deps.submit_key, topic_prefix=deps.topic_prefix)
        await client.start()
        found.ledger = client
    else:
        logger.warning("no koscom key: the API will not submit transactions")
    watcher = StatusWatcher(deps.bootstrap, topic_prefix=deps.topic_prefix)
    try:
        await watcher.start()
        found.status = watcher
        found.tasks.append(asyncio.create_task(_run_status(found), name="api-status"))
    except Exception as error:
        found.status_error = str(error)


async def stop_services(found: Services) -> None:
    if found.market is not None:
        with contextlib.suppress(Exception):
            await found.market.stop()
    for task in found.tasks:
        task.cancel()
    await asyncio.gather(*found.tasks, return_exceptions=True)
    for part in (found.status, found.ledger):
        if part is not None:
            with contextlib.suppress(Exception):
                await part.stop()
    if found.projection is not None:
        await found.projection.close()


async def _market_lag(found: Services) -> int:
    from streams.api.market_reads import MarketReads

    projected = await MarketReads(found.projection).offsets()
    return sum(max(0, end - projected.get(topic, 0))
               for topic, end in dict(found.market.written_ends).items())


def _install_metrics(app: FastAPI, registry: CollectorRegistry) -> None:
    height = Gauge("capledger_api_projected_height", "Height of the projection's head",
                   registry=registry)
    age = Gauge("capledger_api_projection_age_seconds",
                "Seconds since the projection's head block was made", registry=registry)
    lag = Gauge("capledger_api_projection_lag_blocks",
                "Highest height a node reports minus the projected height", registry=registry)
    node_lag = Gauge("capledger_api_node_consumer_lag_records",
                     "Records of the ledger's logs a node has not consumed yet (Kafka lag, "
                     "from its latest heartbeat)", ["institution"], registry=registry)
    market_lag = Gauge("capledger_api_market_projection_lag_records",
                       "Market records this server wrote that the market projection has "
                       "not shown yet", registry=registry)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        found = services(request)
        if found.projection is not None:
            with contextlib.suppress(Exception):
                head = await found.projection.head()
                if head is not None:
                    height.set(head.height)
                    age.set(max(0.0, time.time() - head.time_at.timestamp()))
                    beats = list(found.status.latest.values()) if found.status else []
                    top = max((beat.height for beat in beats), default=head.height)
                    lag.set(max(0, top - head.height))
                    members = deps_of(request).genesis
                    for beat in beats:  # members only: a label per name a record brings
                        if members.member(beat.institution) is not None:
                            node_lag.labels(beat.institution).set(max(0, beat.consumer_lag))
            if found.market is not None:
                with contextlib.suppress(Exception):
                    market_lag.set(await _market_lag(found))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _install_core_routes(app: FastAPI) -> None:
    token_doc = {"requestBody": {"content": {"application/x-www-form-urlencoded": {
        "schema": {"type": "object", "required": ["grant_type"],
                   "properties": {"grant_type": {"enum": ["client_credentials"]}}}}}}}
    for path in ("/oauth2/token", "/v1/oauth2/token"):
        app.post(path, response_model=TokenAnswer, tags=["auth"], openapi_extra=token_doc,
                 operation_id="token" + path.replace("/", "_").replace(".", ""))(
            client_credentials_token)

    @app.post("/api/login", response_model=TokenAnswer, tags=["auth"])
    async def login(request: Request, body: Login) -> TokenAnswer:
        return _token(deps_of(request),
                      _sign_in(request, "user", body.username, body.password))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        found = services(request)
        checks: dict[str, str] = {}
        try:
            ok = found.projection is not None and await found.projection.ping()
            checks["projection"] = "ok" if ok else "not connected"
        except Exception as error:
            checks["projection"] = f"{type(error).__name__}"
        deps = deps_of(request)
        checks["kafka"] = "ok" if found.ledger is not None or not deps.start_kafka else "down"
        if any(value != "ok" for value in checks.values()):
            raise ApiProblem(503, "not-ready", "a dependency is not ready", checks=checks)
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")


def create_app(deps: ApiDeps) -> FastAPI:
    """The API server for ``deps``; its services start with the ASGI lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        found: Services = app.state.services
        try:
            await start_services(deps, found)
            yield
        finally:
            await stop_services(found)

    app = FastAPI(title="capital-ledger platform API", version=API_VERSION,
                  openapi_url=OPENAPI_PATH, docs_url="/api/docs", redoc_url=None,
                  lifespan=lifespan)
    app.state.deps = deps
    app.state.services = Services()
    registry = CollectorRegistry()
    install_problem_handlers(app)
    _install_core_routes(app)
    _install_metrics(app, registry)
    app.include_router(chain_routes.router)
    app.include_router(rpc.router)
    app.include_router(seed_v1.router)
    app.include_router(market_routes.router)
    app.include_router(account_routes.router)
    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
    app.add_middleware(RequestMetrics, registry=registry)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit)
    return app


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (the same for every deployment; docs/openapi.json is a copy)."""
    from typing import cast

    document: dict[str, Any] = create_app(cast(ApiDeps, None)).openapi()
    return document

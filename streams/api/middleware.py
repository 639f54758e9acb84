"""ASGI middleware of the API: the request body limit and request metrics.

Owns: :class:`BodyLimit` (a body over ``BODY_BYTES_MAX`` is refused with 413
``body-too-large`` before a handler sees it, whether or not it declares its length)
and :class:`RequestMetrics` (Prometheus request counts and latencies per route
template, so ids in paths do not explode the label set).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from streams.api.problems import PROBLEM_MEDIA_TYPE, problem_body

# A transaction is at most 1 MB (ledger.tx.TX_BYTES_MAX): 2 MB of hex plus JSON framing.
BODY_BYTES_MAX = 2 * 1024 * 1024 + 16 * 1024
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    pass


async def _send_problem(send: Send, status: int, code: str, detail: str, path: str) -> None:
    body = json.dumps(problem_body(status, code, detail, path)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: App, *, bytes_max: int = BODY_BYTES_MAX) -> None:
        self.app = app
        self.bytes_max = bytes_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request bodies are limited to {self.bytes_max} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit()
                                              or int(value) > self.bytes_max):
                await _send_problem(send, 413, "body-too-large", detail, scope["path"])
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.bytes_max:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_problem(send, 413, "body-too-large", detail, scope["path"])


class RequestMetrics:
    def __init__(self, app: App, *, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("capledger_api_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("capledger_api_request_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=LATENCY_BUCKETS_S,
                                 registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.requests.labels(method, template, str(status[0])).inc()
            self.latency.labels(method, template).observe(time.perf_counter() - started)


UI_PATH_PREFIX = "/ui"
UI_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_COMMON_HEADERS = ((b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer"),
                   (b"x-frame-options", b"DENY"))


class SecurityHeaders:
    """nosniff, no referrer and no framing on every answer; the UI's pages also get a
    content security policy that allows only this origin's own scripts and styles."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_COMMON_HEADERS)
        if str(scope.get("path", "")).startswith(UI_PATH_PREFIX):
            extra.append((b"content-security-policy", UI_CONTENT_SECURITY_POLICY.encode()))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)

"""Refusals as RFC 9457 problem documents (``application/problem+json``).

Owns: :class:`ApiProblem` (raise it anywhere in a handler: status, a stable
machine-readable ``code``, a human ``detail``) and the exception handlers that turn it,
FastAPI's validation errors and unexpected errors into problem responses. Every
refusal the API gives goes through here, so each carries one specific code.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://capital-ledger.example/problems/"
DETAIL_CHARS_MAX = 500

logger = logging.getLogger("capledger.api")

_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}
_STARLETTE_CODES = {404: "not-found", 405: "method-not-allowed"}


class ApiProblem(Exception):
    """A refusal: HTTP ``status``, stable ``code`` (kebab-case), human ``detail``."""

    def __init__(self, status: int, code: str, detail: str, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(f"{status} {code}: {detail}")
        assert 400 <= status <= 599 and code, (status, code)
        self.status = status
        self.code = code
        self.detail = detail[:DETAIL_CHARS_MAX]
        self.headers = headers or {}
        self.extra = extra


def problem_body(status: int, code: str, detail: str, instance: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(status: int, code: str, detail: str, *, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(problem_body(status, code, detail, instance, **extra), status_code=status,
                        media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiProblem)
    async def on_problem(request: Request, error: ApiProblem) -> JSONResponse:
        return problem_response(error.status, error.code, error.detail,
                                instance=request.url.path, headers=error.headers,
                                **error.extra)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(part) for part in item.get("loc", ())),
             "message": str(item.get("msg", ""))[:200]}
            for item in error.errors()[:10]
        ]
        return problem_response(422, "request-invalid", "the request does not match the schema",
                                instance=request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _STARLETTE_CODES.get(error.status_code, f"http-{error.status_code}")
        return problem_response(error.status_code, code, str(error.detail),
                                instance=request.url.path)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # Logged with its type only: a request body may hold secrets.
        logger.error("unexpected %s on %s %s", type(error).__name__, request.method,
                  request.url.path)
        return problem_response(500, "internal", "unexpected error; nothing was written",
                                instance=request.url.path)

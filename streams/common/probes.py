"""The HTTP port a supervisor and Prometheus probe: ``/metrics``, ``/healthz``, ``/readyz``.

Owns: ``ProbeServer``, a deliberately small HTTP/1.0 responder on the process's own
asyncio loop (no thread, no framework): it reads one request line and its headers
(bounded in bytes and time), answers GET for the three paths and closes the connection.
Anything else gets 404/405/400; a slow or oversized request is dropped. Long-running
processes (``capledger node``, ``capledger project --follow``) run one when a metrics
port is configured (``CAPLEDGER_METRICS_PORT`` / ``--metrics-port``; off by default,
docs/decisions/0102-operable-nodes-clock-skew-full-disk.md).

- ``/metrics``: the process's own ``CollectorRegistry`` in Prometheus text format.
- ``/healthz``: liveness. 200 while the event loop answers at all (a wedged loop does
  not answer, which is what a supervisor must see).
- ``/readyz``: readiness, from the caller's check: 200 ``ready`` or 503 with the reason
  on one line (e.g. ``not-ready: broker-unreachable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger("capledger.probes")

REQUEST_BYTES_MAX = 8 * 1024
REQUEST_TIMEOUT_S = 5.0
HEADER_LINES_MAX = 64


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` answers: ready, or the reason (a short machine-readable code)."""

    ready: bool
    reason: str = ""


class ProbeServer:
    """Serves ``registry`` and the two probes on ``host:port`` until ``stop``."""

    def __init__(self, registry: CollectorRegistry, readiness: Callable[[], Readiness], *,
                 host: str, port: int, before_scrape: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port = port
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=REQUEST_BYTES_MAX)
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])  # port 0: the one chosen
        logger.info("metrics and probes on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT_S)
            status, content_type, body = self.answer(path)
            writer.write(_response(status, content_type, body))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a hostile or broken client: drop it, serve the next
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def answer(self, request: tuple[str, str]) -> tuple[str, str, bytes]:
        """(status line, content type, body) for (method, path)."""
        method, path = request
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            return "404 Not Found", "text/plain", b"not-found\n"
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"method-not-allowed\n"
        if path == "/healthz":
            return "200 OK", "text/plain", b"alive\n"
        if path == "/readyz":
            state = self.readiness()
            if state.ready:
                return "200 OK", "text/plain", b"ready\n"
            return ("503 Service Unavailable", "text/plain",
                    f"not-ready: {state.reason}\n".encode())
        if self.before_scrape is not None:
            self.before_scrape()
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = (await reader.readline()).decode("latin-1").strip()
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    for _ in range(HEADER_LINES_MAX):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            return parts[0], parts[1]
    raise ValueError("too many header lines")


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body

"""Helpers of the operability tests: free ports, and reading a process's probe port.

Owns: ``free_port``; ``Probe`` (GET ``/metrics``, ``/healthz``, ``/readyz`` of one
process over real HTTP, parsing the metrics with prometheus_client's own parser).
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

HTTP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Probe:
    """One process's probe port."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.base = f"http://{host}:{port}"

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=HTTP_TIMEOUT_S) as answer:
                return int(answer.status), answer.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode()

    async def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body); raises OSError when nothing listens."""
        return await asyncio.to_thread(self._get, path)

    async def metrics(self) -> dict[str, float]:
        """Every sample as ``name{label="v",...}`` (labels sorted) -> value."""
        status, body = await self.get("/metrics")
        assert status == 200, body
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())
                                  if k != "institution")
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    async def answers(self) -> bool:
        try:
            await self.get("/healthz")
        except OSError:
            return False
        return True


async def wait_for(check: Callable[[], Awaitable[str | None]], *, timeout_s: float,
                   what: str, interval_s: float = 0.2) -> float:
    """Poll the async ``check`` (None = done, else what is missing) until done; the
    seconds it took. TimeoutError names ``what`` and the last answer."""
    started = time.monotonic()
    last: str | None = "never checked"
    while True:
        try:
            last = await check()
        except OSError as error:  # the port is not open yet
            last = f"{type(error).__name__}: {error}"
        if last is None:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not reached within {timeout_s} s: {last}")
        await asyncio.sleep(interval_s)

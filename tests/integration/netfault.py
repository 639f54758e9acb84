"""Network faults the test controls: a TCP proxy per route, cut and healed at will.

Owns: ``TcpProxy`` (an asyncio relay from a loopback port to a broker listener, run in
the test's event loop) and ``NodeRoutes`` (one proxy per node and broker, plus the
``extra-listeners.json`` that makes each broker advertise the node's proxy, so
every byte between that node and the brokers goes through its proxies); and, between
the brokers themselves, ``BrokerRoutes`` (two proxies per ordered pair of brokers,
replication and controller, served by a ``ProxyThread``, plus the ``peer-routes.json``
that points each broker's inter-broker listener and controller voters at them).

Why a proxy and not iptables: no iptables/nft here, and rules on loopback would touch
every engineer's processes on the machine. Why a listener per node: a Kafka client
connects to the addresses the broker *advertises*, not only to its bootstrap; a proxy
in front of the shared listener would be bypassed after the first metadata answer.
Each broker therefore gets one more listener per node (same TLS + SCRAM), advertised at
that node's proxy port; the broker certificate names 127.0.0.1, so host name
verification holds (docs/decisions/0100).

A cut is a black hole, like a pulled cable: established connections stay open but no
byte passes either way and new connections are accepted and left silent, so the
node sees time-outs, not refusals. Healing closes the stalled connections (as the
kernel's TCP time-out eventually would) and relays again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELAY_CHUNK_BYTES = 64 * 1024
# Ports: node j (0-based) in front of broker i (1-based) listens on
# base + 10 * (i - 1) + j; the broker's own listener for that node is at +100.
ROUTE_STRIDE = 10
LISTENER_OFFSET = 100
# Between brokers, per ordered pair: replication listener and proxy, controller listener
# and proxy.
PEER_PORTS_PER_ROUTE = 4
THREAD_STOP_TIMEOUT_S = 10.0


class TcpProxy:
    """Relays 127.0.0.1:``port`` to 127.0.0.1:``upstream_port`` until cut."""

    def __init__(self, port: int, upstream_port: int, name: str) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.name = name
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if not cut:
            self._close_all()  # stalled connections die; clients reconnect

    def _close_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(RELAY_CHUNK_BYTES)
                if not data:
                    break
                while self.cut:  # black hole: hold the bytes, pass nothing
                    await asyncio.sleep(0.05)
                    if sink.transport.is_closing():
                        return
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.transport.abort()


@dataclass
class NodeRoutes:
    """Per node, one proxy in front of each broker; ``cut``/``heal`` a node's routes."""

    base_port: int
    institutions: tuple[str, ...]
    broker_ids: tuple[int, ...]
    proxies: dict[str, list[TcpProxy]] = field(default_factory=dict)

    def _port(self, broker_id: int, index: int) -> int:
        return self.base_port + ROUTE_STRIDE * (broker_id - 1) + index

    def listener_name(self, index: int) -> str:
        return f"ROUTE{index}"

    def write_listeners(self, kafka_state_dir: Path) -> None:
        """The brokers' extra listeners: per node, listen at port + LISTENER_OFFSET,
        advertise the node's proxy port (read when the brokers render their config)."""
        entries = []
        for index, _ in enumerate(self.institutions):
            ports = {str(b): self._port(b, index) for b in self.broker_ids}
            entries.append({"name": self.listener_name(index),
                            "listen": {b: p + LISTENER_OFFSET for b, p in ports.items()},
                            "advertise": ports})
        kafka_state_dir.mkdir(parents=True, exist_ok=True)
        (kafka_state_dir / "extra-listeners.json").write_text(json.dumps(entries, indent=1))

    async def start(self) -> None:
        for index, institution in enumerate(self.institutions):
            self.proxies[institution] = []
            for broker_id in self.broker_ids:
                port = self._port(broker_id, index)
                proxy = TcpProxy(port, port + LISTENER_OFFSET, f"{institution}->{broker_id}")
                await proxy.start()
                self.proxies[institution].append(proxy)

    async def stop(self) -> None:
        for proxies in self.proxies.values():
            for proxy in proxies:
                await proxy.stop()

    def bootstrap(self, institution: str) -> str:
        index = self.institutions.index(institution)
        return ",".join(f"127.0.0.1:{self._port(b, index)}" for b in self.broker_ids)

    def node_env(self) -> dict[str, dict[str, str]]:
        return {name: {"CAPLEDGER_KAFKA_BOOTSTRAP": self.bootstrap(name)}
                for name in self.institutions}

    def cut(self, institution: str) -> None:
        for proxy in self.proxies[institution]:
            proxy.set_cut(True)

    def heal(self, institution: str) -> None:
        for proxy in self.proxies[institution]:
            proxy.set_cut(False)


# ------------------------------------------------------------- between the brokers


class ProxyThread:
    """Proxies served by an event loop of their own, in a thread: the routes between
    brokers must relay from before the brokers start (a KRaft quorum forms through them)
    until after they stop, outliving any test's event loop."""

    def __init__(self, proxies: list[TcpProxy]) -> None:
        self.proxies = proxies
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxies",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._run(self._start_all())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(THREAD_STOP_TIMEOUT_S)

    def set_cut(self, proxies: list[TcpProxy], cut: bool) -> None:
        async def apply() -> None:
            for proxy in proxies:
                proxy.set_cut(cut)

        self._run(apply())

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(THREAD_STOP_TIMEOUT_S)

    async def _start_all(self) -> None:
        for proxy in self.proxies:
            await proxy.start()

    async def _stop_all(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()


@dataclass
class BrokerRoutes:
    """Every ordered pair of brokers (i, j), i != j, through two proxies: i's
    replication fetches from j and i's controller traffic to j (KRaft votes, fetches,
    broker heartbeats). ``isolate(b)`` black-holes every route from or to broker b;
    clients still reach every broker directly (the cut is between the brokers).
    The brokers learn the routes from ``peer-routes.json`` (streams/tools/devstack/
    kafka.py, ``PEER_ROUTES_FILE``)."""

    base_port: int
    broker_ids: list[int]
    routes: dict[tuple[int, int], list[TcpProxy]] = field(default_factory=dict)
    _thread: ProxyThread | None = None

    def ports(self, source: int, target: int) -> tuple[int, int, int, int]:
        """(replication listen, replication proxy, controller listen, controller proxy)
        of the route source -> target."""
        count = len(self.broker_ids)
        first = self.base_port + PEER_PORTS_PER_ROUTE * ((source - 1) * count + target - 1)
        return first, first + 1, first + 2, first + 3

    def write_routes(self, kafka_state_dir: Path) -> None:
        entries = []
        for source in self.broker_ids:
            for target in self.broker_ids:
                listen, replication, controller_listen, controller = self.ports(source, target)
                if source == target:  # a broker's own listeners, direct
                    replication, controller = listen, controller_listen
                entries.append({"from": source, "to": target, "listen": listen,
                                "replication": replication,
                                "controller_listen": controller_listen,
                                "controller": controller})
        kafka_state_dir.mkdir(parents=True, exist_ok=True)
        (kafka_state_dir / "peer-routes.json").write_text(json.dumps(entries, indent=1))

    def start(self) -> None:
        for source in self.broker_ids:
            for target in self.broker_ids:
                if source == target:
                    continue
                listen, replication, controller_listen, controller = self.ports(source, target)
                self.routes[(source, target)] = [
                    TcpProxy(replication, listen, f"{source}->{target} replication"),
                    TcpProxy(controller, controller_listen, f"{source}->{target} controller")]
        self._thread = ProxyThread([p for pair in self.routes.values() for p in pair])
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()

    def _of(self, broker_id: int) -> list[TcpProxy]:
        return [proxy for (source, target), pair in self.routes.items()
                if broker_id in (source, target) for proxy in pair]

    def isolate(self, broker_id: int) -> None:
        assert self._thread is not None
        self._thread.set_cut(self._of(broker_id), True)

    def heal(self, broker_id: int) -> None:
        assert self._thread is not None
        self._thread.set_cut(self._of(broker_id), False)

    def connections(self) -> int:
        return sum(proxy.connections for pair in self.routes.values() for proxy in pair)

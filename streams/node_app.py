"""The faust-streaming worker that hosts one institution's ledger node.

Owns: the faust ``App`` per institution (its own app id, hence its own consumer group
and identity), with
- ``run_node`` (task): the consensus pipeline of ``streams.node.LedgerNode`` — intake,
  proposer, validator, committer and view change — reading the ordered logs with
  plain aiokafka readers (why: docs/decisions/0030-node-pipeline.md);
- ``report_status`` (timer): the heartbeat on ``ledger.status.v1`` (institution,
  height, head hash, state hash, tx-log lag, version);
- ``watch_peers`` (agent): reads every institution's heartbeat in batches and warns
  when a peer disagrees with this node at the same height or falls silent.

Imports: faust, ``streams.node``, ``streams.codec``, ``streams.topics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust

from streams import codec
from streams.node import LedgerNode, NodeHalted, NodeSettings, now_ms
from streams.records import millis
from streams.topics import STATUS, faust_settings

log = logging.getLogger("capledger.node")

STATUS_INTERVAL_S = 1.0
PEER_SILENT_MS = 5_000
EXIT_HALTED = 70


def build_app(settings: NodeSettings) -> tuple[faust.App, LedgerNode]:
    node = LedgerNode(settings)
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"capledger-{settings.topic_prefix}{settings.institution}",
        broker=f"kafka://{settings.bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        datadir=str(settings.node_dir / "faust"),
        consumer_auto_offset_reset="latest",
        **faust_settings(),
    )
    status_topic = app.topic(
        settings.topic(STATUS.name), key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )
    peers: dict[str, dict[str, Any]] = {}
    warned: set[tuple[str, int]] = set()

    @app.agent(status_topic)
    async def watch_peers(stream: Any) -> None:
        async for batch in stream.take(100, within=STATUS_INTERVAL_S):
            for value in batch:
                try:
                    record = codec.decode(value, expected="NodeStatusReported").record
                except Exception:  # a bad heartbeat is someone else's problem: skip it
                    continue
                peers[record["institution"]] = record
            _compare_peers(node, peers, warned)

    @app.timer(interval=STATUS_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def report_status() -> None:
        try:
            await node.publish_status()
        except Exception as error:  # a missed heartbeat must never stop the node
            log.warning("%s: heartbeat not sent: %s", settings.institution, error)

    @app.task  # type: ignore[untyped-decorator]
    async def run_node() -> None:
        try:
            await node.run()
        except asyncio.CancelledError:
            raise
        except NodeHalted as error:
            log.critical("%s", error)
            os._exit(EXIT_HALTED)
        except BaseException:
            log.exception("%s: node crashed", settings.institution)
            os._exit(EXIT_HALTED)
        finally:
            await node.stop()

    return app, node


def _compare_peers(
    node: LedgerNode, peers: dict[str, dict[str, Any]], warned: set[tuple[str, int]]
) -> None:
    mine_height = node.state.height
    mine_hash = node.state.head_hash
    for institution, record in peers.items():
        if institution == node.me:
            continue
        age_ms = now_ms() - millis(record["reported_at"])
        if age_ms > PEER_SILENT_MS and (institution, -1) not in warned:
            warned.add((institution, -1))
            log.warning("%s: peer %s silent for %d ms", node.me, institution, age_ms)
        elif age_ms <= PEER_SILENT_MS:
            warned.discard((institution, -1))
        disagrees = record["height"] == mine_height and record["head_hash"] != mine_hash
        if disagrees and (institution, mine_height) not in warned:
            warned.add((institution, mine_height))
            log.error("%s: peer %s has head %s at height %d, this node %s", node.me,
                      institution, bytes(record["head_hash"])[::-1].hex()[:16], mine_height,
                      mine_hash[::-1].hex()[:16])

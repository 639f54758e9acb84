"""Operability pieces without a broker: the probe server's answers, the readiness rules
of node and projector, the node's metrics, the clock offset setting, and the chain copy
cut back whole when a write is refused for lack of space."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.common import clock, config
from streams.common.probes import ProbeServer, Readiness
from streams.node import chainstore
from streams.node.chainstore import ChainStore
from streams.node.metrics import CODE_LABELS_MAX, NodeMetrics, node_readiness
from streams.projections.metrics import ProjectionLag, projector_readiness

pytestmark = pytest.mark.unit


def _samples(metrics: NodeMetrics) -> dict[str, float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {f"{s.name}{sorted((k, v) for k, v in s.labels.items() if k != 'institution')}":
            s.value for family in text_string_to_metric_families(text)
            for s in family.samples}


def test_node_metrics_count_commits_codes_and_cap_labels() -> None:
    metrics = NodeMetrics("koscom")
    metrics.on_commit(height=3, txs=10, latency_s=0.25, fsync_s=0.002,
                      rejection_codes=["tx-double-spend", "tx-double-spend"])
    for index in range(CODE_LABELS_MAX + 5):
        metrics.on_nack(f"code-{index}")
    metrics.on_view_change()
    metrics.on_disk_full(True)
    samples = _samples(metrics)
    assert samples["capledger_node_height[]"] == 3
    assert samples["capledger_node_committed_txs_total[]"] == 10
    assert samples["capledger_node_rejections_total[('code', 'tx-double-spend')]"] == 2
    assert samples["capledger_node_nacks_total[('code', 'other')]"] == 5
    assert samples["capledger_node_commit_latency_seconds_count[]"] == 1
    assert samples["capledger_node_chain_fsync_seconds_sum[]"] == pytest.approx(0.002)
    assert samples["capledger_node_view_changes_total[]"] == 1
    assert samples["capledger_node_disk_full[]"] == 1
    metrics.on_disk_full(False)
    assert _samples(metrics)["capledger_node_disk_full[]"] == 0
    assert _samples(metrics)["capledger_node_disk_full_events_total[]"] == 1


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"started": False}, Readiness(False, "starting")),
    ({"disk_full": True}, Readiness(False, "disk-full")),
    ({"broker_contact_age_s": None}, Readiness(False, "broker-unreachable")),
    ({"broker_contact_age_s": 60.0}, Readiness(False, "broker-unreachable")),
    ({"votes_lag": None}, Readiness(False, "lag-unknown")),
    ({"votes_lag": 10_000}, Readiness(False, "behind")),
    ({"decided_waiting": True}, Readiness(False, "behind")),
    ({}, Readiness(True)),
])
def test_node_readiness(kwargs: dict[str, object], expected: Readiness) -> None:
    base: dict[str, object] = {"started": True, "broker_contact_age_s": 0.5,
                               "disk_full": False, "votes_lag": 0, "decided_waiting": False}
    assert node_readiness(**{**base, **kwargs}) == expected  # type: ignore[arg-type]


def test_projector_readiness_and_lag_lines() -> None:
    assert projector_readiness(connected=False, blocks_lag=0).reason == "database-unavailable"
    assert projector_readiness(connected=True, blocks_lag=None).reason == "lag-unknown"
    assert projector_readiness(connected=True, blocks_lag=10_000).reason == "behind"
    assert projector_readiness(connected=True, blocks_lag=3).ready
    lag = ProjectionLag(height=7, blocks_offset=30, blocks_end=45)
    assert lag.to_json(9) == {"available": True, "height": 7, "behind_blocks": 2,
                              "blocks_offset": 30, "blocks_end": 45, "lag_records": 15}
    assert "2 blocks behind" in lag.line(9)
    assert ProjectionLag(problem="database: x").line(9) == "projection: unavailable (database: x)"


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_probe_server_answers_and_refuses() -> None:
    metrics = NodeMetrics("koscom")
    state = [Readiness(False, "disk-full")]
    server = ProbeServer(metrics.registry, lambda: state[0], host="127.0.0.1", port=0)
    await server.start()
    try:
        port = server.port
        assert (await _http(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.0 200 OK")
        answer = await _http(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503") and answer.endswith(b"not-ready: disk-full\n")
        state[0] = Readiness(True)
        assert (await _http(port, b"GET /readyz HTTP/1.1\r\n\r\n")).endswith(b"ready\n")
        assert b"capledger_node_height" in await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b" 404 " in await _http(port, b"GET /secret HTTP/1.1\r\n\r\n")
        assert b" 405 " in await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert await _http(port, b"garbage\r\n\r\n") == b""  # dropped, server goes on
        assert await _http(port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n") == b""
        assert (await _http(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.0 200 OK")
    finally:
        await server.stop()


def test_clock_offset_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.clock_offset_ms({}) == 0
    assert config.clock_offset_ms({"CAPLEDGER_CLOCK_OFFSET_MS": "-180000"}) == -180_000
    for bad in ("3m", "1.5", str(config.CLOCK_OFFSET_MS_MAX + 1)):
        with pytest.raises(ValueError, match="CAPLEDGER_CLOCK_OFFSET_MS"):
            config.clock_offset_ms({"CAPLEDGER_CLOCK_OFFSET_MS": bad})
    assert config.load({"CAPLEDGER_CLOCK_OFFSET_MS": "5000"}).clock_offset_ms == 5000
    with pytest.raises(ValueError, match="CAPLEDGER_METRICS_PORT"):
        config.load({"CAPLEDGER_METRICS_PORT": "70000"})
    monkeypatch.setenv("CAPLEDGER_CLOCK_OFFSET_MS", "-120000")
    clock.set_offset_ms(None)
    try:
        real = clock.now_ms() + 120_000
        import time
        assert abs(real - int(time.time() * 1000)) < 1_000
        assert clock.offset_ms() == -120_000
    finally:
        monkeypatch.delenv("CAPLEDGER_CLOCK_OFFSET_MS")
        clock.set_offset_ms(None)
    assert clock.offset_ms() == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_chain_append_refused_half_way_leaves_no_torn_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "chain.dat"
    store = ChainStore(path)
    store.append(b"block-1")
    size = path.stat().st_size
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 8:  # the first call writes part of the record, the next fails
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(chainstore.os, "write", half_then_full)
    with pytest.raises(OSError) as raised:
        store.append(b"block-2-" + b"x" * 100)
    assert raised.value.errno == code
    assert path.stat().st_size == size  # cut back: no torn record
    monkeypatch.setattr(chainstore.os, "write", real_write)
    store.append(b"block-2")  # space back: the next append is whole
    store.close()
    payloads, damage = ChainStore(path).load(lambda index, payload: None)
    assert payloads == [b"block-1", b"block-2"] and damage is None


def test_heartbeat_condition_is_signed_only_when_set_and_shown_by_status() -> None:
    from ledger.errors import ValidationError
    from ledger.membership import INSTITUTION_IDS
    from streams.client.status import Heartbeat, classify
    from streams.common.genesis_files import build_genesis, seeded_entropy
    from streams.kafka import codec
    from streams.kafka.records import NODE_CONDITION_DISK_FULL, status_from_record, status_record

    genesis, keys = build_genesis(chain_id="ops-unit", time_ms=1_700_000_000_000,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("ops-unit"))

    def record(condition: str) -> dict[str, object]:
        return status_record(institution="koscom", chain_id=genesis.chain_id, height=3,
                             head_hash=b"\x01" * 32, state_hash=b"\x02" * 32, consumer_lag=0,
                             version="0.1.0", now_ms=1_700_000_000_000, round_=0,
                             pending_txs=0, key=keys["koscom"], genesis_hash=genesis.hash_le,
                             condition=condition)

    def checked(value: dict[str, object]) -> dict[str, object]:
        decoded = codec.decode(codec.encode("NodeStatusReported", value),
                               expected="NodeStatusReported").record
        status_from_record(decoded).check_signature(genesis, genesis.hash_le)
        return dict(decoded)

    plain, full = record(""), record(NODE_CONDITION_DISK_FULL)
    checked(plain)
    decoded = checked(full)
    assert decoded["condition"] == "disk-full"
    assert plain["signature"] != full["signature"]
    # Version 3's signature still checks (an empty condition signs as v3 did) ...
    v3 = {k: v for k, v in plain.items() if k != "condition"}
    checked({**v3, "condition": ""})
    # ... and a condition added or removed by anyone else breaks the signature.
    for forged in ({**plain, "condition": "disk-full"}, {**full, "condition": ""}):
        with pytest.raises(ValidationError) as caught:
            checked(forged)
        assert caught.value.code == "status-signature"
    with pytest.raises(ValidationError) as caught:
        checked({**plain, "condition": "DISK FULL\n"})
    assert caught.value.code == "record-text"
    beats = {name: Heartbeat.from_record({**record(""), "institution": name})
             for name in ("koscom", "otc-operator")}
    beats["koscom"] = Heartbeat.from_record(decoded)
    report = classify(beats, now_ms=1_700_000_000_500)
    flags = {view.institution: view.flags for view in report.nodes}
    assert flags["koscom"] == ("DISK-FULL",) and flags["otc-operator"] == ()
    assert not report.healthy


async def test_following_projector_waits_out_any_number_of_outages(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """More failed attempts than the old bound of 5, of each transient kind: the runner
    keeps retrying (the metrics count each outage); a data conflict still stops it."""
    import psycopg

    from streams.projections import runner
    from streams.projections.metrics import ProjectorMetrics
    from streams.projections.projector import ProjectionError, ProjectionStats

    monkeypatch.setattr(runner, "RETRY_DELAY_S", 0.001)
    failures: list[Exception] = [
        psycopg.OperationalError("server closed the connection"),
        ProjectionError("cannot connect to PostgreSQL", code="projection-database"),
        psycopg.errors.ReadOnlySqlTransaction("read-only"),
    ] * 3
    made: list[int] = []

    class FakeProjector:
        stats = ProjectionStats()

        async def run(self, **_: object) -> ProjectionStats:
            if failures:
                raise failures.pop(0)
            return ProjectionStats(height=7)

    def make() -> FakeProjector:
        made.append(1)
        return FakeProjector()

    metrics = ProjectorMetrics()
    lines: list[str] = []
    stats = await runner.run_projection(make, follow=True, rebuild=False,  # type: ignore[arg-type]
                                        on_retry=lines.append, metrics=metrics)
    assert stats.height == 7 and len(made) == 10 and len(lines) == 9
    assert lines[-1].startswith("WAITING: retry 9 in 0 s after ReadOnlySqlTransaction")
    assert metrics.outages._value.get() == 9  # type: ignore[attr-defined]
    failures.append(ProjectionError("two blocks at one height", code="projection-conflict"))
    with pytest.raises(ProjectionError):
        await runner.run_projection(make, follow=True, rebuild=False)  # type: ignore[arg-type]


def test_projector_metrics_record_the_start_of_each_run() -> None:
    from streams.projections.metrics import ProjectorMetrics
    from streams.projections.projector import ProjectionStats

    metrics = ProjectorMetrics()
    first = ProjectionStats(batches=1, startup_s=0.25, startup_block_records=1)
    metrics.on_stats(first, batches_before=0)
    later = ProjectionStats(batches=2, startup_s=9.0, startup_block_records=480)
    metrics.on_stats(later, batches_before=1)  # not a start: the gauges stay
    assert metrics.startup._value.get() == 0.25
    assert metrics.startup_records._value.get() == 1

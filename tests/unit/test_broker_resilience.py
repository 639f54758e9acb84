"""Waiting out absent brokers (streams.kafka.resilience) and the local broker cluster's
settings (CAPLEDGER_KAFKA_BROKERS, rendered server.properties, replication from the
cluster size), without a broker."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import ClassVar

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from streams.common import config
from streams.kafka.resilience import (
    Backoff,
    Connectivity,
    ResilientWriter,
    is_transient,
    retry_until_done,
)
from streams.kafka.topics import TX, TopicError, replication_factor_from_env

pytestmark = pytest.mark.unit

FAST = Backoff(initial_ms=1, max_ms=4, factor=2)


def test_backoff_doubles_up_to_its_bound() -> None:
    backoff = Backoff(initial_ms=200, max_ms=5_000, factor=2)
    assert [backoff.delay_ms(n) for n in range(1, 9)] == [
        200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000]
    assert backoff.delay_ms(10_000) == 5_000  # no overflow, no unbounded loop


def test_transient_errors_are_the_brokers_not_our_input() -> None:
    assert is_transient(KafkaConnectionError())
    assert is_transient(KafkaTimeoutError())
    assert is_transient(OSError("refused"))
    assert is_transient(TimeoutError())
    assert is_transient(TopicError("slow", code="topic-timeout"))
    assert not is_transient(TopicError("wrong partitions", code="topic-layout"))
    assert not is_transient(ValueError("bug"))


def test_connectivity_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = [1_000]
    state = Connectivity("koscom", clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="capledger.connectivity"):
        state.failed("send", KafkaTimeoutError())
        clock[0] += 500
        state.failed("send", KafkaTimeoutError())  # no second line within the interval
        assert state.unreachable_for_ms() == 500
        clock[0] += 2_000
        state.succeeded()
        state.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "koscom: broker unreachable (send: KafkaTimeoutError" in lines[0]
    assert lines[1] == "koscom: broker reachable again after 2500 ms"
    assert state.reachable and state.outages == 1 and state.last_outage_ms == 2_500
    assert state.as_dict()["state"] == "connected"


class FlakyWriter:
    """A LogWriter stand-in: refuses ``failures`` sends, then records them."""

    instances: ClassVar[list[FlakyWriter]] = []

    def __init__(self, failures: list[int], sent: list[tuple[str, bytes]]) -> None:
        self.failures, self.sent = failures, sent
        self.started = self.stopped = False
        FlakyWriter.instances.append(self)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None) -> int:
        if self.failures[0] > 0:
            self.failures[0] -= 1
            raise KafkaTimeoutError()
        self.sent.append((topic, value))
        return len(self.sent) - 1


def test_resilient_writer_resends_the_same_bytes_on_a_new_producer() -> None:
    sent: list[tuple[str, bytes]] = []
    failures = [3]
    FlakyWriter.instances = []
    state = Connectivity("koscom")

    async def scenario() -> int:
        writer = ResilientWriter(lambda: FlakyWriter(failures, sent),  # type: ignore[arg-type,return-value]
                                 connectivity=state, backoff=FAST)
        await writer.start()
        offset = await writer.send("t", b"vote", key=b"1")
        await writer.stop()
        return offset

    assert asyncio.run(scenario()) == 0
    assert sent == [("t", b"vote")]  # exactly the record, once acknowledged
    assert len(FlakyWriter.instances) == 4  # each failure replaced the producer
    assert all(w.stopped for w in FlakyWriter.instances)
    assert state.reachable and state.outages == 1


def test_a_heartbeat_is_one_bounded_attempt() -> None:
    sent: list[tuple[str, bytes]] = []
    state = Connectivity("koscom")

    async def scenario() -> tuple[bool, bool]:
        writer = ResilientWriter(lambda: FlakyWriter([1], sent),  # type: ignore[arg-type,return-value]
                                 connectivity=state, backoff=FAST)
        first = await writer.send_once("s", b"hb", key=None, timeout_ms=100)
        second = await writer.send_once("s", b"hb", key=None, timeout_ms=100)
        return first, second

    first, _ = asyncio.run(scenario())
    assert first is False and state.outages == 1


def test_retry_gives_other_errors_back_at_once() -> None:
    calls = [0]

    async def broken() -> None:
        calls[0] += 1
        raise TopicError("layout", code="topic-layout")

    with pytest.raises(TopicError):
        asyncio.run(retry_until_done(broken, what="x", connectivity=Connectivity("a"),
                                     backoff=FAST))
    assert calls == [1]


# ------------------------------------------------------------------ the local cluster


def test_broker_count_gives_ports_and_a_bootstrap_list(tmp_path: Path) -> None:
    one = config.load({"CAPLEDGER_STATE_DIR": str(tmp_path)})
    assert one.kafka_brokers == 1 and one.kafka_bootstrap == "127.0.0.1:9092"
    assert one.kafka_broker_ports(1) == (9092, 9093)
    three = config.load({"CAPLEDGER_STATE_DIR": str(tmp_path),
                         "CAPLEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
                         "CAPLEDGER_KAFKA_BROKERS": "3"})
    assert three.kafka_bootstrap == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    assert (three.kafka_host, three.kafka_port) == ("127.0.0.1", 19092)
    assert [three.kafka_broker_ports(n) for n in (1, 2, 3)] == [
        (19092, 19093), (19094, 19095), (19096, 19097)]
    for bad in ("0", "x", "10"):
        with pytest.raises(ValueError, match="CAPLEDGER_KAFKA_BROKERS"):
            config.load({"CAPLEDGER_KAFKA_BROKERS": bad})


def test_replication_follows_the_cluster_size() -> None:
    assert replication_factor_from_env({}) == 1
    assert replication_factor_from_env({"CAPLEDGER_KAFKA_BROKERS": "3"}) == 3
    assert replication_factor_from_env({"CAPLEDGER_KAFKA_BROKERS": "5"}) == 3
    assert replication_factor_from_env({"CAPLEDGER_KAFKA_BROKERS": "3",
                                        "CAPLEDGER_REPLICATION_FACTOR": "1"}) == 1
    configs = TX.broker_configs(3)
    assert configs["min.insync.replicas"] == "2"
    assert configs["unclean.leader.election.enable"] == "false"
    assert "unclean.leader.election.enable" not in TX.broker_configs(1)


def _rendered(tmp_path: Path, brokers: int) -> list[dict[str, str]]:
    from streams.tools.devstack import kafka

    settings = config.load({"CAPLEDGER_STATE_DIR": str(tmp_path),
                            "CAPLEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
                            "CAPLEDGER_KAFKA_BROKERS": str(brokers)})
    found = []
    for node in kafka.broker_nodes(settings):
        text = kafka.render_properties(settings, node).read_text()
        found.append(dict(line.split("=", 1) for line in text.splitlines()
                          if line and not line.startswith("#")))
    return found


def test_three_rendered_brokers_form_one_replicated_secure_cluster(tmp_path: Path) -> None:
    brokers = _rendered(tmp_path, 3)
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    for node_id, props in enumerate(brokers, start=1):
        port = 19092 + 2 * (node_id - 1)
        assert props["node.id"] == str(node_id)
        assert props["controller.quorum.voters"] == voters
        assert props["process.roles"] == "broker,controller"
        assert props["listeners"] == (f"SASL_SSL://127.0.0.1:{port},"
                                      f"CONTROLLER://127.0.0.1:{port + 1}")
        assert props["advertised.listeners"] == f"SASL_SSL://127.0.0.1:{port}"
        assert props["log.dirs"].endswith(f"kafka/broker-{node_id}/data")
        assert props["default.replication.factor"] == "3"
        assert props["min.insync.replicas"] == "2"
        assert props["offsets.topic.replication.factor"] == "3"
        assert props["transaction.state.log.min.isr"] == "2"
        assert props["unclean.leader.election.enable"] == "false"
        assert props["allow.everyone.if.no.acl.found"] == "false"


def test_the_single_broker_default_is_unchanged(tmp_path: Path) -> None:
    (props,) = _rendered(tmp_path, 1)
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["log.dirs"].endswith("/kafka/data")
    assert props["default.replication.factor"] == "1"
    assert props["min.insync.replicas"] == "1"


def test_compose_and_the_local_cluster_replicate_alike(tmp_path: Path) -> None:
    import yaml

    compose = yaml.safe_load((config.REPO_DIR / "docker" / "compose.yaml").read_text())
    node_env = compose["x-node"]["environment"]
    assert node_env["CAPLEDGER_KAFKA_BROKERS"] == "3"
    assert replication_factor_from_env(node_env) == 3
    assert len(node_env["CAPLEDGER_KAFKA_BOOTSTRAP"].split(",")) == 3
    compose_props = config.REPO_DIR / "docker" / "kafka" / "cluster.properties"
    deployed = dict(line.split("=", 1) for line in compose_props.read_text().splitlines()
                    if line and not line.startswith("#"))
    local = _rendered(tmp_path, 3)[0]
    for key in ("default.replication.factor", "min.insync.replicas",
                "unclean.leader.election.enable", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor", "transaction.state.log.min.isr",
                "share.coordinator.state.topic.replication.factor",
                "share.coordinator.state.topic.min.isr", "process.roles"):
        assert deployed[key] == local[key], key


# ------------------------------------------------------------------ heartbeat v4


def _signed_heartbeats() -> tuple[object, bytes, dict[str, object], object]:
    from ledger.attestation import STATUS_DOMAIN_TAG_V3, sign_record
    from streams.common.genesis_files import build_genesis, seeded_entropy
    from streams.kafka.records import STATUS_SIGNED_V3, status_record

    genesis, keys = build_genesis(chain_id="hb", time_ms=0,
                                  institutions=("otc-operator", "surveillance", "koscom",
                                                "securities-a", "securities-b"),
                                  entropy=seeded_entropy("hb"))
    key = keys["koscom"]
    common = dict(institution="koscom", chain_id="hb", height=3, head_hash=b"\x01" * 32,
                  state_hash=b"\x02" * 32, consumer_lag=0, version="0.1.0",
                  now_ms=1_700_000_000_000, round_=0, pending_txs=4, key=key,
                  genesis_hash=genesis.hash_le)
    v4 = status_record(**common, broker_outages=2, broker_last_outage_ms=41_250)
    v3 = status_record(**common)
    v3["signature"] = sign_record(key, STATUS_DOMAIN_TAG_V3, genesis.hash_le,
                                  [v3[name] for name in STATUS_SIGNED_V3])
    return genesis, genesis.hash_le, v4, v3


def test_heartbeats_carry_signed_broker_outages_and_old_ones_still_verify() -> None:
    from streams.client.status import Heartbeat
    from streams.kafka import codec
    from streams.kafka.records import status_from_record

    genesis, genesis_hash, v4, v3 = _signed_heartbeats()
    decoded = codec.decode(codec.encode("NodeStatusReported", v4)).record
    report = status_from_record(decoded)
    report.check_signature(genesis, genesis_hash)  # type: ignore[arg-type]
    assert (report.broker_outages, report.broker_last_outage_ms) == (2, 41_250)
    assert Heartbeat.from_record(decoded).broker == "2 outages, last 41.2 s"
    status_from_record(v3).check_signature(genesis, genesis_hash)  # type: ignore[arg-type]
    forged = status_from_record({**v4, "broker_last_outage_ms": 0})
    with pytest.raises(Exception, match="signature") as caught:
        forged.check_signature(genesis, genesis_hash)  # type: ignore[arg-type]
    assert getattr(caught.value, "code", "") == "status-signature"
    stripped = status_from_record({**v4, "broker_outages": 0, "broker_last_outage_ms": 0})
    with pytest.raises(Exception, match="signature"):
        stripped.check_signature(genesis, genesis_hash)  # type: ignore[arg-type]


def test_repeated_client_log_lines_are_throttled_per_kind() -> None:
    from streams.kafka.resilience import RepeatedLogFilter

    clock = [0]
    throttle = RepeatedLogFilter(10_000, clock=lambda: clock[0], templates_max=2)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, None, None)

    assert throttle.filter(record("Unable connect to node with id %s"))
    assert not throttle.filter(record("Unable connect to node with id %s"))
    assert throttle.filter(record("Unable to update metadata from %s"))  # another kind
    clock[0] = 10_000
    assert throttle.filter(record("Unable connect to node with id %s"))  # a reminder
    for n in range(5):  # bounded memory: templates beyond the bound reset the table
        throttle.filter(record(f"template {n}"))
    assert len(throttle._last_ms) <= 2


def test_dev_down_finds_cluster_brokers_even_without_the_count(tmp_path: Path) -> None:
    """Stale pid files of a three-broker state dir (a pid that is not our broker: never
    signalled) are cleared by a ``stop`` whose settings say one broker."""
    from streams.tools.devstack import kafka

    settings = config.load({"CAPLEDGER_STATE_DIR": str(tmp_path),
                            "CAPLEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:19092"})
    for node_id in (1, 2, 3):
        directory = settings.kafka_state_dir / f"broker-{node_id}"
        directory.mkdir(parents=True)
        (directory / "kafka.pid").write_text("1\n")  # init: not a kafka.Kafka
    assert kafka.stop(settings) is False
    assert not list(settings.kafka_state_dir.glob("broker-*/kafka.pid"))


def test_peer_routes_put_each_brokers_inter_broker_traffic_on_its_own_routes(
        tmp_path: Path) -> None:
    """With ``peer-routes.json`` (written by the isolation test's ``BrokerRoutes``),
    broker i reaches broker j's replication and controller listeners only through the
    route (i, j): its own PEER<i>/CTRL<i> names come first and j advertises them at the
    route's proxies; clients keep the direct listener."""
    from streams.tools.devstack import kafka
    from tests.integration.netfault import BrokerRoutes

    settings = config.load({"CAPLEDGER_STATE_DIR": str(tmp_path),
                            "CAPLEDGER_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
                            "CAPLEDGER_KAFKA_BROKERS": "3"})
    routes = BrokerRoutes(20000, [n.node_id for n in kafka.broker_nodes(settings)])
    routes.write_routes(settings.kafka_state_dir)
    brokers = _rendered(tmp_path, 3)
    for me, props in enumerate(brokers, start=1):
        assert props["inter.broker.listener.name"] == f"PEER{me}"
        assert props["controller.listener.names"].startswith(f"CTRL{me},")
        voters = dict(v.split("@") for v in props["controller.quorum.voters"].split(","))
        for other in (1, 2, 3):
            # broker ``other`` is served on PEER<other>/CTRL<other>, advertised at the
            # route's proxies (its own listeners direct)
            listen, replication, controller_listen, controller = routes.ports(other, me)
            if other == me:
                replication, controller = listen, controller_listen
            for name, at, advertised in ((f"PEER{other}", listen, replication),
                                         (f"CTRL{other}", controller_listen, controller)):
                assert f"{name}://127.0.0.1:{at}" in props["listeners"]
                assert f"{name}://127.0.0.1:{advertised}" in props["advertised.listeners"]
            assert f"PEER{other}:SASL_SSL" in props["listener.security.protocol.map"]
            assert f"CTRL{other}:SSL" in props["listener.security.protocol.map"]
            assert f"listener.name.peer{other}.scram-sha-512.sasl.jaas.config" in props
            assert props[f"listener.name.ctrl{other}.ssl.client.auth"] == "required"
            # and it reaches broker ``other``'s controller through its own route
            _, _, own_listen, own_proxy = routes.ports(me, other)
            assert voters[str(other)] == f"127.0.0.1:{own_listen if other == me else own_proxy}"
        port = 19092 + 2 * (me - 1)
        assert props["advertised.listeners"].startswith(f"SASL_SSL://127.0.0.1:{port},")

"""streams.kafka.topics without a broker: declarations, configs per replication, client settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from streams.cli import exit_codes
from streams.cli.main import main
from streams.kafka import codec
from streams.kafka.topics import (
    BLOCKS,
    GOVERNANCE,
    MESSAGE_BYTES_MAX,
    PROPOSALS,
    REJECTED,
    STATUS,
    TOPICS,
    TX,
    VOTES,
    TopicError,
    check_topic_prefix,
    consumer_settings,
    faust_settings,
    producer_settings,
    replication_factor_from_env,
    topic,
)

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def secure_state(tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dir with the local CA and the principals' password files, as the set-up
    writes them (no broker needed: the clients below are never started)."""
    from streams.common import config
    from streams.tools.devstack import kafka_tls

    state = tmp_path_factory.mktemp("state")
    for name in ("CAPLEDGER_KAFKA_SECURITY", "CAPLEDGER_KAFKA_PRINCIPAL",
                 "CAPLEDGER_KAFKA_PASSWORD_FILE", "CAPLEDGER_KAFKA_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAPLEDGER_STATE_DIR", str(state))
    settings = config.load()
    kafka_tls.ensure_broker_tls(settings)
    kafka_tls.ensure_credentials(settings)

NAME = re.compile(r"^[a-z]+\.[a-z]+\.v[0-9]+$")


def test_every_topic_declared_once_with_the_issue_names() -> None:
    assert [spec.name for spec in TOPICS] == [
        "ledger.tx.v1", "ledger.proposals.v1", "ledger.votes.v1", "ledger.blocks.v1",
        "ledger.rejected.v1", "ledger.status.v1", "ledger.governance.v1",
        "surveillance.alerts.v1",
        "market.assets.v1", "market.board.v1", "market.negotiation.v1",
    ]
    assert all(NAME.match(spec.name) for spec in TOPICS)
    assert topic("ledger.votes.v1") is VOTES
    with pytest.raises(AssertionError):
        topic("ledger.nope.v1")


def test_every_topic_carries_a_known_record() -> None:
    names = codec.default_registry().names
    for spec in TOPICS:
        assert spec.record in names, spec


def test_consensus_topics_are_single_partition_and_kept_forever() -> None:
    for spec in (TX, PROPOSALS, VOTES, BLOCKS, GOVERNANCE):
        assert spec.partitions == 1
        configs = spec.broker_configs(1)
        assert configs["retention.ms"] == "-1" and configs["retention.bytes"] == "-1"
        assert configs["cleanup.policy"] == "delete"
    assert REJECTED.broker_configs(1)["retention.ms"] == "-1"
    assert STATUS.broker_configs(1)["cleanup.policy"] == "compact"
    assert "retention.ms" not in STATUS.broker_configs(1)


def test_big_messages_fit_blocks_and_proposals() -> None:
    for spec in (PROPOSALS, BLOCKS):
        limit = int(spec.broker_configs(1)["max.message.bytes"])
        assert limit >= 8 * 1024 * 1024
        assert limit >= codec.MESSAGE_BYTES_MAX  # any value the codec accepts fits
    assert int(TX.broker_configs(1)["max.message.bytes"]) > 1_000_000  # TX_BYTES_MAX


@pytest.mark.parametrize("replicas, expected", [(1, None), (2, None), (3, "2"), (5, "2")])
def test_min_insync_replicas_only_when_replicated(replicas: int, expected: str | None) -> None:
    for spec in TOPICS:
        assert spec.broker_configs(replicas).get("min.insync.replicas") == expected


def test_replication_factor_from_env() -> None:
    assert replication_factor_from_env({}) == 1
    assert replication_factor_from_env({"CAPLEDGER_REPLICATION_FACTOR": " 3 "}) == 3
    for bad in ("0", "-1", "three", "99"):
        with pytest.raises(TopicError) as caught:
            replication_factor_from_env({"CAPLEDGER_REPLICATION_FACTOR": bad})
        assert caught.value.code == "topic-replication-factor"
        assert "CAPLEDGER_REPLICATION_FACTOR" in caught.value.message


async def test_producer_settings_are_durable_and_fit_a_block() -> None:
    settings = producer_settings(client_id="koscom")
    assert settings["acks"] == "all"
    assert settings["enable_idempotence"] is True
    assert settings["compression_type"] in ("zstd", "gzip")
    assert settings["max_request_size"] >= MESSAGE_BYTES_MAX
    assert 0 <= settings["linger_ms"] <= 10
    assert settings["client_id"] == "koscom"
    assert settings["security_protocol"] == "SASL_SSL"
    assert settings["sasl_mechanism"] == "SCRAM-SHA-512"
    assert settings["sasl_plain_username"] == "admin"
    assert settings["ssl_context"].check_hostname is True
    assert producer_settings(principal="koscom")["sasl_plain_username"] == "koscom"
    from aiokafka import AIOKafkaProducer

    AIOKafkaProducer(**settings)  # accepts every key and has the codec; never started


def test_consumer_settings_fit_a_block_and_commit_manually() -> None:
    settings = consumer_settings(group_id="node-koscom")
    assert settings["enable_auto_commit"] is False
    assert settings["auto_offset_reset"] == "earliest"
    assert settings["max_partition_fetch_bytes"] >= MESSAGE_BYTES_MAX
    assert settings["security_protocol"] == "SASL_SSL"


def test_plaintext_mode_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPLEDGER_KAFKA_SECURITY", "plaintext")
    assert producer_settings()["security_protocol"] == "PLAINTEXT"
    assert "broker_credentials" not in faust_settings()
    monkeypatch.setenv("CAPLEDGER_KAFKA_SECURITY", "none")
    with pytest.raises(ValueError, match="CAPLEDGER_KAFKA_SECURITY"):
        producer_settings()


def test_faust_settings_are_known_to_faust() -> None:
    import faust

    app = faust.App("settings-check", broker="kafka://127.0.0.1:1", store="memory://",
                    **faust_settings())
    assert app.conf.producer_acks == -1
    assert app.conf.producer_max_request_size >= MESSAGE_BYTES_MAX
    assert app.conf.broker_credentials.username == "admin"
    assert app.conf.broker_credentials.mechanism.value == "SCRAM-SHA-512"


@pytest.mark.parametrize("prefix", ["", "t.", "demo123.", "bench.rate-1000_a."])
def test_topic_prefix_accepted(prefix: str) -> None:
    assert check_topic_prefix(prefix) == prefix


@pytest.mark.parametrize(("prefix", "says"), [
    ("demo", "must end with a dot"),
    ("demo.x", "must end with a dot"),
    ("a b.", "characters Kafka refuses"),
    ("ü.", "characters Kafka refuses"),
    ("x" * 240 + ".", "exceeds Kafka's 249"),
])
def test_topic_prefix_refused(prefix: str, says: str) -> None:
    with pytest.raises(TopicError, match=says) as caught:
        check_topic_prefix(prefix)
    assert caught.value.code == "topic-prefix"


@pytest.mark.parametrize("command", [
    ["status"], ["project", "--genesis", "g.json", "--once"],
    ["node", "--institution", "koscom", "--genesis", "g.json"],
    ["tx", "submit", "--genesis", "g.json", "--submitter", "x", "--hex", "00"],
])
def test_every_command_refuses_a_prefix_without_a_dot(command: list[str]) -> None:
    flag = CliRunner().invoke(main, [*command, "--topic-prefix", "nodot"])
    assert flag.exit_code == exit_codes.USAGE, flag.output
    assert "must end with a dot" in flag.output
    env = CliRunner().invoke(main, command, env={"CAPLEDGER_TOPIC_PREFIX": "nodot"})
    assert env.exit_code == exit_codes.USAGE, env.output
    assert "must end with a dot" in env.output


def test_topic_prefix_option_declared_once() -> None:
    cli_dir = Path(__file__).resolve().parents[2] / "streams" / "cli"
    declaring = sorted(path.name for path in cli_dir.glob("*.py")
                       if '"--topic-prefix"' in path.read_text(encoding="utf-8"))
    assert declaring == ["options.py"], "use streams.cli.options.topic_prefix_option"


class _ListingAdmin:
    """An admin client whose listing shows a topic only from the ``visible_from``-th ask on
    (the broker applying the set-up's ACLs a moment after they were acknowledged)."""

    def __init__(self, names: list[str], visible_from: int) -> None:
        self.names, self.visible_from, self.asks = names, visible_from, 0

    async def list_topics(self) -> list[str]:
        self.asks += 1
        return self.names if self.asks >= self.visible_from else []


async def test_a_member_asks_again_for_topics_it_does_not_see_yet() -> None:
    import time

    from streams.kafka.topics import _listed_topics

    admin = _ListingAdmin(["p.ledger.tx.v1"], visible_from=3)
    seen = await _listed_topics(admin, ["p.ledger.tx.v1"], may_create=False,  # type: ignore[arg-type]
                                deadline=time.monotonic() + 10)
    assert seen == {"p.ledger.tx.v1"} and admin.asks == 3


async def test_a_creator_asks_once_and_a_member_gives_up_at_the_deadline() -> None:
    import time

    from streams.kafka.topics import _listed_topics

    admin = _ListingAdmin(["p.ledger.tx.v1"], visible_from=3)
    assert await _listed_topics(admin, ["p.ledger.tx.v1"], may_create=True,  # type: ignore[arg-type]
                                deadline=time.monotonic() + 10) == set()
    assert admin.asks == 1
    never = _ListingAdmin([], visible_from=1)
    started = time.monotonic()
    assert await _listed_topics(never, ["p.ledger.tx.v1"], may_create=False,  # type: ignore[arg-type]
                                deadline=started + 0.3) == set()
    assert never.asks >= 2 and time.monotonic() - started < 5

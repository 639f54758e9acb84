"""Every Kafka topic of capital-ledger, declared once, and the client settings to use them.

Owns: the topic names (``<domain>.<stream>.v<N>``), their partition counts and
broker-side configs, the record each topic carries (an Avro record name of
``schemas/``), :func:`ensure_topics` (explicit, idempotent creation with aiokafka's
admin client) and the producer/consumer/faust/admin settings every client uses,
security included (TLS verified against the local CA + SASL/SCRAM-SHA-512 as the
process's principal; docs/decisions/0060-kafka-security.md).
Topics are never auto-created: the broker runs with auto creation off, and a node
calls :func:`ensure_topics` before it produces (see
docs/decisions/0021-topics-and-producers.md for the reasons behind each setting).

"""

from __future__ import annotations

import asyncio
import os
import string
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ledger.errors import ValidationError
from streams.common import config
from streams.common.kafka_auth import SASL_MECHANISM, SECURITY_PROTOCOL, KafkaAuth, client_auth

MIB = 1024 * 1024
# The codec refuses an Avro value over 8 MiB (streams.kafka.codec.MESSAGE_BYTES_MAX); a
# record batch adds its header, the key and record framing, so the broker-side and
# producer-side limits leave 64 KiB on top of that for one maximal record.
VALUE_BYTES_MAX = 8 * MIB
BATCH_OVERHEAD_BYTES = 64 * 1024
MESSAGE_BYTES_MAX = VALUE_BYTES_MAX + BATCH_OVERHEAD_BYTES
# How old a client's view of the partition leaders may grow (Kafka's default: 5 min).
# A broker cut off from the other brokers but not from the clients still answers as
# the leader it no longer is: reads from it return nothing new and raise no error, so
# only a metadata refresh moves a reader to the new leader (docs/decisions/0103).
METADATA_MAX_AGE_MS = 10_000
# What the other topics accept: transactions are at most 1 MB (ledger.tx.TX_BYTES_MAX).
SMALL_MESSAGE_BYTES_MAX = 2 * MIB

# Every topic name is <prefix><domain>.<stream>.v<N>; the prefix isolates chains (and
# tests) on one broker. Kafka allows ASCII letters, digits, '.', '_' and '-', up to 249.
TOPIC_PREFIX_ENV = "CAPLEDGER_TOPIC_PREFIX"
TOPIC_NAME_CHARS_MAX = 249
TOPIC_NAME_ALPHABET = frozenset(string.ascii_letters + string.digits + "._-")

REPLICATION_FACTOR_ENV = "CAPLEDGER_REPLICATION_FACTOR"
REPLICATION_FACTOR_DEFAULT = 1
REPLICATION_FACTOR_MAX = 16
KAFKA_BROKERS_ENV = "CAPLEDGER_KAFKA_BROKERS"
REPLICATION_FACTOR_FROM_CLUSTER_MAX = 3
# With 3+ replicas a write (acks=all) must reach 2 of them, so losing one broker
# never loses an acknowledged record; with fewer the broker could not accept writes
# while one replica is down, so the broker default (1) stays.
MIN_INSYNC_REPLICAS = 2
MIN_INSYNC_FROM_REPLICATION = 3

STATUS_SEGMENT_MS = 60 * 60 * 1000  # compaction only cleans closed segments
STATUS_DELETE_RETENTION_MS = 24 * 60 * 60 * 1000

ENSURE_TIMEOUT_MS_DEFAULT = 30_000
POLL_INTERVAL_MS = 100
CONFIG_APPLY_TIMEOUT_S = 10.0  # how long an accepted config change may take to show

_KAFKA_TOPIC_ALREADY_EXISTS = 36
_KAFKA_NOT_AUTHORIZED = (29, 31)  # TOPIC_ / CLUSTER_AUTHORIZATION_FAILED
# The set-up principal (a super user): the only one that creates topics and ACLs.
ADMIN_PRINCIPAL = "admin"
# How long a member principal asks again for a topic it does not see yet (the set-up's
# ACLs on a new topic are applied by the broker a moment after they are acknowledged),
# and the backoff between asks.
MEMBER_TOPIC_WAIT_S = 20.0
MEMBER_TOPIC_POLL_S_MIN = 0.05
MEMBER_TOPIC_POLL_S_MAX = 1.0

_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}



class TopicError(ValidationError):
    """A topic that cannot be created or that exists with settings other than declared."""

    code = "topic"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: its base name, partitions, broker configs and what it carries."""

    name: str
    partitions: int
    record: str  # Avro record name in schemas/ (the value of every message)
    key: str  # what the message key holds (documentation; producers follow it)
    configs: Mapping[str, str] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self) -> None:
        assert self.partitions >= 1, self.name
        assert self.name.count(".") == 2 and self.name.rsplit(".", 1)[1].startswith("v"), (
            f"topic name {self.name!r} is not <domain>.<stream>.v<N>"
        )

    def full_name(self, prefix: str = "") -> str:
        """The name on the broker: the deployment/test prefix, then the base name."""
        return f"{prefix}{self.name}"

    def broker_configs(self, replication_factor: int) -> dict[str, str]:
        """Configs to set on the broker for this topic at this replication factor."""
        configs = dict(self.configs)
        if replication_factor >= MIN_INSYNC_FROM_REPLICATION:
            configs["min.insync.replicas"] = str(MIN_INSYNC_REPLICAS)
            # Never elect a replica that missed acknowledged records (decision 0100).
            configs["unclean.leader.election.enable"] = "false"
        return configs


TX = TopicSpec(
    name="ledger.tx.v1",
    partitions=1,
    record="TxSubmitted",
    key="submitter/idempotency_key (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Submitted transactions; proposers cut blocks from this log in offset order.",
)
PROPOSALS = TopicSpec(
    name="ledger.proposals.v1",
    partitions=1,
    record="BlockProposed",
    key="height (decimal ASCII)",
    configs={**_FOREVER, "max.message.bytes": str(MESSAGE_BYTES_MAX)},
    doc="Block proposals, one per (height, round) from the rotation's proposer.",
)
VOTES = TopicSpec(
    name="ledger.votes.v1",
    partitions=1,
    record="VoteCast",
    key="height (decimal ASCII)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Signed acks, nacks and timeout votes; the first quorum in log order wins.",
)
BLOCKS = TopicSpec(
    name="ledger.blocks.v1",
    partitions=1,
    record="BlockCommitted",
    key="height (decimal ASCII)",
    configs={**_FOREVER, "max.message.bytes": str(MESSAGE_BYTES_MAX)},
    doc="Committed blocks with their quorum certificates: the chain.",
)
REJECTED = TopicSpec(
    name="ledger.rejected.v1",
    partitions=1,
    record="TxRejected",
    key="institution (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Every refused input with its code: the evidence log surveillance projects.",
)
STATUS = TopicSpec(
    name="ledger.status.v1",
    partitions=1,
    record="NodeStatusReported",
    key="institution (UTF-8)",
    configs={
        "cleanup.policy": "compact",
        "segment.ms": str(STATUS_SEGMENT_MS),
        "delete.retention.ms": str(STATUS_DELETE_RETENTION_MS),
        "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX),
    },
    doc="Node heartbeats; compacted to the latest report per institution.",
)
GOVERNANCE = TopicSpec(
    name="ledger.governance.v1",
    partitions=1,
    record="MembershipChanged",
    key="chain_id/sequence (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Membership and parameter changes signed by a majority.",
)

ALERTS = TopicSpec(
    name="surveillance.alerts.v1",
    partitions=1,
    record="AlertRaised",
    key="rule/cause (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Surveillance alerts, one per rule and cause, with the evidence they rest on.",
)

MARKET_ASSETS = TopicSpec(
    name="market.assets.v1",
    partitions=1,
    record="MarketEventRecorded",
    key="security code (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Registered assets with their terms, signed by the issuing firm (decision 0070).",
)
MARKET_BOARD = TopicSpec(
    name="market.board.v1",
    partitions=1,
    record="MarketEventRecorded",
    key="order, negotiation or agreement id (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="The quote board's events in one total order: orders, amendments, cancellations, "
        "joins, agreement signatures, settlements, refusals (decision 0070).",
)
MARKET_NEGOTIATION = TopicSpec(
    name="market.negotiation.v1",
    partitions=1,
    record="MarketEventRecorded",
    key="negotiation id (UTF-8)",
    configs={**_FOREVER, "max.message.bytes": str(SMALL_MESSAGE_BYTES_MAX)},
    doc="Negotiation messages, end-to-end encrypted: ciphertext only (decision 0070).",
)
MARKET_TOPICS: tuple[TopicSpec, ...] = (MARKET_ASSETS, MARKET_BOARD, MARKET_NEGOTIATION)

TOPICS: tuple[TopicSpec, ...] = (
    TX, PROPOSALS, VOTES, BLOCKS, REJECTED, STATUS, GOVERNANCE, ALERTS, *MARKET_TOPICS
)
_BY_NAME = {spec.name: spec for spec in TOPICS}
assert len(_BY_NAME) == len(TOPICS)


def topic(name: str) -> TopicSpec:
    """The declared topic of this base name (programmer error if undeclared)."""
    spec = _BY_NAME.get(name)
    assert spec is not None, f"undeclared topic {name!r}"
    return spec


def check_topic_prefix(prefix: str) -> str:
    """``prefix`` when it can prefix every declared topic name, else ``TopicError``
    (code ``topic-prefix``): empty, or Kafka's topic alphabet ending with a dot, and
    short enough for the longest declared name."""
    if not prefix:
        return prefix
    if not prefix.endswith("."):
        raise TopicError(
            f"topic prefix {prefix!r} must end with a dot (e.g. {prefix + '.'!r}): topic "
            f"names are <prefix><domain>.<stream>.v<N>",
            code="topic-prefix",
        )
    bad = sorted(set(prefix) - TOPIC_NAME_ALPHABET)
    if bad:
        raise TopicError(
            f"topic prefix {prefix!r} has characters Kafka refuses in topic names: "
            f"{''.join(bad)!r} (allowed: letters, digits, '.', '_', '-')",
            code="topic-prefix",
        )
    longest = max(len(spec.name) for spec in TOPICS)
    if len(prefix) + longest > TOPIC_NAME_CHARS_MAX:
        raise TopicError(
            f"topic prefix {prefix[:20]!r}... is {len(prefix)} characters: with the longest "
            f"topic name it exceeds Kafka's {TOPIC_NAME_CHARS_MAX}",
            code="topic-prefix",
        )
    return prefix


def replication_factor_from_env(environ: Mapping[str, str] | None = None) -> int:
    """CAPLEDGER_REPLICATION_FACTOR; by default the cluster's size
    (CAPLEDGER_KAFKA_BROKERS, 1 for the single local broker) up to
    ``REPLICATION_FACTOR_FROM_CLUSTER_MAX`` (3: with min.insync.replicas 2 one broker
    may be lost without losing or refusing a write; decision 0100)."""
    source = os.environ if environ is None else environ
    raw = source.get(REPLICATION_FACTOR_ENV, "").strip()
    if not raw:
        brokers = source.get(KAFKA_BROKERS_ENV, "").strip()
        size = int(brokers) if brokers.isdigit() and int(brokers) >= 1 else (
            REPLICATION_FACTOR_DEFAULT)
        return min(size, REPLICATION_FACTOR_FROM_CLUSTER_MAX)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= REPLICATION_FACTOR_MAX:
        raise TopicError(
            f"{REPLICATION_FACTOR_ENV}={raw!r} is not an integer from 1 to "
            f"{REPLICATION_FACTOR_MAX}",
            code="topic-replication-factor",
        )
    return value


# ---------------------------------------------------------------- client settings


def compression_type() -> str:
    """zstd when aiokafka's codec library (cramjam) is installed, else gzip.

    zstd level 3 compresses a 2 MB block of transactions about 10x faster than
    aiokafka's gzip (level 9) at a slightly better ratio; CPU is the scarce
    resource (every node verifies every signature), so it matters. gzip needs
    nothing but the standard library and stays the fallback.
    """
    from aiokafka.codec import has_zstd

    return "zstd" if has_zstd() else "gzip"


def security_settings(principal: str | None = None,
                      settings: config.Settings | None = None) -> dict[str, Any]:
    """The aiokafka connection keywords of ``principal`` (default: this process's,
    CAPLEDGER_KAFKA_PRINCIPAL): TLS verified against the local CA and SCRAM-SHA-512,
    or plaintext in the debugging mode (CAPLEDGER_KAFKA_SECURITY=plaintext)."""
    auth = client_auth(principal, settings)
    if not auth.secure:
        return {"security_protocol": "PLAINTEXT"}
    return {
        "security_protocol": SECURITY_PROTOCOL,
        "ssl_context": auth.ssl_context(),
        "sasl_mechanism": SASL_MECHANISM,
        "sasl_plain_username": auth.principal,
        "sasl_plain_password": auth.password,
    }


def admin_settings(*, principal: str | None = None, settings: config.Settings | None = None,
                   request_timeout_ms: int = 30_000) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaAdminClient`` (security included)."""
    return {"request_timeout_ms": request_timeout_ms,
            **security_settings(principal, settings)}


def admin_client(bootstrap: str, *, principal: str | None = None,
                 settings: config.Settings | None = None,
                 request_timeout_ms: int = 30_000) -> AIOKafkaAdminClient:
    """The one way to build an admin client (not started)."""
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        **admin_settings(principal=principal, settings=settings,
                         request_timeout_ms=request_timeout_ms),
    )


def producer_settings(*, client_id: str | None = None, linger_ms: int = 2,
                      principal: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaProducer`` for every ledger writer.

    acks=all with idempotence: an acknowledged record is on every in-sync replica and
    a retried send never writes it twice or out of order. ``linger_ms`` stays small
    so a vote is not held back waiting for company.
    """
    settings: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": compression_type(),
        "max_request_size": MESSAGE_BYTES_MAX,
        "linger_ms": linger_ms,
        "max_batch_size": 1 * MIB,
        "request_timeout_ms": 30_000,
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
        **security_settings(principal),
    }
    if client_id is not None:
        settings["client_id"] = client_id
    return settings


def rdkafka_producer_settings(bootstrap: str, *, client_id: str, linger_ms: int = 5,
                              principal: str | None = None,
                              settings: config.Settings | None = None) -> dict[str, Any]:
    """The configuration of a librdkafka producer (``confluent_kafka.Producer``) with
    the ledger's producer guarantees (acks=all, idempotent, same compression and sizes)
    and ``security_settings``' connection, mapped to librdkafka's names: TLS checked
    against the same CA and host name, SCRAM-SHA-512 as the same principal. For bulk
    writers (the load generator), whose CPU per record matters."""
    auth = client_auth(principal, settings)
    rdkafka: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": compression_type(),
        "message.max.bytes": MESSAGE_BYTES_MAX,
        "batch.size": 1 * MIB,
        "linger.ms": linger_ms,
        "request.timeout.ms": 30_000,
    }
    return {**rdkafka, **_rdkafka_connection(auth)}


def _rdkafka_connection(auth: KafkaAuth) -> dict[str, Any]:
    """``security_settings``' connection in librdkafka's names: TLS checked against the
    same CA and host name, SCRAM-SHA-512 as the same principal."""
    if not auth.secure:
        return {"security.protocol": "PLAINTEXT"}
    return {
        "security.protocol": SECURITY_PROTOCOL,
        "sasl.mechanism": SASL_MECHANISM,
        "sasl.username": auth.principal,
        "sasl.password": auth.password,
        "ssl.ca.location": str(auth.ca_file),
        "ssl.endpoint.identification.algorithm": "https",
    }


# What a librdkafka reader may hold fetched ahead of its caller (its memory bound).
RDKAFKA_PREFETCH_KIB_MAX = 16 * 1024


def rdkafka_consumer_settings(bootstrap: str, *, client_id: str,
                              principal: str | None = None,
                              settings: config.Settings | None = None) -> dict[str, Any]:
    """The configuration of a librdkafka consumer (``confluent_kafka.Consumer``) with
    ``consumer_settings``' guarantees: no consumer group and no committed offsets (the
    reader is assigned a partition at an offset its owner derives from its own state),
    read uncommitted, the same fetch sizes, ``security_settings``' connection. For the
    node's tx reader (``streams.kafka.logio.RdkafkaLogReader``, decision 0117)."""
    auth = client_auth(principal, settings)
    rdkafka: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        # librdkafka wants a group and looks up its coordinator; it never joins it nor
        # commits. Named under the member's own group prefix, which its ACLs grant
        "group.id": f"capledger-{auth.principal}.unjoined",  # acls.member_group_prefix
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_uncommitted",
        "max.partition.fetch.bytes": MESSAGE_BYTES_MAX,
        "fetch.max.bytes": 4 * MESSAGE_BYTES_MAX,
        "receive.message.max.bytes": 4 * MESSAGE_BYTES_MAX + 1 * MIB,
        "queued.max.messages.kbytes": RDKAFKA_PREFETCH_KIB_MAX,
        "topic.metadata.refresh.interval.ms": METADATA_MAX_AGE_MS,
    }
    return {**rdkafka, **_rdkafka_connection(auth)}


def consumer_settings(*, group_id: str | None, client_id: str | None = None,
                      principal: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaConsumer`` for every ledger reader.

    Offsets are committed by the reader after it has applied what it read (never
    automatically); a new group starts from the beginning of the log, because a
    node's state is a function of the whole log. Fetch sizes allow a maximal block.
    """
    settings: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MESSAGE_BYTES_MAX,
        "fetch_max_bytes": 4 * MESSAGE_BYTES_MAX,
        "isolation_level": "read_uncommitted",
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
        **security_settings(principal),
    }
    if client_id is not None:
        settings["client_id"] = client_id
    return settings


def faust_credentials(principal: str | None = None) -> dict[str, Any]:
    """faust ``App`` keyword for this principal's TLS + SCRAM connection (empty in the
    plaintext debugging mode)."""
    import faust

    auth = client_auth(principal)
    if not auth.secure:
        return {}
    return {"broker_credentials": faust.SASLCredentials(
        username=auth.principal, password=auth.password,
        ssl_context=auth.ssl_context(), mechanism=SASL_MECHANISM)}


def faust_settings(principal: str | None = None) -> dict[str, Any]:
    """faust ``App`` keyword arguments matching :func:`producer_settings`.

    faust enables producer idempotence only inside its exactly-once transactions,
    so agents that write consensus records use their own ``AIOKafkaProducer`` with
    :func:`producer_settings`; these keep faust's own producer close to it. The
    credentials are the same as every other client's.
    """
    return {
        **faust_credentials(principal),
        "producer_acks": -1,
        "producer_compression_type": compression_type(),
        "producer_max_request_size": MESSAGE_BYTES_MAX,
        "producer_linger": 0.002,
        "consumer_max_fetch_size": MESSAGE_BYTES_MAX,
    }


async def delete_topics(bootstrap: str, *, prefix: str,
                        specs: Iterable[TopicSpec] = TOPICS,
                        timeout_ms: int = ENSURE_TIMEOUT_MS_DEFAULT) -> list[str]:
    """Delete the declared topics under ``prefix`` that exist (test and bench clean-up);
    the names deleted. Never used on a deployment's topics: a prefix is required."""
    assert prefix, "refusing to delete un-prefixed (deployment) topics"
    admin = admin_client(bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [spec.full_name(prefix) for spec in specs
                 if spec.full_name(prefix) in existing]
        if names:
            await admin.delete_topics(names)
        await delete_acls_of(admin, [spec.full_name(prefix) for spec in specs])
        return names
    finally:
        await admin.close()


async def delete_acls_of(admin: AIOKafkaAdminClient, names: list[str]) -> int:
    """The rules on these deleted topics, deleted too (the broker keeps rules on topics
    that are gone, decision 0131); none without security (there are none) or as a
    principal that may not alter them."""
    auth = client_auth()
    if not names or not auth.secure or auth.principal != ADMIN_PRINCIPAL:
        return 0
    from streams.kafka.acls import delete_topic_acls

    return await delete_topic_acls(admin, names)


# ---------------------------------------------------------------- creation


@dataclass(frozen=True, slots=True)
class TopicState:
    """What :func:`ensure_topics` found or made for one topic."""

    name: str
    created: bool
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]


async def ensure_topics(
    bootstrap: str,
    *,
    prefix: str = "",
    replication_factor: int | None = None,
    specs: Iterable[TopicSpec] = TOPICS,
    fix_configs: bool = False,
    timeout_ms: int = ENSURE_TIMEOUT_MS_DEFAULT,
) -> dict[str, TopicState]:
    """Create the declared topics that are missing; check the ones that exist.

    Idempotent and safe to run from several nodes at once (a topic created by
    someone else in between counts as existing). An existing topic with other
    partitions or replication factor is a :class:`TopicError` (neither can be
    fixed in place without breaking order); other config differences are an error
    too, unless ``fix_configs`` rewrites them to the declared values. Run by the set-up
    (admin) principal on a secure broker, it also grants the ACL table of
    :mod:`streams.kafka.acls` on these topics; any other principal only checks. Returns when
    every topic has a leader for each partition, keyed by full topic name.
    """
    chosen = list(specs)
    replicas = replication_factor_from_env() if replication_factor is None else replication_factor
    assert 1 <= replicas <= REPLICATION_FACTOR_MAX
    wanted = {spec.full_name(prefix): spec.broker_configs(replicas) for spec in chosen}
    partitions = {spec.full_name(prefix): spec.partitions for spec in chosen}
    deadline = time.monotonic() + timeout_ms / 1000
    auth = client_auth()
    admin = admin_client(bootstrap, request_timeout_ms=min(timeout_ms, 30_000))
    await admin.start()
    try:
        may_create = not auth.secure or auth.principal == ADMIN_PRINCIPAL
        existing = await _listed_topics(admin, wanted, may_create=may_create, deadline=deadline)
        missing = [name for name in wanted if name not in existing]
        created = (await _create_topics(admin, missing, wanted, partitions, replicas, timeout_ms,
                                        principal=auth.principal)
                   if missing else set())
        if auth.secure and auth.principal == ADMIN_PRINCIPAL:
            from streams.kafka.acls import ensure_acls

            await ensure_acls(admin, prefix, specs=chosen)
        layout = await _wait_for_leaders(admin, list(wanted), deadline)
        actual = await _describe_configs(admin, list(wanted))
        problems = _layout_problems(partitions, replicas, layout)
        if problems:
            raise TopicError("; ".join(problems), code="topic-layout")
        drifted = _drifted_configs(wanted, actual)
        if drifted and not fix_configs:
            raise TopicError(f"topic configs differ: {_describe_drift(drifted, actual)}",
                             code="topic-config")
        if drifted:
            actual = await _fix_configs(admin, wanted, drifted)
        return _topic_states(wanted, created, layout, actual)
    finally:
        await admin.close()


async def _listed_topics(admin: AIOKafkaAdminClient, wanted: Iterable[str], *,
                        may_create: bool, deadline: float) -> set[str]:
    """The topics the broker lists to this principal. One that may not create topics
    sees a topic only once the broker has applied the ACLs the set-up granted on it, a
    moment after the set-up's own call returned (decision 0060): a wanted topic not
    listed yet is asked for again, with backoff, for up to ``MEMBER_TOPIC_WAIT_S``,
    before it counts as missing (and refused as ``topic-not-authorized``)."""
    existing = set(await admin.list_topics())
    if may_create:
        return existing
    names = list(wanted)
    until = min(deadline, time.monotonic() + MEMBER_TOPIC_WAIT_S)
    delay_s = MEMBER_TOPIC_POLL_S_MIN
    while any(name not in existing for name in names) and time.monotonic() < until:
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, MEMBER_TOPIC_POLL_S_MAX)
        existing = set(await admin.list_topics())
    return existing


async def _create_topics(
    admin: AIOKafkaAdminClient,
    missing: list[str],
    wanted: Mapping[str, Mapping[str, str]],
    partitions: Mapping[str, int],
    replicas: int,
    timeout_ms: int,
    *,
    principal: str,
) -> set[str]:
    """Create ``missing``; the names this call created (one created by someone else in
    between counts as existing, not as an error; a principal without the right to create
    gets ``topic-not-authorized``)."""
    response = await admin.create_topics(
        [
            NewTopic(
                name=name,
                num_partitions=partitions[name],
                replication_factor=replicas,
                topic_configs=dict(wanted[name]),
            )
            for name in missing
        ],
        timeout_ms=timeout_ms,
    )
    created: set[str] = set()
    for entry in response.to_object()["topic_errors"]:
        code = entry["error_code"]
        if code == 0:
            created.add(entry["topic"])
        elif code in _KAFKA_NOT_AUTHORIZED:
            raise TopicError(
                f"topic {entry['topic']} does not exist and principal {principal} may not "
                f"create it: the set-up creates topics and their ACLs (ensure_topics as the "
                f"admin principal)",
                code="topic-not-authorized",
            )
        elif code != _KAFKA_TOPIC_ALREADY_EXISTS:
            raise TopicError(
                f"broker refused to create topic {entry['topic']}: error {code} "
                f"{entry.get('error_message') or ''}".rstrip(),
                code="topic-create",
            )
    return created


def _layout_problems(
    partitions: Mapping[str, int], replicas: int, layout: Mapping[str, tuple[int, int]]
) -> list[str]:
    """What differs from the declared partitions and replication factor (neither can be
    fixed in place)."""
    problems: list[str] = []
    for name, declared in partitions.items():
        found_partitions, found_replicas = layout[name]
        if found_partitions != declared:
            problems.append(f"{name} has {found_partitions} partitions, declared {declared}")
        if found_replicas != replicas:
            problems.append(f"{name} has replication factor {found_replicas}, declared {replicas}")
    return problems


def _drifted_configs(
    wanted: Mapping[str, Mapping[str, str]], actual: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, str]]:
    """Per topic, the declared configs whose value on the broker differs."""
    drifted: dict[str, dict[str, str]] = {}
    for name, configs in wanted.items():
        diff = {key: value for key, value in configs.items() if actual[name].get(key) != value}
        if diff:
            drifted[name] = diff
    return drifted


def _describe_drift(
    drifted: Mapping[str, Mapping[str, str]], actual: Mapping[str, Mapping[str, str]]
) -> str:
    return "; ".join(
        f"{name}: " + ", ".join(
            f"{key}={actual[name].get(key)!r} (declared {value!r})"
            for key, value in diff.items()
        )
        for name, diff in drifted.items()
    )


async def _fix_configs(
    admin: AIOKafkaAdminClient,
    wanted: Mapping[str, Mapping[str, str]],
    drifted: Mapping[str, Mapping[str, str]],
) -> dict[str, dict[str, str]]:
    """Rewrite the drifted topics' configs to the declared ones; the configs after."""
    await _alter_configs(admin, {name: wanted[name] for name in drifted})
    # The broker applies an accepted change asynchronously: a describe right after the
    # alter can still show the old value (seen under load). Poll, bounded.
    deadline = time.monotonic() + CONFIG_APPLY_TIMEOUT_S
    while True:
        actual = await _describe_configs(admin, list(wanted))
        still = [name for name in drifted if any(
            actual[name].get(k) != v for k, v in wanted[name].items())]
        if not still:
            return actual
        if time.monotonic() >= deadline:
            raise TopicError(f"configs of {still} did not change", code="topic-config")
        await asyncio.sleep(POLL_INTERVAL_MS / 1000)


def _topic_states(
    wanted: Mapping[str, Mapping[str, str]],
    created: set[str],
    layout: Mapping[str, tuple[int, int]],
    actual: Mapping[str, Mapping[str, str]],
) -> dict[str, TopicState]:
    return {
        name: TopicState(
            name=name,
            created=name in created,
            partitions=layout[name][0],
            replication_factor=layout[name][1],
            configs={key: actual[name].get(key, "") for key in wanted[name]},
        )
        for name in wanted
    }


async def describe_topic_configs(
    bootstrap: str, names: list[str], *, timeout_ms: int = ENSURE_TIMEOUT_MS_DEFAULT
) -> dict[str, dict[str, str]]:
    """Every config value the broker reports for each named topic (for checks and tests)."""
    admin = admin_client(bootstrap, request_timeout_ms=min(timeout_ms, 30_000))
    await admin.start()
    try:
        return await _describe_configs(admin, names)
    finally:
        await admin.close()


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], deadline: float
) -> dict[str, tuple[int, int]]:
    """(partitions, replication factor) per topic once every partition has a leader."""
    while True:
        metadata = await admin.describe_topics(names)
        layout: dict[str, tuple[int, int]] = {}
        pending: list[str] = []
        for entry in metadata:
            name = entry["topic"]
            parts = entry["partitions"]
            if entry["error_code"] != 0 or not parts or any(
                part["leader"] < 0 or part["error_code"] != 0 for part in parts
            ):
                pending.append(f"{name} (error {entry['error_code']})")
                continue
            layout[name] = (len(parts), len(parts[0]["replicas"]))
        pending.extend(name for name in names if name not in layout and not any(
            p.startswith(f"{name} ") for p in pending))
        if not pending:
            return layout
        if time.monotonic() >= deadline:
            raise TopicError(
                f"topics without a leader before the deadline: {', '.join(sorted(pending))}",
                code="topic-timeout",
            )
        await asyncio.sleep(POLL_INTERVAL_MS / 1000)


async def _describe_configs(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, str]]:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    )
    found: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            if resource["error_code"] != 0:
                raise TopicError(
                    f"cannot describe configs of {resource['resource_name']}: error "
                    f"{resource['error_code']} {resource.get('error_message') or ''}".rstrip(),
                    code="topic-describe",
                )
            found[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"]
                if entry["config_value"] is not None
            }
    missing = [name for name in names if name not in found]
    assert not missing, f"describe_configs answered without {missing}"
    return found


async def _alter_configs(
    admin: AIOKafkaAdminClient, configs: Mapping[str, Mapping[str, str]]
) -> None:
    # AlterConfigs (non-incremental) replaces the whole set of topic overrides, which
    # is what declaring every topic's configs here means.
    responses = await admin.alter_configs(
        [
            ConfigResource(ConfigResourceType.TOPIC, name, configs=dict(values))
            for name, values in configs.items()
        ]
    )
    for response in responses:
        for resource in response.to_object()["resources"]:
            if resource["error_code"] != 0:
                raise TopicError(
                    f"cannot alter configs of {resource['resource_name']}: error "
                    f"{resource['error_code']} {resource.get('error_message') or ''}".rstrip(),
                    code="topic-alter",
                )

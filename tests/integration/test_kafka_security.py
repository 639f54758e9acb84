"""The secure broker against real clients: TLS, SCRAM, ACLs, and nothing in clear.

Every test talks to the running dev broker (SASL_SSL, StandardAuthorizer, deny by
default). Topics are a fresh chain prefix, created with its ACLs by ``ensure_topics``
as the set-up's admin principal, and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from streams.common import config
from streams.common.kafka_auth import client_properties
from streams.kafka import codec
from streams.kafka.acls import REGULATOR, external_system_name
from streams.kafka.logio import LogReader, LogWriter
from streams.kafka.records import tx_submitted_record
from streams.kafka.topics import (
    PROPOSALS,
    TOPICS,
    TX,
    VOTES,
    admin_client,
    delete_topics,
    ensure_topics,
    security_settings,
)
from streams.tools.devstack.kafka import LOG4J_CONFIG_PATH, libs_dir

pytestmark = pytest.mark.integration

CONNECT_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_MS = 10_000
CREDENTIAL_GONE_TIMEOUT_S = 30.0
READ_TIMEOUT_MS = 2_000
JAVA_TIMEOUT_S = 120.0
READ_DENIED_S = 5.0
EXTERNAL = external_system_name("koscom")
AUTHORIZATION_ERRORS = {29, 31}  # TOPIC_/CLUSTER_AUTHORIZATION_FAILED
JAVA_CLIENT = Path(__file__).with_name("java") / "ListTopics.java"


@pytest.fixture
def secure(stack_settings: Any) -> config.Settings:
    settings: config.Settings = config.load()
    if not settings.kafka_secure:
        pytest.fail("these tests need the secure broker (CAPLEDGER_KAFKA_SECURITY is "
                    "plaintext)")
    return settings


@pytest.fixture
async def chain(kafka_bootstrap: str, unique_id: str,
                secure: config.Settings) -> AsyncIterator[str]:
    prefix = f"sec.{unique_id}."
    await ensure_topics(kafka_bootstrap, prefix=prefix)
    await _acls_visible(kafka_bootstrap, prefix)
    yield prefix
    with contextlib.suppress(Exception):
        await delete_topics(kafka_bootstrap, prefix=prefix)


async def _acls_visible(bootstrap: str, prefix: str) -> None:
    """Until the broker describes every rule of the chain: a created ACL is applied by
    the broker a little after the controller acknowledged it, and a client connecting
    in between is refused the topic (aiokafka gives up at the first such answer)."""
    from streams.kafka.acls import bindings, roster, until_visible

    admin = admin_client(bootstrap)
    await admin.start()
    try:
        await until_visible(admin, list(bindings(prefix, roster(), TOPICS)))
    finally:
        await admin.close()


async def _admin_started(bootstrap: str, **settings: Any) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=REQUEST_TIMEOUT_MS, **settings)
    try:
        await asyncio.wait_for(admin.start(), CONNECT_TIMEOUT_S)
        await asyncio.wait_for(admin.list_topics(), CONNECT_TIMEOUT_S)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def test_plaintext_connection_is_refused(kafka_bootstrap: str,
                                               secure: config.Settings) -> None:
    with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
        await _admin_started(kafka_bootstrap, security_protocol="PLAINTEXT")


async def test_wrong_password_is_refused(kafka_bootstrap: str, secure: config.Settings) -> None:
    good = security_settings("koscom")
    await _admin_started(kafka_bootstrap, **good)  # the right one works
    wrong = {**good, "sasl_plain_password": good["sasl_plain_password"][::-1]}
    with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
        await _admin_started(kafka_bootstrap, **wrong)
    unknown = {**good, "sasl_plain_username": "mallory"}
    with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
        await _admin_started(kafka_bootstrap, **unknown)


async def test_broker_certificate_is_verified(kafka_bootstrap: str,
                                              secure: config.Settings) -> None:
    """A client trusting another CA (the system's) does not get through the handshake."""
    settings = {**security_settings("koscom"), "ssl_context": ssl.create_default_context()}
    with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
        await _admin_started(kafka_bootstrap, **settings)


async def test_external_system_writes_only_the_tx_log(kafka_bootstrap: str, chain: str) -> None:
    writer = LogWriter(kafka_bootstrap, client_id="sec-test-external", principal=EXTERNAL)
    await writer.start()
    try:
        assert await writer.send(chain + TX.name, b"a transaction") == 0
        for spec in (VOTES, PROPOSALS):
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(writer.send(chain + spec.name, b"forged"),
                                       CONNECT_TIMEOUT_S)
    finally:
        await writer.stop()
    # a member may write a vote: the refusal above is the ACL, not the topic
    member = LogWriter(kafka_bootstrap, client_id="sec-test-member", principal="koscom")
    await member.start()
    try:
        assert await member.send(chain + VOTES.name, b"vote") == 0
    finally:
        await member.stop()


async def test_external_system_cannot_read_votes(kafka_bootstrap: str, chain: str) -> None:
    """A vote is in the log; the regulator reads it, the external system gets nothing
    and the broker's metadata answer marks the topic unauthorized for it."""
    member = LogWriter(kafka_bootstrap, client_id="sec-test-member", principal="koscom")
    await member.start()
    try:
        await member.send(chain + VOTES.name, b"a signed vote")
    finally:
        await member.stop()
    regulator = LogReader(kafka_bootstrap, chain + VOTES.name, client_id="sec-test-reg",
                          principal=REGULATOR)
    await regulator.start(0)
    try:
        got = await regulator.read(timeout_ms=CONNECT_TIMEOUT_S * 1000)
        assert [record.value for record in got] == [b"a signed vote"]
    finally:
        await regulator.stop()
    reader = LogReader(kafka_bootstrap, chain + VOTES.name, client_id="sec-test-ext-read",
                       principal=EXTERNAL)
    await reader.start(0)
    try:
        deadline = time.monotonic() + READ_DENIED_S
        while time.monotonic() < deadline:
            assert await reader.read(timeout_ms=READ_TIMEOUT_MS) == []
        cluster = reader._consumer._client.cluster
        assert chain + VOTES.name in cluster.unauthorized_topics
    finally:
        await reader.stop()


@pytest.mark.parametrize("principal", [EXTERNAL, REGULATOR, "koscom"])
async def test_only_the_admin_creates_deletes_or_alters_topics(kafka_bootstrap: str, chain: str,
                                                       principal: str) -> None:
    name = chain + TX.name
    admin = admin_client(kafka_bootstrap, principal=principal,
                         request_timeout_ms=REQUEST_TIMEOUT_MS)
    await admin.start()
    try:
        created = await admin.create_topics([NewTopic(chain + "ledger.extra.v1", 1, 1)])
        codes = [entry[1] for entry in created.topic_errors]
        assert codes and all(code in AUTHORIZATION_ERRORS for code in codes), codes
        deleted = await admin.delete_topics([name])
        codes = [entry[1] for entry in deleted.topic_error_codes]
        assert codes and all(code in AUTHORIZATION_ERRORS for code in codes), codes
        altered = await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, name, configs={"retention.ms": "1000"})])
        codes = [resource[0] for response in altered for resource in response.resources]
        assert codes and all(code in AUTHORIZATION_ERRORS for code in codes), codes
    finally:
        await admin.close()
    described = await admin_list(kafka_bootstrap)
    assert name in described  # still there


async def admin_list(bootstrap: str) -> set[str]:
    admin = admin_client(bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


# ------------------------------------------------------------------ message encryption


class CapturingProxy:
    """A TCP relay (asyncio) that keeps every byte it forwards, both directions."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.captured = bytearray()
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while chunk := await source.read(65536):
                    self.captured += chunk
                    sink.write(chunk)
                    await sink.drain()
            with contextlib.suppress(Exception):
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@contextlib.contextmanager
def through(proxy_port: int, broker: tuple[str, int]) -> Iterator[None]:
    """Route aiokafka's connections to the broker via the proxy. The broker advertises
    its own address in metadata, so without this the client would leave the proxy
    after bootstrap; only the port changes, so the TLS host name check still applies."""
    import aiokafka.client as client_module

    original = client_module.create_conn

    async def redirected(host: str, port: int, **kwargs: Any) -> Any:
        if (host, port) == broker:
            port = proxy_port
        return await original(host, port, **kwargs)

    client_module.create_conn = redirected  # type: ignore[assignment]
    try:
        yield
    finally:
        client_module.create_conn = original


async def test_bytes_on_the_wire_hold_no_transaction(kafka_bootstrap: str, chain: str,
                                                     secure: config.Settings) -> None:
    """The seed's "message encryption" test: a transaction goes in and comes back out
    through a relay that records the raw stream; none of its bytes, nor the topic
    name nor the principal, appear in it."""
    raw_tx = b"CAPLEDGER-TX-MARKER:" + os.urandom(160) + b":pay 1000000 KRW to koscom"
    value = codec.encode("TxSubmitted", tx_submitted_record(
        raw_tx, submitter=EXTERNAL, idempotency_key="secret-key-0001",
        now_ms=int(time.time() * 1000)))
    proxy = CapturingProxy(secure.kafka_host, secure.kafka_port)
    port = await proxy.start()
    try:
        with through(port, (secure.kafka_host, secure.kafka_port)):
            writer = LogWriter(f"{secure.kafka_host}:{port}", client_id="sec-wire",
                               principal=EXTERNAL, compression_type=None)
            await writer.start()
            try:
                offset = await writer.send(chain + TX.name, value, key=b"secret-key-0001")
            finally:
                await writer.stop()
            reader = LogReader(f"{secure.kafka_host}:{port}", chain + TX.name,
                               client_id="sec-wire-read", principal=REGULATOR)
            await reader.start(offset)
            try:
                records = await reader.read(timeout_ms=CONNECT_TIMEOUT_S * 1000)
            finally:
                await reader.stop()
    finally:
        await proxy.stop()
    assert [record.value for record in records] == [value]  # it did travel, both ways
    wire = bytes(proxy.captured)
    assert proxy.connections >= 2 and len(wire) > 2 * len(value)
    for secret in (raw_tx, raw_tx[20:180], b"CAPLEDGER-TX-MARKER", b"pay 1000000 KRW",
                   value, b"secret-key-0001", (chain + TX.name).encode(), EXTERNAL.encode(),
                   b"SCRAM-SHA-512"):
        assert secret not in wire, secret[:40]
    assert wire[:1] == b"\x16"  # a TLS handshake record opens the stream


# ------------------------------------------------------------------ other languages


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime")
def test_client_config_works_for_the_java_client(secure: config.Settings, tmp_path: Path,
                                                 chain: str) -> None:
    """`capledger dev client-config` output, as is, connects Kafka's own Java client."""
    properties = tmp_path / "regulator.properties"
    text = client_properties(REGULATOR, secure, style="java", include_password=True)
    fd = os.open(properties, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    out = subprocess.run(
        ["java", "-cp", f"{libs_dir(secure)}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
         str(JAVA_CLIENT), str(properties)],
        capture_output=True, text=True, timeout=JAVA_TIMEOUT_S, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = [int(line.split()[1]) for line in out.stdout.splitlines()
              if line.startswith("topics ")]
    assert counts and counts[0] >= len(TOPICS), out.stdout[-2000:]  # this chain's, at least
    wrong = tmp_path / "wrong.properties"
    wrong.write_text(text.replace('password="', 'password="x'))
    out = subprocess.run(
        ["java", "-cp", f"{libs_dir(secure)}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
         str(JAVA_CLIENT), str(wrong)],
        capture_output=True, text=True, timeout=JAVA_TIMEOUT_S, check=False)
    assert out.returncode != 0


async def test_a_member_cannot_create_its_chain_topics(kafka_bootstrap: str, unique_id: str,
                                                       secure: config.Settings) -> None:
    """A node started before the set-up made its topics fails once its short wait for
    them is over (bounded here by the call's timeout), and says why."""
    from streams.kafka.topics import TopicError

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPLEDGER_KAFKA_PRINCIPAL", "koscom")
        with pytest.raises(TopicError) as caught:
            await ensure_topics(kafka_bootstrap, prefix=f"nosetup.{unique_id}.", specs=[TX],
                                timeout_ms=3_000)
    assert caught.value.code == "topic-not-authorized"
    assert f"nosetup.{unique_id}.{TX.name}" not in await admin_list(kafka_bootstrap)


async def test_a_member_joins_only_its_own_consumer_groups(kafka_bootstrap: str,
                                                           chain: str) -> None:
    """koscom's node may use capledger-koscom.* groups, not securities-a's."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import GroupAuthorizationFailedError

    from streams.kafka.acls import member_group_prefix
    from streams.kafka.topics import consumer_settings

    async def join(group: str) -> None:
        consumer = AIOKafkaConsumer(chain + VOTES.name, bootstrap_servers=kafka_bootstrap,
                                    **consumer_settings(group_id=group, principal="koscom"))
        try:
            await consumer.start()
            await consumer.getmany(timeout_ms=READ_TIMEOUT_MS)
            await asyncio.wait_for(consumer.commit({TopicPartition(chain + VOTES.name, 0): 0}),
                                   CONNECT_TIMEOUT_S)
        finally:
            await consumer.stop()

    await join(member_group_prefix("koscom") + chain)
    with pytest.raises(GroupAuthorizationFailedError):
        await join(member_group_prefix("securities-a") + chain)


async def test_a_system_registered_after_setup_connects_with_external_rights(
        kafka_bootstrap: str, chain: str, unique_id: str, secure: config.Settings) -> None:
    """`capledger dev add-system`: a new SCRAM credential on the running broker, its
    password file, and the external-system ACLs on the chains that exist."""
    from streams.kafka.registry import (
        register_external_system,
        registered_systems,
        unregister_external_system,
    )

    name = f"sys-{unique_id[-12:]}"
    admin = admin_client(kafka_bootstrap)
    await admin.start()
    try:
        chains = await register_external_system(admin, secure, name, "koscom")
    finally:
        await admin.close()
    try:
        await _acls_visible(kafka_bootstrap, chain)  # the new system's rules too
        assert chains >= 1 and (name, "koscom") in registered_systems(secure)
        assert oct(secure.kafka_password_file(name).stat().st_mode & 0o777) == "0o600"
        writer = LogWriter(kafka_bootstrap, client_id="sec-registered", principal=name)
        await writer.start()
        try:
            assert await writer.send(chain + TX.name, b"from the new system") >= 0
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(writer.send(chain + VOTES.name, b"forged"),
                                       CONNECT_TIMEOUT_S)
        finally:
            await writer.stop()
        wrong = {**security_settings(name), "sasl_plain_password": "not-its-password"}
        with pytest.raises((KafkaConnectionError, KafkaError, asyncio.TimeoutError)):
            await _admin_started(kafka_bootstrap, **wrong)
        right = security_settings(name)
    finally:  # also after a failure above, so no later test sees the system
        admin = admin_client(kafka_bootstrap)
        await admin.start()
        try:
            await unregister_external_system(admin, secure, name)
        finally:
            await admin.close()
    assert (name, "koscom") not in registered_systems(secure)
    # Its credential is gone: the deletion is a metadata record every broker applies
    # on its own, so a connection made right after the call may still be let in.
    deadline = asyncio.get_running_loop().time() + CREDENTIAL_GONE_TIMEOUT_S
    while True:
        try:
            await _admin_started(kafka_bootstrap, **right)
        except (TimeoutError, KafkaConnectionError, KafkaError):
            break
        assert asyncio.get_running_loop().time() < deadline, "the credential still works"
        await asyncio.sleep(0.2)


async def test_ensure_topics_takes_back_rules_the_table_no_longer_holds(
        kafka_bootstrap: str, chain: str) -> None:
    """A rule an older table granted (here: the external system writing votes) is
    deleted by the next set-up run, and the broker refuses again."""
    from streams.kafka.acls import (
        PATTERN_LITERAL,
        RESOURCE_TOPIC,
        Binding,
        Op,
        create_bindings,
    )

    stale = Binding(f"User:{EXTERNAL}", RESOURCE_TOPIC, chain + VOTES.name, PATTERN_LITERAL,
                    int(Op.WRITE))
    admin = admin_client(kafka_bootstrap)
    await admin.start()
    try:
        await create_bindings(admin, [stale])
    finally:
        await admin.close()
    writer = LogWriter(kafka_bootstrap, client_id="sec-stale", principal=EXTERNAL)
    await writer.start()
    try:
        assert await writer.send(chain + VOTES.name, b"allowed by the stale rule") >= 0
    finally:
        await writer.stop()
    await ensure_topics(kafka_bootstrap, prefix=chain)
    writer = LogWriter(kafka_bootstrap, client_id="sec-stale-2", principal=EXTERNAL)
    await writer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(writer.send(chain + VOTES.name, b"refused again"),
                                   CONNECT_TIMEOUT_S)
    finally:
        await writer.stop()


async def _topic_rules(bootstrap: str, names: list[str]) -> set[Any]:
    from streams.kafka.acls import PATTERN_LITERAL, RESOURCE_TOPIC, existing_bindings

    admin = admin_client(bootstrap)
    await admin.start()
    try:
        found: set[Any] = set()
        for name in names:
            found |= await existing_bindings(admin, RESOURCE_TOPIC, name, PATTERN_LITERAL)
        return found
    finally:
        await admin.close()


async def _until_no_rules(bootstrap: str, names: list[str]) -> None:
    deadline = asyncio.get_running_loop().time() + CREDENTIAL_GONE_TIMEOUT_S
    while left := await _topic_rules(bootstrap, names):
        assert asyncio.get_running_loop().time() < deadline, f"rules left: {sorted(left)[:3]}"
        await asyncio.sleep(0.1)


async def test_deleting_a_chain_deletes_its_rules(kafka_bootstrap: str, unique_id: str,
                                                  secure: config.Settings) -> None:
    """The broker keeps a rule after its topic is gone; a chain's deletion takes its
    rules with it, so runs that create and delete chains do not grow the broker's rule
    set (decision 0131)."""
    prefix = f"gone.{unique_id}."
    names = [prefix + spec.name for spec in TOPICS]
    await ensure_topics(kafka_bootstrap, prefix=prefix)
    await _acls_visible(kafka_bootstrap, prefix)
    assert len(await _topic_rules(kafka_bootstrap, names)) > len(TOPICS)
    assert sorted(await delete_topics(kafka_bootstrap, prefix=prefix)) == sorted(names)
    await _until_no_rules(kafka_bootstrap, names)


async def test_prune_deletes_rules_on_missing_topics_only(kafka_bootstrap: str, chain: str,
                                                          unique_id: str) -> None:
    """``capledger dev prune-acls``' two steps: the rules on a topic that does not exist
    are found and deleted; the rules of a chain whose topics exist stay."""
    from streams.kafka.acls import (
        PATTERN_LITERAL,
        RESOURCE_TOPIC,
        Binding,
        Op,
        create_bindings,
        delete_topic_acls,
        orphan_topic_acl_names,
    )

    missing = f"orphan.{unique_id}.ledger.tx.v1"
    admin = admin_client(kafka_bootstrap)
    await admin.start()
    try:
        await create_bindings(admin, [Binding(f"User:{EXTERNAL}", RESOURCE_TOPIC, missing,
                                              PATTERN_LITERAL, int(Op.READ))])
        # A broker serves rules from its copy of the controller's metadata, so a rule
        # just granted shows up there a moment later.
        deadline = asyncio.get_running_loop().time() + CREDENTIAL_GONE_TIMEOUT_S
        while missing not in (orphans := await orphan_topic_acl_names(admin)):
            assert asyncio.get_running_loop().time() < deadline, "the rule never showed"
            await asyncio.sleep(0.1)
        assert not any(name.startswith(chain) for name in orphans)
        assert await delete_topic_acls(admin, [missing]) == 1
    finally:
        await admin.close()
    await _until_no_rules(kafka_bootstrap, [missing])
    assert len(await _topic_rules(kafka_bootstrap, [chain + TX.name])) > 0

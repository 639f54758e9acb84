"""Shared pytest fixtures: the real local stack, per-test topics and databases.

Owns: bringing up (or reusing) the Kafka broker and PostgreSQL once per test run
through streams.tools.devstack, and giving each test its own topic names and its own
freshly migrated database. Only tests marked ``integration`` may use these
fixtures (tests under tests/integration are marked automatically, tests under
tests/unit get ``unit``), so unit runs never start anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
TESTS_DIR = Path(__file__).resolve().parent
TOPIC_TIMEOUT_S = 30.0
TEST_DB_PREFIX = "capledger_test_"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if TESTS_DIR / "integration" in path.parents:
            item.add_marker(pytest.mark.integration)
        elif TESTS_DIR / "unit" in path.parents:
            item.add_marker(pytest.mark.unit)


def _require_integration(request: pytest.FixtureRequest) -> None:
    node = request.node
    if isinstance(node, pytest.Item) and node.get_closest_marker("integration") is None:
        raise pytest.UsageError(f"{node.nodeid} uses the real stack but is not marked "
                                f"integration")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in a thread.

    Lets synchronous fixtures call aiokafka even while a test's event loop runs.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="fixture-async")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Any]:
    """Settings of the running stack; starts Kafka and PostgreSQL if they are not up."""
    from streams.common import config
    from streams.tools.devstack import kafka, postgres

    settings = config.load()
    kafka.start(settings)
    postgres.start(settings)
    yield settings
    run_async(_prune_acls(settings.kafka_bootstrap))


async def _prune_acls(bootstrap: str) -> None:
    """After the session: the rules on topics the tests deleted without their rules
    (fixtures that delete topics directly), so the broker's rule set does not grow run
    after run (decision 0131)."""
    from streams.common.kafka_auth import client_auth
    from streams.kafka.acls import delete_topic_acls, orphan_topic_acl_names
    from streams.kafka.topics import admin_client

    if not client_auth().secure:
        return
    admin = admin_client(bootstrap, request_timeout_ms=int(TOPIC_TIMEOUT_S * 1000))
    await admin.start()
    try:
        await delete_topic_acls(admin, await orphan_topic_acl_names(admin))
    finally:
        await admin.close()


@pytest.fixture
def kafka_bootstrap(request: pytest.FixtureRequest, stack_settings: Any) -> str:
    _require_integration(request)
    return str(stack_settings.kafka_bootstrap)


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test, usable in topic, group and app names."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return unique_name(base or "test")


async def _create_topics(bootstrap: str, specs: list[tuple[str, int, dict[str, str]]]) -> None:
    from aiokafka.admin import NewTopic

    from streams.kafka.topics import admin_client

    admin = admin_client(bootstrap, request_timeout_ms=int(TOPIC_TIMEOUT_S * 1000))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)
                                   for name, partitions, configs in specs])
        deadline = asyncio.get_running_loop().time() + TOPIC_TIMEOUT_S
        wanted = {name for name, _, _ in specs}
        while not wanted <= set(await admin.list_topics()):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"topics {sorted(wanted)} not listed in {TOPIC_TIMEOUT_S}s")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from streams.kafka.topics import admin_client

    admin = admin_client(bootstrap, request_timeout_ms=int(TOPIC_TIMEOUT_S * 1000))
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


@pytest.fixture
def topic_factory(kafka_bootstrap: str,
                  unique_id: str) -> Iterator[Callable[..., str]]:
    """``topic_factory("pings", partitions=1, configs={...}) -> unique topic name``.

    Creates the topic explicitly (auto creation is off on the broker) and deletes
    it after the test; names are unique so a leftover never disturbs another test.
    """
    created: list[str] = []

    def make(name: str, partitions: int = 1, configs: dict[str, str] | None = None) -> str:
        topic = f"test.{name}.{unique_id}"
        run_async(_create_topics(kafka_bootstrap, [(topic, partitions, dict(configs or {}))]))
        created.append(topic)
        return topic

    yield make
    if created:
        with contextlib.suppress(Exception):
            run_async(_delete_topics(kafka_bootstrap, created))


@pytest.fixture
def unique_topics(topic_factory: Callable[..., str]) -> Callable[..., dict[str, str]]:
    """``unique_topics("a", "b") -> {"a": "test.a.<id>", "b": ...}``, all created."""

    def make(*names: str) -> dict[str, str]:
        return {name: topic_factory(name) for name in names}

    return make


@pytest.fixture
def pg_dsn(request: pytest.FixtureRequest, stack_settings: Any) -> Iterator[str]:
    """DSN of a fresh database, migrated to head, dropped after the test."""
    _require_integration(request)
    import psycopg
    from psycopg import sql

    from streams.tools.devstack.postgres import migrate, with_database

    name = TEST_DB_PREFIX + uuid.uuid4().hex[:16]
    with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_database(stack_settings.pg_dsn, name)
    try:
        migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))

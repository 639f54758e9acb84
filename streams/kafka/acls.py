"""Who may do what on the broker: the principals of a chain and their ACLs.

Owns: the principal roster of the local set-up (the admin, one principal per member
institution, one per registered external system, the read-only regulator), the ACL
table (which principal may read, write or describe which topic; see
docs/decisions/0060-kafka-security.md) and :func:`ensure_acls`, which creates those
ACLs for one chain's topics with the admin principal. The broker denies everything
no ACL allows (``allow.everyone.if.no.acl.found=false``); only the admin (a super
user) creates, deletes or alters topics.

aiokafka has no ACL API and its CreateAcls request is version 1, which Kafka 4
no longer accepts; the version 2 (flexible) request is declared here.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from ledger.errors import ValidationError
from ledger.membership import INSTITUTION_IDS
from streams.common import config
from streams.common.kafka_auth import check_principal_name
from streams.kafka.topics import (
    ADMIN_PRINCIPAL,
    ALERTS,
    BLOCKS,
    GOVERNANCE,
    MARKET_TOPICS,
    PROPOSALS,
    REJECTED,
    STATUS,
    TOPICS,
    TX,
    VOTES,
    TopicSpec,
)

ADMIN = ADMIN_PRINCIPAL
REGULATOR = "regulator"
EXTERNAL_SUFFIX = "-backoffice"
# A member's node (its faust app) uses consumer groups named
# "capledger-<institution>.<topic prefix>"; ids are [a-z0-9-], so the "." ends the
# institution and one member's prefix never matches another's groups. Other
# principals read with manually assigned partitions and use no group.
GROUP_PREFIX = "capledger-"


def member_group_prefix(institution: str) -> str:
    return f"{GROUP_PREFIX}{institution}."


ACL_BATCH_MAX = 200
ACL_VISIBLE_TIMEOUT_S = 30.0  # created rules described by the broker within this
ACL_VISIBLE_POLL_S = 0.05


class AclError(ValidationError):
    code = "kafka-acl"


class Role(enum.Enum):
    ADMIN = ADMIN_PRINCIPAL
    MEMBER = "member"
    EXTERNAL = "external"
    REGULATOR = "regulator"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    institution: str = ""  # the member it belongs to (members and external systems)

    @property
    def kafka_name(self) -> str:
        return f"User:{self.name}"


def external_system_name(institution: str) -> str:
    """The back-office principal registered for ``institution`` by the local set-up."""
    return institution + EXTERNAL_SUFFIX


def roster(institutions: Iterable[str] = INSTITUTION_IDS, *,
           settings: config.Settings | None = None) -> tuple[Principal, ...]:
    """Every principal of the local set-up: the admin, the members, one back office
    per member, the regulator, and the external systems registered since
    (``capledger dev add-system``, streams/kafka/registry.py)."""
    members = tuple(institutions)
    registered = registered_systems(settings or config.load())
    return (
        Principal(ADMIN, Role.ADMIN),
        *(Principal(name, Role.MEMBER, name) for name in members),
        *(Principal(external_system_name(name), Role.EXTERNAL, name) for name in members),
        Principal(REGULATOR, Role.REGULATOR),
        *(Principal(name, Role.EXTERNAL, institution) for name, institution in registered
          if institution in members),
    )


REGISTRY_FILENAME = "external-systems.json"
REGISTRY_BYTES_MAX = 1024 * 1024


def registry_path(settings: config.Settings) -> Path:
    return settings.kafka_state_dir / REGISTRY_FILENAME


def registered_systems(settings: config.Settings) -> list[tuple[str, str]]:
    """(name, institution) of every external system registered after set-up."""
    path = registry_path(settings)
    if not path.exists():
        return []
    raw = path.read_bytes()[:REGISTRY_BYTES_MAX + 1]
    try:
        data = json.loads(raw)
        return [(check_principal_name(str(item["name"])), str(item["institution"]))
                for item in data["systems"]]
    except (ValueError, KeyError, TypeError) as error:
        raise AclError(f"{path} is damaged: {type(error).__name__}",
                       code="kafka-registry-file") from None


class Op(enum.IntEnum):
    """Kafka AclOperation codes."""

    READ = 3
    WRITE = 4
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


# The market topics and the alerts topic are written by members too: which member may
# write which record is checked by every reader from the record's signature (the market
# replays only events signed by their rightful writer, decision 0070), not by the broker.
# A member's own services (the platform's API, the market service) submit
# transactions as the member, so members write the tx log too.
_MEMBER_WRITES = (TX, PROPOSALS, VOTES, BLOCKS, REJECTED, STATUS, GOVERNANCE, *MARKET_TOPICS,
                  ALERTS)
# The governance announcements tell an external system's client the membership that
# checks the blocks it reads (decision 0062); they hold public keys and signatures only.
_EXTERNAL_READS = (BLOCKS, REJECTED, GOVERNANCE)

# role -> topic -> operations. Reading or writing implies describing (Kafka's rule);
# DESCRIBE_CONFIGS lets a node check the declared topic configs at start.
ACL_TABLE: dict[Role, dict[str, tuple[Op, ...]]] = {
    Role.MEMBER: {
        spec.name: (Op.READ, Op.DESCRIBE_CONFIGS)
        + ((Op.WRITE,) if spec in _MEMBER_WRITES else ())
        for spec in TOPICS
    },
    Role.EXTERNAL: {
        TX.name: (Op.WRITE,),
        **{spec.name: (Op.READ,) for spec in _EXTERNAL_READS},
    },
    Role.REGULATOR: {spec.name: (Op.READ, Op.DESCRIBE_CONFIGS) for spec in TOPICS},
}


@dataclass(frozen=True, slots=True)
class Binding:
    """One ALLOW rule: principal, resource (type, name, pattern), operation."""

    principal: str
    resource_type: int
    resource_name: str
    pattern_type: int
    operation: int


RESOURCE_TOPIC = 2
RESOURCE_GROUP = 3
PATTERN_LITERAL = 3
PATTERN_PREFIXED = 4
PERMISSION_ALLOW = 3


def bindings(prefix: str, principals: Iterable[Principal],
             specs: Iterable[TopicSpec] = TOPICS) -> list[Binding]:
    """The ACLs of one chain (its topics under ``prefix``) for these principals."""
    chosen = {spec.name for spec in specs}
    out: list[Binding] = []
    for principal in principals:
        table = ACL_TABLE.get(principal.role)
        if table is None:  # the admin is a super user and needs none
            continue
        for name, operations in table.items():
            if name not in chosen:
                continue
            out.extend(Binding(principal.kafka_name, RESOURCE_TOPIC, prefix + name,
                               PATTERN_LITERAL, int(op)) for op in operations)
        if principal.role is Role.MEMBER:
            out.append(Binding(principal.kafka_name, RESOURCE_GROUP,
                               member_group_prefix(principal.name), PATTERN_PREFIXED,
                               int(Op.READ)))
    return out


# ---------------------------------------------------------------- CreateAcls v2


class _CreateAclsResponse_v2(Response):  # type: ignore[misc]
    API_KEY = 30
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _CreateAclsRequest_v2(RequestStruct):  # type: ignore[misc]
    API_KEY = 30
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = _CreateAclsResponse_v2
    SCHEMA = Schema(
        ("creations", CompactArray(
            ("resource_type", Int8),
            ("resource_name", CompactString("utf-8")),
            ("resource_pattern_type", Int8),
            ("principal", CompactString("utf-8")),
            ("host", CompactString("utf-8")),
            ("operation", Int8),
            ("permission_type", Int8),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


_CreateAclsStruct: TypeAlias = _CreateAclsRequest_v2


class _CreateAcls(Request[_CreateAclsStruct]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, items: list[Binding]) -> None:
        self._items = items

    def build(self, request_struct_class: type[_CreateAclsStruct]) -> _CreateAclsStruct:
        return request_struct_class(
            [(b.resource_type, b.resource_name, b.pattern_type, b.principal, "*",
              b.operation, PERMISSION_ALLOW, {}) for b in self._items],
            {},
        )


async def create_bindings(admin: AIOKafkaAdminClient, items: list[Binding]) -> int:
    """Create these ACLs (creating an existing ACL is a no-op on the broker)."""
    for start in range(0, len(items), ACL_BATCH_MAX):
        batch = items[start:start + ACL_BATCH_MAX]
        client: Any = admin._client  # aiokafka has no public ACL call
        response = await client.send(client.get_random_node(), _CreateAcls(batch))
        errors = [(code, message) for code, message, *_ in response.results if code]
        if errors:
            code, message = errors[0]
            raise AclError(f"broker refused {len(errors)} ACL(s): error {code} "
                           f"{message or ''}".rstrip(), code="kafka-acl-create")
    return len(items)


async def until_visible(admin: AIOKafkaAdminClient, items: list[Binding],
                        timeout_s: float = ACL_VISIBLE_TIMEOUT_S) -> None:
    """Wait until the broker describes every one of these rules. A created ACL is a
    metadata record each broker applies on its own, a little after the controller
    acknowledged it; a client connecting in between is refused the topic
    (``TopicAuthorizationFailed``). Raises ``AclError`` (``kafka-acl-not-visible``)
    if they are not all visible within ``timeout_s``."""
    wanted = set(items)
    resources = sorted({(b.resource_type, b.resource_name, b.pattern_type) for b in wanted})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay_s = ACL_VISIBLE_POLL_S
    while True:
        present: set[Binding] = set()
        for resource_type, resource_name, pattern_type in resources:
            present |= await existing_bindings(admin, resource_type, resource_name,
                                               pattern_type)
        missing = wanted - present
        if not missing:
            return
        if loop.time() >= deadline:
            raise AclError(f"{len(missing)} created ACL(s) not visible on the broker after "
                           f"{timeout_s:.0f} s", code="kafka-acl-not-visible")
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 1.0)


# ---------------------------------------------------------------- DescribeAcls / DeleteAcls v2

_ANY = 1  # resource type, pattern type, operation and permission "ANY" in filters
_FILTER_FIELDS = (
    ("resource_type", Int8),
    ("resource_name", CompactString("utf-8")),
    ("pattern_type", Int8),
    ("principal", CompactString("utf-8")),
    ("host", CompactString("utf-8")),
    ("operation", Int8),
    ("permission_type", Int8),
)


class _DescribeAclsResponse_v2(Response):  # type: ignore[misc]
    API_KEY = 29
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        ("resources", CompactArray(
            ("resource_type", Int8),
            ("resource_name", CompactString("utf-8")),
            ("pattern_type", Int8),
            ("acls", CompactArray(
                ("principal", CompactString("utf-8")),
                ("host", CompactString("utf-8")),
                ("operation", Int8),
                ("permission_type", Int8),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _DescribeAclsRequest_v2(RequestStruct):  # type: ignore[misc]
    API_KEY = 29
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = _DescribeAclsResponse_v2
    SCHEMA = Schema(*_FILTER_FIELDS, ("tags", TaggedFields))


class _DeleteAclsResponse_v2(Response):  # type: ignore[misc]
    API_KEY = 31
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("filter_results", CompactArray(
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("matching_acls", CompactArray(
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                *_FILTER_FIELDS,
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _DeleteAclsRequest_v2(RequestStruct):  # type: ignore[misc]
    API_KEY = 31
    API_VERSION = 2
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = _DeleteAclsResponse_v2
    SCHEMA = Schema(("filters", CompactArray(*_FILTER_FIELDS, ("tags", TaggedFields))),
                    ("tags", TaggedFields))


_DescribeStruct: TypeAlias = _DescribeAclsRequest_v2
_DeleteStruct: TypeAlias = _DeleteAclsRequest_v2


class _DescribeAcls(Request[_DescribeStruct]):  # type: ignore[misc]
    API_KEY = 29

    def __init__(self, resource_type: int, resource_name: str | None,
                 pattern_type: int) -> None:
        self._filter = (resource_type, resource_name, pattern_type)

    def build(self, request_struct_class: type[_DescribeStruct]) -> _DescribeStruct:
        return request_struct_class(*self._filter, None, None, _ANY, _ANY, {})


class _DeleteAcls(Request[_DeleteStruct]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, items: list[Binding]) -> None:
        self._items = items

    def build(self, request_struct_class: type[_DeleteStruct]) -> _DeleteStruct:
        return request_struct_class(
            [(b.resource_type, b.resource_name, b.pattern_type, b.principal, "*",
              b.operation, PERMISSION_ALLOW, {}) for b in self._items], {})


class _DeleteAclsOn(Request[_DeleteStruct]):  # type: ignore[misc]
    """Every rule (any principal, host, operation and permission) on these resources,
    named literally."""

    API_KEY = 31

    def __init__(self, resource_type: int, names: list[str]) -> None:
        self._resource_type = resource_type
        self._names = names

    def build(self, request_struct_class: type[_DeleteStruct]) -> _DeleteStruct:
        return request_struct_class(
            [(self._resource_type, name, PATTERN_LITERAL, None, None, _ANY, _ANY, {})
             for name in self._names], {})


async def existing_bindings(admin: AIOKafkaAdminClient, resource_type: int,
                            resource_name: str | None, pattern_type: int) -> set[Binding]:
    """The ALLOW rules (any host) on the resources matching this filter."""
    client: Any = admin._client
    response = await client.send(client.get_random_node(),
                                 _DescribeAcls(resource_type, resource_name, pattern_type))
    if response.error_code:
        raise AclError(f"broker refused to describe ACLs: error {response.error_code} "
                       f"{response.error_message or ''}".rstrip(), code="kafka-acl-describe")
    return {
        Binding(principal, kind, name, pattern, operation)
        for kind, name, pattern, acls, *_ in response.resources
        for principal, host, operation, permission, *_ in acls
        if permission == PERMISSION_ALLOW and host == "*"
    }


async def _deleted(admin: AIOKafkaAdminClient, requests: Iterable[Any]) -> int:
    """Send these DeleteAcls requests one after another; how many rules went."""
    removed = 0
    client: Any = admin._client
    for request in requests:
        response = await client.send(client.get_random_node(), request)
        for code, message, matching, *_ in response.filter_results:
            if code:
                raise AclError(f"broker refused to delete ACLs: error {code} "
                               f"{message or ''}".rstrip(), code="kafka-acl-delete")
            removed += len(matching)
    return removed


async def delete_bindings(admin: AIOKafkaAdminClient, items: list[Binding]) -> int:
    """Delete exactly these rules; returns how many the broker removed."""
    return await _deleted(admin, (_DeleteAcls(items[start:start + ACL_BATCH_MAX])
                                  for start in range(0, len(items), ACL_BATCH_MAX)))


async def delete_topic_acls(admin: AIOKafkaAdminClient, names: Iterable[str]) -> int:
    """Delete every rule on these topics (named literally), whoever it is for: what
    deleting a chain's topics leaves behind. The broker keeps rules on topics that do
    not exist; a bench or test run that creates and deletes chains by the hundred would
    otherwise grow them without bound (1.16 M rules once filled a 1 GiB broker heap and
    cost a full collection every few minutes, decision 0131). Returns how many went."""
    chosen = list(names)
    return await _deleted(admin, (_DeleteAclsOn(RESOURCE_TOPIC, chosen[start:start + ACL_BATCH_MAX])
                                  for start in range(0, len(chosen), ACL_BATCH_MAX)))


async def orphan_topic_acl_names(admin: AIOKafkaAdminClient) -> list[str]:
    """The topics named by a literal rule that do not exist (left by deleted chains)."""
    ruled = {b.resource_name for b in await existing_bindings(
        admin, RESOURCE_TOPIC, None, PATTERN_LITERAL)}
    existing = set(await admin.list_topics())
    return sorted(ruled - existing)


async def ensure_acls(admin: AIOKafkaAdminClient, prefix: str,
                      principals: Iterable[Principal] | None = None,
                      specs: Iterable[TopicSpec] = TOPICS) -> int:
    """Make the rules on one chain's topics (and the members' groups) exactly the ACL
    table: grant what is missing, delete what the table no longer holds (a rule an
    older table granted, or one for a principal no longer registered). Returns the
    number of rules granted or deleted."""
    chosen = roster() if principals is None else tuple(principals)
    chosen_specs = tuple(specs)
    wanted = set(bindings(prefix, chosen, chosen_specs))
    present: set[Binding] = set()
    for spec in chosen_specs:
        present |= await existing_bindings(admin, RESOURCE_TOPIC, prefix + spec.name,
                                           PATTERN_LITERAL)
    groups = await existing_bindings(admin, RESOURCE_GROUP, None, PATTERN_PREFIXED)
    present |= {b for b in groups if b.resource_name.startswith(GROUP_PREFIX)}
    stale = [b for b in present - wanted
             if b.resource_type == RESOURCE_TOPIC or b not in _all_group_bindings()]
    missing = sorted(wanted - present, key=repr)
    if missing:
        await create_bindings(admin, missing)
    if stale:
        await delete_bindings(admin, stale)
    return len(missing) + len(stale)


def _all_group_bindings() -> set[Binding]:
    """The group rules of every principal of the roster (shared by all chains)."""
    return {b for b in bindings("", roster(), ()) if b.resource_type == RESOURCE_GROUP}

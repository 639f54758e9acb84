"""External systems registered after set-up: their SCRAM credential and their ACLs.

Owns: the registry file ``$CAPLEDGER_STATE_DIR/kafka/external-systems.json`` (the
systems registered beyond the set-up's one back office per member; read by
:func:`streams.kafka.acls.roster`, so every later ``ensure_topics`` grants them the
external-system ACLs too) and :func:`register_external_system`, which, as the admin
principal, creates the system's SCRAM-SHA-512 credential on the running broker
(AlterUserScramCredentials: the salted password is computed here, the password
itself never leaves this process) and grants its ACLs on every chain's topics that
exist now. aiokafka has no call for AlterUserScramCredentials; the request (v0,
flexible) is declared here.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any, TypeAlias

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from ledger.errors import ValidationError
from streams.common import config
from streams.common.kafka_auth import check_principal_name
from streams.kafka.acls import (
    Principal,
    Role,
    bindings,
    create_bindings,
    registered_systems,
    registry_path,
    roster,
)
from streams.kafka.topics import TX

SCRAM_SHA_512 = 2  # Kafka's ScramMechanism code
SCRAM_ITERATIONS = 8192
SALT_BYTES = 32
PASSWORD_BYTES = 24


class RegistryError(ValidationError):
    code = "kafka-registry"



def _write_registry(settings: config.Settings, systems: list[tuple[str, str]]) -> None:
    path = registry_path(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"systems": [{"name": n, "institution": i}
                                           for n, i in systems]}, indent=2) + "\n")
    tmp.replace(path)


class _AlterScramResponse_v0(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    FLEXIBLE_VERSION = True
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(
            ("user", CompactString("utf-8")),
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _AlterScramRequest_v0(RequestStruct):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = _AlterScramResponse_v0
    SCHEMA = Schema(
        ("deletions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("tags", TaggedFields),
        )),
        ("upsertions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("iterations", Int32),
            ("salt", CompactBytes),
            ("salted_password", CompactBytes),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


_AlterScramStruct: TypeAlias = _AlterScramRequest_v0


class _AlterScram(Request[_AlterScramStruct]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, name: str, salt: bytes | None, salted_password: bytes | None) -> None:
        """Upsert ``name``'s credential, or delete it when ``salt`` is None."""
        self._deletions: list[tuple[Any, ...]] = []
        self._upsertions: list[tuple[Any, ...]] = []
        if salt is None:
            self._deletions.append((name, SCRAM_SHA_512, {}))
        else:
            self._upsertions.append(
                (name, SCRAM_SHA_512, SCRAM_ITERATIONS, salt, salted_password, {}))

    def build(self, request_struct_class: type[_AlterScramStruct]) -> _AlterScramStruct:
        return request_struct_class(self._deletions, self._upsertions, {})


async def upsert_scram_credential(admin: AIOKafkaAdminClient, name: str,
                                  password: str | None) -> None:
    """Create or replace ``name``'s SCRAM-SHA-512 credential, or delete it when
    ``password`` is None (admin principal only)."""
    salt = None if password is None else secrets.token_bytes(SALT_BYTES)
    salted = None if password is None or salt is None else hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, SCRAM_ITERATIONS)
    client: Any = admin._client  # aiokafka has no public call for this request
    response = await client.send(client.get_random_node(), _AlterScram(name, salt, salted))
    for user, code, message, *_ in response.results:
        if code:
            raise RegistryError(f"broker refused the credential of {user}: error {code} "
                                f"{message or ''}".rstrip(), code="kafka-scram-upsert")


async def register_external_system(admin: AIOKafkaAdminClient, settings: config.Settings,
                                   name: str, institution: str) -> int:
    """Register ``name`` as ``institution``'s external system: password file (0600),
    credential on the broker, registry entry, ACLs on every existing chain. Returns
    the number of chains (topic prefixes) it was granted."""
    check_principal_name(name)
    known = roster(settings=settings)
    if institution not in {p.institution for p in known if p.role is Role.MEMBER}:
        raise RegistryError(f"{institution!r} is not a member institution",
                            code="kafka-registry-institution")
    if any(p.name == name for p in known):
        raise RegistryError(f"principal {name} exists already", code="kafka-registry-exists")
    password_file = settings.kafka_password_file(name)
    password_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    password = secrets.token_hex(PASSWORD_BYTES)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    await upsert_scram_credential(admin, name, password)
    _write_registry(settings, [*registered_systems(settings), (name, institution)])
    prefixes = sorted({topic[: -len(TX.name)] for topic in await admin.list_topics()
                       if topic.endswith(TX.name)})
    principal = Principal(name, Role.EXTERNAL, institution)
    for prefix in prefixes:
        await create_bindings(admin, bindings(prefix, [principal]))
    return len(prefixes)


async def unregister_external_system(admin: AIOKafkaAdminClient, settings: config.Settings,
                                     name: str) -> None:
    """Remove a registered system: its credential (it can no longer connect), its
    registry entry and its password file. Its ACLs stay until deleted (DeleteAcls;
    harmless without a credential)."""
    systems = registered_systems(settings)
    if name not in {system for system, _ in systems}:
        raise RegistryError(f"{name} is not a registered system", code="kafka-registry-unknown")
    await upsert_scram_credential(admin, name, None)
    _write_registry(settings, [(n, i) for n, i in systems if n != name])
    settings.kafka_password_file(name).unlink(missing_ok=True)

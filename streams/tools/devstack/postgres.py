"""The development PostgreSQL: the system cluster, the capledger role and database, alembic.

Owns: starting the machine's PostgreSQL cluster (Debian ``pg_ctlcluster``),
installing it with apt-get when we are root and it is missing, creating the role and
database named in ``CAPLEDGER_PG_DSN`` and running ``alembic upgrade head``.
Stopping it is not ours: the system cluster may serve other users, so ``dev down``
leaves it running unless asked (``stop_cluster``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from streams.common import db_roles
from streams.common.config import REPO_DIR, Settings
from streams.tools.devstack import DevStackError, ServiceStatus, apt_install, is_root

START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.2
CONNECT_TIMEOUT_S = 3
ALEMBIC_INI_PATH = REPO_DIR / "alembic.ini"
SCRAM_ITERATIONS = 4096
SCRAM_SALT_BYTES = 16


@dataclass(frozen=True, slots=True)
class Cluster:
    version: str
    name: str
    port: int
    online: bool


@dataclass(frozen=True, slots=True)
class Dsn:
    user: str
    password: str
    host: str
    port: int
    database: str

    @classmethod
    def parse(cls, dsn: str) -> Dsn:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise DevStackError("CAPLEDGER_PG_DSN is not postgresql://user:pw@host/db")
        return cls(parts.username or "postgres", parts.password or "",
                   parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.strip("/"))


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def sqlalchemy_url(dsn: str) -> str:
    """The SQLAlchemy URL of a libpq DSN, using the psycopg 3 driver."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def clusters() -> list[Cluster]:
    if shutil.which("pg_lsclusters") is None:
        return []
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True,
                         timeout=30, check=True)
    found = []
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            found.append(Cluster(fields[0], fields[1], int(fields[2]),
                                 fields[3].startswith("online")))
    return found


def _superuser_run(sql_text: str, cluster: Cluster) -> None:
    """Run SQL as the postgres superuser over the local socket (peer auth). The SQL
    goes in on stdin, never on the command line (it may hold a password)."""
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(cluster.port),
               "-d", "postgres", "-f", "-"]
    if is_root():
        command = ["runuser", "-u", "postgres", "--", *command]
    out = subprocess.run(command, input=sql_text, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise DevStackError(f"psql as postgres failed: {out.stderr.strip()}")


def _can_connect(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S):
            return True
    except psycopg.OperationalError:
        return False


def _wait_accepting(cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["pg_isready", "-q", "-p", str(cluster.port)], timeout=30)
        if out.returncode == 0:
            return
        time.sleep(POLL_INTERVAL_S)
    raise DevStackError(f"PostgreSQL {cluster.version}/{cluster.name} did not accept "
                        f"connections within {START_TIMEOUT_S:.0f}s")


def ensure_cluster(settings: Settings) -> Cluster:
    """The system cluster serving the DSN's port, installed and started as needed."""
    dsn = Dsn.parse(settings.pg_dsn)
    found = clusters()
    if not found:
        if shutil.which("pg_ctlcluster") is None and shutil.which("apt-get") is None:
            raise DevStackError("no PostgreSQL here and no apt-get to install it; install "
                                "PostgreSQL and set CAPLEDGER_PG_DSN")
        apt_install("postgresql")
        found = clusters()
    matching = [c for c in found if c.port == dsn.port] or found
    if not matching:
        raise DevStackError("PostgreSQL is installed but has no cluster; create one with "
                            "pg_createcluster <version> main --start")
    cluster = matching[0]
    if not cluster.online:
        command = ["pg_ctlcluster", cluster.version, cluster.name, "start"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise DevStackError(f"{' '.join(command)} failed (root needed?): "
                                f"{out.stderr.strip()}")
        cluster = Cluster(cluster.version, cluster.name, cluster.port, True)
    _wait_accepting(cluster)
    return cluster


def ensure_role_and_database(settings: Settings, cluster: Cluster) -> None:
    dsn = Dsn.parse(settings.pg_dsn)
    if _can_connect(settings.pg_dsn):
        return
    role = sql.Identifier(dsn.user).as_string(None)
    password = sql.Literal(dsn.password).as_string(None)
    user_literal = sql.Literal(dsn.user).as_string(None)
    _superuser_run(
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user_literal}) "
        f"THEN CREATE ROLE {role} LOGIN CREATEDB PASSWORD {password}; "
        f"ELSE ALTER ROLE {role} LOGIN CREATEDB PASSWORD {password}; END IF; END $$;",
        cluster)
    with contextlib.suppress(DevStackError):  # exists already: fine
        _superuser_run(f"CREATE DATABASE {sql.Identifier(dsn.database).as_string(None)} "
                       f"OWNER {role}", cluster)
    if not _can_connect(settings.pg_dsn):
        raise DevStackError(f"cannot connect with CAPLEDGER_PG_DSN after creating role "
                            f"{dsn.user!r} and database {dsn.database!r} (pg_hba.conf?)")


def migrate(dsn: str, revision: str = "head", *, downgrade: bool = False) -> None:
    """Run alembic on the database of ``dsn`` (upgrade to, or downgrade to, ``revision``)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI_PATH))
    config.set_main_option("script_location", str(REPO_DIR / "migrations"))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    if downgrade:
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password``: sent instead of
    the password, so not even the server's statement log sees the password."""
    salt = salt if salt is not None else secrets.token_bytes(SCRAM_SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt).decode()}$"
            f"{b64(stored_key).decode()}:{b64(server_key).decode()}")


def _role_logs_in(settings: Settings, role: str) -> bool:
    try:
        with psycopg.connect(**db_roles.connect_kwargs(settings, role),
                             connect_timeout=CONNECT_TIMEOUT_S):
            return True
    except psycopg.OperationalError:
        return False


def ensure_app_roles(settings: Settings, cluster: Cluster) -> None:
    """The projector, API and regulator roles (cluster-wide; revision 0007 grants
    them their rights per database), each with a password kept in the state dir. A
    role that already logs in with the kept password is left alone."""
    directory = db_roles.password_path(settings, db_roles.API).parent
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    statements = []
    for role in db_roles.ROLES:
        path = db_roles.password_path(settings, role)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(24) + "\n")
        elif _role_logs_in(settings, role):
            continue
        name = sql.Identifier(role).as_string(None)
        literal = sql.Literal(role).as_string(None)
        verifier = sql.Literal(scram_verifier(path.read_text().strip())).as_string(None)
        attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
        statements.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal}) "
            f"THEN CREATE ROLE {name} {attributes} PASSWORD {verifier}; "
            f"ELSE ALTER ROLE {name} {attributes} PASSWORD {verifier}; END IF; END $$;")
    owner = Dsn.parse(settings.pg_dsn).user
    if not _owner_signals_backends(settings.pg_dsn):
        # The owner drops databases WITH (FORCE) (tests, rebuilds) while the projector,
        # API or regulator roles may still hold sessions there: it may signal them.
        statements.append(f"GRANT pg_signal_backend TO {sql.Identifier(owner).as_string(None)};")
    if statements:
        _superuser_run("\n".join(statements), cluster)


def _owner_signals_backends(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')").fetchone()
    return bool(row and row[0])


def start(settings: Settings) -> ServiceStatus:
    cluster = ensure_cluster(settings)
    ensure_role_and_database(settings, cluster)
    ensure_app_roles(settings, cluster)
    migrate(settings.pg_dsn)
    return status(settings)


def stop_cluster(settings: Settings) -> bool:
    dsn = Dsn.parse(settings.pg_dsn)
    stopped = False
    for cluster in clusters():
        if cluster.port == dsn.port and cluster.online:
            subprocess.run(["pg_ctlcluster", cluster.version, cluster.name, "stop"],
                           check=True, timeout=120)
            stopped = True
    return stopped


def status(settings: Settings) -> ServiceStatus:
    dsn = Dsn.parse(settings.pg_dsn)
    address = f"{dsn.host}:{dsn.port}/{dsn.database}"
    try:
        with psycopg.connect(settings.pg_dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            row = conn.execute("SELECT current_setting('server_version'), "
                               "pg_backend_pid()").fetchone()
            revision = None
            with contextlib.suppress(psycopg.Error):
                rev = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = rev[0] if rev else None
        assert row is not None
        pid = None
        for cluster in clusters():
            if cluster.port == dsn.port:
                pid = _postmaster_pid(cluster)
        return ServiceStatus("postgresql", True, address, pid, str(row[0]),
                             f"schema revision {revision or 'none'}")
    except psycopg.OperationalError as exc:
        return ServiceStatus("postgresql", False, address, None, "",
                             str(exc).strip().splitlines()[0] if str(exc) else "")


def _postmaster_pid(cluster: Cluster) -> int | None:
    path = f"/var/run/postgresql/{cluster.version}-{cluster.name}.pid"
    with contextlib.suppress(OSError, ValueError), open(path) as handle:
        return int(handle.readline().strip())
    return None

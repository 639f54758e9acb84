"""The PostgreSQL roles of the platform and how a process connects as one of them.

Owns: the role names (``capledger_projector`` writes the projection,
``capledger_api`` reads it, ``capledger_regulator`` reads only the regulator views;
granted by alembic revision 0007), where each role's password lives
(``$CAPLEDGER_STATE_DIR/postgres/<role>.password``, 0600, written by the set-up) and
the connection parameters for a role (the password goes to libpq as a parameter,
never in a DSN string, a command line or an error message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streams.common.config import Settings
from streams.common.kafka_auth import read_password_file

PROJECTOR = "capledger_projector"
API = "capledger_api"
REGULATOR = "capledger_regulator"
ROLES = (PROJECTOR, API, REGULATOR)


def password_path(settings: Settings, role: str) -> Path:
    assert role in ROLES, role
    return settings.state_dir / "postgres" / f"{role}.password"


def connect_kwargs(settings: Settings, role: str, database: str | None = None,
                   dsn: str | None = None) -> dict[str, Any]:
    """psycopg.connect keyword arguments for ``role`` on the server and database of
    ``dsn`` (default CAPLEDGER_PG_DSN; ``database`` names another one)."""
    parts = urlsplit(dsn or settings.pg_dsn)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "dbname": database or parts.path.strip("/"),
        "user": role,
        "password": read_password_file(password_path(settings, role)),
    }

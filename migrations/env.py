"""Alembic environment of the PostgreSQL projection.

Owns: how alembic connects. URL: ``sqlalchemy.url`` if the caller set it (tests and
streams/tools/devstack/postgres.py do), else CAPLEDGER_PG_DSN via streams.common.config, always with
the psycopg 3 driver. Revisions are hand-written (no autogenerate metadata).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from streams.common import config as settings_module
from streams.tools.devstack.postgres import sqlalchemy_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or sqlalchemy_url(settings_module.load().pg_dsn)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=None, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

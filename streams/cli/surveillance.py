"""``capledger surveillance``: alert rules over the projection (streams/projections).

The rules and their thresholds: streams/projections/surveillance.py, docs/regulator-sql.md.

Exit codes: 0 evaluated (alerts, if any, recorded and published); 1 no database/broker.
"""

from __future__ import annotations

import asyncio
import os
import sys

import click
import psycopg
from aiokafka.errors import KafkaError

from streams.cli import exit_codes
from streams.common import config
from streams.projections.surveillance import (
    CONSUMER_DEFAULT,
    IGNORED_CODES_DEFAULT,
    run_surveillance,
)


@click.group("surveillance")
def cli() -> None:
    """Market surveillance: alert rules evaluated as the projection advances."""


@cli.command("run")
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (default "
                                          "CAPLEDGER_PG_DSN).")
@click.option("--topic-prefix", default=lambda: os.environ.get("CAPLEDGER_TOPIC_PREFIX", ""),
              help="Prefix of every topic name.")
@click.option("--follow/--once", default=False, show_default=True,
              help="--once: evaluate what the projection holds and exit; --follow: keep "
                   "evaluating as it advances (Ctrl-C stops).")
@click.option("--ignore-code", "ignored_codes", multiple=True,
              default=IGNORED_CODES_DEFAULT, show_default=True,
              help="Rejection codes that do not raise refused-settlement (repeatable).")
@click.option("--consumer", default=CONSUMER_DEFAULT, show_default=True,
              help="Name of the evaluation cursor (surveillance_cursor).")
def run(dsn: str | None, topic_prefix: str, follow: bool, ignored_codes: tuple[str, ...],
        consumer: str) -> None:
    """Raise alerts (table ``alert`` and topic surveillance.alerts.v1), once per cause.

    Thresholds are the rows of ``surveillance_setting`` (docs/regulator-sql.md)."""
    settings = config.load()
    try:
        raised, published = asyncio.run(run_surveillance(
            dsn=dsn or settings.pg_dsn, bootstrap=settings.kafka_bootstrap,
            topic_prefix=topic_prefix, consumer=consumer, ignored_codes=ignored_codes,
            follow=follow))
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    except KeyboardInterrupt:
        sys.exit(exit_codes.INTERRUPTED)
    click.echo(f"alerts raised {raised}, published {published}")

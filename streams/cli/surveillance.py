"""``capledger surveillance``: alert rules over the projection (streams/projections).

The rules and their thresholds: streams/projections/surveillance.py, docs/regulator-sql.md.

Exit codes: 0 evaluated (alerts, if any, recorded and published); 1 no database/broker.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import psycopg
from aiokafka.errors import KafkaError

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
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
@topic_prefix_option
@click.option("--follow/--once", default=False, show_default=True,
              help="--once: evaluate what the projection holds and exit; --follow: keep "
                   "evaluating as it advances (Ctrl-C stops).")
@click.option("--ignore-code", "ignored_codes", multiple=True,
              default=IGNORED_CODES_DEFAULT, show_default=True,
              help="Rejection codes that do not raise refused-settlement (repeatable).")
@click.option("--consumer", default=CONSUMER_DEFAULT, show_default=True,
              help="Name of the evaluation cursor (surveillance_cursor).")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), default=None,
              help="With the chain's genesis, also project the votes log (consensus "
                   "evidence) before each evaluation.")
def run(dsn: str | None, topic_prefix: str, follow: bool, ignored_codes: tuple[str, ...],
        consumer: str, genesis_path: Path | None) -> None:
    """Raise alerts (table ``alert`` and topic surveillance.alerts.v1), once per cause.

    Thresholds are the rows of ``surveillance_setting`` (docs/regulator-sql.md)."""
    from streams.common.genesis_files import load_genesis
    from streams.projections.consensus_evidence import EvidenceProjector

    settings = config.load()
    dsn = dsn or settings.pg_dsn
    evidence = None
    if genesis_path is not None:
        try:
            genesis = load_genesis(genesis_path)
        except ValidationError as error:
            click.echo(f"error: {error.message}", err=True)
            sys.exit(exit_codes.USAGE)
        evidence = EvidenceProjector(genesis, bootstrap=settings.kafka_bootstrap, dsn=dsn,
                                     topic_prefix=topic_prefix)
    try:
        raised, published = asyncio.run(run_surveillance(
            dsn=dsn, bootstrap=settings.kafka_bootstrap, topic_prefix=topic_prefix,
            consumer=consumer, ignored_codes=ignored_codes, follow=follow,
            evidence=evidence))
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    except KeyboardInterrupt:
        sys.exit(exit_codes.INTERRUPTED)
    click.echo(f"alerts raised {raised}, published {published}")


@cli.command("evidence")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="genesis.json or its directory (the membership the votes are judged by).")
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (default "
                                          "CAPLEDGER_PG_DSN).")
@topic_prefix_option
def evidence(genesis_path: Path, dsn: str | None, topic_prefix: str) -> None:
    """Project the votes log (consensus_vote, consensus_view_change; view
    consensus_evidence) up to its last decided height."""
    from streams.common.genesis_files import load_genesis
    from streams.projections.consensus_evidence import EvidenceProjector

    try:
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    settings = config.load()
    projector = EvidenceProjector(genesis, bootstrap=settings.kafka_bootstrap,
                                  dsn=dsn or settings.pg_dsn, topic_prefix=topic_prefix)
    try:
        stats = asyncio.run(projector.run())
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    click.echo(f"votes {stats.votes}, view changes {stats.view_changes}; decided height "
               f"{stats.height}, votes log offset {stats.offset}")
    if stats.problem is not None:
        click.echo(f"error: the membership table is refused ({stats.problem})", err=True)
        sys.exit(exit_codes.ERROR)
    if stats.waiting:
        click.echo("waiting for the projector: the membership of the next height is not "
                   "projected yet (run capledger project)")

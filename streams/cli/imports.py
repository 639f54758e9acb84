"""``capledger import``: holdings from legacy systems (streams/legacy/importer.py).

Exit codes: 0 every issuance of the file committed (or nothing new: the file was
imported before); 2 a bad file (each bad row printed with its line; nothing applied) or
bad arguments; 3 the ledger refused an issuance; 6 no outcome in time (running the same
file again is safe); 1 no broker/database.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
import psycopg
from aiokafka.errors import KafkaError

from ledger.assets import AssetDefinition
from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.common import config
from streams.legacy.importer import FILE_BYTES_MAX, ImportRefused, import_holdings

DEFINITION_BYTES_MAX = 64 * 1024


def _definition(path: Path | None, security_code: str | None, issuer: str) -> AssetDefinition:
    if path is not None:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(DEFINITION_BYTES_MAX + 1)[:DEFINITION_BYTES_MAX])
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an asset definition is a JSON object")
        return AssetDefinition.from_dict(data)
    if security_code is None:
        raise click.UsageError("give --security-code or --definition")
    return AssetDefinition(security_code, security_code, "equity", issuer, "SHARE")


@click.group("import")
def cli() -> None:
    """Imports from legacy systems."""


@cli.command("legacy")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="The chain directory: genesis.json and keys/<issuer>.wif.")
@click.option("--issuer", required=True, help="The issuing member (its identity key issues).")
@click.option("--security-code", default=None,
              help="The issuer's security; rows must name it. Its first issuance binds a "
                   "default definition (kind equity, unit SHARE) unless --definition is given.")
@click.option("--definition", "definition_path", type=click.Path(path_type=Path), default=None,
              help="JSON asset definition (ledger.assets.AssetDefinition) of the security.")
@topic_prefix_option
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (default "
                                          "CAPLEDGER_PG_DSN).")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the outcomes.")
def legacy(file: Path, genesis_path: Path, issuer: str, security_code: str | None,
           definition_path: Path | None, topic_prefix: str, dsn: str | None,
           timeout_s: float) -> None:
    """Issue the holdings of a CSV (holder,security_code,quantity), exactly once per file."""
    from streams.common.genesis_files import load_genesis, load_institution_key

    try:
        genesis = load_genesis(genesis_path)
        key = load_institution_key(genesis_path, issuer, genesis=genesis)
        definition = _definition(definition_path, security_code, issuer)
        with open(file, "rb") as handle:
            raw = handle.read(FILE_BYTES_MAX + 1)
    except (ValidationError, OSError, ValueError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.USAGE)
    settings = config.load()
    try:
        result = asyncio.run(import_holdings(
            raw, genesis=genesis, issuer=issuer, key=key, definition=definition,
            dsn=dsn or settings.pg_dsn, bootstrap=settings.kafka_bootstrap,
            topic_prefix=topic_prefix, timeout_s=timeout_s))
    except ImportRefused as error:
        for line, problem in error.problems:
            click.echo(f"line {line}: {problem}", err=True)
        click.echo(f"refused ({error.code}): {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    click.echo(f"file {result.file_sha256}: {result.rows} rows, {result.already_committed} "
               f"already committed, {result.submitted} submitted, {result.committed} committed")
    if result.nothing_new:
        click.echo("nothing new: this file was imported before")
    for line, txid, code in result.rejected:
        click.echo(f"line {line}: tx {txid} rejected: {code}")
    for line, txid in result.pending:
        click.echo(f"line {line}: tx {txid} undecided (run the import again)")
    if result.rejected:
        sys.exit(exit_codes.REJECTED)
    sys.exit(exit_codes.TIMEOUT if result.pending else exit_codes.OK)

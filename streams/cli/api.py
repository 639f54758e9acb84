"""``capledger api``: the platform API server (koscom) and its access file."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.common import config


@click.group("api")
def cli() -> None:
    """The platform's HTTP API, Bitcoin JSON-RPC endpoint and web UI."""


@cli.command("init")
@click.option("--access-dir", type=click.Path(path_type=Path), default=None,
              help="Where the access file goes (default: $CAPLEDGER_STATE_DIR/api).")
@click.option("--token-ttl-s", type=click.IntRange(1, 86_400), default=900, show_default=True)
def init(access_dir: Path | None, token_ttl_s: int) -> None:
    """Create the access file (hashed secrets), the token key and the custody stores of
    users A and B; the generated secrets go to initial-credentials.json (mode 0600) for
    handing out, never to the terminal."""
    from streams.api.server import access_dir_of, init_state

    directory = access_dir or access_dir_of(config.load().state_dir)
    credentials = init_state(directory, token_ttl_s=token_ttl_s)
    click.echo(f"access file written to {directory}; secrets to hand out: {credentials}")


@cli.command("serve")
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path))
@click.option("--access-dir", type=click.Path(path_type=Path), default=None,
              help="Directory of api-access.json (default: $CAPLEDGER_STATE_DIR/api).")
@topic_prefix_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8480, show_default=True)
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--market/--no-market", default=False, show_default=True,
              help="Also run the market service here (needs keys/ of otc-operator, "
                   "securities-a and securities-b next to the genesis).")
def serve(genesis_path: Path, access_dir: Path | None, topic_prefix: str, host: str,
          port: int, log_level: str, market: bool) -> None:
    """Serve the API. The database is CAPLEDGER_PG_DSN (never a command-line argument)."""
    from ledger.errors import ValidationError
    from streams.api.auth import AccessFileError, load_access
    from streams.api.context import ApiDeps
    from streams.api.server import ServeOptions, access_dir_of, build_market, load_custody
    from streams.api.server import serve as run
    from streams.common.genesis_files import load_genesis, load_institution_key

    settings = config.load()
    try:
        genesis = load_genesis(genesis_path)
        directory = access_dir or access_dir_of(settings.state_dir)
        access = load_access(directory)
        accounts = load_custody(directory)
    except (ValidationError, AccessFileError, ValueError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.USAGE)
    keys_dir = genesis_path if genesis_path.is_dir() else genesis_path.parent
    try:
        submit_key = load_institution_key(keys_dir, "koscom")
    except ValidationError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.USAGE)
    deps = ApiDeps(dsn=settings.pg_dsn, bootstrap=settings.kafka_bootstrap, genesis=genesis,
                   access=access, topic_prefix=topic_prefix, accounts=accounts,
                   submit_key=submit_key, state_dir=directory,
                   fault_point=os.environ.get("CAPLEDGER_API_FAULT") or None)
    if market:
        try:
            factory = build_market(keys_dir, deps)
            deps = dataclasses.replace(deps, market_factory=factory)
        except ValidationError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(exit_codes.USAGE)
    click.echo(f"capledger api: http://{host}:{port}/ (chain {genesis.chain_id})", err=True)
    run(deps, ServeOptions(host, port, log_level))


@cli.command("openapi")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write here (default: standard output).")
def openapi(out: Path | None) -> None:
    """Print the OpenAPI document (docs/openapi.json is a checked copy)."""
    import json

    from streams.api.app import openapi_document

    text = json.dumps(openapi_document(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")


@cli.command("demo")
@click.option("--port", type=click.IntRange(1, 65535), default=8480, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--exit", "exit_after", is_flag=True, help="Exit after the scenario (tests).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Default: $CAPLEDGER_STATE_DIR.")
def demo(port: int, host: str, exit_after: bool, state_dir: Path | None) -> None:
    """The seed's OTC market scenario on five nodes, through the API; then the UI."""
    import asyncio

    from streams.tools.market_demo import run_market_demo

    settings = config.load()
    try:
        asyncio.run(run_market_demo(settings, state_dir=state_dir or settings.state_dir,
                                    host=host, port=port, exit_after=exit_after,
                                    say=click.echo))
    except KeyboardInterrupt:
        sys.exit(exit_codes.INTERRUPTED)
    except (RuntimeError, TimeoutError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.ERROR)

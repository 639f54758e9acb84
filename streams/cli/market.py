"""``capledger market``: the OTC bond market for operators and tests, over the same
``MarketService`` the HTTP API uses.

Each command opens the service for one chain (``--genesis`` directory with its keys,
``--custody-dir`` with the firms' custody stores), replays the market topics, does
one thing, prints, and exits. Passwords come from ``CAPLEDGER_MARKET_PASSWORD`` or a
prompt, never from the command line.

Exit codes: 0 done; 2 bad input (price, quantity, unknown user, wrong password);
3 refused by the market or the ledger (code printed); 6 no ledger outcome in time;
1 broker unreachable or another error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, is_dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import click

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.common import config

T = TypeVar("T")
USAGE_CODE_PREFIXES = ("market-price", "market-quantity", "account-", "market-bad-side")
PASSWORD_ENV = "CAPLEDGER_MARKET_PASSWORD"


def _default_custody_dir() -> Path:
    return config.load().state_dir / "custody"


def _exit_for(code: str) -> int:
    if code == "ledger-timeout":
        return exit_codes.TIMEOUT
    if code.startswith(USAGE_CODE_PREFIXES):
        return exit_codes.USAGE
    return exit_codes.REJECTED


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items() if k != "token"}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _print(value: Any) -> None:
    click.echo(json.dumps(_plain(value), ensure_ascii=False, indent=2, default=str))


def _run(ctx: click.Context, action: Callable[[Any], Awaitable[T]]) -> T:
    """Open and start the market, run ``action(service)``, stop; refusals exit non-zero."""
    from streams.market.runtime import open_market

    options = ctx.obj

    async def main() -> T:
        service = open_market(options["genesis"], bootstrap=config.load().kafka_bootstrap,
                              topic_prefix=options["prefix"],
                              custody_dir=options["custody_dir"])
        await service.start()
        try:
            return await action(service)
        finally:
            await service.stop()

    try:
        return asyncio.run(main())
    except ValidationError as error:
        click.echo(f"refused: {error.code}: {error.message}", err=True)
        sys.exit(_exit_for(error.code))
    except (OSError, TimeoutError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.ERROR)


def _principal(service: Any, firm: str, user: str) -> Any:
    password = os.environ.get(PASSWORD_ENV) or click.prompt(
        f"password of {firm}/{user}", hide_input=True, err=True)
    return service.accounts.store(firm).authenticate(user, password)


def _user_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option("--user", "user_id", required=True, help="User id at the firm.")(
        function)
    return click.option("--firm", required=True, help="The user's securities firm.")(function)


@click.group("market")
@click.option("--genesis", "genesis", required=True, type=click.Path(path_type=Path),
              help="Chain directory: genesis.json and keys/ (otc-operator, issuers).")
@click.option("--custody-dir", type=click.Path(path_type=Path), default=None,
              help="Custody stores and keys (default: $CAPLEDGER_STATE_DIR/custody).")
@topic_prefix_option
@click.pass_context
def cli(ctx: click.Context, genesis: Path, custody_dir: Path | None, topic_prefix: str) -> None:
    """The OTC bond market: assets, accounts, board, negotiation, agreement, DvP."""
    ctx.obj = {"genesis": genesis, "prefix": topic_prefix,
               "custody_dir": custody_dir or _default_custody_dir()}


@cli.command("register")
@click.option("--issuer", required=True, help="Issuing member (securities-a, securities-b).")
@click.option("--terms", "terms_file", type=click.Path(path_type=Path), default=None,
              help="JSON file with the asset definition (security_code, name, kind, ...).")
@click.option("--seed", is_flag=True, help="Register the seed's bonds and KRW deposits of "
              "--issuer instead.")
@click.pass_context
def register_command(ctx: click.Context, issuer: str, terms_file: Path | None,
                     seed: bool) -> None:
    """Register asset terms (signed by the issuer) and fund their issuing script."""
    from ledger.assets import AssetDefinition
    from streams.market.fixtures import SEED_ASSETS

    if seed == (terms_file is not None):
        click.echo("error: give exactly one of --terms FILE or --seed", err=True)
        sys.exit(exit_codes.USAGE)
    try:
        if terms_file is None:
            definitions = [d for d in SEED_ASSETS if d.issuer == issuer]
        else:
            definitions = [AssetDefinition.from_dict(json.loads(terms_file.read_text()))]
    except (OSError, ValueError, ValidationError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(exit_codes.USAGE)

    async def action(service: Any) -> list[Any]:
        return [await service.register_asset(issuer, d) for d in definitions]

    _print(_run(ctx, action))


@cli.command("open-account")
@_user_options
@click.pass_context
def open_account_command(ctx: click.Context, firm: str, user_id: str) -> None:
    """Open a custodial account (a fresh key, stored encrypted) for a user of a firm."""
    async def action(service: Any) -> Any:
        password = os.environ.get(PASSWORD_ENV) or click.prompt(
            f"new password of {firm}/{user_id}", hide_input=True,
            confirmation_prompt=True, err=True)
        return service.accounts.store(firm).open_account(user_id, password)

    _print(_run(ctx, action))


@cli.command("issue")
@click.option("--issuer", required=True)
@click.option("--security", "security_code", required=True)
@click.option("--quantity", required=True, type=int)
@_user_options
@click.pass_context
def issue_command(ctx: click.Context, issuer: str, security_code: str, quantity: int,
                  firm: str, user_id: str) -> None:
    """Issue units of a registered asset to a user's address; wait until committed."""
    async def action(service: Any) -> Any:
        account = service.accounts.store(firm).account(user_id)
        return await service.issue(issuer, security_code, account, quantity)

    _print(_run(ctx, action))


@cli.command("post")
@_user_options
@click.option("--security", "security_code", required=True)
@click.option("--side", required=True, type=click.Choice(["sell", "buy"]))
@click.option("--price", required=True, help="KRW, at most two decimals (11578.50).")
@click.option("--quantity", required=True, help="Whole units.")
@click.pass_context
def post_command(ctx: click.Context, firm: str, user_id: str, security_code: str, side: str,
                 price: str, quantity: str) -> None:
    """Post an order on the quote board (호가게시)."""
    async def action(service: Any) -> Any:
        return await service.post_order(_principal(service, firm, user_id), security_code,
                                        side, price, quantity)

    _print(_run(ctx, action))


@cli.command("amend")
@_user_options
@click.option("--order", "order_id", required=True)
@click.option("--price", default=None)
@click.option("--quantity", default=None)
@click.pass_context
def amend_command(ctx: click.Context, firm: str, user_id: str, order_id: str,
                  price: str | None, quantity: str | None) -> None:
    """Amend one's own order (정정)."""
    async def action(service: Any) -> Any:
        return await service.amend_order(_principal(service, firm, user_id), order_id,
                                         price=price, quantity=quantity)

    _print(_run(ctx, action))


@cli.command("cancel")
@_user_options
@click.option("--order", "order_id", required=True)
@click.pass_context
def cancel_command(ctx: click.Context, firm: str, user_id: str, order_id: str) -> None:
    """Cancel one's own order (취소)."""
    async def action(service: Any) -> Any:
        return await service.cancel_order(_principal(service, firm, user_id), order_id)

    _print(_run(ctx, action))


@cli.command("join")
@_user_options
@click.option("--order", "order_id", required=True)
@click.pass_context
def join_command(ctx: click.Context, firm: str, user_id: str, order_id: str) -> None:
    """Join another user's order (거래참여); prints the negotiation."""
    async def action(service: Any) -> Any:
        return await service.join_order(_principal(service, firm, user_id), order_id)

    _print(_run(ctx, action))


@cli.command("send")
@_user_options
@click.option("--negotiation", "negotiation_id", required=True)
@click.option("--text", required=True)
@click.option("--offer-price", default=None)
@click.option("--offer-quantity", default=None)
@click.pass_context
def send_command(ctx: click.Context, firm: str, user_id: str, negotiation_id: str, text: str,
                 offer_price: str | None, offer_quantity: str | None) -> None:
    """Send an encrypted message, optionally with an offer (협의)."""
    async def action(service: Any) -> Any:
        return await service.send_message(_principal(service, firm, user_id), negotiation_id,
                                          text, offer_price=offer_price,
                                          offer_quantity=offer_quantity)

    _print({"sequence": _run(ctx, action)})


@cli.command("messages")
@_user_options
@click.option("--negotiation", "negotiation_id", required=True)
@click.pass_context
def messages_command(ctx: click.Context, firm: str, user_id: str, negotiation_id: str) -> None:
    """Read a negotiation's messages (decrypted for one of its two parties)."""
    async def action(service: Any) -> Any:
        return service.read_messages(_principal(service, firm, user_id), negotiation_id)

    _print(_run(ctx, action))


@cli.command("agree")
@_user_options
@click.option("--negotiation", "negotiation_id", required=True)
@click.option("--price", required=True)
@click.option("--quantity", required=True)
@click.pass_context
def agree_command(ctx: click.Context, firm: str, user_id: str, negotiation_id: str,
                  price: str, quantity: str) -> None:
    """Sign the agreed terms (협상확정); they must be the last offer."""
    async def action(service: Any) -> Any:
        return await service.agree(_principal(service, firm, user_id), negotiation_id,
                                   price, quantity)

    _print(_run(ctx, action))


@cli.command("settle")
@click.option("--agreement", "agreement_id", required=True)
@click.pass_context
def settle_command(ctx: click.Context, agreement_id: str) -> None:
    """Settle an agreement: one DvP transaction, committed by the nodes (거래)."""
    async def action(service: Any) -> Any:
        return await service.settle(agreement_id)

    _print(_run(ctx, action))


@cli.command("expire")
@click.option("--ttl-hours", type=click.FloatRange(min=0.0), default=24.0, show_default=True,
              help="Waiting orders older than this leave the board.")
@click.pass_context
def expire_command(ctx: click.Context, ttl_hours: float) -> None:
    """Retire waiting orders older than --ttl-hours (만료), as the operator."""
    async def action(service: Any) -> Any:
        return await service.expire_orders(ttl_ms=int(ttl_hours * 3_600_000))

    _print(_run(ctx, action))


@cli.command("board")
@click.option("--all", "include_closed", is_flag=True, help="Also closed orders.")
@click.pass_context
def board_command(ctx: click.Context, include_closed: bool) -> None:
    """The quote board (호가게시판)."""
    async def action(service: Any) -> Any:
        return service.board(include_closed=include_closed)

    _print(_run(ctx, action))


@cli.command("trades")
@click.pass_context
def trades_command(ctx: click.Context) -> None:
    """Confirmed trades with their transactions (거래확인)."""
    async def action(service: Any) -> Any:
        return service.trades()

    _print(_run(ctx, action))


@cli.command("balance")
@_user_options
@click.pass_context
def balance_command(ctx: click.Context, firm: str, user_id: str) -> None:
    """A user's units and KRW cash (나의 잔고 조회)."""
    async def action(service: Any) -> Any:
        return service.balance(_principal(service, firm, user_id))

    _print(_run(ctx, action))


@cli.command("project")
@click.option("--dsn", default=None, help="PostgreSQL DSN (default: CAPLEDGER_PG_DSN).")
@click.option("--follow", is_flag=True, default=False,
              help="Keep projecting whenever a market topic grows (Ctrl-C stops); what the "
                   "API reads.")
@click.pass_context
def project_command(ctx: click.Context, dsn: str | None, follow: bool) -> None:
    """Project the market topics into PostgreSQL (revision 0003 tables), once or --follow."""
    import psycopg

    from streams.common.genesis_files import load_genesis
    from streams.projections.market import follow_market, project_market

    settings = config.load()
    try:
        genesis = load_genesis(ctx.obj["genesis"])
        if follow:
            asyncio.run(_follow(follow_market, dsn or settings.pg_dsn,
                                settings.kafka_bootstrap, genesis, ctx.obj["prefix"]))
            return
        result = asyncio.run(project_market(dsn or settings.pg_dsn, settings.kafka_bootstrap,
                                            genesis, topic_prefix=ctx.obj["prefix"]))
    except ValidationError as error:
        click.echo(f"error: {error.code}: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    except (psycopg.Error, OSError) as error:
        click.echo(f"error: {type(error).__name__}: {error}", err=True)
        sys.exit(exit_codes.ERROR)
    _print(result)


async def _follow(follow: Any, dsn: str, bootstrap: str, genesis: Any, prefix: str) -> None:
    """Run ``follow_market`` until SIGINT/SIGTERM."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runs = await follow(dsn, bootstrap, genesis, stop=stop, topic_prefix=prefix)
    click.echo(f"market projection stopped after {runs} runs", err=True)

"""The ``capledger`` command line: one click group, sub-commands from a list of modules.

Owns: the entry point (console script ``capledger`` = ``streams.cli.main:main``), the
``dev`` group (local stack up/down/status) and the registration of every other
command group. To add a group, write a module exposing a click command or group
named ``cli`` and add its dotted path to COMMAND_MODULES (one line). A module that
is missing is skipped; one that fails to import is replaced by a command that
reports the error, so one broken module never breaks the whole CLI.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.common import config
from streams.tools.devstack import DevStackError, ServiceStatus

# One line per command module; each exposes a click command or group named ``cli``.
COMMAND_MODULES: tuple[str, ...] = (
    "streams.cli.demo",
    "streams.cli.genesis",
    "streams.cli.node",
    "streams.cli.tx",
    "streams.cli.status",
    "streams.cli.bench",
    "streams.cli.project",
    "streams.cli.audit",
    "streams.cli.surveillance",
    "streams.cli.export",
    "streams.cli.imports",
    "streams.cli.api",
    "streams.cli.market",
    "streams.cli.keys",
    "streams.cli.governance",
)

console = Console(stderr=True)
T = TypeVar("T")
# Topics whose ACLs one prune step deletes before it reports its progress.
PRUNE_PROGRESS_TOPICS = 2_000


@click.group()
@click.version_option(package_name="capital-ledger")
def main() -> None:
    """capital-ledger: a permissioned capital-market ledger on Apache Kafka."""


@main.group()
def dev() -> None:
    """The local development stack: Kafka (KRaft) and PostgreSQL."""


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    sys.exit(exit_codes.ERROR)


@dev.command()
@click.option("--kafka-only", is_flag=True, help="Start only the Kafka broker(s).")
@click.option("--brokers", type=click.IntRange(1, config.KAFKA_BROKERS_MAX), default=None,
              help="Brokers in the local cluster (default $CAPLEDGER_KAFKA_BROKERS, else 1). "
                   "3: replication factor 3, min.insync.replicas 2; clients then need "
                   "CAPLEDGER_KAFKA_BROKERS=3 too.")
def up(kafka_only: bool, brokers: int | None) -> None:
    """Fetch Kafka jars if needed, start Kafka and PostgreSQL, migrate. Idempotent."""
    from streams.tools.devstack import kafka, postgres

    settings = config.load()
    if brokers is not None and brokers != settings.kafka_brokers:
        settings = config.load(kafka_brokers=brokers)
        console.print(f"brokers: {brokers}; set CAPLEDGER_KAFKA_BROKERS={brokers} for the "
                      f"clients (bootstrap {settings.kafka_bootstrap})")
    try:
        statuses = kafka.start_brokers(settings, console)
        if not kafka_only:
            statuses.append(postgres.start(settings))
    except DevStackError as exc:
        _fail(exc)
    _print_statuses(statuses)


@dev.command()
@click.option("--postgres", "stop_postgres", is_flag=True,
              help="Also stop the system PostgreSQL cluster (left running by default: "
                   "it is the machine's, not only ours).")
def down(stop_postgres: bool) -> None:
    """Stop the Kafka broker (and PostgreSQL with --postgres). Idempotent."""
    from streams.tools.devstack import kafka, postgres

    settings = config.load()
    stopped = kafka.stop(settings)
    console.print(f"kafka: {'stopped' if stopped else 'was not running'}")
    if stop_postgres:
        stopped = postgres.stop_cluster(settings)
        console.print(f"postgresql: {'stopped' if stopped else 'was not running'}")
    else:
        console.print("postgresql: left running (system cluster; use --postgres to stop)")


@dev.command()
def status() -> None:
    """Show whether Kafka and PostgreSQL are up, with addresses, pids and versions."""
    from streams.tools.devstack import kafka, postgres

    settings = config.load()
    statuses = [*kafka.statuses(settings), postgres.status(settings)]
    _print_statuses(statuses)
    console.print(f"state {settings.state_dir}  cache {settings.cache_dir}")
    if not all(s.running for s in statuses):
        sys.exit(exit_codes.ERROR)


@dev.command("ensure-topics")
@topic_prefix_option
def ensure_topics_command(topic_prefix: str) -> None:
    """Create every topic and grant the ACL table, as the configured (admin) principal:
    the one-shot set-up of a deployment (docker/compose.yaml topics-setup). Idempotent."""
    import asyncio

    from streams.kafka.topics import ensure_topics

    try:
        asyncio.run(ensure_topics(config.load().kafka_bootstrap, prefix=topic_prefix))
    except Exception as exc:  # the broker's own error, printed
        _fail(exc)
    console.print(f"topics and ACLs in place (prefix {topic_prefix!r})")


@dev.command("prune-acls")
@click.option("--dry-run", is_flag=True, help="Only count the rules that would go.")
def prune_acls_command(dry_run: bool) -> None:
    """Delete the ACLs on topics that no longer exist, as the admin principal.

    The broker keeps a rule after its topic is deleted; a broker that has run many
    test or bench chains can hold millions of them (decision 0131). Rules are only
    ever granted after their topics exist, so a rule on a missing topic is left over."""
    import asyncio

    from streams.kafka.acls import delete_topic_acls, orphan_topic_acl_names
    from streams.kafka.topics import admin_client

    async def prune() -> tuple[int, int]:
        admin = admin_client(config.load().kafka_bootstrap, request_timeout_ms=120_000)
        await admin.start()
        try:
            names = await orphan_topic_acl_names(admin)
            console.print(f"{len(names)} missing topics still named by ACLs")
            if dry_run or not names:
                return len(names), 0
            removed = 0
            for start in range(0, len(names), PRUNE_PROGRESS_TOPICS):
                removed += await delete_topic_acls(
                    admin, names[start:start + PRUNE_PROGRESS_TOPICS])
                console.print(f"  {min(start + PRUNE_PROGRESS_TOPICS, len(names))} of "
                              f"{len(names)} topics: {removed} rules deleted")
            return len(names), removed
        finally:
            await admin.close()

    try:
        topics, removed = asyncio.run(prune())
    except Exception as exc:  # the broker's own error, printed
        _fail(exc)
    console.print(f"ACLs of {topics} missing topics: {removed} deleted"
                  + (" (dry run)" if dry_run else ""))


@dev.command("deploy-secrets")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory docker/compose.yaml mounts (deploy/kafka).")
@click.option("--hosts", default="kafka-1,kafka-2,kafka-3", show_default=True,
              help="Broker host names, comma-separated.")
def deploy_secrets_command(out_dir: Path, hosts: str) -> None:
    """Write a deployment's CA, broker key stores and SCRAM password files (0600); prints
    the files written, never their contents."""
    from streams.kafka.acls import roster
    from streams.tools.devstack.kafka_tls import write_deployment_secrets

    names = tuple(h.strip() for h in hosts.split(",") if h.strip())
    for path in write_deployment_secrets(out_dir, names, roster()):
        console.print(str(path))


@dev.command("client-config")
@click.option("--principal", required=True,
              help="The Kafka principal: admin, an institution id, <institution>-backoffice, "
                   "or regulator.")
@click.option("--format", "style", type=click.Choice(["java", "librdkafka"]), default="java",
              show_default=True, help="Java client properties or librdkafka's.")
@click.option("--include-password", is_flag=True,
              help="Print the SCRAM password itself (default: a placeholder naming its "
                   "0600 file). The output is then a secret: redirect it to a 0600 file.")
def client_config(principal: str, style: str, include_password: bool) -> None:
    """Print connection properties (bootstrap, SASL_SSL, SCRAM-SHA-512, CA file) so an
    institution's own systems, in any language, can connect as PRINCIPAL."""
    from streams.common.kafka_auth import KafkaAuthError, client_properties

    try:
        text = client_properties(principal, config.load(), style=style,
                                 include_password=include_password)
    except KafkaAuthError as exc:
        console.print(f"[bold red]error[/] {exc.code}: {exc.message}")
        sys.exit(exit_codes.USAGE)
    click.echo(text, nl=False)


def _as_admin(settings: config.Settings, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(admin client)`` as the set-up's admin principal; exit 2 with the
    code of a refusal."""
    import asyncio

    from ledger.errors import ValidationError
    from streams.kafka.acls import ADMIN
    from streams.kafka.topics import admin_client

    if not settings.kafka_secure:
        _fail(RuntimeError("the plaintext broker has no principals"))

    async def run() -> T:
        admin = admin_client(settings.kafka_bootstrap, principal=ADMIN, settings=settings)
        await admin.start()
        try:
            return await action(admin)
        finally:
            await admin.close()

    try:
        return asyncio.run(run())
    except ValidationError as exc:
        console.print(f"[bold red]error[/] {exc.code}: {exc.message}")
        sys.exit(exit_codes.USAGE)


@dev.command("add-system")
@click.option("--name", required=True, help="The new principal (a-z 0-9 - _ .).")
@click.option("--institution", required=True, help="The member it submits for.")
def add_system(name: str, institution: str) -> None:
    """Register an external system (an institution's back office) on the running
    secure broker: SCRAM credential, password file (0600), ACLs on every chain."""
    from streams.kafka.registry import register_external_system

    settings = config.load()
    chains = _as_admin(settings, lambda admin: register_external_system(
        admin, settings, name, institution))
    click.echo(f"registered {name} for {institution}: password in "
               f"{settings.kafka_password_file(name)}; ACLs on {chains} chain(s)")


@dev.command("remove-system")
@click.option("--name", required=True, help="A principal registered with add-system.")
def remove_system(name: str) -> None:
    """Remove a registered external system: its credential, registry entry and
    password file (it can no longer connect)."""
    from streams.kafka.registry import unregister_external_system

    settings = config.load()
    _as_admin(settings, lambda admin: unregister_external_system(admin, settings, name))
    click.echo(f"removed {name}")


def _print_statuses(statuses: list[ServiceStatus]) -> None:
    table = Table(show_header=True, header_style="bold")
    for column in ("service", "state", "address", "pid", "version", "detail"):
        table.add_column(column)
    for item in statuses:
        table.add_row(item.name, "[green]up[/]" if item.running else "[red]down[/]",
                      item.address, str(item.pid or "-"), item.version or "-", item.detail)
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def _register(module_path: str) -> None:
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name == module_path:
            return  # not written yet
        _register_broken(module_path, exc)
        return
    except Exception as exc:  # a broken module must not take the CLI down
        _register_broken(module_path, exc)
        return
    command = getattr(module, "cli", None)
    if not isinstance(command, click.Command):
        _register_broken(module_path, TypeError(f"{module_path} has no click command `cli`"))
        return
    main.add_command(command)


def _register_broken(module_path: str, exc: Exception) -> None:
    name = module_path.rsplit(".", 1)[-1].removesuffix("_cli")

    @click.command(name=name, help=f"(unavailable: {module_path} failed to import)",
                   context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def broken(args: tuple[str, ...]) -> None:
        _fail(RuntimeError(f"{module_path} failed to import: {type(exc).__name__}: {exc}"))

    main.add_command(broken)


for _module_path in COMMAND_MODULES:
    _register(_module_path)

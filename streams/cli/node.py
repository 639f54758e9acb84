"""``capledger node``: run one institution's node as a faust-streaming worker.

"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from streams.cli import exit_codes
from streams.cli.options import metrics_options, topic_prefix_option
from streams.common import config


@click.command("node")
@click.option("--institution", required=True, help="Member id, e.g. securities-a.")
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path),
              help="genesis.json, or the directory `capledger genesis init` wrote.")
@click.option("--keys-dir", type=click.Path(path_type=Path), default=None,
              help="Directory holding keys/<institution>.wif (default: the genesis directory).")
@topic_prefix_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@metrics_options
@click.option("--snapshot-every", type=click.IntRange(min=0), default=1_000, show_default=True,
              envvar="CAPLEDGER_SNAPSHOT_EVERY",
              help="Write a verified state snapshot every N heights (0: never; "
              "env CAPLEDGER_SNAPSHOT_EVERY).")
@click.option("--verify-workers", type=click.IntRange(1, 64), default=1, show_default=True,
              envvar="CAPLEDGER_VERIFY_WORKERS",
              help="Threads checking signatures at intake (one per core the node may use).")
@click.option("--verify-processes/--verify-threads", default=False, show_default=True,
              envvar="CAPLEDGER_VERIFY_PROCESSES",
              help="Make the verify workers beside the node's thread processes returning "
              "verdicts (decision 0122; env CAPLEDGER_VERIFY_PROCESSES).")
@click.option("--tx-reader", type=click.Choice(["aiokafka", "librdkafka"]), default="aiokafka",
              show_default=True, envvar="CAPLEDGER_NODE_TX_READER",
              help="The tx log's Kafka client (decision 0117; env CAPLEDGER_NODE_TX_READER).")
def cli(institution: str, genesis_path: Path, keys_dir: Path | None, topic_prefix: str,
        log_level: str, metrics_port: int | None, metrics_host: str | None,
        snapshot_every: int, verify_workers: int, verify_processes: bool,
        tx_reader: str) -> None:
    """Run the ledger node of INSTITUTION: intake, proposer, validator, committer."""
    import faust

    from ledger.errors import ValidationError
    from streams.common.genesis_files import load_genesis, load_node_key
    from streams.node.app import build_app
    from streams.node.ledger_node import NodeSettings
    from streams.node.signing_guard import hold_key_lock

    settings = config.load()
    try:
        genesis = load_genesis(genesis_path)
        directory = keys_dir or (genesis_path if genesis_path.is_dir() else genesis_path.parent)
        key = load_node_key(directory, institution, genesis)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    node_settings = NodeSettings(
        institution=institution,
        genesis=genesis,
        key=key,
        bootstrap=settings.kafka_bootstrap,
        state_dir=settings.state_dir,
        topic_prefix=topic_prefix,
        snapshot_every_heights=snapshot_every,
        verify_workers=verify_workers,
        verify_processes=verify_processes,
        tx_reader=tx_reader,
    )
    try:
        hold_key_lock(directory, institution, node_settings.node_dir)
    except ValidationError as error:
        click.echo(f"error {error.code}: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    app, _node = build_app(
        node_settings,
        metrics_port=settings.metrics_port if metrics_port is None else metrics_port,
        metrics_host=metrics_host or settings.metrics_host)
    logging.getLogger("capledger").setLevel(log_level.upper())
    worker = faust.Worker(app, loglevel=log_level, quiet=True)
    profile_dir = os.environ.get("CAPLEDGER_PROFILE_DIR")
    if profile_dir:
        _profile_until_exit(Path(profile_dir) / f"{institution}.prof")
    worker.execute_from_commandline()


def _profile_until_exit(path: Path) -> None:
    """cProfile the whole worker; the stats are written when the process exits
    (SIGTERM / Ctrl-C; not on kill -9). For benchmarks only."""
    import atexit
    import cProfile

    profiler = cProfile.Profile()
    path.parent.mkdir(parents=True, exist_ok=True)
    def dump() -> None:
        profiler.disable()
        profiler.dump_stats(str(path))

    atexit.register(dump)
    profiler.enable()

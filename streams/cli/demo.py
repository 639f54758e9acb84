"""``capledger demo``: five nodes committing pre-signed payments by majority vote."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.common import config
from streams.tools.demo import ROUNDS_DEFAULT, TX_COUNT_DEFAULT, run_demo


@click.command(name="demo")
@click.option("--txs", "tx_count", type=click.IntRange(1, 5_000), default=TX_COUNT_DEFAULT,
              show_default=True, help="Transactions to submit.")
@click.option("--rounds", type=click.IntRange(1, 20), default=ROUNDS_DEFAULT,
              show_default=True, help="Submission rounds (each waits for its outcomes).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Directory for the demo's chain, node state and logs (emptied first; "
                   "default $CAPLEDGER_STATE_DIR/demo).")
def cli(tx_count: int, rounds: int, state_dir: Path | None) -> None:
    """Start five nodes, commit a few hundred transactions by majority vote, show it."""
    from streams.tools.devstack import DevStackError, kafka

    settings = config.load()
    try:
        kafka.start(settings, Console(stderr=True))
        result = run_demo(settings, tx_count=tx_count, rounds=rounds, state_dir=state_dir)
    except (DevStackError, ValidationError, TimeoutError, RuntimeError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise SystemExit(exit_codes.ERROR) from None
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; node processes stopped")
        raise SystemExit(exit_codes.INTERRUPTED) from None
    if result.status is None or result.status.disagreement or result.committed == 0:
        raise SystemExit(exit_codes.ERROR)

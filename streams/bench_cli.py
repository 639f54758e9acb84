"""``capledger bench``: benchmark commands (a click group; ``core`` is the first).

Owns: the ``bench`` group and its ``core`` sub-command, which runs
``streams.bench_core.bench_validation`` several times and prints the median of each
figure. Other benchmarks add sub-commands to ``cli``.
Imports: click, statistics, json, streams.bench_core.
"""

from __future__ import annotations

import json
import os
import statistics

import click

from streams.bench_core import bench_validation, profile_validation

BENCH_RUNS_MAX = 20


@click.group(name="bench")
def cli() -> None:
    """Benchmarks of the ledger core and the stream shell."""


@cli.command("core")
@click.option("--seconds", type=click.FloatRange(0.1, 60.0), default=2.0, show_default=True,
              help="Duration of each measurement.")
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=3, show_default=True,
              help="Repetitions; the median of each figure is printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the medians as JSON.")
@click.option("--profile", type=click.Choice(["p2pkh", "p2sh"]), default=None,
              help="Also print a cProfile of full validation of this spend.")
def core(seconds: float, runs: int, as_json: bool, profile: str | None) -> None:
    """Per-core full validation rate of P2PKH and 2-of-3 P2SH spends vs bare ECDSA."""
    results = [bench_validation(seconds) for _ in range(runs)]
    medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
    medians["runs"] = runs
    medians["cpu_count"] = os.cpu_count() or 0
    if as_json:
        click.echo(json.dumps(medians, indent=2, sort_keys=True))
    else:
        click.echo(f"core validation, one core, median of {runs} runs of {seconds:g} s each")
        for key, value in medians.items():
            shown = f"{value:,.3f}" if isinstance(value, float) and value < 10 else f"{value:,.0f}"
            click.echo(f"  {key:28s} {shown}")
    if profile is not None:
        click.echo(profile_validation(seconds, profile))

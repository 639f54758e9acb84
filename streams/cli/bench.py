"""``capledger bench``: benchmark commands (a click group).

Owns: the ``bench`` group; ``capledger bench`` with no sub-command (or ``bench cluster``,
alias ``bench run``) runs the cluster throughput/latency sweep of ``streams.tools.bench``
against five real node processes; ``bench memory`` the memory benchmark; ``bench
core`` runs ``streams.tools.bench_core.bench_validation`` several times and prints the
median of each figure; ``bench stages`` the latency per stage of a kept step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.tools.bench_core import (
    bench_intake,
    bench_intake_paired,
    bench_validation,
    bench_verdict_ipc,
    profile_validation,
)

BENCH_RUNS_MAX = 20


def _cluster_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The cluster sweep's options, shared by the bare group and ``cluster``/``run``."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--rates", default="1,10,100,1000,1500,2000,3000,4000,6000",
                     show_default=True, help="Target rates (tx/s), comma-separated, "
                     "in the order run; the sweep stops after the first saturated one."),
        click.option("--duration", "duration_s", type=click.FloatRange(1.0, 3600.0),
                     default=15.0, show_default=True, help="Seconds of load per rate."),
        click.option("--lanes", type=click.IntRange(1, 100_000), default=200,
                     show_default=True, help="Independent payment chains (keys)."),
        click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(1.0, 3600.0),
                     default=30.0, show_default=True,
                     help="Seconds to wait for outcomes after the load ends."),
        click.option("--p99-bound-ms", type=click.FloatRange(1.0), default=2000.0,
                     show_default=True, help="A step with a larger p99 is saturated."),
        click.option("--all-rates", is_flag=True,
                     help="Run every rate even after one saturates."),
        click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
                     help="Run each rate this many times."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object per step (one per line)."),
        click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
                     help="Also write every step (with extras) and the machine to this "
                     "JSON file."),
        click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                     help="Write a PNG of throughput and latency (needs matplotlib)."),
        click.option("--profile-node", type=click.Choice(list(_institutions())), default=None,
                     help="Run this node under cProfile; its stats are written next to "
                     "the step's state (kept)."),
        click.option("--keep", is_flag=True,
                     help="Keep each step's state directory and topics for inspection."),
        click.option("--mix", type=click.Choice(["p2pkh", "multisig", "mixed", "oap"]),
                     default="p2pkh", show_default=True,
                     help="Payments from P2PKH lanes, from P2SH 2-of-3 multisig lanes, "
                     "half and half, or Open Assets transfers (after one issuance)."),
        _batch_option(),
        click.option("--producer", type=click.Choice(["librdkafka", "aiokafka"]),
                     default="librdkafka", show_default=True,
                     help="The load generator's Kafka client (librdkafka falls back to "
                     "aiokafka when confluent-kafka is not installed)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _batch_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    from ledger.envelope import BATCH_TXS_MAX

    return click.option("--batch", type=click.IntRange(1, BATCH_TXS_MAX), default=1,
                        show_default=True,
                        help="Transactions per tx-log record: 1 sends one signed envelope "
                        "each (TxSubmitted), N > 1 one TxBatchSubmitted (one envelope "
                        "signature) per N, sent when its last one is due.")


def _institutions() -> tuple[str, ...]:
    from ledger.membership import INSTITUTION_IDS

    return INSTITUTION_IDS


@click.group(name="bench", invoke_without_command=True)
@_cluster_options
@click.pass_context
def cli(context: click.Context, /, **options: Any) -> None:
    """Benchmarks. With no sub-command: the cluster throughput/latency sweep."""
    if context.invoked_subcommand is None:
        _run_cluster(**options)


@click.command("cluster")
@_cluster_options
def cluster(**options: Any) -> None:
    """Open-loop load at fixed rates against five real node processes."""
    _run_cluster(**options)


cli.add_command(cluster, "cluster")
cli.add_command(cluster, "run")


def _run_cluster(*, rates: str, duration_s: float, lanes: int, drain_timeout_s: float,
                 p99_bound_ms: float, all_rates: bool, repeat: int, as_json: bool,
                 out_path: Path | None, plot_path: Path | None, profile_node: str | None,
                 keep: bool, producer: str, mix: str, batch: int) -> None:
    from streams.common import config
    from streams.tools import bench

    try:
        targets = [float(item) for item in rates.split(",") if item.strip()]
    except ValueError as error:
        raise click.BadParameter(f"--rates: {error}") from error
    if not targets or any(not 0 < rate <= bench.RATE_MAX for rate in targets):
        raise click.BadParameter(f"--rates: each rate in (0, {bench.RATE_MAX}]")
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise click.BadParameter("--plot needs matplotlib: pip install "
                                     "'capital-ledger[bench]'") from error
    settings = config.load()
    options = bench.StepOptions(
        bootstrap=settings.kafka_bootstrap, duration_s=duration_s, lanes=lanes,
        drain_timeout_s=drain_timeout_s, keep=keep or profile_node is not None,
        profile_node=profile_node, producer=producer, mix=mix, batch=batch,
    )

    def progress(message: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)

    def on_step(result: Any) -> None:
        if as_json:
            click.echo(json.dumps(result.record()))
        else:
            click.echo(bench.summary_line(result))
        if profile_node is not None:
            progress(f"profile of {profile_node}: {result.extras['work_dir']}/"
                     f"{profile_node}.prof")

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    progress("measuring the bare secp256k1 verification rate (no cluster running)")
    verify = bench.verify_rate_per_core()
    results = bench.run_sweep(
        [rate for rate in targets for _ in range(repeat)], options,
        p99_bound_ms=p99_bound_ms, stop_at_saturation=not all_rates, verify=verify,
        on_step=on_step, progress=progress,
    )
    if out_path is not None:
        document = {
            "command": "capledger bench " + " ".join(sys.argv[2:]),
            "started_at": started,
            "machine": bench.machine_description(),
            "verify": verify,
            "steps": [dict(r.record(), extras=r.extras) for r in results],
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(document, indent=1) + "\n")
    if plot_path is not None:
        bench.plot_sweep([r.record() for r in results], plot_path,
                         title=f"capledger bench, 5 nodes, {started}")


@cli.command("memory")
@click.option("--utxos", type=click.IntRange(1, 50_000_000), default=1_000_000,
              show_default=True, help="Unspent outputs in the state.")
@click.option("--rate", type=click.FloatRange(1.0, 100_000.0), default=1000.0,
              show_default=True, help="Rate of the node-growth run (0 duration skips it).")
@click.option("--duration", "duration_s", type=click.FloatRange(0.0, 3600.0), default=60.0,
              show_default=True, help="Seconds of load in the node-growth run.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Also write the figures (with the RSS time series) to this JSON file.")
def memory(utxos: int, rate: float, duration_s: float, as_json: bool,
           out_path: Path | None) -> None:
    """RSS of a state with N unspent outputs; node RSS at start vs end of a long run."""
    from streams.common import config
    from streams.tools import bench

    click.echo(f"building a state of {utxos:,} unspent outputs in a fresh process", err=True)
    figures: dict[str, Any] = {"utxo_state": bench.measure_utxo_memory(utxos)}
    if not as_json:
        for key, value in figures["utxo_state"].items():
            click.echo(f"  {key:32s} {value}")
    if duration_s > 0:
        click.echo(f"node growth: {rate:g} tx/s for {duration_s:g} s", err=True)
        options = bench.StepOptions(bootstrap=config.load().kafka_bootstrap,
                                    duration_s=duration_s, drain_timeout_s=60.0)
        result = bench.run_step(rate, options, verify_per_s=0.0)
        figures["node_growth"] = bench.growth_summary(result)
        if not as_json:
            click.echo(bench.summary_line(result))
            for name, node in figures["node_growth"]["nodes"].items():
                click.echo(f"  {name:14s} rss {node['rss_mb_early']:>6} MB at "
                           f"{node['early_at_s']} s -> {node['rss_mb_end']:>6} MB at end "
                           f"(max {node['rss_mb_max']})")
        extras = result.extras
    else:
        extras = {}
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(dict(figures, machine=bench.machine_description(),
                                            rss_series_mb=extras.get("rss_series_mb")),
                                       indent=1) + "\n")


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


@cli.command("wire")
@click.option("--records", type=click.IntRange(100, 1_000_000), default=20_000,
              show_default=True, help="TxSubmitted records per run.")
@click.option("--tx-bytes", type=click.IntRange(50, 1_000_000), default=250, show_default=True)
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=3, show_default=True,
              help="Repetitions; the median of each figure is printed.")
def wire(records: int, tx_bytes: int, runs: int) -> None:
    """Produce and read back transaction records, no nodes: the connection's cost
    (compare CAPLEDGER_KAFKA_SECURITY=sasl_ssl with a plaintext broker)."""
    from streams.common import config
    from streams.tools.bench_wire import run_wire

    bootstrap = config.load().kafka_bootstrap
    results = [run_wire(bootstrap, records=records, tx_bytes=tx_bytes) for _ in range(runs)]
    numeric = [key for key, value in results[0].items() if isinstance(value, float)]
    medians = {key: statistics.median(r[key] for r in results) for key in numeric}
    click.echo(json.dumps({"security": results[0]["security"], "records": records,
                           "tx_bytes": tx_bytes, "runs": runs,
                           **{k: round(v, 1) for k, v in medians.items()}}))


@cli.command("intake")
@click.option("--records", type=click.IntRange(100, 1_000_000), default=5_000, show_default=True,
              help="TxSubmitted records per run.")
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=3, show_default=True,
              help="Repetitions; the median is printed.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Signature-checking workers (a node's --verify-workers), the node's "
              "thread among them; the others threads, or with --verify-processes processes.")
@click.option("--verify-processes/--verify-threads", default=False, show_default=True,
              help="Workers are processes returning verdicts (decision 0122).")
@click.option("--paired", is_flag=True,
              help="One worker and --workers in turn, call by call, on the same records "
              "(both see the same load): their walls and ratio (decision 0126).")
@click.option("--json", "as_json", is_flag=True, help="Print the median as JSON.")
def intake(records: int, runs: int, workers: int, verify_processes: bool, paired: bool,
           as_json: bool) -> None:
    """Cost per transaction of a node's intake: Avro decode, parse, envelope and script
    checks (on --workers threads or processes), pool. CPU and wall time per transaction."""
    if paired:
        _intake_paired(records, runs, workers, verify_processes)
        return
    results = [bench_intake(records, workers=workers, processes=verify_processes)
               for _ in range(runs)]
    medians = {key: round(statistics.median(r[key] for r in results), 2)
               for key in results[0] if key not in ("records", "workers")}
    if verify_processes:
        medians.update({k: round(v, 2) for k, v in bench_verdict_ipc().items()})
    load = os.getloadavg()[0]
    wall, kind = medians["wall_us_per_tx"], "process(es)" if verify_processes else "thread(s)"
    if as_json:
        click.echo(json.dumps({"records": records, "runs": runs, "workers": workers,
                               "verify_processes": verify_processes, **medians,
                               "tx_per_s": round(1e6 / wall, 0), "load_average_1m": load}))
        return
    click.echo(f"intake, {workers} worker {kind}, median of {runs} runs of {records:,} "
               f"records: {medians['total_cpu_us_per_tx']:.1f} µs CPU (node's thread "
               f"{medians['node_thread_cpu_us_per_tx']:.1f}), {wall:.1f} µs wall per "
               f"transaction ({1e6 / wall:,.0f} tx/s; load average {load:.2f})")


def _intake_paired(records: int, runs: int, workers: int, verify_processes: bool) -> None:
    """``bench intake --paired``: one JSON line per run, then the medians."""
    results = []
    for _ in range(runs):
        result = bench_intake_paired(records, workers=workers, processes=verify_processes)
        result["load_average_1m"] = os.getloadavg()[0]
        click.echo(json.dumps({k: round(v, 3) for k, v in result.items()}))
        results.append(result)
    click.echo(json.dumps({"records": records, "runs": runs, "workers": workers,
                           "verify_processes": verify_processes, "median": {
                               key: round(statistics.median(r[key] for r in results), 3)
                               for key in results[0]}}))


@cli.command("node")
@click.option("--txs", type=click.IntRange(100, 1_000_000), default=5_000, show_default=True,
              help="Payments per run.")
@click.option("--rate", type=click.FloatRange(1.0, 1_000_000.0), default=1_000.0,
              show_default=True, help="Arrival rate in simulated tx/s.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Each node's signature-checking threads.")
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=3, show_default=True,
              help="Repetitions; the median is printed.")
@click.option("--mix", type=click.Choice(["p2pkh", "multisig", "mixed", "oap"]),
              default="p2pkh", show_default=True,
              help="P2PKH or P2SH 2-of-3 multisig payments, both, or Open Assets transfers.")
@_batch_option()
@click.option("--profile", is_flag=True, help="Also print cProfile statistics (one run).")
@click.option("--json", "as_json", is_flag=True, help="Print the median run as JSON.")
def node(txs: int, rate: float, workers: int, runs: int, mix: str, batch: int, profile: bool,
         as_json: bool) -> None:
    """A node's CPU per committed transaction without Kafka: five real nodes in one
    process over in-memory logs (streams/tools/bench_node.py)."""
    from streams.tools.bench_node import bench_node

    results = [bench_node(txs, rate=rate, workers=workers, mix=mix, batch=batch,
                          profile=profile and i == 0)
               for i in range(runs)]
    ordered = sorted(results, key=lambda r: r["ratio_to_verify"])
    median = dict(ordered[len(ordered) // 2])
    median["runs_ratio_to_verify"] = [r["ratio_to_verify"] for r in results]
    text = results[0].pop("profile", None)
    median.pop("profile", None)
    if as_json:
        click.echo(json.dumps(median))
    else:
        click.echo(f"node CPU per committed tx (median node, median of {runs} runs): "
                   f"{median['node_cpu_us_per_tx_median']} µs = {median['ratio_to_verify']}x "
                   f"a bare verification ({median['verify_cpu_us']} µs; "
                   f"{median['ratio_to_varied_verify']}x one over distinct inputs, "
                   f"{median['verify_varied_cpu_us']} µs); {txs:,} txs at "
                   f"{rate:g}/s ({mix}, batch {batch}), {median['heights']} blocks, "
                   f"load average {os.getloadavg()[0]:.2f}")
    if text:
        click.echo(text, err=True)


@cli.command("market")
@click.option("--pairs", type=click.IntRange(1, 500), default=20, show_default=True,
              help="Seller/buyer pairs; each settles one DvP trade, all at once.")
@click.option("--orders", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Orders posted by all sellers at once (and up to 200 one after "
                   "another) for the orders/s figures.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def market(pairs: int, orders: int, as_json: bool) -> None:
    """Market throughput on five real nodes: orders accepted/s, DvP settlements/s."""
    import asyncio
    import tempfile
    from pathlib import Path

    from streams.common import config
    from streams.tools.market_bench import bench_market

    with tempfile.TemporaryDirectory(prefix="capledger-market-bench-") as work:
        result = asyncio.run(bench_market(
            config.load().kafka_bootstrap, Path(work), pairs=pairs, orders=orders,
            log=lambda line: click.echo(line, err=True)))
    figures = {
        "orders": result.orders, "orders_per_s": round(result.orders_per_s, 1),
        "sequential_orders": result.sequential_orders,
        "sequential_orders_per_s": round(result.sequential_orders_per_s, 1),
        "settlements": result.settlements,
        "settlements_per_s": round(result.settlements_per_s, 2),
        "settlement_latency_p50_ms": round(result.settlement_latency_p50_ms),
        "settlement_latency_max_ms": round(result.settlement_latency_max_ms),
        "settlement_blocks": result.blocks,
    }
    if as_json:
        click.echo(json.dumps(figures))
    else:
        for key, value in figures.items():
            click.echo(f"  {key:28s} {value}")


@cli.command("startup")
@click.option("--txs", type=click.IntRange(1, 10_000_000), default=100_000, show_default=True,
              help="Committed payments in the generated chain copy.")
@click.option("--block-txs", type=click.IntRange(1, 10_000), default=1_000, show_default=True,
              help="Payments per block (one per lane).")
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=1, show_default=True,
              help="Loads of each kind; medians are printed.")
@click.option("--dir", "work_dir", type=click.Path(path_type=Path), default=None,
              help="Where the chain copy is generated (default: a temporary directory, "
              "removed afterwards).")
@click.option("--utxo-growth/--no-utxo-growth", default=True, show_default=True,
              help="1-in/2-out payments (one more unspent output per tx) or 1-in/1-out "
              "transfers (the UTXO set stays at one output per lane).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--existing", "existing_dir", type=click.Path(path_type=Path, exists=True,
              file_okay=False), default=None,
              help="Generate nothing: time a kept run's node (a `bench soak --keep` or "
              "`bench --keep` directory holding chain/ and state/) from its newest "
              "snapshot, then with its snapshots set aside.")
@click.option("--institution", default=None, help="With --existing: whose node "
              "(default: the first member).")
def startup(txs: int, block_txs: int, runs: int, work_dir: Path | None, utxo_growth: bool,
            as_json: bool, existing_dir: Path | None, institution: str | None) -> None:
    """A node's start-up after TXS committed payments: full replay vs from a snapshot."""
    import dataclasses
    import tempfile

    from streams.tools.bench_startup import bench_existing, bench_startup

    if existing_dir is not None:
        click.echo(f"loading the kept node of {existing_dir} ({runs} loads each)", err=True)
        figures = dataclasses.asdict(bench_existing(
            existing_dir / "state", existing_dir / "chain",
            institution or _institutions()[0], runs))
        _print_figures(figures, as_json)
        return
    click.echo(f"generating a chain copy of {txs:,} payments, {block_txs} per block", err=True)
    with tempfile.TemporaryDirectory(prefix="capledger-startup-") as scratch:
        result = bench_startup(work_dir or Path(scratch), txs=txs, block_txs=block_txs,
                               runs=runs, utxo_growth=utxo_growth)
    _print_figures(dataclasses.asdict(result), as_json)


def _print_figures(figures: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(figures))
        return
    for key, value in figures.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else (
            f"{value:,}" if isinstance(value, int) else value)
        click.echo(f"  {key:20s} {shown}")


@cli.command("soak")
@click.option("--minutes", type=click.FloatRange(0.5, 24 * 60.0), default=30.0,
              show_default=True, help="Minutes of load.")
@click.option("--rate", type=click.FloatRange(1.0, 100_000.0), default=1000.0,
              show_default=True, help="Transactions per second, open loop.")
@click.option("--lanes", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Independent payment chains (keys).")
@click.option("--dsn", default=None, help="An empty PostgreSQL database for the projection "
              "(migrated here; default: no projection figures).")
@click.option("--replication-factor", type=click.IntRange(1, 5), default=1, show_default=True,
              help="The broker copies assumed in the days-of-history estimate.")
@click.option("--keep", is_flag=True, help="Keep the state directory and topics.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Also write the whole report to this JSON file.")
@_batch_option()
def soak(minutes: float, rate: float, lanes: int, dsn: str | None, replication_factor: int,
         keep: bool, out_path: Path | None, batch: int) -> None:
    """Capacity soak: five nodes at RATE tx/s for MINUTES; latency and RSS per minute,
    disk bytes per committed transaction, days of history this disk holds."""
    import dataclasses

    from streams.common import config
    from streams.tools.devstack.postgres import migrate
    from streams.tools.soak import SoakOptions, days_of_history, run_soak

    if dsn is not None:
        migrate(dsn)
    options = SoakOptions(bootstrap=config.load().kafka_bootstrap, minutes=minutes, rate=rate,
                          lanes=lanes, dsn=dsn, keep=keep, batch=batch)
    report = run_soak(options, lambda message: click.echo(message, err=True))
    days = days_of_history(report, replication_factor=replication_factor)
    click.echo(f"soak {rate:g} tx/s x {minutes:g} min: {report.committed:,} committed, "
               f"{report.rejected} rejected, {report.undecided} undecided at the end; nodes "
               f"{report.nodes_cpu_us_per_tx} µs CPU per tx each")
    click.echo("minute  committed   p50 ms   p95 ms   p99 ms   max ms   RSS MB (max per node)")
    for row in report.per_minute:
        click.echo(f"{row['minute']:>6} {row['committed']:>10,} {row['p50_ms']:>8} "
                   f"{row['p95_ms']:>8} {row['p99_ms']:>8} {row['max_ms']:>8}   "
                   + " ".join(f"{v:.0f}" for v in row["rss_mb"].values()))
    click.echo(json.dumps({"disk": report.disk, "projection": report.projection,
                           "days_of_history": days}, indent=1))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(dict(dataclasses.asdict(report),
                                            days_of_history=days), indent=1) + "\n")


@cli.command("snapshot")
@click.option("--utxos", type=click.IntRange(1, 50_000_000), default=1_000_000,
              show_default=True, help="Unspent outputs in the state.")
@click.option("--runs", type=click.IntRange(1, BENCH_RUNS_MAX), default=3, show_default=True,
              help="Repetitions; medians are printed.")
def snapshot(utxos: int, runs: int) -> None:
    """CPU to write and to verify-and-load a node snapshot of N unspent outputs."""
    from streams.tools.bench_startup import bench_snapshot_codec

    click.echo(json.dumps(bench_snapshot_codec(utxos, runs)))


@cli.command("stages")
@topic_prefix_option
@click.option("--quorum", type=click.IntRange(1, 100), default=4, show_default=True,
              help="Acks that decide a height (4 of the bench's five members).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stages(topic_prefix: str, quorum: int, as_json: bool) -> None:
    """Where committed transactions' time went in a kept step (`bench --keep`):
    send, wait for the previous height, wait for the cut, validation and votes,
    commit; p50/p90/p99/mean in ms, from the logs' record times (decision 0111)."""
    import asyncio

    from streams.common import config
    from streams.tools.latency_stages import read_stage_inputs, stage_samples, summarize

    if not topic_prefix:
        click.echo("error: --topic-prefix of a kept bench step is required", err=True)
        sys.exit(exit_codes.USAGE)
    submitted, heights = asyncio.run(read_stage_inputs(
        config.load().kafka_bootstrap, topic_prefix, quorum=quorum))
    figures = summarize(stage_samples(submitted, heights))
    if as_json:
        click.echo(json.dumps({"heights": len(heights), "stages_ms": figures}))
        return
    click.echo(f"{len(heights)} decided heights, {len(submitted)} tx-log records")
    for stage, row in figures.items():
        click.echo(f"{stage:22s} p50 {row['p50']:8.0f}  p90 {row['p90']:8.0f}  "
                   f"p99 {row['p99']:8.0f}  mean {row['mean']:8.1f} ms")

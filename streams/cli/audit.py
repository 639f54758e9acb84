"""``capledger audit``: replay and re-verify the chain, prove a transaction's inclusion,
check a proof offline.

Exit codes (streams/cli/exit_codes.py):

  replay        0 everything verifies and the projection equals the replay; 4 any finding
                (each printed: code, table, key, expected, found); 1 no broker/database
  prove         0 proof written; 2 txid unknown or unusable; 1 no broker/database
  verify-proof  0 the proof holds; 3 it does not (the failed check is printed); 2 unreadable
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import click
import psycopg
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.common import config
from streams.projections.audit import Auditor, AuditReport
from streams.projections.projector import CONSUMER_DEFAULT

PROOF_FILE_BYTES_MAX = 64 * 1024 * 1024
TXID_PATTERN = re.compile(r"[0-9a-f]{64}")


def _progress_text(report: AuditReport) -> str:
    return (f"height {report.height}  txs {report.txs}  {report.tx_per_s:.0f} tx/s  "
            f"{report.tx_per_cpu_s:.0f} tx per CPU s  findings "
            f"{len(report.findings) + report.findings_dropped}")


def _run_with_progress(auditor: Auditor, quiet: bool) -> AuditReport:
    """The replay, with a progress bar over the blocks log on stderr (unless quiet)."""
    if quiet:
        return asyncio.run(auditor.run())
    console = Console(stderr=True)
    with Progress(TextColumn("audit"), BarColumn(), TextColumn("{task.description}"),
                  console=console, transient=True) as bar:
        task = bar.add_task("reading", total=None)

        def update(report: AuditReport) -> None:
            bar.update(task, total=report.blocks_log_end or None,
                       completed=report.blocks_log_position,
                       description=_progress_text(report))

        auditor.on_progress = update
        return asyncio.run(auditor.run())


def _summary(report: AuditReport) -> list[str]:
    evidence = ", ".join(f"{k} x{v}" for k, v in sorted(report.evidence.items())) or "none"
    lines = [
        f"verified {report.blocks} blocks, {report.txs} txs, {report.inputs_verified} inputs "
        f"(scripts and signatures) in {report.elapsed_s:.1f} s: {report.tx_per_s:.0f} tx/s "
        f"({report.cpu_s:.1f} CPU s: {report.tx_per_cpu_s:.0f} tx per CPU second)",
        f"copies: {report.copies_identical} identical, {report.copies_invalid} invalid, "
        f"{report.copies_ahead} ahead; votes read {report.votes_read}, heights decided "
        f"{report.heights_decided}; consensus evidence: {evidence}",
        f"compared {report.blocks_compared} blocks ({report.rows_compared} rows) and "
        f"{report.rejections_compared} rejections with PostgreSQL; "
        f"{report.unprojected_blocks} blocks not yet projected",
        f"height {report.height}",
        f"head hash {report.head_hash}",
        f"state hash {report.state_hash}",
    ]
    lines.extend(f"note: {note}" for note in report.notes)
    return lines


@click.group("audit")
def cli() -> None:
    """Audit replay and offline inclusion proofs."""


@cli.command("replay")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="genesis.json or its directory.")
@topic_prefix_option
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (default "
                                          "CAPLEDGER_PG_DSN).")
@click.option("--consumer", default=CONSUMER_DEFAULT, show_default=True,
              help="The projector whose tracking rows say how far the projection is.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes verifying scripts and signatures (1: in this process).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay(genesis_path: Path, topic_prefix: str, dsn: str | None, consumer: str,
           workers: int, quiet: bool) -> None:
    """Re-verify the chain from offset 0 and compare the projection row by row."""
    from streams.common.genesis_files import load_genesis

    try:
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    settings = config.load()
    auditor = Auditor(genesis, bootstrap=settings.kafka_bootstrap, dsn=dsn or settings.pg_dsn,
                      topic_prefix=topic_prefix, consumer=consumer, workers=workers)
    try:
        report = _run_with_progress(auditor, quiet)
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    except KeyboardInterrupt:
        sys.exit(exit_codes.INTERRUPTED)
    for line in _summary(report):
        click.echo(line)
    for finding in report.findings:
        click.echo(f"FINDING {finding.line()}")
    if report.findings_dropped:
        click.echo(f"FINDING ... and {report.findings_dropped} more")
    click.echo("audit: OK" if report.ok else
               f"audit: {len(report.findings) + report.findings_dropped} findings")
    sys.exit(exit_codes.OK if report.ok else exit_codes.CONFLICT)


@cli.command("prove")
@click.argument("txid")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path), required=True,
              help="genesis.json or its directory.")
@topic_prefix_option
@click.option("--dsn", default=None, help="PostgreSQL DSN of the projection (to find the "
                                          "block; default CAPLEDGER_PG_DSN).")
@click.option("--scan-log", is_flag=True,
              help="Find the block by scanning the blocks log (no projection needed).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the proof (default <txid>.proof.json).")
def prove(txid: str, genesis_path: Path, topic_prefix: str, dsn: str | None, scan_log: bool,
          out_path: Path | None) -> None:
    """Write a self-contained inclusion proof of TXID (docs/audit.md)."""
    from streams.common.genesis_files import load_genesis
    from streams.projections.proofs import (
        ProofUnavailable,
        build_proof_from_log_scan,
        build_proof_from_logs,
    )

    txid = txid.lower()
    if not TXID_PATTERN.fullmatch(txid):
        click.echo(f"error: {txid!r} is not a txid (64 hex digits)", err=True)
        sys.exit(exit_codes.USAGE)
    try:
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    settings = config.load()
    try:
        if scan_log:
            proof = asyncio.run(build_proof_from_log_scan(
                genesis, txid, bootstrap=settings.kafka_bootstrap, topic_prefix=topic_prefix))
        else:
            proof = asyncio.run(build_proof_from_logs(
                genesis, txid, bootstrap=settings.kafka_bootstrap,
                dsn=dsn or settings.pg_dsn, topic_prefix=topic_prefix))
    except ProofUnavailable as error:
        click.echo(f"error ({error.code}): {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    except (psycopg.Error, KafkaError) as error:
        click.echo(f"error ({type(error).__name__}): {error}", err=True)
        sys.exit(exit_codes.ERROR)
    target = out_path or Path(f"{txid}.proof.json")
    target.write_text(json.dumps(proof, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    click.echo(f"proof of {txid} at height {proof['height']} written to "
               f"{target}")


@cli.command("verify-proof")
@click.argument("proof_path", type=click.Path(path_type=Path))
@click.option("--chain-id", "genesis_hash", default=None,
              help="The genesis hash (display hex) you trust; the proof's genesis must have "
                   "it. Without it, the proof is checked against the genesis it carries.")
def verify_proof_command(proof_path: Path, genesis_hash: str | None) -> None:
    """Check an inclusion proof offline (no Kafka, no PostgreSQL)."""
    from ledger.proof import ProofError, verify_proof

    try:
        with open(proof_path, "rb") as handle:
            raw = handle.read(PROOF_FILE_BYTES_MAX + 1)
        if len(raw) > PROOF_FILE_BYTES_MAX:
            raise ValueError(f"over {PROOF_FILE_BYTES_MAX} bytes")
        document = json.loads(raw)
    except (OSError, ValueError, RecursionError) as error:
        click.echo(f"error: cannot read proof {proof_path}: {error}", err=True)
        sys.exit(exit_codes.USAGE)
    try:
        result = verify_proof(document, trusted_genesis_hash=genesis_hash)
    except ProofError as error:
        click.echo(f"INVALID ({error.code}): {error.message}")
        sys.exit(exit_codes.REJECTED)
    click.echo(f"valid: tx {result.txid} is in block {result.block_hash} at height "
               f"{result.height}, certified by {', '.join(result.voters)} "
               f"(quorum {result.quorum} of chain {result.genesis_hash})")

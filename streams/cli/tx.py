"""``capledger tx``: send one signed transaction to the ledger, or look inside one.

Owns: ``tx submit`` (parse locally, refuse what does not parse before anything is
sent, then send through :class:`streams.client.ledger_client.LedgerClient` and optionally wait for
the outcome read back from ``ledger.blocks.v1`` / ``ledger.rejected.v1``) and
``tx decode`` (txid, inputs and outputs of a raw transaction, no network).

Exit codes of ``tx submit``: 0 committed (or sent, with --no-wait); 2 bad input
(hex, file, transaction, genesis, submitter); 3 rejected by the ledger; 4 no
outcome within --timeout.

"""

from __future__ import annotations

import asyncio
import json
import string
import sys
from pathlib import Path

import click

from ledger.errors import ValidationError
from ledger.tx import TX_BYTES_MAX, Transaction
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.client.submit import WAIT_TIMEOUT_S_DEFAULT, describe_tx, submit_tx
from streams.common import config

# A hex file holds at most two characters per byte plus whitespace.
TX_FILE_BYTES_MAX = 2 * TX_BYTES_MAX + 4096
HEX_DIGITS = frozenset(string.hexdigits)


class TxInputError(ValidationError):
    """A transaction given on the command line that cannot be sent as it is."""

    code = "tx-input"


def raw_from_hex(text: str, *, source: str = "--hex") -> bytes:
    """Bytes of a hex string (whitespace ignored); a clear error naming the fault."""
    compact = "".join(text.split())
    if not compact:
        raise TxInputError(f"{source} is empty", code="tx-hex-empty")
    bad = next((i for i, char in enumerate(compact) if char not in HEX_DIGITS), None)
    if bad is not None:
        raise TxInputError(f"{source} is not hex: character {compact[bad]!r} at position {bad}",
                           code="tx-hex")
    if len(compact) % 2:
        raise TxInputError(f"{source} has an odd number of hex digits ({len(compact)})",
                           code="tx-hex")
    return bytes.fromhex(compact)


def raw_from_file(path: Path) -> bytes:
    """A file holding the transaction as hex text, or as raw bytes."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(TX_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise TxInputError(f"cannot read {path}: {error.strerror}", code="tx-file") from None
    if len(data) > TX_FILE_BYTES_MAX:
        raise TxInputError(f"{path} is over {TX_FILE_BYTES_MAX} bytes", code="tx-file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return data  # binary: a serialized transaction never starts with a hex digit
    if text.strip() and all(char in HEX_DIGITS or char.isspace() for char in text):
        return raw_from_hex(text, source=str(path))
    return data


def parse_tx(raw: bytes, *, source: str) -> Transaction:
    try:
        return Transaction.parse(raw)
    except ValidationError as error:
        raise TxInputError(f"{source}: not a valid transaction ({error.code}): {error.message}",
                           code=error.code) from None


def tx_from_options(raw_hex: str | None, file_path: Path | None) -> Transaction:
    """The transaction of exactly one of ``--hex`` and ``--file``."""
    if (raw_hex is None) == (file_path is None):
        raise TxInputError("give exactly one of --hex RAW or --file PATH", code="tx-input")
    if raw_hex is not None:
        return parse_tx(raw_from_hex(raw_hex), source="--hex")
    assert file_path is not None
    return parse_tx(raw_from_file(file_path), source=str(file_path))


def _fail(message: str, code: int = exit_codes.USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group("tx")
def cli() -> None:
    """Submit signed transactions and decode raw ones."""


@cli.command("submit")
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path),
              help="genesis.json or its directory (to check the commit certificates).")
@click.option("--submitter", required=True,
              help="Member id of the submitting institution, or the name of a registered "
                   "system (its back office) that signs with its own submit key.")
@click.option("--keys-dir", type=click.Path(path_type=Path), default=None,
              help="Directory holding keys/<submitter>.key (encrypted; passphrase from "
                   "CAPLEDGER_KEY_PASSPHRASE_FILE or CAPLEDGER_KEY_PASSPHRASE) or .wif: the "
                   "key that signs the envelope (default: the genesis directory).")
@click.option("--hex", "raw_hex", default=None, help="The signed transaction, hex.")
@click.option("--file", "file_path", type=click.Path(path_type=Path), default=None,
              help="A file holding the signed transaction (hex text or raw bytes).")
@click.option("--idempotency-key", default=None,
              help="Key of this submission; a second submission with it is a duplicate.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the transaction commits or is rejected.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1),
              default=WAIT_TIMEOUT_S_DEFAULT, show_default=True, help="Seconds to wait.")
@topic_prefix_option
def submit_command(genesis_path: Path, submitter: str, keys_dir: Path | None,
                   raw_hex: str | None,
                   file_path: Path | None, idempotency_key: str | None, wait: bool,
                   timeout_s: float, topic_prefix: str) -> None:
    """Send one signed transaction in an envelope signed by SUBMITTER's key; print
    where it committed or why it was rejected."""
    from streams.common.genesis_files import load_genesis, load_submitter_key

    try:
        tx = tx_from_options(raw_hex, file_path)
        genesis = load_genesis(genesis_path)
    except ValidationError as error:
        _fail(error.message)
    if genesis.member(submitter) is None and genesis.submit_key(submitter) is None:
        _fail(f"--submitter {submitter!r} is neither a member of genesis {genesis.chain_id} "
              f"({', '.join(member.id for member in genesis.members)}) nor a registered "
              "system")
    directory = keys_dir or (genesis_path if genesis_path.is_dir() else genesis_path.parent)
    try:
        key = load_submitter_key(directory, submitter, genesis)
    except ValidationError as error:
        _fail(f"{error.code}: {error.message}")
    try:
        result = asyncio.run(submit_tx(
            tx, bootstrap=config.load().kafka_bootstrap, genesis=genesis, submitter=submitter,
            signing_key=key,
            topic_prefix=topic_prefix, idempotency_key=idempotency_key, wait=wait,
            timeout_s=timeout_s))
    except TimeoutError:
        _fail(f"transaction {tx.txid}: no outcome within {timeout_s} s (it may still be "
              f"decided; submitting it again is safe: a duplicate is rejected)", exit_codes.TIMEOUT)
    if result.committed is None:
        click.echo(f"sent {result.txid} (tx-log offset {result.offset})")
    elif result.committed:
        click.echo(f"committed at height {result.height} (block {result.block_hash}) "
                   f"txid {result.txid}")
    else:
        click.echo(f"rejected: {result.code}: {result.message}")
        sys.exit(exit_codes.REJECTED)


@cli.command("decode")
@click.option("--hex", "raw_hex", default=None, help="The transaction, hex.")
@click.option("--file", "file_path", type=click.Path(path_type=Path), default=None,
              help="A file holding the transaction (hex text or raw bytes).")
def decode_command(raw_hex: str | None, file_path: Path | None) -> None:
    """Parse a raw transaction locally and print it as JSON (txid, inputs, outputs)."""
    try:
        tx = tx_from_options(raw_hex, file_path)
    except ValidationError as error:
        _fail(error.message)
    click.echo(json.dumps(describe_tx(tx), indent=2))

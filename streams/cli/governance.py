"""``capledger governance``: change the membership or chain parameters by majority.

Owns the command line only: ``propose`` writes a change file (no signatures),
``sign`` adds one member's signature with its own key, ``show`` prints a change
file, ``submit`` sends the signed change as a governance transaction and prints
where it committed or why it was refused. Library: ``streams.client.governance``;
rules: ``ledger.governance``; decision 0061.

Exit codes: 0 committed (or written); 2 bad input; 3 refused by the ledger (e.g.
``governance-minority``); 6 no outcome within --timeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from ledger.errors import ValidationError
from ledger.governance import KINDS, PARAM_RANGES
from streams.cli import exit_codes
from streams.cli.options import topic_prefix_option
from streams.client.submit import WAIT_TIMEOUT_S_DEFAULT
from streams.common import config


def _fail(message: str, code: int = exit_codes.USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _directory(genesis_path: Path, keys_dir: Path | None) -> Path:
    return keys_dir or (genesis_path if genesis_path.is_dir() else genesis_path.parent)


@click.group("governance")
def cli() -> None:
    """Membership and parameter changes, signed by a majority of the members."""


@cli.command("propose")
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path))
@click.option("--kind", required=True, type=click.Choice(KINDS))
@click.option("--sequence", required=True, type=click.IntRange(min=1),
              help="Number of this change in the chain's governance history (1, 2, ...).")
@click.option("--effective-height", required=True, type=click.IntRange(min=1),
              help="First height the change is in force (at least 16 above the block "
                   "that will carry it).")
@click.option("--member", "member_id", default="", help="Member added, removed or rotated.")
@click.option("--public-key", default="", help="New member's or new key's SEC hex.")
@click.option("--name", default="", help="Display name of an added member.")
@click.option("--role", default="member", show_default=True)
@click.option("--may-issue/--no-issue", default=False)
@click.option("--param", "param_items", multiple=True, metavar="NAME=VALUE",
              help=f"change_params: one of quorum, {', '.join(PARAM_RANGES)}.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path))
def propose_command(genesis_path: Path, kind: str, sequence: int, effective_height: int,
                    member_id: str, public_key: str, name: str, role: str, may_issue: bool,
                    param_items: tuple[str, ...], out_path: Path) -> None:
    """Write an unsigned change file."""
    from streams.client.governance import draft_change, write_change_file
    from streams.common.genesis_files import load_genesis

    try:
        params = {k: int(v) for k, _, v in (item.partition("=") for item in param_items)}
    except ValueError:
        _fail("--param takes NAME=INTEGER")
    try:
        genesis = load_genesis(genesis_path)
        signed = draft_change(genesis, kind=kind, sequence=sequence,
                              effective_height=effective_height, member_id=member_id,
                              public_key_hex=public_key, name=name, role=role,
                              may_issue=may_issue, params=params)
    except ValidationError as error:
        _fail(f"{error.code}: {error.message}")
    write_change_file(out_path, signed)
    click.echo(f"change {signed.change.change_id.hex()} written to {out_path}")


@cli.command("sign")
@click.argument("change_path", type=click.Path(path_type=Path))
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path))
@click.option("--member", "member_id", required=True, help="The signing member.")
@click.option("--keys-dir", type=click.Path(path_type=Path), default=None,
              help="Directory holding keys/<member>.key or .wif (default: the genesis "
                   "directory).")
def sign_command(change_path: Path, genesis_path: Path, member_id: str,
                 keys_dir: Path | None) -> None:
    """Add MEMBER's signature (its own key) to a change file, in place."""
    from streams.client.governance import read_change_file, write_change_file
    from streams.common.genesis_files import load_genesis, load_node_key

    try:
        genesis = load_genesis(genesis_path)
        signed = read_change_file(change_path)
        key = load_node_key(_directory(genesis_path, keys_dir), member_id, genesis)
    except ValidationError as error:
        _fail(f"{error.code}: {error.message}")
    if signed.change.genesis_hash != genesis.hash_le:
        _fail("the change belongs to another chain than --genesis")
    signed = signed.signed_by(member_id, key)
    write_change_file(change_path, signed)
    click.echo(f"signed by {member_id}: {len(signed.signatures)} signature(s)")


@cli.command("show")
@click.argument("change_path", type=click.Path(path_type=Path))
def show_command(change_path: Path) -> None:
    """Print a change file after checking it."""
    from streams.client.governance import change_to_json, read_change_file

    try:
        signed = read_change_file(change_path)
    except ValidationError as error:
        _fail(f"{error.code}: {error.message}")
    click.echo(json.dumps(change_to_json(signed), indent=2))


@cli.command("submit")
@click.argument("change_path", type=click.Path(path_type=Path))
@click.option("--genesis", "genesis_path", required=True, type=click.Path(path_type=Path))
@click.option("--submitter", required=True, help="Member whose key signs the envelope.")
@click.option("--keys-dir", type=click.Path(path_type=Path), default=None)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1),
              default=WAIT_TIMEOUT_S_DEFAULT, show_default=True)
@topic_prefix_option
def submit_command(change_path: Path, genesis_path: Path, submitter: str,
                   keys_dir: Path | None, timeout_s: float, topic_prefix: str) -> None:
    """Send the signed change; print the height it committed at or the refusal."""
    from streams.client.governance import read_change_file, submit_change
    from streams.common.genesis_files import load_genesis, load_institution_key

    try:
        genesis = load_genesis(genesis_path)
        signed = read_change_file(change_path)
        key = load_institution_key(_directory(genesis_path, keys_dir), submitter,
                                   genesis=genesis)
    except ValidationError as error:
        _fail(f"{error.code}: {error.message}")
    try:
        result = asyncio.run(submit_change(
            signed, bootstrap=config.load().kafka_bootstrap, genesis=genesis,
            submitter=submitter, signing_key=key, topic_prefix=topic_prefix,
            timeout_s=timeout_s))
    except TimeoutError:
        _fail(f"no outcome within {timeout_s} s", exit_codes.TIMEOUT)
    if result.committed:
        click.echo(f"committed at height {result.height} (block {result.block_hash}) "
                   f"txid {result.txid}; in force from height "
                   f"{signed.change.effective_height}")
    else:
        click.echo(f"rejected: {result.code}: {result.message}")
        sys.exit(exit_codes.REJECTED)

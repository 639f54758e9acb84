"""``capledger genesis``: create the chain's founding file and the institutions' identity keys.

Owns: the on-disk layout written by ``capledger genesis init --out DIR``::

    DIR/genesis.json            members, quorum, block parameters (public data)
    DIR/keys/<institution>.wif  one identity private key per institution, mode 0600

and the loaders every node uses at start: :func:`load_genesis` and
:func:`load_institution_key` (which refuses key files that group or others could
read, as ssh does). Randomness comes from :mod:`secrets` here, in the shell, and
is passed into ``ledger.keys.PrivateKey.generate``; private keys are written only
to their own 0600 files and are never printed or logged.

"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ledger.errors import ValidationError
from ledger.hashing import display_hex
from ledger.membership import (
    INSTITUTION_IDS,
    Genesis,
    GenesisError,
)
from streams.common.clock import now_ms
from streams.common.genesis_files import (
    CHAIN_ID_DEFAULT,
    GENESIS_FILENAME,
    KEY_SUFFIX,
    KEYS_DIRNAME,
    build_genesis,
    genesis_from_public_keys,
    load_genesis,
    parse_member_public_key,
    parse_submit_key,
    random_entropy,
    seeded_entropy,
    write_genesis_dir,
)

# ---------------------------------------------------------------- building


# ---------------------------------------------------------------- files


# ---------------------------------------------------------------- CLI


def _split_institutions(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@click.group("genesis")
def genesis_group() -> None:
    """Create and inspect the genesis file and identity keys."""


@genesis_group.command("init")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write genesis.json and keys/<institution>.wif into.")
@click.option("--chain-id", default=CHAIN_ID_DEFAULT, show_default=True,
              help="Name of the chain; part of the genesis hash.")
@click.option("--institutions", default=",".join(INSTITUTION_IDS), show_default=True,
              help="Comma-separated member ids, in rotation order.")
@click.option("--block-interval-ms", default=500, show_default=True, type=click.IntRange(1))
@click.option("--block-bytes-max", default=2_000_000, show_default=True,
              type=click.IntRange(1_000))
@click.option("--proposer-timeout-ms", default=3_000, show_default=True, type=click.IntRange(1))
@click.option("--time-ms", type=click.IntRange(0), default=None,
              help="Genesis time in ms since the epoch (default: now).")
@click.option("--example-seed", default=None, metavar="TEXT",
              help="Derive keys from this PUBLIC seed instead of the OS's randomness. "
                   "For examples and tests only: anyone who knows the seed has the keys.")
@click.option("--allocate", "allocations", multiple=True, metavar="ADDRESS=VALUE",
              help="Native value created at genesis for a P2PKH/P2SH address (repeatable). "
                   "The only way native value comes into existence: no fees, no reward.")
@click.option("--member", "members", multiple=True, metavar="ID=PUBLIC_KEY",
              help="Build the genesis from this member's public key (repeat, in rotation "
                   "order; from `capledger keys new` on each institution's machine). No "
                   "private key is made or written; --institutions is ignored.")
@click.option("--submit-key", "submit_keys", multiple=True, metavar="NAME=MEMBER:PUBLIC_KEY",
              help="Register an external system (e.g. securities-a-backoffice) that signs "
                   "its envelopes with this key of its own (repeat; decision 0061).")
@click.option("--force", is_flag=True, help="Overwrite an existing genesis.json and key files.")
def init_command(
    out_dir: Path,
    chain_id: str,
    institutions: str,
    block_interval_ms: int,
    block_bytes_max: int,
    proposer_timeout_ms: int,
    time_ms: int | None,
    example_seed: str | None,
    allocations: tuple[str, ...],
    members: tuple[str, ...],
    submit_keys: tuple[str, ...],
    force: bool,
) -> None:
    """Create the genesis file: from the members' public keys (--member), or, as a
    convenience for the demo, with one new plain identity key per institution."""
    ids = _split_institutions(institutions)
    if members and example_seed is not None:
        raise click.UsageError("--member and --example-seed exclude each other")
    try:
        allocated = tuple(_parse_allocation(text) for text in allocations)
        registered = tuple(parse_submit_key(text) for text in submit_keys)
        if members:
            genesis = genesis_from_public_keys(
                chain_id=chain_id,
                time_ms=now_ms() if time_ms is None else time_ms,
                public_keys=[parse_member_public_key(text) for text in members],
                block_interval_ms=block_interval_ms, block_bytes_max=block_bytes_max,
                proposer_timeout_ms=proposer_timeout_ms)
            genesis = dataclasses.replace(genesis, allocations=allocated,
                                          submit_keys=registered)
            write_genesis_dir(out_dir, genesis, {}, force=force)
            _print_summary(genesis, None)
            click.echo(f"wrote {out_dir / GENESIS_FILENAME} (no private keys: each member "
                       f"keeps its own)")
            return
        genesis, keys = build_genesis(
            chain_id=chain_id,
            time_ms=now_ms() if time_ms is None else time_ms,
            institutions=ids,
            entropy=random_entropy if example_seed is None else seeded_entropy(example_seed),
            block_interval_ms=block_interval_ms,
            block_bytes_max=block_bytes_max,
            proposer_timeout_ms=proposer_timeout_ms,
        )
        genesis = dataclasses.replace(genesis, allocations=allocated, submit_keys=registered)
        comment = None
        if example_seed is not None:
            comment = (f"EXAMPLE ONLY: keys derived from the public seed {example_seed!r}; "
                       "anyone can recompute the private keys. Never use for real value.")
        write_genesis_dir(out_dir, genesis, keys, force=force, comment=comment)
    except ValidationError as error:
        raise click.ClickException(f"{error.message} [{error.code}]") from None
    _print_summary(genesis, out_dir)
    if example_seed is not None:
        click.echo("WARNING: keys come from a public example seed; do not use them for real.",
                   err=True)


def _parse_allocation(text: str) -> tuple[bytes, int]:
    """``ADDRESS=VALUE`` as (output script, value); a clear error names the bad part."""
    from ledger.address import address_to_script

    address, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise GenesisError(f"allocation {text!r} is not ADDRESS=VALUE (VALUE a whole number "
                           "of base units)", code="genesis-allocation")
    try:
        return address_to_script(address.strip()), int(value)
    except ValidationError as error:
        raise GenesisError(f"allocation {text!r}: {address.strip()!r} is not an address "
                           f"({error.message})", code="genesis-allocation") from None


@genesis_group.command("show")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def show_command(path: Path) -> None:
    """Check a genesis file (or a directory holding one) and print its summary."""
    try:
        genesis = load_genesis(path)
    except ValidationError as error:
        raise click.ClickException(f"{error.message} [{error.code}]") from None
    _print_summary(genesis, None)


def _print_summary(genesis: Genesis, out_dir: Path | None) -> None:
    params = genesis.params
    click.echo(f"chain id      {genesis.chain_id}")
    click.echo(f"genesis hash  {display_hex(genesis.hash_le)}")
    click.echo(f"quorum        {params.quorum} of {len(genesis.members)}")
    click.echo(f"block         interval {params.block_interval_ms} ms, at most "
               f"{params.block_bytes_max} bytes / {params.block_txs_max} txs; "
               f"proposer timeout {params.proposer_timeout_ms} ms")
    click.echo("members:")
    for member in genesis.members:
        issuer = "issuer" if member.may_issue else "      "
        click.echo(f"  {member.id:<14} {member.role:<13} {issuer} {member.public_key.sec.hex()}")
    _print_allocations(genesis)
    if out_dir is not None:
        click.echo(f"wrote {out_dir / GENESIS_FILENAME}")
        click.echo(f"private keys in {out_dir / KEYS_DIRNAME}/<institution>{KEY_SUFFIX} "
                   f"(mode 0600; keep them secret, never commit them)")


def _print_allocations(genesis: Genesis) -> None:
    """The outputs of the genesis allocation transaction (txid:index, value, address):
    what an institution spends first, computable from the genesis record alone."""
    from ledger.address import script_to_address
    from ledger.state import genesis_allocation_tx

    if not genesis.allocations:
        click.echo("allocations:  none")
        return
    allocation = genesis_allocation_tx(genesis.hash_le, genesis.allocations)
    click.echo(f"allocations:  tx {allocation.txid} (height 0)")
    for index, out in enumerate(allocation.outputs):
        address = script_to_address(out.script_pubkey, p2pkh_version=genesis.params.p2pkh_version,
                                    p2sh_version=genesis.params.p2sh_version)
        click.echo(f"  {allocation.txid}:{index}  {out.value:>16,}  "
                   f"{address or out.script_pubkey.hex()}")


cli = genesis_group  # registered by streams.cli.main (COMMAND_MODULES)

"""``capledger keys``: an institution makes its own identity key, encrypted at rest.

``keys new`` runs on the institution's machine: it draws a secp256k1 key from the
operating system's randomness, seals it under a passphrase (scrypt +
ChaCha20-Poly1305, :mod:`streams.common.keystore`) into ``DIR/keys/<ID>.key`` and
prints only the public key, which the institution hands to whoever assembles the
genesis (``capledger genesis init --member ID=PUBLIC_KEY``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ledger.errors import ValidationError
from streams.cli import exit_codes
from streams.common.genesis_files import make_key, random_entropy
from streams.common.keystore import (
    PASSPHRASE_ENV,
    KeystoreError,
    PassphraseSource,
    encrypted_key_path,
    read_encrypted_key,
    write_encrypted_key,
)


@click.group("keys")
def keys_group() -> None:
    """Identity keys of institutions, encrypted at rest."""


def _source(passphrase_file: Path | None, passphrase_env: str | None) -> PassphraseSource:
    if passphrase_file is not None and passphrase_env is not None:
        raise click.UsageError("give --passphrase-file or --passphrase-env, not both")
    return PassphraseSource(file=passphrase_file, env_name=passphrase_env)


def _passphrase(source: PassphraseSource, *, confirm: bool) -> str:
    found = source.read()
    if found is not None:
        return found
    if not sys.stdin.isatty():
        raise KeystoreError("no passphrase: give --passphrase-file or --passphrase-env, or "
                            "run in a terminal to be prompted", code="keystore-passphrase")
    return str(click.prompt("passphrase", hide_input=True, confirmation_prompt=confirm,
                            err=True))


_file_option = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Read the passphrase from the first line of this file (mode 0600).")
_env_option = click.option(
    "--passphrase-env", default=None, metavar="NAME",
    help=f"Read the passphrase from this environment variable (e.g. {PASSPHRASE_ENV}).")


@keys_group.command("new")
@click.option("--institution", required=True, help="The member id the key is for.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True,
              help="Directory to write keys/<institution>.key into.")
@_file_option
@_env_option
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def new_command(institution: str, directory: Path, passphrase_file: Path | None,
                passphrase_env: str | None, force: bool) -> None:
    """Create INSTITUTION's identity key, encrypted; print only its public key."""
    try:
        passphrase = _passphrase(_source(passphrase_file, passphrase_env), confirm=True)
        key = make_key(institution, random_entropy)
        path = write_encrypted_key(directory, institution, key, passphrase, force=force)
    except ValidationError as error:
        click.echo(f"error {error.code}: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    click.echo(f"wrote {path} (encrypted, mode 0600)", err=True)
    click.echo(key.public_key.sec.hex())


@keys_group.command("check")
@click.option("--institution", required=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True)
@_file_option
@_env_option
def check_command(institution: str, directory: Path, passphrase_file: Path | None,
                  passphrase_env: str | None) -> None:
    """Open INSTITUTION's key with the passphrase and print its public key."""
    try:
        passphrase = _passphrase(_source(passphrase_file, passphrase_env), confirm=False)
        key = read_encrypted_key(directory, institution, passphrase)
    except ValidationError as error:
        click.echo(f"error {error.code}: {error.message}", err=True)
        sys.exit(exit_codes.USAGE)
    click.echo(f"{encrypted_key_path(directory, institution)} opens", err=True)
    click.echo(key.public_key.sec.hex())


cli = keys_group  # registered by streams.cli.main (COMMAND_MODULES)

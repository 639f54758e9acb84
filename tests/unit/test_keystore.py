"""Identity keys encrypted at rest (streams.common.keystore) and `capledger keys`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger.keys import PrivateKey
from ledger.membership import Genesis
from streams.common.genesis_files import load_genesis, load_institution_key
from streams.common.keystore import (
    KeystoreError,
    encrypted_key_path,
    read_encrypted_key,
    write_encrypted_key,
)

pytestmark = pytest.mark.unit

PASSPHRASE = "correct horse battery staple"
KEY = PrivateKey(bytes(range(1, 33)))


def test_key_at_rest_holds_no_secret_and_opens_only_with_the_passphrase(tmp_path: Path) -> None:
    path = write_encrypted_key(tmp_path, "koscom", KEY, PASSPHRASE)
    raw = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KEY.secret not in raw and KEY.secret.hex().encode() not in raw
    assert KEY.to_wif().encode() not in raw
    assert read_encrypted_key(tmp_path, "koscom", PASSPHRASE) == KEY
    with pytest.raises(KeystoreError) as caught:
        read_encrypted_key(tmp_path, "koscom", PASSPHRASE + "!")
    assert caught.value.code == "keystore-decrypt"
    assert PASSPHRASE not in caught.value.message


def test_altered_or_renamed_key_file_does_not_open(tmp_path: Path) -> None:
    path = write_encrypted_key(tmp_path, "koscom", KEY, PASSPHRASE)
    document = json.loads(path.read_text())
    other = PrivateKey(bytes(range(2, 34)))
    document["public_key"] = other.public_key.sec.hex()  # claim another public key
    path.write_text(json.dumps(document))
    with pytest.raises(KeystoreError) as caught:
        read_encrypted_key(tmp_path, "koscom", PASSPHRASE)
    assert caught.value.code == "keystore-decrypt"
    write_encrypted_key(tmp_path, "koscom", KEY, PASSPHRASE, force=True)
    target = encrypted_key_path(tmp_path, "koscom-b")
    os.replace(encrypted_key_path(tmp_path, "koscom"), target)
    document = json.loads(target.read_text())
    document["institution"] = "koscom-b"
    target.write_text(json.dumps(document))
    target.chmod(0o600)
    with pytest.raises(KeystoreError) as caught:
        read_encrypted_key(tmp_path, "koscom-b", PASSPHRASE)
    assert caught.value.code == "keystore-decrypt"


def test_weak_passphrase_readable_file_and_clobbering_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="at least"):
        write_encrypted_key(tmp_path, "koscom", KEY, "short")
    path = write_encrypted_key(tmp_path, "koscom", KEY, PASSPHRASE)
    with pytest.raises(KeystoreError) as caught:
        write_encrypted_key(tmp_path, "koscom", KEY, PASSPHRASE)
    assert caught.value.code == "keystore-exists"
    path.chmod(0o644)
    with pytest.raises(KeystoreError) as caught:
        read_encrypted_key(tmp_path, "koscom", PASSPHRASE)
    assert caught.value.code == "keystore-permissions"


def _passphrase_file(tmp_path: Path) -> Path:
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    return secret


def test_keys_new_prints_only_the_public_key_and_genesis_takes_members(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.cli.main import main

    runner = CliRunner()
    secret = _passphrase_file(tmp_path)
    publics = {}
    for institution in ("koscom", "securities-a", "securities-b"):
        result = runner.invoke(main, ["keys", "new", "--institution", institution,
                                      "--dir", str(tmp_path / institution),
                                      "--passphrase-file", str(secret)])
        assert result.exit_code == 0, result.output
        publics[institution] = result.stdout.strip()
        assert len(bytes.fromhex(publics[institution])) == 33  # only the public key
    result = runner.invoke(main, ["genesis", "init", "--out", str(tmp_path / "chain"),
                                  *(arg for name, key in publics.items()
                                    for arg in ("--member", f"{name}={key}"))])
    assert result.exit_code == 0, result.output
    genesis: Genesis = load_genesis(tmp_path / "chain")
    assert [m.id for m in genesis.members] == list(publics)
    assert genesis.params.quorum == 2
    assert not (tmp_path / "chain" / "keys").exists() or not any(
        (tmp_path / "chain" / "keys").iterdir())
    # the node's loader opens the encrypted key with the passphrase from the environment
    monkeypatch.setenv("CAPLEDGER_KEY_PASSPHRASE_FILE", str(secret))
    key = load_institution_key(tmp_path / "koscom", "koscom", genesis=genesis)
    assert key.public_key.sec.hex() == publics["koscom"]
    monkeypatch.delenv("CAPLEDGER_KEY_PASSPHRASE_FILE")
    monkeypatch.delenv("CAPLEDGER_KEY_PASSPHRASE", raising=False)
    with pytest.raises(KeystoreError) as caught:
        load_institution_key(tmp_path / "koscom", "koscom", genesis=genesis)
    assert caught.value.code == "keystore-passphrase"
    monkeypatch.setenv("CAPLEDGER_KEY_PASSPHRASE", "not the passphrase")
    with pytest.raises(KeystoreError) as caught:
        load_institution_key(tmp_path / "koscom", "koscom", genesis=genesis)
    assert caught.value.code == "keystore-decrypt"


def test_genesis_member_must_be_a_public_key(tmp_path: Path) -> None:
    from streams.cli.main import main

    result = CliRunner().invoke(main, ["genesis", "init", "--out", str(tmp_path),
                                       "--member", "koscom=abcd"])
    assert result.exit_code != 0
    assert "genesis-member-key" in result.output

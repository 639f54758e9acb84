"""``capledger genesis init`` and the key/genesis loaders: files, modes, secrets kept secret."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger.hashing import display_hex
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis, GenesisError
from streams.cli.main import main
from streams.common.genesis_files import (
    KeyFileError,
    build_genesis,
    genesis_json,
    key_path,
    load_genesis,
    load_institution_key,
    seeded_entropy,
)

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "genesis.json"
# How docs/examples/genesis.json was made (its _comment names the seed).
EXAMPLE_ARGS = ["--chain-id", "capledger-example", "--time-ms", "1798761600000",
                "--example-seed", "capital-ledger-example-2026"]


def _init(out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["genesis", "init", "--out", str(out), *extra])
    return result.exit_code, result.output


def _secrets(out: Path) -> list[str]:
    """Every private key written, in each form it could leak in: WIF and raw hex."""
    found = []
    for institution in INSTITUTION_IDS:
        wif = key_path(out, institution).read_text().strip()
        found += [wif, PrivateKey.from_wif(wif).secret.hex()]
    return found


def test_init_writes_genesis_and_private_key_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "net"
    caplog.set_level(logging.DEBUG)
    code, output = _init(out, "--chain-id", "test-chain")
    assert code == 0, output

    genesis = load_genesis(out / "genesis.json")
    assert genesis.chain_id == "test-chain"
    assert genesis.member_ids == INSTITUTION_IDS
    assert genesis.params.quorum == 3
    assert genesis.params.block_interval_ms == 500
    assert genesis.params.block_bytes_max == 2_000_000
    assert genesis.params.proposer_timeout_ms > 0
    issuers = {m.id for m in genesis.members if m.may_issue}
    assert issuers == {"securities-a", "securities-b"}

    assert stat.S_IMODE(os.stat(out / "keys").st_mode) == 0o700
    for institution in INSTITUTION_IDS:
        path = key_path(out, institution)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        key = load_institution_key(out, institution, genesis=genesis)
        assert key.public_key == genesis.member(institution).public_key  # type: ignore[union-attr]
    assert sorted(p.name for p in (out / "keys").iterdir()) == sorted(
        f"{i}.wif" for i in INSTITUTION_IDS)  # no temporary files left behind

    # The summary shows public keys and the genesis hash, never a private key.
    assert display_hex(genesis.hash_le) in output
    for member in genesis.members:
        assert member.public_key.sec.hex() in output
    logged = caplog.text
    for secret in _secrets(out):
        assert secret not in output
        assert secret not in logged
    assert secret not in (out / "genesis.json").read_text()


def test_keys_are_fresh_randomness_each_time(tmp_path: Path) -> None:
    assert _init(tmp_path / "a")[0] == 0
    assert _init(tmp_path / "b")[0] == 0
    a, b = load_genesis(tmp_path / "a"), load_genesis(tmp_path / "b")
    assert {m.public_key for m in a.members}.isdisjoint({m.public_key for m in b.members})


def test_key_files_are_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        code, output = _init(tmp_path / "net")
    finally:
        os.umask(old)
    assert code == 0, output
    for institution in INSTITUTION_IDS:
        assert stat.S_IMODE(os.stat(key_path(tmp_path / "net", institution)).st_mode) == 0o600


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "net"
    assert _init(out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    code, output = _init(out)
    assert code != 0
    assert "refusing to overwrite" in output and "--force" in output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # One existing key file is enough to refuse, and nothing else gets written.
    other = tmp_path / "other"
    (other / "keys").mkdir(parents=True)
    key_path(other, "koscom").write_text("keep me\n")
    assert _init(other)[0] != 0
    assert not (other / "genesis.json").exists()
    assert key_path(other, "koscom").read_text() == "keep me\n"

    code, output = _init(out, "--force")
    assert code == 0, output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} != before
    assert load_institution_key(out, "koscom", genesis=load_genesis(out)) is not None


def test_custom_institutions(tmp_path: Path) -> None:
    code, output = _init(tmp_path, "--institutions", "alpha,beta,gamma")
    assert code == 0, output
    genesis = load_genesis(tmp_path)
    assert genesis.member_ids == ("alpha", "beta", "gamma")
    assert genesis.params.quorum == 2
    code, output = _init(tmp_path / "bad", "--institutions", "alpha,Bad Name")
    assert code != 0 and "genesis-institution" in output


def test_load_key_refuses_group_or_world_readable_files(tmp_path: Path) -> None:
    assert _init(tmp_path)[0] == 0
    path = key_path(tmp_path, "securities-a")
    secret = path.read_text().strip()
    for mode in (0o640, 0o604, 0o660, 0o622):
        os.chmod(path, mode)
        with pytest.raises(KeyFileError) as caught:
            load_institution_key(tmp_path, "securities-a")
        assert caught.value.code == "key-file-permissions"
        assert str(path) in caught.value.message and "chmod 600" in caught.value.message
        assert secret not in caught.value.message
    os.chmod(path, 0o400)  # read-only for the owner is fine
    assert load_institution_key(tmp_path, "securities-a").to_wif() == secret


def test_load_key_errors_have_codes_and_hide_content(tmp_path: Path) -> None:
    assert _init(tmp_path)[0] == 0
    genesis = load_genesis(tmp_path)
    with pytest.raises(KeyFileError) as caught:
        load_institution_key(tmp_path / "nowhere", "koscom")
    assert caught.value.code == "key-file-missing"

    # A key of another member does not pass for koscom's.
    koscom = key_path(tmp_path, "koscom")
    koscom.write_text(key_path(tmp_path, "surveillance").read_text())
    with pytest.raises(KeyFileError) as caught:
        load_institution_key(tmp_path, "koscom", genesis=genesis)
    assert caught.value.code == "key-file-mismatch"

    damaged = key_path(tmp_path, "surveillance").read_text().strip()[:-3] + "abc"
    koscom.write_text(damaged + "\n")
    with pytest.raises(KeyFileError) as caught:
        load_institution_key(tmp_path, "koscom")
    assert caught.value.code == "key-file-format"
    assert damaged not in caught.value.message

    link = key_path(tmp_path, "otc-operator")
    link.unlink()
    link.symlink_to(key_path(tmp_path, "securities-b"))
    with pytest.raises(KeyFileError) as caught:
        load_institution_key(tmp_path, "otc-operator")
    assert caught.value.code == "key-file-type"  # O_NOFOLLOW: symlinks are refused

    with pytest.raises(KeyFileError):
        load_institution_key(tmp_path, "../keys/koscom")


def test_load_genesis_errors(tmp_path: Path) -> None:
    with pytest.raises(GenesisError) as caught:
        load_genesis(tmp_path / "missing.json")
    assert caught.value.code == "genesis-file"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GenesisError) as caught:
        load_genesis(bad)
    assert caught.value.code == "genesis-json"
    data = json.loads(EXAMPLE.read_text())
    data["params"]["quorum"] = 2  # not a majority of five
    bad.write_text(json.dumps(data))
    with pytest.raises(GenesisError) as caught:
        load_genesis(bad)
    assert caught.value.code == "genesis-quorum"
    del data["members"]
    bad.write_text(json.dumps(data))
    with pytest.raises(GenesisError) as caught:
        load_genesis(bad)
    assert str(bad) in caught.value.message


def test_checked_in_example_is_what_the_command_makes(tmp_path: Path) -> None:
    """docs/examples/genesis.json: five institutions, public keys only, reproducible."""
    text = EXAMPLE.read_text()
    assert "EXAMPLE ONLY" in text
    genesis = load_genesis(EXAMPLE)
    assert genesis.member_ids == INSTITUTION_IDS
    assert genesis.params.quorum == 3

    code, output = _init(tmp_path, *EXAMPLE_ARGS)
    assert code == 0, output
    assert (tmp_path / "genesis.json").read_text() == text
    assert "public example seed" in output
    # The example file holds no private key.
    for secret in _secrets(tmp_path):
        assert secret not in text


def test_genesis_hash_ignores_the_comment() -> None:
    genesis, _ = build_genesis(chain_id="c", time_ms=1, institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("s"))
    with_comment = json.loads(genesis_json(genesis, comment="EXAMPLE ONLY"))
    assert Genesis.from_dict(with_comment).hash_le == genesis.hash_le


def test_allocations_create_native_value_and_bad_ones_are_named(tmp_path: Path) -> None:
    from ledger.address import address_to_script
    from streams.common.genesis_files import load_genesis

    address = "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"
    ok = CliRunner().invoke(main, ["genesis", "init", "--out", str(tmp_path / "ok"),
                                   "--allocate", f"{address}=5000"])
    assert ok.exit_code == 0, ok.output
    genesis = load_genesis(tmp_path / "ok")
    assert genesis.allocations == ((address_to_script(address), 5000),)
    from ledger.state import genesis_allocation_tx

    shown = CliRunner().invoke(main, ["genesis", "show", str(tmp_path / "ok")])
    txid = genesis_allocation_tx(genesis.hash_le, genesis.allocations).txid
    assert f"{txid}:0" in shown.output and "5,000  " + address in shown.output, shown.output
    for bad in ("nonsense=5", f"{address}=abc", address):
        result = CliRunner().invoke(main, ["genesis", "init", "--out", str(tmp_path / "bad"),
                                           "--allocate", bad])
        assert result.exit_code != 0
        assert "genesis-allocation" in result.output and bad in result.output
        assert not (tmp_path / "bad" / "genesis.json").exists()

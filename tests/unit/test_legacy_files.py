"""Legacy integration, pure parts: the holdings file checks, the chained issuances, and the
export layouts (streams/legacy/)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from decimal import Decimal

import pytest

from ledger.address import script_to_address
from ledger.assets import AssetDefinition
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.state import BlockOverlay, LedgerRules, check_tx, state_from_genesis
from ledger.tx import OutPoint
from streams.common.genesis_files import build_genesis, seeded_entropy
from streams.legacy.export import (
    RECORD_CHARS,
    Balance,
    DayExport,
    ExportError,
    Settlement,
    balance_csv,
    fixed_width,
    settlement_csv,
)
from streams.legacy.importer import ImportRefused, build_issuances, parse_holdings

pytestmark = pytest.mark.unit

CODE = "KRLEGACY01"


@pytest.fixture(scope="module")
def chain() -> tuple[object, dict[str, PrivateKey]]:
    genesis, keys = build_genesis(chain_id="legacy-test", time_ms=1_764_000_000_000,
                                  institutions=INSTITUTION_IDS,
                                  entropy=seeded_entropy("legacy-test"))
    issuer_script = p2pkh_script(keys["securities-a"].public_key.hash160)
    return dataclasses.replace(genesis, allocations=((issuer_script, 10_000),)), keys


def address(seed: str) -> str:
    key = PrivateKey(hashlib.sha256(seed.encode()).digest())
    return str(script_to_address(p2pkh_script(key.public_key.hash160)))


def test_parse_accepts_a_good_file(chain: tuple[object, dict[str, PrivateKey]]) -> None:
    genesis, _ = chain
    raw = (f"holder,security_code,quantity\n{address('a')},{CODE},100\n\n"
           f"{address('b')}, {CODE} ,7\n").encode()
    holdings = parse_holdings(raw, security_code=CODE, genesis=genesis)  # type: ignore[arg-type]
    assert [(h.line, h.holder, h.quantity) for h in holdings] == [
        (2, address("a"), 100), (4, address("b"), 7)]


@pytest.mark.parametrize("row, fragment", [
    ("1BadAddress,{code},5", "is not an address"),
    ("{a},OTHER,5", "is not the issuer's security"),
    ("{a},{code},0", "not between 1"),
    ("{a},{code},-3", "not a whole number"),
    ("{a},{code},1.5", "not a whole number"),
    ("{a},{code},1e3", "not a whole number"),
    ("{a},{code},99999999999999999999", "not between 1"),
    ("{a},{code}", "2 fields"),
])
def test_a_bad_row_is_named_by_its_line(chain: tuple[object, dict[str, PrivateKey]], row: str,
                                        fragment: str) -> None:
    genesis, _ = chain
    good = f"{address('a')},{CODE},100"
    raw = "\n".join(["holder,security_code,quantity", good, good,
                     row.format(a=address("a"), code=CODE), good]).encode()
    with pytest.raises(ImportRefused) as caught:
        parse_holdings(raw, security_code=CODE, genesis=genesis)  # type: ignore[arg-type]
    assert caught.value.code == "legacy-bad-row"
    assert [line for line, _ in caught.value.problems] == [4]
    assert fragment in caught.value.problems[0][1]


def test_header_empty_and_encoding(chain: tuple[object, dict[str, PrivateKey]]) -> None:
    genesis, _ = chain
    for raw, code in ((b"holder,code,qty\n", "legacy-header"), (b"", "legacy-header"),
                      (b"holder,security_code,quantity\n", "legacy-empty"),
                      (b"\xff\xfe", "legacy-encoding"),
                      (b"holder,security_code,quantity\n\x00,1,2\n", "legacy-bad-row"),
                      (b"holder,security_code,quantity\n" + b"a" * 200_000 + b",x,1\n",
                       "legacy-csv")):
        with pytest.raises(ImportRefused) as caught:
            parse_holdings(raw, security_code=CODE, genesis=genesis)  # type: ignore[arg-type]
        assert caught.value.code == code


def test_issuances_chain_and_apply(chain: tuple[object, dict[str, PrivateKey]]) -> None:
    genesis, keys = chain
    state = state_from_genesis(genesis.hash_le, genesis.allocations)  # type: ignore[attr-defined]
    rules = LedgerRules.from_genesis(genesis)  # type: ignore[arg-type]
    raw = (f"holder,security_code,quantity\n{address('a')},{CODE},100\n"
           f"{address('b')},{CODE},7\n{address('a')},{CODE},1\n").encode()
    holdings = parse_holdings(raw, security_code=CODE, genesis=genesis)  # type: ignore[arg-type]
    (outpoint, entry), = list(state.items())
    definition = AssetDefinition(CODE, CODE, "equity", "securities-a", "SHARE")
    txs = build_issuances(holdings, keys["securities-a"], (outpoint, entry.value), definition)
    overlay = BlockOverlay()
    issued = asset_id(p2pkh_script(keys["securities-a"].public_key.hash160))
    for tx, holding in zip(txs, holdings, strict=True):
        effect = check_tx(state, tx, rules, overlay=overlay)  # scripts verified
        overlay.absorb(effect)
        assert (effect.issued_asset_id, effect.issued_quantity) == (issued, holding.quantity)
    assert txs[1].inputs[0].prevout == OutPoint(txs[0].hash_le, 2)
    # the same file and coin build the same transactions (RFC 6979 signatures)
    again = build_issuances(holdings, keys["securities-a"], (outpoint, entry.value), definition)
    assert [t.txid for t in again] == [t.txid for t in txs]


def _export() -> DayExport:
    time_at = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.UTC)
    return DayExport(dt.date(2026, 11, 2), (
        Settlement(5, time_at, "ab" * 32, 0, 0, "1Alice", None, Decimal(2_000_000), False),
        Settlement(6, time_at, "cd" * 32, 1, 0, "1Bob", "AAsset", Decimal(100), True),
    ), (Balance("1Alice", None, Decimal(2_000_000), 1), Balance("1Bob", "AAsset", Decimal(100), 1)))


def test_fixed_width_layout() -> None:
    data = fixed_width(_export())
    lines = data.decode("ascii").split("\n")
    assert lines[-1] == "" and all(len(line) == RECORD_CHARS for line in lines[:-1])
    assert [line[0] for line in lines[:-1]] == ["H", "S", "S", "B", "B", "T"]
    assert lines[0].startswith("HCAPLEDGR20261102001000000000005000000000006")
    assert lines[2][1:13] == "000000000006" and lines[2][13:77] == "cd" * 32
    trailer = lines[5]
    assert trailer[1:10] == "000000002"  # settlements
    assert trailer[10:34] == str(2_000_100).zfill(24)  # their total
    assert trailer[34:43] == "000000002" and trailer[43:67] == str(2_000_100).zfill(24)
    assert trailer[67:76] == "000000006"  # records, header and trailer included
    assert fixed_width(_export()) == data  # deterministic


def test_csv_layouts_and_width_limits() -> None:
    export = _export()
    assert settlement_csv(export).decode().splitlines()[2] == (
        f"2026-11-02,6,2026-11-02T10:00:00.000Z,{'cd' * 32},1,0,1Bob,AAsset,100,Y")
    assert balance_csv(export).decode().splitlines() == [
        "balance_date,address,asset_id,amount,outputs",
        "2026-11-02,1Alice,,2000000,1", "2026-11-02,1Bob,AAsset,100,1"]
    too_long = dataclasses.replace(export, balances=(Balance("1" * 36, None, Decimal(1), 1),))
    with pytest.raises(ExportError):
        fixed_width(too_long)

"""The legacy holdings import: a CSV of (holder, security code, quantity) becomes signed
issuances by the issuing member, exactly once per file.

Owns: :func:`parse_holdings` (the file checked whole before anything is built: every bad
row is reported with its line number and nothing is applied), :func:`build_issuances`
(one issuance per row, chained on the issuer's change output, built and signed with
``ledger.wallet``) and :func:`import_holdings`, the shell with the import journal.

Exactly once: the signed transactions of a file are written to the ``legacy_import``
journal (key: the file's SHA-256 and the line) in one PostgreSQL transaction *before*
anything is sent. A re-run of the same file never builds new transactions: it re-sends
the journal's, and a re-sent transaction is either already committed (nothing to do) or
a duplicate the ledger refuses by txid. Each submission carries the idempotency key
``legacy/<first 16 hex of the file hash>/<line>``. Design: decision 0090.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from ledger.address import address_to_script
from ledger.assets import AssetDefinition
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.membership import Genesis
from ledger.oap import asset_id
from ledger.script import p2pkh_script
from ledger.state import UtxoEntry
from ledger.tx import OutPoint, Transaction
from ledger.wallet import KeyStore, Wallet

FILE_BYTES_MAX = 16 * 1024 * 1024
ROWS_MAX = 10_000  # issuances per file
QUANTITY_MAX = 2**63 - 1
PROBLEMS_REPORTED_MAX = 50
HEADER = ("holder", "security_code", "quantity")
CHANGE_OUTPUT_INDEX = 2  # ledger.wallet.build_issuance: 0 recipient, 1 marker, 2 change
WAIT_TIMEOUT_S_DEFAULT = 60.0
DUPLICATE_CODE = "duplicate"


class ImportRefused(ValidationError):
    """The file (or the chain's state) does not allow the import; nothing was applied."""

    code = "legacy-import"

    def __init__(self, message: str, *, code: str | None = None,
                 problems: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(message, code=code)
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Holding:
    line: int
    holder: str
    script_pubkey: bytes
    security_code: str
    quantity: int


@dataclass(frozen=True, slots=True)
class ImportResult:
    file_sha256: str
    rows: int
    already_committed: int
    submitted: int
    committed: int
    rejected: tuple[tuple[int, str, str], ...]  # (line, txid, code)
    pending: tuple[tuple[int, str], ...]  # (line, txid) with no outcome in time

    @property
    def nothing_new(self) -> bool:
        return self.submitted == 0


def parse_holdings(raw: bytes, *, security_code: str, genesis: Genesis) -> list[Holding]:
    """Every row of the file, or ``ImportRefused`` listing each bad row's line. Pure."""
    if len(raw) > FILE_BYTES_MAX:
        raise ImportRefused(f"file of {len(raw)} bytes exceeds {FILE_BYTES_MAX}",
                            code="legacy-file-size")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ImportRefused(f"not UTF-8: {error}", code="legacy-encoding") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:  # a NUL byte, a field over the csv module's size limit
        raise ImportRefused(f"not a readable CSV file: {error}", code="legacy-csv") from None
    if not rows or tuple(cell.strip() for cell in rows[0]) != HEADER:
        raise ImportRefused(f"line 1: the header must be {','.join(HEADER)}",
                            code="legacy-header", problems=[(1, "bad header")])
    params = genesis.params
    holdings: list[Holding] = []
    problems: list[tuple[int, str]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines (e.g. a trailing newline) carry nothing
        problem, holding = _parse_row(line, row, security_code, params.p2pkh_version,
                                      params.p2sh_version)
        if problem is not None:
            problems.append((line, problem))
        elif holding is not None:
            holdings.append(holding)
    if len(holdings) + len(problems) > ROWS_MAX:
        raise ImportRefused(f"more than {ROWS_MAX} rows", code="legacy-too-many-rows")
    if problems:
        shown = "; ".join(f"line {n}: {m}" for n, m in problems[:PROBLEMS_REPORTED_MAX])
        raise ImportRefused(f"{len(problems)} bad rows, nothing applied: {shown}",
                            code="legacy-bad-row", problems=problems)
    if not holdings:
        raise ImportRefused("no rows to import", code="legacy-empty")
    return holdings


def _parse_row(line: int, row: Sequence[str], security_code: str, p2pkh_version: int,
               p2sh_version: int) -> tuple[str | None, Holding | None]:
    if len(row) != len(HEADER):
        return f"{len(row)} fields, expected {len(HEADER)}", None
    holder, code, quantity_text = (cell.strip() for cell in row)
    try:
        script = address_to_script(holder, p2pkh_version=p2pkh_version,
                                   p2sh_version=p2sh_version)
    except ValidationError as error:
        return f"holder {holder!r} is not an address of this chain ({error.code})", None
    if code != security_code:
        return f"security code {code!r} is not the issuer's security {security_code!r}", None
    if not quantity_text.isascii() or not quantity_text.isdigit():
        return f"quantity {quantity_text!r} is not a whole number of units", None
    quantity = int(quantity_text)
    if not 0 < quantity <= QUANTITY_MAX:
        return f"quantity {quantity} is not between 1 and {QUANTITY_MAX}", None
    return None, Holding(line, holder, script, code, quantity)


def build_issuances(holdings: Sequence[Holding], key: PrivateKey, coin: tuple[OutPoint, int],
                    definition: AssetDefinition | None) -> list[Transaction]:
    """One signed issuance per holding, each funded by the previous one's change (the
    first by ``coin``: an uncolored output of the issuer's script with value > 0).
    ``definition`` goes into the first issuance only (the asset's first ever). Pure."""
    store = KeyStore().with_key(key)
    issuer_script = p2pkh_script(key.public_key.hash160)
    outpoint, value = coin
    assert value > 0
    txs = []
    for number, holding in enumerate(holdings):
        wallet = Wallet.from_utxos(store, [(outpoint, UtxoEntry(value, issuer_script, None,
                                                                0, 0))])
        tx = (wallet.issue(holding.quantity, holding.script_pubkey, issuer_script=issuer_script,
                           definition=definition if number == 0 else None)
              .add_signatures(store).finalize())
        txs.append(tx)
        outpoint = OutPoint(tx.hash_le, CHANGE_OUTPUT_INDEX)
    return txs


# --------------------------------------------------------------------------- the shell


async def _journal(conn: psycopg.AsyncConnection[Any], file_sha256: str
                   ) -> list[tuple[int, str, bytes, bool]]:
    """(line, txid, raw, committed) of a file already journaled, in line order."""
    rows = await (await conn.execute(
        "SELECT j.line, j.txid, j.raw, t.txid IS NOT NULL FROM legacy_import j "
        "LEFT JOIN tx t ON t.txid = j.txid WHERE j.file_sha256 = %s ORDER BY j.line",
        (file_sha256,))).fetchall()
    return [(int(n), str(txid), bytes(raw), bool(done)) for n, txid, raw, done in rows]


async def _issuer_coin(conn: psycopg.AsyncConnection[Any], script: bytes
                       ) -> tuple[OutPoint, int]:
    row = await (await conn.execute(
        'SELECT o.txid, o."index", o.value FROM tx_output o JOIN tx t ON t.txid = o.txid '
        "WHERE o.script_pubkey = %s AND o.spent_by_txid IS NULL AND o.asset_id IS NULL "
        'AND o.value > 0 ORDER BY t.height, t.position, o."index" LIMIT 1',
        (script,))).fetchone()
    if row is None:
        raise ImportRefused("the issuer has no unspent uncolored output with value in the "
                            "projection to fund the issuances", code="legacy-no-issuing-coin")
    return OutPoint(bytes.fromhex(str(row[0]))[::-1], int(row[1])), int(row[2])


async def _pending_elsewhere(conn: psycopg.AsyncConnection[Any], issuer: str) -> str | None:
    """A file of this issuer journaled but neither committed nor refused: its chained
    transactions may spend the coin a new file would use."""
    row = await (await conn.execute(
        "SELECT j.file_sha256 FROM legacy_import j WHERE j.issuer = %s "
        "AND NOT EXISTS (SELECT 1 FROM tx t WHERE t.txid = j.txid) "
        "AND NOT EXISTS (SELECT 1 FROM tx_rejection r WHERE r.txid = j.txid) LIMIT 1",
        (issuer,))).fetchone()
    return None if row is None else str(row[0])


async def prepare_import(conn: psycopg.AsyncConnection[Any], raw: bytes, *, genesis: Genesis,
                         issuer: str, key: PrivateKey, definition: AssetDefinition
                         ) -> tuple[str, list[tuple[int, str, bytes, bool]]]:
    """The file's journal: read back if this file was seen, else checked, built and
    written in one transaction. Nothing is sent here."""
    file_sha256 = hashlib.sha256(raw).hexdigest()
    journal = await _journal(conn, file_sha256)
    if journal:
        return file_sha256, journal
    holdings = parse_holdings(raw, security_code=definition.security_code, genesis=genesis)
    other = await _pending_elsewhere(conn, issuer)
    if other is not None:
        raise ImportRefused(f"the import of file {other} by {issuer} is neither committed nor "
                            "refused yet: run it again first", code="legacy-pending")
    script = p2pkh_script(key.public_key.hash160)
    issued = await (await conn.execute("SELECT 1 FROM tx WHERE issued_asset_id = %s LIMIT 1",
                                       (asset_id(script),))).fetchone()
    coin = await _issuer_coin(conn, script)
    txs = build_issuances(holdings, key, coin, None if issued else definition)
    async with conn.transaction():
        for holding, tx in zip(holdings, txs, strict=True):
            await conn.execute(
                "INSERT INTO legacy_import (file_sha256, line, issuer, holder, security_code, "
                "quantity, txid, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (file_sha256, holding.line, issuer, holding.holder, holding.security_code,
                 holding.quantity, tx.txid, tx.serialize()))
    return file_sha256, [(h.line, tx.txid, tx.serialize(), False)
                         for h, tx in zip(holdings, txs, strict=True)]


async def import_holdings(raw: bytes, *, genesis: Genesis, issuer: str, key: PrivateKey,
                          definition: AssetDefinition, dsn: str, bootstrap: str,
                          topic_prefix: str = "",
                          timeout_s: float = WAIT_TIMEOUT_S_DEFAULT) -> ImportResult:
    """Journal the file's issuances (or read them back), send those not yet committed,
    and wait for their outcomes."""
    from streams.client.ledger_client import LedgerClient

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        file_sha256, journal = await prepare_import(conn, raw, genesis=genesis, issuer=issuer,
                                                    key=key, definition=definition)
    todo = [(line, txid, raw_tx) for line, txid, raw_tx, done in journal if not done]
    if not todo:
        return ImportResult(file_sha256, len(journal), len(journal), 0, 0, (), ())
    client = LedgerClient(bootstrap, genesis, submitter=issuer, signing_key=key,
                          topic_prefix=topic_prefix)
    await client.start()
    try:
        for line, _, raw_tx in todo:
            await client.submit(Transaction.parse(raw_tx),
                                idempotency_key=f"legacy/{file_sha256[:16]}/{line}")
        with contextlib.suppress(TimeoutError):  # reported as pending; a re-run is safe
            await client.wait([txid for _, txid, _ in todo], timeout_s=timeout_s)
        outcomes = {txid: client.outcome(txid) for _, txid, _ in todo}
    finally:
        await client.stop()
    # A re-sent transaction the ledger already holds (committed after the projection
    # was read) comes back as a duplicate: it is committed, not refused.
    committed = [line for line, txid, _ in todo if (o := outcomes.get(txid)) is not None
                 and (o.committed or o.code == DUPLICATE_CODE)]
    rejected = tuple((line, txid, str(o.code)) for line, txid, _ in todo
                     if (o := outcomes.get(txid)) is not None and not o.committed
                     and o.code != DUPLICATE_CODE)
    pending = tuple((line, txid) for line, txid, _ in todo if outcomes.get(txid) is None)
    return ImportResult(file_sha256, len(journal), len(journal) - len(todo), len(todo),
                        len(committed), rejected, pending)

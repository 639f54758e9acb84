"""Opening the market service from files: genesis, identity keys, custody stores.

Owns: ``open_market`` (an unstarted ``MarketService`` for a chain directory: the
otc-operator's key, the issuing firms' keys that are present, one ``CustodyStore`` per
securities firm under ``custody_dir``) and ``custody_key`` (the firm's 32-byte custody
key file, made on first use, mode 0600 — on a real deployment a KMS/HSM holds it).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ledger.errors import ValidationError
from ledger.market import MarketError
from streams.common.genesis_files import load_genesis, load_institution_key
from streams.market.accounts import Accounts, CustodyStore
from streams.market.service import OPERATOR, MarketService

CUSTODY_KEY_FILE_BYTES = 64  # hex of 32 bytes
SECURITIES_ROLE = "securities"


def custody_key(custody_dir: Path, firm: str) -> bytes:
    """The firm's custody key from ``<custody_dir>/<firm>.key``; created if missing."""
    custody_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = custody_dir / f"{firm}.key"
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.getuid():
        raise MarketError(f"custody key {path} must be this user's, mode 0600",
                          code="custody-key-file")
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != 32:
        raise MarketError(f"custody key {path} does not hold 32 bytes of hex",
                          code="custody-key-file")
    return key


def open_market(genesis_dir: Path, *, bootstrap: str, topic_prefix: str,
                custody_dir: Path) -> MarketService:
    genesis = load_genesis(genesis_dir)
    firms = [m.id for m in genesis.members if m.may_issue or m.role == SECURITIES_ROLE]
    stores = [CustodyStore(firm, custody_key(custody_dir, firm),
                           custody_dir / f"{firm}.accounts.json") for firm in firms]
    issuer_keys = {}
    for member in genesis.members:
        if member.may_issue:
            try:
                issuer_keys[member.id] = load_institution_key(genesis_dir, member.id,
                                                              genesis=genesis)
            except ValidationError:
                continue  # this process does not act for that issuer
    return MarketService(bootstrap, genesis, accounts=Accounts(stores),
                         operator_key=load_institution_key(genesis_dir, OPERATOR,
                                                           genesis=genesis),
                         issuer_keys=issuer_keys, topic_prefix=topic_prefix)

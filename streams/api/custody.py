"""The custodial accounts the API acts through: the market's custody stores, on disk.

Owns: where each firm's custody store and custody key live in the API's state
directory (``custody/<firm>.json``, the store of encrypted keys; ``custody/<firm>.key``,
the firm's 32-byte AES key, mode 0600), opening them (:func:`load_accounts`), opening
the seed's two users' accounts on a fresh set-up (:func:`open_seed_accounts`), and
signing in a custodial user (:func:`custody_login`, which yields the market's own
principal for that user: only it may use the user's key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from streams.api.problems import ApiProblem
from streams.market.accounts import CUSTODY_KEY_BYTES, Account, Accounts, CustodyStore
from streams.market.accounts import Principal as MarketPrincipal

CUSTODY_DIR = "custody"
CUSTODIAN_FIRMS = ("securities-a", "securities-b")
SEED_USERS = (("user-a", "securities-a"), ("user-b", "securities-b"))
ACCOUNT_ID_CHARS_MAX = 160
SESSION_NONCE_BYTES = 12
SESSION_CHARS_MAX = 200
SESSION_SEAL_LABEL = b"capledger api session seal v1"


def _key(path: Path, *, create: bool) -> bytes:
    if not path.exists() and create:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_bytes(CUSTODY_KEY_BYTES).hex() + "\n")
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by others (chmod 600)")
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def load_accounts(directory: Path, firms: Sequence[str] = CUSTODIAN_FIRMS, *,
                  create: bool = False) -> Accounts:
    """The custody stores of ``firms`` under ``directory/custody``."""
    folder = directory / CUSTODY_DIR
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    stores = [CustodyStore(firm, _key(folder / f"{firm}.key", create=create),
                           folder / f"{firm}.json", durable_sessions=True) for firm in firms]
    return Accounts(stores)


def open_seed_accounts(directory: Path, *, password: str | None = None) -> dict[str, str]:
    """Open user A at securities-a and user B at securities-b; their passwords (made
    here, unless given for a test) by ``user@firm``."""
    accounts = load_accounts(directory, create=True)
    made: dict[str, str] = {}
    for user_id, firm in SEED_USERS:
        secret = password or secrets.token_urlsafe(18)
        accounts.store(firm).open_account(user_id, secret)
        made[f"{user_id}@{firm}"] = secret
    return made


def find_account(accounts: Accounts, account_id: str) -> Account:
    """An account by ``user`` (unique among the firms) or ``user@firm``."""
    user_id, _, firm = account_id[:ACCOUNT_ID_CHARS_MAX].partition("@")
    firms = [firm] if firm else list(accounts.firms())
    found: list[Account] = []
    for name in firms:
        try:
            found.append(accounts.store(name).account(user_id))
        except Exception:  # MarketError: not a customer of this firm
            continue
    if len(found) != 1:
        raise ApiProblem(404 if not found else 400,
                         "account-unknown" if not found else "account-ambiguous",
                         f"no single custodial account {account_id[:64]!r}; use user@firm")
    return found[0]


def custody_login(accounts: Accounts, name: str, password: str) -> MarketPrincipal | None:
    """The market principal of a custodial user, None if ``name`` is no such user;
    401 ``credentials-invalid`` for a wrong password."""
    try:
        account = find_account(accounts, name)
    except ApiProblem:
        return None
    try:
        return accounts.store(account.firm).authenticate(account.user_id, password)
    except Exception:
        raise ApiProblem(401, "credentials-invalid", "unknown user or wrong password",
                         headers={"WWW-Authenticate": 'Basic realm="capital-ledger"'}) from None


def _session_aead(token_key: bytes) -> AESGCM:
    return AESGCM(hmac.new(token_key, SESSION_SEAL_LABEL, hashlib.sha256).digest())


def seal_session(token_key: bytes, holder: MarketPrincipal) -> str:
    """The market principal's token sealed for this server (it rides in the bearer
    token, so a restarted API resumes the session; nothing is stored at rest)."""
    nonce = os.urandom(SESSION_NONCE_BYTES)
    subject = f"{holder.user_id}@{holder.firm}".encode()
    sealed = _session_aead(token_key).encrypt(nonce, holder.token, subject)
    return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def resume_session(token_key: bytes, accounts: Accounts, subject: str,
                   sealed: str | None) -> MarketPrincipal | None:
    """The market principal a bearer token's sealed session names, None when it does
    not open or the custody store no longer accepts it."""
    if sealed is None or len(sealed) > SESSION_CHARS_MAX or subject.count("@") != 1:
        return None
    user_id, _, firm = subject.partition("@")
    try:
        blob = base64.urlsafe_b64decode(sealed.encode("ascii"))
        token = _session_aead(token_key).decrypt(blob[:SESSION_NONCE_BYTES],
                                                 blob[SESSION_NONCE_BYTES:], subject.encode())
        holder = MarketPrincipal(user_id, firm, token)
        accounts.check(holder)
    except (InvalidTag, ValueError, binascii.Error, UnicodeEncodeError):
        return None
    except Exception:  # MarketError: not a principal this custody store issued
        return None
    return holder

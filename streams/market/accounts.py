"""Custodial accounts of a securities firm: its users' keys, encrypted at rest, used
only for the authenticated user.

Owns: ``CustodyStore`` (one per firm: user A at securities-a, user B at securities-b):
``open_account`` makes a user's secp256k1 key from fresh randomness and keeps it only
encrypted (AES-256-GCM under the firm's 32-byte custody key, the firm and user id as
additional data) with a scrypt password hash; ``authenticate`` turns a user id and
password into a ``Principal`` that only this store accepts (an HMAC under a secret
that never leaves the process); every use of a key (``sign_digest``, ``sign_inputs``,
``unseal``) takes a principal and refuses another firm's or a forged one. A firm sees
its own customers only (``accounts``). ``OwnKey``: a user who holds their own key
(non-custodial), same interface (``UserSigner``). ``Accounts`` resolves who holds a
user's key: the custody stores of the firms one process acts for, and own keys. The
store file (JSON, mode 0600) holds ciphertexts, never keys.

Keys never appear in logs, reprs or command lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.address import P2PKH_VERSION_MAINNET, p2pkh_address
from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.market import MarketError, UserRef
from ledger.script import p2pkh_script
from ledger.wallet import KeyStore, PartiallySignedTx
from streams.market import sealing

CUSTODY_KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16
SCRYPT_N = 2**14  # interactive-login cost (RFC 7914 §2); ~20 ms here
SCRYPT_R = 8
SCRYPT_P = 1
ACCOUNTS_PER_FIRM_MAX = 100_000
PASSWORD_CHARS_MIN = 8
PASSWORD_CHARS_MAX = 256
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9가-힣][A-Za-z0-9가-힣._-]{0,63}$")
STORE_FORMAT = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class Account:
    """What anyone may know of an account: who, where, the public key and address."""

    user_id: str
    firm: str
    pubkey_hex: str
    address: str

    @property
    def user(self) -> UserRef:
        return UserRef(self.user_id, self.firm, self.pubkey_hex)

    @property
    def script(self) -> bytes:
        return p2pkh_script(hashlib.new("ripemd160", hashlib.sha256(
            bytes.fromhex(self.pubkey_hex)).digest()).digest())


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user of one firm, as ``CustodyStore.authenticate`` issued it."""

    user_id: str
    firm: str
    token: bytes = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.firm}/{self.user_id}"


@dataclass(frozen=True, slots=True)
class _Sealed:
    pubkey_hex: str
    salt: bytes
    password_hash: bytes
    nonce: bytes
    ciphertext: bytes


class CustodyStore:
    """The custodial keys of one firm's users (see the module docstring)."""

    def __init__(self, firm: str, custody_key: bytes, path: Path | None = None, *,
                 durable_sessions: bool = False) -> None:
        """``durable_sessions``: principals stay valid across a restart of the process
        (their HMAC secret is derived from the custody key instead of fresh randomness);
        the holder must then keep principals' tokens only sealed (decision 0081)."""
        if len(custody_key) != CUSTODY_KEY_BYTES:
            raise MarketError("custody key must be 32 bytes", code="custody-key-invalid")
        self.firm = firm
        self._aead = AESGCM(custody_key)
        self._session_secret = (
            hmac.new(custody_key, b"capledger custody session v1", hashlib.sha256).digest()
            if durable_sessions else os.urandom(32))
        self._path = path
        self._sealed: dict[str, _Sealed] = {}
        if path is not None and path.exists():
            self._load(path)

    def __repr__(self) -> str:
        return f"CustodyStore(firm={self.firm!r}, accounts={len(self._sealed)})"

    # -- accounts -----------------------------------------------------------

    def open_account(self, user_id: str, password: str, *,
                     entropy32: bytes | None = None) -> Account:
        """A new custodial account with a fresh key (``entropy32`` only in tests)."""
        if not USER_ID_PATTERN.match(user_id):
            raise MarketError(f"user id {user_id!r} is not 1-64 letters, digits, . _ -",
                              code="account-bad-user-id")
        if user_id in self._sealed:
            raise MarketError(f"{self.firm} already has user {user_id}", code="account-exists")
        if not PASSWORD_CHARS_MIN <= len(password) <= PASSWORD_CHARS_MAX:
            raise MarketError(f"password must be {PASSWORD_CHARS_MIN}..{PASSWORD_CHARS_MAX} "
                              "characters", code="account-bad-password")
        if len(self._sealed) >= ACCOUNTS_PER_FIRM_MAX:
            raise MarketError("too many accounts", code="account-limit")
        key = PrivateKey(entropy32 if entropy32 is not None else _random_secret())
        salt = os.urandom(SALT_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        self._sealed[user_id] = _Sealed(
            key.public_key.sec.hex(), salt, _password_hash(password, salt), nonce,
            self._aead.encrypt(nonce, key.secret, self._aad(user_id)),
        )
        self._save()
        return self.account(user_id)

    def account(self, user_id: str) -> Account:
        sealed = self._sealed.get(user_id)
        if sealed is None:
            raise MarketError(f"{self.firm} has no user {user_id!r}", code="account-unknown")
        pubkey = bytes.fromhex(sealed.pubkey_hex)
        address = p2pkh_address(hashlib.new("ripemd160", hashlib.sha256(pubkey).digest())
                                .digest(), P2PKH_VERSION_MAINNET)
        return Account(user_id, self.firm, sealed.pubkey_hex, address)

    def accounts(self) -> tuple[Account, ...]:
        """This firm's customers (and no one else's)."""
        return tuple(self.account(user_id) for user_id in sorted(self._sealed))

    # -- authentication -----------------------------------------------------

    def authenticate(self, user_id: str, password: str) -> Principal:
        sealed = self._sealed.get(user_id)
        if sealed is None or not hmac.compare_digest(
                _password_hash(password, sealed.salt), sealed.password_hash):
            raise MarketError("unknown user or wrong password", code="account-auth-failed")
        return Principal(user_id, self.firm, self._token(user_id))

    def check(self, principal: Principal) -> Account:
        """The principal's account; refuses one this store did not issue."""
        if principal.firm != self.firm or not hmac.compare_digest(
                principal.token, self._token(principal.user_id)):
            raise MarketError(f"principal {principal.key} was not authenticated by "
                              f"{self.firm}", code="account-not-authenticated")
        return self.account(principal.user_id)

    # -- using keys (only for the authenticated user) -----------------------

    def sign_digest(self, principal: Principal, digest32: bytes) -> str:
        """DER signature (hex) of the user's key over a 32-byte digest."""
        return self._key(principal).sign(digest32).hex()

    def sign_inputs(self, principal: Principal, psbt: PartiallySignedTx) -> PartiallySignedTx:
        """Sign the inputs of ``psbt`` that spend the user's outputs (and no other)."""
        keystore = KeyStore().with_key(self._key(principal))
        return psbt.add_signatures(keystore)

    def sign_agreed_inputs(self, user_id: str, psbt: PartiallySignedTx) -> PartiallySignedTx:
        """Sign the user's inputs of a settlement. Called only by
        ``streams.market.settlement.sign_for_party``, after it verified the user's own
        signature on the agreement and that the transaction does what it says: the
        user's signed agreement is the authorisation here, not a session."""
        keystore = KeyStore().with_key(self._secret_key(user_id))
        return psbt.add_signatures(keystore)

    def unseal(self, principal: Principal, blob: bytes, aad: bytes) -> bytes:
        return sealing.unseal(self._key(principal), blob, aad)

    def _key(self, principal: Principal) -> PrivateKey:
        self.check(principal)
        return self._secret_key(principal.user_id)

    def _secret_key(self, user_id: str) -> PrivateKey:
        sealed = self._sealed.get(user_id)
        if sealed is None:
            raise MarketError(f"{self.firm} has no user {user_id!r}", code="account-unknown")
        try:
            secret = self._aead.decrypt(sealed.nonce, sealed.ciphertext, self._aad(user_id))
        except InvalidTag:
            raise MarketError("custody record does not decrypt under this firm's key",
                              code="custody-key-invalid") from None
        return PrivateKey(secret)

    # -- storage ------------------------------------------------------------

    def _aad(self, user_id: str) -> bytes:
        return f"capital-ledger/custody/v1/{self.firm}/{user_id}".encode()

    def _token(self, user_id: str) -> bytes:
        return hmac.new(self._session_secret, self._aad(user_id), hashlib.sha256).digest()

    def _save(self) -> None:
        if self._path is None:
            return
        data = {"format": STORE_FORMAT, "firm": self.firm, "accounts": [
            {"user_id": user_id, "pubkey": s.pubkey_hex, "salt": _b64(s.salt),
             "password_hash": _b64(s.password_hash), "nonce": _b64(s.nonce),
             "ciphertext": _b64(s.ciphertext)}
            for user_id, s in sorted(self._sealed.items())
        ]}
        temporary = self._path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=1)
        os.replace(temporary, self._path)

    def _load(self, path: Path) -> None:
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != STORE_FORMAT or data.get("firm") != self.firm:
                raise ValueError("another format or firm")
            for item in data["accounts"]:
                self._sealed[str(item["user_id"])] = _Sealed(
                    str(item["pubkey"]), _unb64(item["salt"]), _unb64(item["password_hash"]),
                    _unb64(item["nonce"]), _unb64(item["ciphertext"]))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise MarketError(f"custody store {path} is unreadable: {error}",
                              code="custody-store-invalid") from None


def _password_hash(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                          p=SCRYPT_P, dklen=32)


def _random_secret() -> bytes:
    for _ in range(8):
        candidate = os.urandom(32)
        try:
            return PrivateKey(candidate).secret
        except ValidationError:
            continue
    raise AssertionError("os.urandom keeps producing invalid secp256k1 keys")


class UserSigner(Protocol):
    """What the market needs from whoever holds a user's key: a firm's custody store, or
    the user's own key (``OwnKey``)."""

    firm: str

    def account(self, user_id: str) -> Account: ...
    def check(self, principal: Principal) -> Account: ...
    def sign_digest(self, principal: Principal, digest32: bytes) -> str: ...
    def sign_agreed_inputs(self, user_id: str,
                           psbt: PartiallySignedTx) -> PartiallySignedTx: ...
    def unseal(self, principal: Principal, blob: bytes, aad: bytes) -> bytes: ...


class OwnKey:
    """A user who holds their own key (non-custodial): the firm records the account
    (id, public key, address), never the key; this object lives in the user's own
    process (a wallet, a test) and signs for that one user only."""

    def __init__(self, user_id: str, firm: str, key: PrivateKey) -> None:
        if not USER_ID_PATTERN.match(user_id):
            raise MarketError(f"user id {user_id!r} is not 1-64 letters, digits, . _ -",
                              code="account-bad-user-id")
        self.user_id = user_id
        self.firm = firm
        self._key = key
        self._secret = os.urandom(32)

    def __repr__(self) -> str:
        return f"OwnKey(firm={self.firm!r}, user={self.user_id!r})"

    def principal(self) -> Principal:
        return Principal(self.user_id, self.firm, self._token())

    def account(self, user_id: str) -> Account:
        if user_id != self.user_id:
            raise MarketError(f"{self.firm} has no self-custody user {user_id!r}",
                              code="account-unknown")
        sec = self._key.public_key.sec
        address = p2pkh_address(hashlib.new("ripemd160", hashlib.sha256(sec).digest())
                                .digest(), P2PKH_VERSION_MAINNET)
        return Account(self.user_id, self.firm, sec.hex(), address)

    def check(self, principal: Principal) -> Account:
        if (principal.firm, principal.user_id) != (self.firm, self.user_id) or not (
                hmac.compare_digest(principal.token, self._token())):
            raise MarketError(f"principal {principal.key} is not this key's holder",
                              code="account-not-authenticated")
        return self.account(self.user_id)

    def sign_digest(self, principal: Principal, digest32: bytes) -> str:
        self.check(principal)
        return self._key.sign(digest32).hex()

    def sign_agreed_inputs(self, user_id: str, psbt: PartiallySignedTx) -> PartiallySignedTx:
        """As ``CustodyStore.sign_agreed_inputs``: called by ``sign_for_party`` after the
        delivery check, which the holder's own client runs the same way."""
        self.account(user_id)
        return psbt.add_signatures(KeyStore().with_key(self._key))

    def unseal(self, principal: Principal, blob: bytes, aad: bytes) -> bytes:
        self.check(principal)
        return sealing.unseal(self._key, blob, aad)

    def _token(self) -> bytes:
        return hmac.new(self._secret, f"{self.firm}/{self.user_id}".encode(),
                        hashlib.sha256).digest()


class Accounts:
    """Who holds each user's key: the custody stores of the firms this process acts for,
    and users who hold their own (``OwnKey``), which take precedence for their user."""

    def __init__(self, stores: Iterable[CustodyStore], own_keys: Iterable[OwnKey] = ()) -> None:
        self._stores: Mapping[str, CustodyStore] = {store.firm: store for store in stores}
        self._own: dict[tuple[str, str], OwnKey] = {(k.firm, k.user_id): k for k in own_keys}

    def add_own_key(self, own: OwnKey) -> Account:
        """Register a self-custody user (public key only leaves ``own``)."""
        if own.firm in self._stores and own.user_id in {
                a.user_id for a in self._stores[own.firm].accounts()}:
            raise MarketError(f"{own.firm} already keeps a custodial account "
                              f"{own.user_id}", code="account-exists")
        self._own[(own.firm, own.user_id)] = own
        return own.account(own.user_id)

    def store(self, firm: str) -> CustodyStore:
        found = self._stores.get(firm)
        if found is None:
            raise MarketError(f"no custody store for firm {firm!r}", code="account-unknown-firm")
        return found

    def signer(self, firm: str, user_id: str) -> UserSigner:
        """Whoever holds this user's key."""
        return self._own.get((firm, user_id)) or self.store(firm)

    def check(self, principal: Principal) -> Account:
        return self.signer(principal.firm, principal.user_id).check(principal)

    def find(self, user: UserRef) -> Account | None:
        try:
            account = self.signer(user.firm, user.user_id).account(user.user_id)
        except MarketError:
            return None
        return account if account.pubkey_hex == user.pubkey_hex else None

    def firms(self) -> tuple[str, ...]:
        return tuple(sorted(self._stores))

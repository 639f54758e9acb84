"""Who is calling: API clients and people, their secrets, scopes and bearer tokens.

Owns: the API's access file (``api-access.json`` in the API's state directory:
clients and users with scrypt hashes of their secrets, never the secrets), the token
key file (HMAC key, mode 0600), password hashing, minting and checking bearer tokens
(HMAC-SHA256 over a small JSON payload, with an expiry) and :class:`Principal`, what a
checked token says about its holder. Tokens are stateless, so an API restart keeps
every issued token valid until it expires.

Scopes: ``user`` (a person: their own accounts only), ``firm`` (an institution's
system or staff: that firm's customers), ``regulator`` (reads everything, writes
nothing), ``platform`` (koscom's own operators: every account, all writes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.api.problems import ApiProblem

ACCESS_FILE = "api-access.json"
TOKEN_KEY_FILE = "api-token.key"
CREDENTIALS_FILE = "initial-credentials.json"
SCOPES = ("user", "firm", "regulator", "platform")
TOKEN_TTL_S_DEFAULT = 900
TOKEN_TTL_S_MAX = 24 * 60 * 60
TOKEN_CHARS_MAX = 2048
TOKEN_KEY_BYTES = 32
NAME_CHARS_MAX = 64
SECRET_CHARS_MAX = 256
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_SALT_BYTES = 16
SCRYPT_HASH_BYTES = 32
TOKEN_PREFIX = "cl1"
SIGN_IN_FAILURES_MAX = 10
SIGN_IN_WINDOW_S = 300
SIGN_IN_NAMES_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """The checked holder of a token."""

    subject: str  # client id or user name
    kind: str  # "client" or "user"
    scope: str
    firm: str | None = None  # the institution a firm principal or a user's broker is
    accounts: tuple[str, ...] = ()  # the custodial accounts a user owns
    expires_at_s: int = 0
    # A custodial user's custody session, sealed for this server only (AES-GCM under a
    # key derived from the token key): lets the session survive an API restart.
    session: str | None = field(default=None, repr=False)

    @property
    def reads_everything(self) -> bool:
        return self.scope in ("regulator", "platform")

    @property
    def may_write(self) -> bool:
        return self.scope != "regulator"


@dataclass(frozen=True, slots=True)
class Identity:
    """One entry of the access file: a client or a user."""

    name: str
    kind: str
    secret_hash: str
    scope: str
    firm: str | None = None
    accounts: tuple[str, ...] = ()
    display_name: str = ""


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """The access file, loaded; ``token_key`` signs and checks tokens."""

    identities: Mapping[tuple[str, str], Identity]
    token_key: bytes = field(repr=False)
    token_ttl_s: int = TOKEN_TTL_S_DEFAULT

    def identity(self, kind: str, name: str) -> Identity | None:
        return self.identities.get((kind, name))


# ------------------------------------------------------------------ secrets


def hash_secret(secret: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex) of a secret."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_secret(secret: str, stored: str) -> bool:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or len(secret) > SECRET_CHARS_MAX:
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    except ValueError:
        return False
    if n > 2**17 or r > 16 or p > 4:
        return False  # a hostile file must not make a login burn the CPU
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    return hmac.compare_digest(digest, expected)


# ------------------------------------------------------------------ tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(principal: Principal, key: bytes, *, now_s: int, ttl_s: int) -> str:
    payload = {
        "sub": principal.subject, "kind": principal.kind, "scope": principal.scope,
        "firm": principal.firm, "accounts": list(principal.accounts), "iat": now_s,
        "exp": now_s + ttl_s,
    }
    if principal.session is not None:
        payload["ses"] = principal.session
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signature = _b64(hmac.new(key, f"{TOKEN_PREFIX}.{body}".encode(), "sha256").digest())
    return f"{TOKEN_PREFIX}.{body}.{signature}"


def check_token(token: str, key: bytes, *, now_s: int) -> Principal:
    """The principal of a token; ApiProblem 401 ``token-invalid`` / ``token-expired``."""
    invalid = ApiProblem(401, "token-invalid", "the bearer token is not one this server issued",
                         headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    parts = token.split(".")
    if len(token) > TOKEN_CHARS_MAX or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise invalid
    try:
        signature = _unb64(parts[2])
        payload = json.loads(_unb64(parts[1]))
    except (ValueError, binascii.Error):
        raise invalid from None
    expected = hmac.new(key, f"{TOKEN_PREFIX}.{parts[1]}".encode(), "sha256").digest()
    if not hmac.compare_digest(signature, expected) or not isinstance(payload, dict):
        raise invalid
    if int(payload.get("exp", 0)) <= now_s:
        raise ApiProblem(401, "token-expired", "the bearer token has expired; get a new one",
                         headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Principal(subject=str(payload["sub"]), kind=str(payload["kind"]),
                     scope=str(payload["scope"]), firm=payload.get("firm"),
                     accounts=tuple(str(a) for a in payload.get("accounts", ())),
                     expires_at_s=int(payload["exp"]),
                     session=str(payload["ses"]) if isinstance(payload.get("ses"), str)
                     else None)


def authenticate(access: AccessConfig, kind: str, name: str, secret: str) -> Identity:
    """The identity whose secret this is; ApiProblem 401 ``credentials-invalid``."""
    identity = access.identity(kind, name[:NAME_CHARS_MAX])
    # Check a hash even for an unknown name, so timing does not reveal which names exist.
    stored = identity.secret_hash if identity else _DUMMY_HASH
    if not check_secret(secret, stored) or identity is None:
        raise ApiProblem(401, "credentials-invalid", f"unknown {kind} or wrong secret",
                         headers={"WWW-Authenticate": 'Basic realm="capital-ledger"'})
    return identity


def principal_of(identity: Identity, *, now_s: int, ttl_s: int) -> Principal:
    return Principal(identity.name, identity.kind, identity.scope, identity.firm,
                     identity.accounts, now_s + ttl_s)


_DUMMY_HASH = hash_secret("not a secret", salt=bytes(SCRYPT_SALT_BYTES))


class SignInGuard:
    """Bounds failed sign-ins per name: after ``failures_max`` failures within
    ``window_s`` the name is refused (429 ``too-many-attempts``) until the window
    passes, so guessing costs the guesser time, and the server's scrypt CPU is bounded.
    At most ``names_max`` names are tracked (the oldest are forgotten)."""

    def __init__(self, *, failures_max: int = SIGN_IN_FAILURES_MAX,
                 window_s: int = SIGN_IN_WINDOW_S, names_max: int = SIGN_IN_NAMES_MAX) -> None:
        self._failures: dict[str, list[float]] = {}
        self._failures_max, self._window_s, self._names_max = failures_max, window_s, names_max

    def check(self, name: str, now_s: float) -> None:
        recent = [t for t in self._failures.get(name, ()) if now_s - t < self._window_s]
        if len(recent) >= self._failures_max:
            raise ApiProblem(429, "too-many-attempts",
                             f"too many failed sign-ins for this name; retry in "
                             f"{int(self._window_s - (now_s - recent[0])) + 1} s",
                             headers={"Retry-After": str(self._window_s)})

    def failed(self, name: str, now_s: float) -> None:
        recent = [t for t in self._failures.pop(name, []) if now_s - t < self._window_s]
        self._failures[name] = [*recent, now_s][-self._failures_max:]
        while len(self._failures) > self._names_max:
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)


# ------------------------------------------------------------------ the access file


class AccessFileError(ValueError):
    """The access file or token key is missing or malformed."""


def _identity_from(entry: Any, kind: str) -> Identity:
    if not isinstance(entry, dict):
        raise AccessFileError(f"a {kind} entry is not an object")
    name, scope = entry.get("name"), entry.get("scope")
    if not isinstance(name, str) or not 0 < len(name) <= NAME_CHARS_MAX:
        raise AccessFileError(f"a {kind} has no valid name")
    if scope not in SCOPES:
        raise AccessFileError(f"{kind} {name!r} has scope {scope!r}, not one of {SCOPES}")
    secret_hash = entry.get("secret_hash")
    if not isinstance(secret_hash, str) or not secret_hash.startswith("scrypt$"):
        raise AccessFileError(f"{kind} {name!r} has no scrypt secret_hash")
    accounts = entry.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
        raise AccessFileError(f"{kind} {name!r}: accounts is not a list of strings")
    return Identity(name, kind, secret_hash, scope, entry.get("firm"), tuple(accounts),
                    str(entry.get("display_name", "")))


def load_access(directory: Path) -> AccessConfig:
    """Read ``api-access.json`` and ``api-token.key`` from the API's state directory."""
    path, key_path = directory / ACCESS_FILE, directory / TOKEN_KEY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        key = bytes.fromhex(key_path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as error:
        raise AccessFileError(f"cannot read the API access files in {directory}: {error}") \
            from None
    if len(key) < TOKEN_KEY_BYTES:
        raise AccessFileError(f"{key_path} holds fewer than {TOKEN_KEY_BYTES} bytes")
    if key_path.stat().st_mode & 0o077:
        raise AccessFileError(f"{key_path} is readable by others (chmod 600)")
    identities: dict[tuple[str, str], Identity] = {}
    for kind, entries in (("client", data.get("clients", [])), ("user", data.get("users", []))):
        for entry in entries:
            identity = _identity_from(entry, kind)
            identities[(kind, identity.name)] = identity
    ttl = data.get("token_ttl_s", TOKEN_TTL_S_DEFAULT)
    if not isinstance(ttl, int) or not 1 <= ttl <= TOKEN_TTL_S_MAX:
        raise AccessFileError(f"token_ttl_s {ttl!r} is not 1..{TOKEN_TTL_S_MAX}")
    return AccessConfig(identities, key, ttl)


@dataclass(frozen=True, slots=True)
class NewIdentity:
    """What :func:`write_access` creates: the secret is generated, never passed in."""

    name: str
    kind: str
    scope: str
    firm: str | None = None
    accounts: tuple[str, ...] = ()
    display_name: str = ""


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def write_access(directory: Path, identities: Sequence[NewIdentity], *,
                 token_ttl_s: int = TOKEN_TTL_S_DEFAULT,
                 secret: Callable[[], str] = lambda: secrets.token_urlsafe(24)) -> Path:
    """Create the access file (hashes only), a fresh token key and, mode 0600, the
    generated secrets for the operator to hand out (``initial-credentials.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict[str, Any]]] = {"clients": [], "users": []}
    handed_out: dict[str, dict[str, str]] = {"clients": {}, "users": {}}
    for new in identities:
        value = secret()
        group = "clients" if new.kind == "client" else "users"
        entries[group].append({
            "name": new.name, "scope": new.scope, "firm": new.firm,
            "accounts": list(new.accounts), "display_name": new.display_name,
            "secret_hash": hash_secret(value),
        })
        handed_out[group][new.name] = value
    text = json.dumps({"token_ttl_s": token_ttl_s, **entries}, indent=2, ensure_ascii=False)
    _write_private(directory / ACCESS_FILE, text + "\n")
    _write_private(directory / TOKEN_KEY_FILE, secrets.token_bytes(TOKEN_KEY_BYTES).hex() + "\n")
    credentials = directory / CREDENTIALS_FILE
    _write_private(credentials, json.dumps(handed_out, indent=2) + "\n")
    return credentials

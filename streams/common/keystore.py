"""Identity keys encrypted at rest: one institution's key, under its own passphrase.

Owns: the encrypted key file ``<dir>/keys/<institution>.key`` (JSON, mode 0600): the
secp256k1 private key sealed with ChaCha20-Poly1305 under a key derived from the
passphrase with scrypt; the institution id and the public key are authenticated
data, so a file renamed to another institution or with a swapped public key does
not open. Also where the passphrase comes from (a file, an environment variable,
or the caller's prompt). The passphrase and the private key are never printed,
logged or put in an error message.

Format (``format`` = ``capledger-key-v1``; byte strings in lower-case hex)::

    {"format": "capledger-key-v1", "institution": "koscom",
     "public_key": <33-byte compressed SEC>, "kdf": "scrypt",
     "scrypt": {"n": 32768, "r": 8, "p": 1, "salt": <16 bytes>},
     "aead": "chacha20poly1305", "nonce": <12 bytes>,
     "ciphertext": <32-byte key + 16-byte tag>}
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ledger.errors import ValidationError
from ledger.keys import PrivateKey

FORMAT = "capledger-key-v1"
KEY_SUFFIX = ".key"
SCRYPT_N = 2**15  # ~32 MiB and ~0.1 s per derivation: slow for a guesser, fine at start
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_N_MAX = 2**20
SALT_BYTES = 16
NONCE_BYTES = 12
PASSPHRASE_CHARS_MIN = 12
PASSPHRASE_BYTES_MAX = 4096
KEY_FILE_BYTES_MAX = 4096
FILE_MODE = 0o600
DIR_MODE = 0o700
PASSPHRASE_ENV = "CAPLEDGER_KEY_PASSPHRASE"
PASSPHRASE_FILE_ENV = "CAPLEDGER_KEY_PASSPHRASE_FILE"


class KeystoreError(ValidationError):
    code = "keystore"


def encrypted_key_path(directory: Path, institution: str) -> Path:
    return Path(directory) / "keys" / f"{institution}{KEY_SUFFIX}"


def _aad(institution: str, public_key: bytes) -> bytes:
    return f"{FORMAT}/{institution}/".encode() + public_key


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def seal(key: PrivateKey, institution: str, passphrase: str) -> dict[str, Any]:
    """The encrypted-key document for ``key`` (random salt and nonce)."""
    if len(passphrase) < PASSPHRASE_CHARS_MIN:
        raise KeystoreError(f"the passphrase must have at least {PASSPHRASE_CHARS_MIN} "
                            f"characters", code="keystore-weak-passphrase")
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    if not key.compressed:
        raise KeystoreError("identity keys use compressed public keys", code="keystore-format")
    public = key.public_key.sec
    sealed = ChaCha20Poly1305(_derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, key.secret, _aad(institution, public))
    return {"format": FORMAT, "institution": institution, "public_key": public.hex(),
            "kdf": "scrypt",
            "scrypt": {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()},
            "aead": "chacha20poly1305", "nonce": nonce.hex(), "ciphertext": sealed.hex()}


def _field(document: dict[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if not isinstance(value, kind):
        raise KeystoreError(f"encrypted key file: field {name!r} missing or not "
                            f"{kind.__name__}", code="keystore-format")
    return value


def _hex(document: dict[str, Any], name: str, size: int) -> bytes:
    try:
        value = bytes.fromhex(_field(document, name, str))
    except ValueError:
        value = b""
    if len(value) != size:
        raise KeystoreError(f"encrypted key file: field {name!r} is not {size} bytes of hex",
                            code="keystore-format")
    return value


def open_sealed(document: dict[str, Any], institution: str, passphrase: str) -> PrivateKey:
    """The private key; a wrong passphrase or any altered field is ``keystore-decrypt``."""
    if document.get("format") != FORMAT or document.get("kdf") != "scrypt" or document.get(
            "aead") != "chacha20poly1305":
        raise KeystoreError("not a capledger-key-v1 file", code="keystore-format")
    if document.get("institution") != institution:
        raise KeystoreError(f"the key file is for {document.get('institution')!r}, not "
                            f"{institution!r}", code="keystore-institution")
    params = _field(document, "scrypt", dict)
    n, r, p = (params.get(k) for k in ("n", "r", "p"))
    if not all(isinstance(v, int) for v in (n, r, p)) or not (
            2 <= n <= SCRYPT_N_MAX and 1 <= r <= 32 and 1 <= p <= 16):
        raise KeystoreError("scrypt parameters out of range", code="keystore-format")
    salt = _hex(params, "salt", SALT_BYTES)
    public = _hex(document, "public_key", 33)
    nonce = _hex(document, "nonce", NONCE_BYTES)
    sealed = _hex(document, "ciphertext", 32 + 16)
    try:
        secret = ChaCha20Poly1305(_derive(passphrase, salt, n, r, p)).decrypt(
            nonce, sealed, _aad(institution, public))
    except InvalidTag:
        raise KeystoreError("wrong passphrase, or the key file was altered",
                            code="keystore-decrypt") from None
    key = PrivateKey(secret)
    if key.public_key.sec != public:
        raise KeystoreError("the key does not match its public key", code="keystore-format")
    return key


def write_encrypted_key(directory: Path, institution: str, key: PrivateKey, passphrase: str,
                        *, force: bool = False) -> Path:
    """Seal and write ``<directory>/keys/<institution>.key`` (0600, never clobbered
    unless ``force``)."""
    path = encrypted_key_path(directory, institution)
    if path.exists() and not force:
        raise KeystoreError(f"refusing to overwrite {path}", code="keystore-exists")
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path.parent, DIR_MODE)
    text = json.dumps(seal(key, institution, passphrase), indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_encrypted_key(directory: Path, institution: str, passphrase: str) -> PrivateKey:
    """Open ``<directory>/keys/<institution>.key``; refuses a file others may read."""
    path = encrypted_key_path(directory, institution)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > KEY_FILE_BYTES_MAX:
            raise KeystoreError(f"{path} is not a small regular file", code="keystore-file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise KeystoreError(f"{path} is accessible by group or others; chmod 600 it",
                                code="keystore-permissions")
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise KeystoreError(f"cannot read {path}: {error.strerror}",
                            code="keystore-missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeystoreError(f"{path} is not JSON", code="keystore-format") from None
    if not isinstance(document, dict):
        raise KeystoreError(f"{path} does not hold a JSON object", code="keystore-format")
    return open_sealed(document, institution, passphrase)


@dataclass(frozen=True, slots=True)
class PassphraseSource:
    """Where a passphrase comes from: a file (first line), an environment variable,
    or nothing (then the CLI prompts)."""

    file: Path | None = None
    env_name: str | None = None

    def read(self) -> str | None:
        if self.file is not None:
            return read_passphrase_file(self.file)
        if self.env_name is not None:
            value = os.environ.get(self.env_name)
            if not value:
                raise KeystoreError(f"environment variable {self.env_name} is not set",
                                    code="keystore-passphrase")
            return value
        return None


def read_passphrase_file(path: Path) -> str:
    try:
        info = path.stat()
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise KeystoreError(f"passphrase file {path} is readable by others; chmod 600 it",
                                code="keystore-permissions")
        raw = path.read_bytes()[:PASSPHRASE_BYTES_MAX + 1]
    except OSError as error:
        raise KeystoreError(f"cannot read passphrase file {path}: {error.strerror}",
                            code="keystore-passphrase") from None
    if len(raw) > PASSPHRASE_BYTES_MAX:
        raise KeystoreError(f"passphrase file {path} is too large", code="keystore-passphrase")
    text = raw.decode("utf-8", errors="strict").splitlines()
    if not text or not text[0]:
        raise KeystoreError(f"passphrase file {path} is empty", code="keystore-passphrase")
    return text[0]


def node_passphrase_source(environ: dict[str, str] | None = None) -> PassphraseSource:
    """A node's passphrase: CAPLEDGER_KEY_PASSPHRASE_FILE, else CAPLEDGER_KEY_PASSPHRASE."""
    env = os.environ if environ is None else environ
    if env.get(PASSPHRASE_FILE_ENV):
        return PassphraseSource(file=Path(env[PASSPHRASE_FILE_ENV]))
    return PassphraseSource(env_name=PASSPHRASE_ENV)

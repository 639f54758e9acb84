"""Genesis and identity-key files on disk: build, write, load and check them.

Owns: the genesis directory layout (genesis.json + keys/<institution>.wif, 0600/0700),
the bounded, checked readers of both, and the all-in-one key generation used by
``capledger genesis init``, the demo and the local cluster.
Touches: only the files and directories it is given.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import ValidationError
from ledger.hashing import sha256
from ledger.keys import PrivateKey, PublicKey
from ledger.membership import (
    ChainParams,
    Genesis,
    GenesisError,
    Member,
    SubmitKey,
)
from streams.common.keystore import (
    encrypted_key_path,
    node_passphrase_source,
    read_encrypted_key,
)

GENESIS_FILENAME = "genesis.json"


KEYS_DIRNAME = "keys"


KEY_SUFFIX = ".wif"


KEY_FILE_MODE = 0o600


KEYS_DIR_MODE = 0o700


KEY_FILE_BYTES_MAX = 256  # a WIF is 51-52 characters; anything big is not a key file


GENESIS_FILE_BYTES_MAX = 1024 * 1024


CHAIN_ID_DEFAULT = "capledger-dev"


INSTITUTION_ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,31}$")


KEYGEN_ATTEMPTS_MAX = 8  # a random 32-byte string is out of range with p ~ 2^-128


EXAMPLE_COMMENT_KEY = "_comment"


@dataclass(frozen=True, slots=True)
class InstitutionProfile:
    name: str
    role: str
    may_issue: bool


# The seed's five institutions (docs: ARCHITECTURE.md); issuers are the two brokers.
PROFILES: dict[str, InstitutionProfile] = {
    "otc-operator": InstitutionProfile("OTC Market Operator", "market-operator", False),
    "surveillance": InstitutionProfile("Market Surveillance Agency", "surveillance", False),
    "koscom": InstitutionProfile("Koscom (platform operator)", "platform", False),
    "securities-a": InstitutionProfile("Securities A (broker and issuer)", "securities", True),
    "securities-b": InstitutionProfile("Securities B (broker and issuer)", "securities", True),
}


class KeyFileError(ValidationError):
    """An identity key file that is missing, unsafe, or does not hold a usable key."""

    code = "key-file"


class GenesisFileError(ValidationError):
    """Files ``genesis init`` would write already exist, or the output is unusable."""

    code = "genesis-file"


def random_entropy(institution: str, attempt: int) -> bytes:
    """32 bytes from the operating system's CSPRNG (institution/attempt unused)."""
    del institution, attempt
    return secrets.token_bytes(32)


def seeded_entropy(seed: str) -> Callable[[str, int], bytes]:
    """Deterministic entropy from a PUBLIC seed: for examples and tests only."""

    def entropy(institution: str, attempt: int) -> bytes:
        return sha256(f"capital-ledger/example/{seed}/{institution}/{attempt}".encode())

    return entropy


def make_key(institution: str, entropy: Callable[[str, int], bytes]) -> PrivateKey:
    for attempt in range(KEYGEN_ATTEMPTS_MAX):
        try:
            return PrivateKey.generate(entropy(institution, attempt))
        except ValidationError:
            continue  # zero or above the group order: draw again
    raise AssertionError("entropy source keeps producing invalid secp256k1 keys")


def build_genesis(
    *,
    chain_id: str,
    time_ms: int,
    institutions: Sequence[str],
    entropy: Callable[[str, int], bytes],
    block_interval_ms: int = 500,
    block_bytes_max: int = 2_000_000,
    proposer_timeout_ms: int = 3_000,
    quorum: int | None = None,
) -> tuple[Genesis, dict[str, PrivateKey]]:
    """The genesis record and one fresh identity key per institution."""
    _check_institution_ids(institutions)
    keys = {institution: make_key(institution, entropy) for institution in institutions}
    genesis = genesis_from_public_keys(
        chain_id=chain_id, time_ms=time_ms,
        public_keys=[(institution, keys[institution].public_key) for institution in institutions],
        block_interval_ms=block_interval_ms, block_bytes_max=block_bytes_max,
        proposer_timeout_ms=proposer_timeout_ms, quorum=quorum)
    return genesis, keys


def _check_institution_ids(institutions: Sequence[str]) -> None:
    for institution in institutions:
        if not INSTITUTION_ID_PATTERN.match(institution):
            raise GenesisError(
                f"institution id {institution!r} must be 2-32 characters of a-z, 0-9 and -, "
                "starting with a letter",
                code="genesis-institution",
            )
    if len(set(institutions)) != len(institutions):
        raise GenesisError(f"institution ids repeat: {list(institutions)}",
                           code="genesis-institution")


def genesis_from_public_keys(
    *,
    chain_id: str,
    time_ms: int,
    public_keys: Sequence[tuple[str, PublicKey]],
    block_interval_ms: int = 500,
    block_bytes_max: int = 2_000_000,
    proposer_timeout_ms: int = 3_000,
    quorum: int | None = None,
) -> Genesis:
    """The genesis record from the members' public keys (each institution made its
    own key with ``capledger keys new``; no private key passes through here)."""
    _check_institution_ids([institution for institution, _ in public_keys])
    members = tuple(
        Member(
            id=institution,
            name=PROFILES[institution].name if institution in PROFILES else institution,
            role=PROFILES[institution].role if institution in PROFILES else "member",
            public_key=public_key,
            may_issue=PROFILES[institution].may_issue if institution in PROFILES else False,
        )
        for institution, public_key in public_keys
    )
    params = ChainParams(
        quorum=len(members) // 2 + 1 if quorum is None else quorum,
        block_interval_ms=block_interval_ms,
        block_bytes_max=block_bytes_max,
        proposer_timeout_ms=proposer_timeout_ms,
    )
    return Genesis(chain_id, time_ms, members, params)


def parse_member_public_key(text: str) -> tuple[str, PublicKey]:
    """``ID=HEX`` (a compressed SEC public key as ``capledger keys new`` prints it)."""
    institution, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        public = PublicKey.parse(bytes.fromhex(value.strip()))
    except (ValueError, ValidationError):
        raise GenesisError(f"member {text[:80]!r} is not ID=PUBLIC_KEY_HEX (33-byte "
                           "compressed key)", code="genesis-member-key") from None
    if not public.is_compressed:
        raise GenesisError(f"member {institution}: use the compressed public key",
                           code="genesis-member-key")
    return institution.strip(), public


def genesis_json(genesis: Genesis, *, comment: str | None = None) -> str:
    """The genesis file's text; ``comment`` (ignored by loaders) marks examples."""
    data = genesis.to_dict()
    if comment is not None:
        data = {EXAMPLE_COMMENT_KEY: comment, **data}
    return json.dumps(data, indent=2) + "\n"


def key_path(directory: Path, institution: str) -> Path:
    return Path(directory) / KEYS_DIRNAME / f"{institution}{KEY_SUFFIX}"


def _write_private(path: Path, text: str, *, mode: int) -> None:
    """Write ``text`` to ``path`` created with ``mode`` from the start, then rename.

    The temporary file is created with O_EXCL and the final mode, so the content is
    never readable by others, not even for an instant; the rename makes the write
    atomic (a crash leaves the old file or the new one, never half a key).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def write_genesis_dir(
    directory: Path,
    genesis: Genesis,
    keys: dict[str, PrivateKey],
    *,
    force: bool = False,
    comment: str | None = None,
) -> list[Path]:
    """Write genesis.json and every key file; refuse to overwrite unless ``force``.

    All targets are checked before anything is written, so a refusal leaves the
    directory untouched.
    """
    directory = Path(directory)
    targets = [directory / GENESIS_FILENAME] + [key_path(directory, i) for i in keys]
    existing = [path for path in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        raise GenesisFileError(
            "refusing to overwrite existing "
            + ", ".join(str(path) for path in existing)
            + " (use --force to replace them)",
            code="genesis-exists",
        )
    keys_dir = directory / KEYS_DIRNAME
    keys_dir.mkdir(parents=True, exist_ok=True, mode=KEYS_DIR_MODE)
    os.chmod(keys_dir, KEYS_DIR_MODE)
    for institution, key in keys.items():
        _write_private(key_path(directory, institution), key.to_wif() + "\n", mode=KEY_FILE_MODE)
    _write_private(directory / GENESIS_FILENAME, genesis_json(genesis, comment=comment),
                   mode=0o644)
    return targets


def load_genesis(path: Path | str) -> Genesis:
    """The genesis record in ``path`` (a genesis.json file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / GENESIS_FILENAME
    try:
        with open(path, "rb") as handle:
            raw = handle.read(GENESIS_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise GenesisError(f"cannot read genesis file {path}: {error.strerror}",
                           code="genesis-file") from None
    if len(raw) > GENESIS_FILE_BYTES_MAX:
        raise GenesisError(f"genesis file {path} is over {GENESIS_FILE_BYTES_MAX} bytes",
                           code="genesis-file")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenesisError(f"genesis file {path} is not JSON: {error}",
                           code="genesis-json") from None
    if not isinstance(data, dict):
        raise GenesisError(f"genesis file {path} does not hold a JSON object",
                           code="genesis-json")
    try:
        return Genesis.from_dict(data)
    except ValidationError as error:
        raise GenesisError(f"genesis file {path}: {error.message}", code=error.code) from None


def load_institution_key(
    directory: Path | str, institution: str, *, genesis: Genesis | None = None
) -> PrivateKey:
    """The identity key of ``institution``: ``DIR/keys/<institution>.key`` (encrypted,
    see :mod:`streams.common.keystore`; passphrase from CAPLEDGER_KEY_PASSPHRASE_FILE
    or CAPLEDGER_KEY_PASSPHRASE) when present, else ``DIR/keys/<institution>.wif``
    (the demo's plain key files).

    Refuses (like ssh) a key file that is not a regular file, is a symlink, belongs
    to another user, or that group or others may read or write. With ``genesis``,
    also checks the key is the one genesis lists for that member.
    """
    if not INSTITUTION_ID_PATTERN.match(institution):
        raise KeyFileError(f"institution id {institution!r} is not a valid id",
                           code="key-file-institution")
    if encrypted_key_path(Path(directory), institution).exists():
        passphrase = node_passphrase_source().read()
        assert passphrase is not None  # an environment source raises when unset
        key = read_encrypted_key(Path(directory), institution, passphrase)
        _check_member_key(key, institution, genesis,
                          encrypted_key_path(Path(directory), institution))
        return key
    path = key_path(Path(directory), institution)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise KeyFileError(f"key file {path} is a symbolic link; use the file itself",
                               code="key-file-type") from None
        raise KeyFileError(f"cannot open key file {path}: {error.strerror}",
                           code="key-file-missing") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file", code="key-file-type")
        if info.st_uid != os.getuid():
            raise KeyFileError(f"key file {path} belongs to uid {info.st_uid}, not to this "
                               f"user (uid {os.getuid()})", code="key-file-owner")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others (mode {mode:04o}); "
                f"run: chmod 600 {path}",
                code="key-file-permissions",
            )
        raw = handle.read(KEY_FILE_BYTES_MAX + 1)
    if len(raw) > KEY_FILE_BYTES_MAX:
        raise KeyFileError(f"key file {path} is too large to hold one WIF key",
                           code="key-file-format")
    try:
        key = PrivateKey.from_wif(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValidationError) as error:
        # Never echo the content: it may be a (damaged) secret.
        code = getattr(error, "code", "encoding")
        raise KeyFileError(f"key file {path} does not hold a WIF private key ({code})",
                           code="key-file-format") from None
    _check_member_key(key, institution, genesis, path)
    return key


def _check_member_key(key: PrivateKey, institution: str, genesis: Genesis | None,
                      path: Path) -> None:
    if genesis is not None:
        member = genesis.member(institution)
        if member is None:
            raise KeyFileError(f"{institution} is not a member of genesis {genesis.chain_id}",
                               code="key-file-not-member")
        if member.public_key.compressed() != key.public_key.compressed():
            raise KeyFileError(
                f"key file {path} does not match the public key genesis lists for "
                f"{institution}", code="key-file-mismatch")


def load_node_key(directory: Path | str, institution: str, genesis: Genesis) -> PrivateKey:
    """The key a node signs with: its genesis key, or (after governance rotated it, or
    for a member added later) a key genesis does not list. Such a key is checked by
    the node against the membership its chain copy knows (``LedgerNode.check_own_key``),
    since only the chain says which key is in force (decision 0061)."""
    try:
        return load_institution_key(directory, institution, genesis=genesis)
    except KeyFileError as error:
        if error.code not in ("key-file-mismatch", "key-file-not-member"):
            raise
        return load_institution_key(directory, institution)


def parse_submit_key(text: str) -> SubmitKey:
    """``NAME=MEMBER:PUBLIC_KEY_HEX`` of ``genesis init --submit-key`` (decision 0061)."""
    name, _, rest = text.partition("=")
    member, _, key_hex = rest.partition(":")
    if not INSTITUTION_ID_PATTERN.match(name) or not INSTITUTION_ID_PATTERN.match(member):
        raise GenesisError(f"--submit-key {text[:80]!r}: want NAME=MEMBER:PUBLIC_KEY",
                           code="genesis-submit-keys")
    try:
        return SubmitKey(name, member, PublicKey.parse(bytes.fromhex(key_hex)))
    except (ValueError, ValidationError):
        raise GenesisError(f"--submit-key {name}: the public key does not parse",
                           code="genesis-submit-keys") from None


def load_submitter_key(directory: Path | str, submitter: str, genesis: Genesis) -> PrivateKey:
    """The key that signs ``submitter``'s envelopes: a member's identity key, or a
    registered system's own submit key (``keys/<name>.key`` or ``.wif``), which must be
    the one genesis registers for it."""
    if genesis.member(submitter) is not None:
        return load_institution_key(directory, submitter, genesis=genesis)
    registered = genesis.submit_key(submitter)
    if registered is None:
        raise KeyFileError(f"{submitter!r} is neither a member nor a registered system of "
                           f"genesis {genesis.chain_id}", code="key-file-not-member")
    key = load_institution_key(directory, submitter)
    if key.public_key.compressed() != registered.public_key.compressed():
        raise KeyFileError(f"the key file of {submitter} is not the submit key genesis "
                           "registers for it", code="key-file-mismatch")
    return key

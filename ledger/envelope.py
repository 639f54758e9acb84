"""The signed transaction envelope: who submitted a transaction, provably.

Owns: the digest a submitter signs for a ``TxSubmitted`` record and the check every
node's intake applies to it. The submitter is a genesis member, which signs with its
identity key (the public key genesis lists for it), or a registered external system
(a back office, genesis ``submit_keys``), which signs with its own submit key, never
its member's identity key (decision 0061). A record whose signature is
missing, whose submitter is not a member, or whose signature does not verify under
the named member's key is refused with a code (``envelope-unsigned``,
``envelope-submitter-unknown``, ``envelope-signature``), so one member can neither
submit in another's name nor spend another's idempotency keys.

The digest (documented for clients in any language in docs/schemas.md)::

    SHA-256( "capital-ledger/TxSubmitted/v1"      29 ASCII bytes
             || genesis hash                        32 bytes, internal order
             || u16 big-endian length || submitter (UTF-8)
             || u16 big-endian length || idempotency key (UTF-8)
             || txid                                32 bytes, SHA-256d of the tx bytes,
                                                    internal order )

signed as a DER ECDSA secp256k1 signature with low S (BIP 62), as votes are.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ledger.errors import ValidationError
from ledger.hashing import sha256d
from ledger.keys import PrivateKey, verify_der
from ledger.membership import Genesis

ENVELOPE_DOMAIN_TAG = b"capital-ledger/TxSubmitted/v1"
HASH_BYTES = 32
FIELD_BYTES_MAX = 0xFFFF
SIGNATURE_BYTES_MAX = 73


class EnvelopeError(ValidationError):
    code = "envelope"


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > FIELD_BYTES_MAX:
        raise EnvelopeError(f"envelope field of {len(data)} bytes", code="envelope-field")
    return struct.pack(">H", len(data)) + data


def envelope_digest(genesis_hash: bytes, submitter: str, idempotency_key: str,
                    txid_le: bytes) -> bytes:
    """The 32 bytes the submitter signs."""
    assert len(genesis_hash) == HASH_BYTES and len(txid_le) == HASH_BYTES
    return hashlib.sha256(b"".join((ENVELOPE_DOMAIN_TAG, genesis_hash, _field(submitter),
                                    _field(idempotency_key), txid_le))).digest()


def sign_envelope(key: PrivateKey, genesis_hash: bytes, submitter: str, idempotency_key: str,
                  tx_bytes: bytes) -> bytes:
    """The submitter's signature over a transaction's envelope."""
    return key.sign(envelope_digest(genesis_hash, submitter, idempotency_key,
                                    sha256d(tx_bytes)))


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str


def envelope_refusal(genesis: Genesis, genesis_hash: bytes, *, submitter: str,
                     idempotency_key: str, txid_le: bytes, signature: bytes) -> Refusal | None:
    """None when the envelope is signed by the member it names; else why not."""
    if not signature:
        return Refusal("envelope-unsigned", f"record of {submitter!r} carries no signature")
    member = genesis.member(submitter)
    registered = genesis.submit_key(submitter) if member is None else None
    if member is not None:
        public_key = member.public_key
    elif registered is not None:
        public_key = registered.public_key
    else:
        return Refusal("envelope-submitter-unknown",
                       f"submitter {submitter[:64]!r} is neither a member of "
                       f"{genesis.chain_id} nor a registered system")
    if len(signature) > SIGNATURE_BYTES_MAX:
        return Refusal("envelope-signature", f"signature of {len(signature)} bytes")
    try:
        digest = envelope_digest(genesis_hash, submitter, idempotency_key, txid_le)
    except EnvelopeError as error:
        return Refusal(error.code, error.message)
    if not verify_der(public_key.sec, signature, digest):
        return Refusal("envelope-signature",
                       f"the signature is not {submitter}'s over this envelope")
    return None

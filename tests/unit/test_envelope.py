"""ledger.envelope: the submitter's signature over a TxSubmitted envelope."""

from __future__ import annotations

import hashlib

import pytest

from ledger.envelope import envelope_digest, envelope_refusal, sign_envelope
from ledger.hashing import sha256d
from streams.common.genesis_files import build_genesis, seeded_entropy

pytestmark = pytest.mark.unit

GENESIS, KEYS = build_genesis(chain_id="envelope", time_ms=0,
                              institutions=("koscom", "securities-a", "securities-b"),
                              entropy=seeded_entropy("envelope"))
TX = bytes.fromhex("01000000") + b"\x01" + b"\x07" * 36 + b"\x00" + b"\xff" * 4 + b"\x00" * 5


def _refusal(signature: bytes, submitter: str = "securities-a", key: str = "order-1") -> str:
    found = envelope_refusal(GENESIS, GENESIS.hash_le, submitter=submitter,
                             idempotency_key=key, txid_le=sha256d(TX), signature=signature)
    return "" if found is None else found.code


def test_digest_follows_the_documented_layout() -> None:
    """docs/schemas.md, rebuilt byte by byte without ledger.envelope."""
    submitter, key = "securities-a", "주문-42"  # non-ASCII keys are UTF-8 byte counted
    by_hand = hashlib.sha256(
        b"capital-ledger/TxSubmitted/v1" + GENESIS.hash_le
        + len(submitter.encode()).to_bytes(2, "big") + submitter.encode()
        + len(key.encode()).to_bytes(2, "big") + key.encode()
        + hashlib.sha256(hashlib.sha256(TX).digest()).digest()).digest()
    assert envelope_digest(GENESIS.hash_le, submitter, key, sha256d(TX)) == by_hand


def test_own_signature_passes_others_are_refused_with_codes() -> None:
    own = sign_envelope(KEYS["securities-a"], GENESIS.hash_le, "securities-a", "order-1", TX)
    assert _refusal(own) == ""
    # securities-b signs a record that names securities-a: refused
    other = sign_envelope(KEYS["securities-b"], GENESIS.hash_le, "securities-a", "order-1", TX)
    assert _refusal(other) == "envelope-signature"
    assert _refusal(b"") == "envelope-unsigned"
    assert _refusal(own, submitter="mallory") == "envelope-submitter-unknown"
    assert _refusal(own, key="order-2") == "envelope-signature"  # key is covered
    assert _refusal(own[:-1] + bytes([own[-1] ^ 1])) == "envelope-signature"
    assert _refusal(b"\x30" * 200) == "envelope-signature"
    other_chain = sign_envelope(KEYS["securities-a"], bytes(32), "securities-a", "order-1", TX)
    assert _refusal(other_chain) == "envelope-signature"  # bound to this genesis


def test_back_office_signs_with_its_registered_submit_key_only() -> None:
    """A registered system (genesis ``submit_keys``) signs with its own key; its
    member's identity key does not sign in its name, nor its key in the member's."""
    import dataclasses

    from ledger.keys import PrivateKey
    from ledger.membership import Genesis, GenesisError, SubmitKey

    office = PrivateKey(hashlib.sha256(b"envelope/back-office").digest())
    name = "securities-a-backoffice"
    genesis = dataclasses.replace(
        GENESIS, submit_keys=(SubmitKey(name, "securities-a", office.public_key),))
    assert Genesis.from_dict(genesis.to_dict()) == genesis
    assert GENESIS.to_dict().keys() < genesis.to_dict().keys()  # old genesis hash kept

    def refusal(key: PrivateKey, submitter: str) -> str:
        signature = sign_envelope(key, genesis.hash_le, submitter, "k", TX)
        found = envelope_refusal(genesis, genesis.hash_le, submitter=submitter,
                                 idempotency_key="k", txid_le=sha256d(TX), signature=signature)
        return "" if found is None else found.code

    assert refusal(office, name) == ""
    assert refusal(KEYS["securities-a"], name) == "envelope-signature"
    assert refusal(office, "securities-a") == "envelope-signature"
    assert refusal(office, "securities-b-backoffice") == "envelope-submitter-unknown"
    with pytest.raises(GenesisError) as caught:
        dataclasses.replace(GENESIS, submit_keys=(SubmitKey(name, "nobody", office.public_key),))
    assert caught.value.code == "genesis-submit-keys"

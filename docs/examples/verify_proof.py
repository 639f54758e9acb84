"""Check a capital-ledger inclusion proof, written from docs/audit.md alone.

Needs only Python 3.11 and coincurve (pip install coincurve). No project code.
Usage: python verify_proof.py PROOF.json [TRUSTED_GENESIS_HASH]; exit 0 valid, 1 invalid.
"""

import hashlib
import json
import struct
import sys

import coincurve


def check(condition, what):
    if not condition:
        raise ValueError(f"check failed: {what}")


def sha256d(data):
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def compact(n):
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def compact(self):
        first = self.take(1)[0]
        if first < 0xFD:
            return first
        return struct.unpack({0xFD: "<H", 0xFE: "<I", 0xFF: "<Q"}[first],
                             self.take({0xFD: 2, 0xFE: 4, 0xFF: 8}[first]))[0]

    def bytes(self):
        return self.take(self.compact())

    def done(self):
        if self.pos != len(self.data):
            raise ValueError("trailing bytes")


def verify(proof, trusted=None):
    check(proof["format"] == "capital-ledger/inclusion-proof/v1", "format")
    genesis = proof["genesis"]
    genesis_hash = sha256d(json.dumps(genesis, sort_keys=True, separators=(",", ":")).encode())
    if trusted is not None:
        check(genesis_hash[::-1].hex() == trusted.lower(), "chain id")
    tx = bytes.fromhex(proof["tx_hex"])
    leaf = sha256d(tx)
    check(leaf[::-1].hex() == proof["txid"], "txid")
    h, p = leaf, proof["position"]
    for sibling_hex in proof["merkle_branch"]:
        sibling = bytes.fromhex(sibling_hex)
        check(len(sibling) == 32, "branch")
        check(not (p % 2 and sibling == h), "position names a padding copy")
        h = sha256d(sibling + h) if p % 2 else sha256d(h + sibling)
        p //= 2
    check(p == 0, "position")

    header = bytes.fromhex(proof["header_hex"])
    r = Reader(header)
    r.u32()  # version
    height = r.u64()
    r.take(32)  # prev_hash
    merkle_root = r.take(32)
    r.u64()  # time_ms
    proposer = r.bytes().decode("utf-8")
    round_ = r.u32()
    r.u32(), r.u64(), r.u64()  # shard, tx offsets
    r.done()
    block_hash = sha256d(header)
    check(h == merkle_root, "merkle root")

    members = genesis["members"]
    keys = {m["id"]: coincurve.PublicKey(bytes.fromhex(m["public_key"])) for m in members}
    check(members[(height + round_) % len(members)]["id"] == proposer, "proposer")
    signature = bytes.fromhex(proof["proposer_signature_hex"])
    check(keys[proposer].verify(signature, block_hash, hasher=None), "proposer signature")

    c = Reader(bytes.fromhex(proof["certificate_hex"]))
    qc_height, qc_round, qc_hash = c.u64(), c.u32(), c.take(32)
    check((qc_height, qc_round, qc_hash) == (height, round_, block_hash), "certificate target")
    voters = []
    for _ in range(c.compact()):
        kind = c.take(1)[0]
        voter_raw = c.bytes()
        v_height, v_round, v_hash = c.u64(), c.u32(), c.take(32)
        reason = c.bytes()
        signature = c.bytes()
        voter = voter_raw.decode("utf-8")
        check(kind == 1 and reason == b"", "not an ack")
        check((v_height, v_round, v_hash) == (height, round_, block_hash), "vote target")
        check(voter in keys and voter not in voters, "voter")
        digest = sha256d(b"capital-ledger/vote/v1" + genesis_hash + bytes([kind])
                         + compact(len(voter_raw)) + voter_raw
                         + struct.pack("<QI", v_height, v_round) + v_hash
                         + compact(len(reason)) + reason)
        check(keys[voter].verify(signature, digest, hasher=None), "vote signature")
        voters.append(voter)
    c.done()
    check(len(voters) >= genesis["params"]["quorum"], "quorum")
    for name, value in (("block_hash", block_hash[::-1].hex()), ("height", height),
                        ("genesis_hash", genesis_hash[::-1].hex()), ("voters", voters)):
        check(proof.get(name, value) == value, name)
    return proof["txid"], block_hash[::-1].hex(), height, voters


def main():
    with open(sys.argv[1], "rb") as handle:
        proof = json.load(handle)
    try:
        txid, block_hash, height, voters = verify(proof, sys.argv[2] if len(sys.argv) > 2
                                                  else None)
    except Exception as error:  # any failed check or malformed field: invalid
        print(f"INVALID: {type(error).__name__} {error}")
        sys.exit(1)
    print(f"valid: {txid} in block {block_hash} at height {height}, acked by {voters}")


if __name__ == "__main__":
    main()

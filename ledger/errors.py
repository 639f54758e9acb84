"""The one error root of the ledger core and its specific subclasses.

Owns: every *operating* error the pure core can raise (bad input, bad signature,
double spend, ...). Each class has a stable machine-readable ``code`` that the
shell turns into a rejection event; the message names the input or output at
fault. Programmer errors are assertions, not these.

"""

from __future__ import annotations


class ValidationError(Exception):
    """Root of all operating errors. ``code`` is stable and machine-readable."""

    code: str = "invalid"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class DecodeError(ValidationError):
    """Bytes that do not parse: truncated, trailing bytes, oversized fields."""

    code = "decode"


class EncodingError(ValidationError):
    """A textual encoding (Base58Check, WIF, hex) that does not decode."""

    code = "encoding"


class KeyError_(ValidationError):
    """A public or private key that is not a valid secp256k1 key."""

    code = "key"


class ScriptError(ValidationError):
    """Script evaluation failed; ``code`` says why (e.g. ``script-sig-verify``)."""

    code = "script"


class TxError(ValidationError):
    """A transaction that breaks a ledger rule (conservation, structure, size)."""

    code = "tx"


class AssetError(ValidationError):
    """An Open Assets rule broken: invalid coloring, destroyed units, unknown issuer."""

    code = "asset"


class DoubleSpendError(ValidationError):
    """An output spent twice, within a block or against the committed state."""

    code = "double-spend"


class MissingInputError(ValidationError):
    """An input that spends an output the state does not hold."""

    code = "missing-input"


class BlockError(ValidationError):
    """A block that breaks a structural rule: links, Merkle root, size, signature."""

    code = "block"


class QuorumError(ValidationError):
    """A quorum certificate that does not prove a majority of member votes."""

    code = "quorum"


class ConsensusError(ValidationError):
    """A consensus message that breaks the protocol (wrong proposer, forged vote)."""

    code = "consensus"


class WalletError(ValidationError):
    """The wallet cannot do what was asked (insufficient funds, unknown key)."""

    code = "wallet"

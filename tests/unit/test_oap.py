"""Open Assets Protocol: marker parse/build, asset ids, coloring, the ledger's asset rules.

Vectors are data taken from public sources, each named where it is used:
- the OAP specification (OpenAssets/open-assets-protocol, specification.mediawiki),
- the reference implementation's tests (OpenAssets/openassets, tests/test_protocol.py),
- NBitcoin's and openassets-ruby's asset id tests (same key/script as the spec's example).
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ledger.errors import AssetError
from ledger.oap import (
    QUANTITY_MAX,
    Marker,
    _single_push_after_op_return,
    asset_id,
    asset_id_bytes,
    asset_id_to_bytes,
    build_marker,
    build_marker_payload,
    check_asset_rules,
    color_outputs,
    color_transaction,
    leb128_encode,
    parse_marker,
    parse_marker_payload,
)
from ledger.tx import OutPoint, Transaction, TxIn, TxOut

pytestmark = pytest.mark.unit

# -- asset ids ---------------------------------------------------------------

# The spec's example: the P2PKH script of private key 18E14A7B...21725
# (address 16UwLL9Risc3QfPqBUvKofHmBQ7wMtjvM).
SPEC_SCRIPT = bytes.fromhex("76a914010966776006953d5567439e5e39f86a0d273bee88ac")


def test_asset_id_of_spec_example() -> None:
    # Hash: reference implementation test_hash_script; Base58 form: current spec text,
    # NBitcoin's OpenAsset tests and openassets-ruby's util spec.
    assert asset_id_bytes(SPEC_SCRIPT).hex() == "36e0ea8e93eaa0285d641305f4c81e563aa570a2"
    assert asset_id(SPEC_SCRIPT) == "ALn3aK1fSuG27N96UGYB1kUYUpGKRhBuBC"
    assert asset_id_to_bytes("ALn3aK1fSuG27N96UGYB1kUYUpGKRhBuBC") == asset_id_bytes(SPEC_SCRIPT)
    # The 2014 spec text rendered the same hash with the P2SH version byte 5.
    assert asset_id(SPEC_SCRIPT, version=5) == "36hBrMeUfevFPZdY2iYSHVaP9jdLd9Np4R"


def test_asset_id_refuses_other_versions() -> None:
    from ledger.errors import EncodingError

    with pytest.raises(EncodingError):
        asset_id_to_bytes("36hBrMeUfevFPZdY2iYSHVaP9jdLd9Np4R")


# -- marker payload ----------------------------------------------------------

SPEC_MARKER_SCRIPT = bytes.fromhex("6a10" "4f41" "0100" "03" "ac02" "00" "e58e26" "04" "12345678")


def test_spec_marker_example_parses_and_rebuilds() -> None:
    marker = parse_marker(SPEC_MARKER_SCRIPT)
    assert marker == Marker((300, 0, 624485), bytes.fromhex("12345678"))
    assert build_marker([300, 0, 624485], bytes.fromhex("12345678")) == SPEC_MARKER_SCRIPT


# reference tests: test_leb128_encode_decode_success
LEB128_VECTORS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (0xFF, "ff01"),
    (0x100, "8002"),
    (300, "ac02"),
    (624485, "e58e26"),
    (0xFFFFFF, "ffffff07"),
    (0x1000000, "80808008"),
]


@pytest.mark.parametrize(("value", "encoded"), LEB128_VECTORS)
def test_leb128_vectors(value: int, encoded: str) -> None:
    assert leb128_encode(value).hex() == encoded
    payload = b"OA\x01\x00" + b"\x01" + bytes.fromhex(encoded) + b"\x00"
    assert parse_marker_payload(payload) == Marker((value,), b"")


# reference tests: test_parse_script_success / test_parse_script_invalid
@pytest.mark.parametrize(
    ("script", "payload"),
    [
        (b"\x6a\x00", b""),
        (b"\x6a\x06abcdef", b"abcdef"),
        (b"\x6a\x4c\x06abcdef", b"abcdef"),
        (b"\x6a\x4d\x06\x00abcdef", b"abcdef"),
        (b"\x6a\x4e\x06\x00\x00\x00abcdef", b"abcdef"),
        (b"\x6b\x00", None),  # first opcode is not OP_RETURN
        (b"\x6a", None),  # no push
        (b"\x6a\x75", None),  # not a push
        (b"\x6a\x06", None),  # truncated push
        (b"\x6a\x05abcdef", None),  # push then a stray opcode
        (b"\x6a\x4d", None),  # truncated PUSHDATA2 length
        (b"\x6a\x06abcdef\x01a", None),  # additional push
        (b"\x6a\x06abcdef\x75", None),  # additional opcode
        (b"", None),
    ],
)
def test_op_return_single_push(script: bytes, payload: bytes | None) -> None:
    assert _single_push_after_op_return(script) == payload


# reference tests: test_build_script
@pytest.mark.parametrize(
    ("payload_len", "prefix"),
    [(76, b"\x6a\x4c\x4c"), (256, b"\x6a\x4d\x00\x01")],
)
def test_push_encoding_of_built_marker(payload_len: int, prefix: bytes) -> None:
    # Metadata length chosen so the whole payload has the wanted size.
    metadata_len = payload_len - 4 - 1 - (1 if payload_len - 6 < 0xFD else 3)
    script = build_marker([], b"a" * metadata_len)
    assert script.startswith(prefix)
    assert parse_marker(script) == Marker((), b"a" * metadata_len)


def test_build_marker_short_payload_push() -> None:
    assert build_marker([]) == b"\x6a\x06OA\x01\x00\x00\x00"


# reference tests: test_serialize_deserialize_payload_success
@pytest.mark.parametrize(
    ("quantities", "metadata", "payload"),
    [
        ((5, 300), b"abcdef", b"OA\x01\x00" + b"\x02\x05\xac\x02" + b"\x06abcdef"),
        ((5,) * 256, b"abcdef", b"OA\x01\x00" + b"\xfd\x00\x01" + b"\x05" * 256 + b"\x06abcdef"),
        ((5,), b"\x01" * 256, b"OA\x01\x00" + b"\x01\x05" + b"\xfd\x00\x01" + b"\x01" * 256),
        ((2**63 - 1,), b"", b"OA\x01\x00" + b"\x01" + b"\xff" * 8 + b"\x7f" + b"\x00"),
    ],
)
def test_payload_round_trip(quantities: tuple[int, ...], metadata: bytes, payload: bytes) -> None:
    assert build_marker_payload(quantities, metadata) == payload
    assert parse_marker_payload(payload) == Marker(quantities, metadata)


# reference tests: test_deserialize_payload_invalid (+ the spec's 9-byte LEB128 limit)
@pytest.mark.parametrize(
    "payload",
    [
        b"OB\x01\x00" + b"\x02\x01\xac\x02" + b"\x06abcdef",  # wrong tag
        b"OA\x02\x00" + b"\x02\x01\xac\x02" + b"\x06abcdef",  # wrong version
        b"O",
        b"OA\x01",
        b"OA\x01\x00",
        b"OA\x01\x00" + b"\x02\x01",
        b"OA\x01\x00" + b"\x02\x01\xac",
        b"OA\x01\x00" + b"\x02\x01\xac\x02" + b"\x06abcd",  # metadata truncated
        b"OA\x01\x00" + b"\x02\x01\xac\x02" + b"\x06abcdefgh",  # trailing bytes
        b"OA\x01\x00" + b"\xfd\x00",  # truncated CompactSize
        b"OA\x01\x00" + b"\x01" + b"\x80" * 9 + b"\x01" + b"\x00",  # quantity 2**63: too large
        # Spec: an encoding longer than 9 bytes is invalid even when its value is small
        # (the reference implementation would accept this non-minimal zero).
        b"OA\x01\x00" + b"\x01" + b"\x80" * 9 + b"\x00" + b"\x00",
        b"OA\x01\x00" + b"\xff" + b"\xff" * 8,  # absurd count, refused before looping
    ],
)
def test_malformed_payloads_are_not_markers(payload: bytes) -> None:
    assert parse_marker_payload(payload) is None
    assert parse_marker(b"\x6a" + bytes([len(payload)]) + payload) is None


def test_non_canonical_compact_size_accepted_like_reference() -> None:
    # python-bitcoinlib's VarIntSerializer (used by the reference) accepts 0xfd 0x01 0x00.
    payload = b"OA\x01\x00" + b"\xfd\x01\x00" + b"\x07" + b"\x00"
    assert parse_marker_payload(payload) == Marker((7,), b"")


def test_build_marker_refuses_out_of_range_quantity() -> None:
    with pytest.raises(AssetError) as info:
        build_marker([QUANTITY_MAX + 1])
    assert info.value.code == "asset-quantity-range"


# -- coloring ----------------------------------------------------------------

PLAIN = b"\x51"  # any non-marker output script


def make_tx(input_count: int, output_scripts: list[bytes]) -> Transaction:
    inputs = tuple(TxIn(OutPoint(bytes([i + 1]) * 32, i)) for i in range(input_count))
    outputs = tuple(TxOut(10 * i, script) for i, script in enumerate(output_scripts))
    return Transaction(1, inputs, outputs)


def color_case(
    inputs: list[tuple[str | None, int, bytes]],
    quantities: list[int],
    marker_index: int,
    output_count: int,
) -> list[tuple[str | None, int]]:
    scripts = [bytes([0x51 + (i % 16)]) for i in range(output_count)]
    scripts[marker_index] = build_marker(quantities)
    tx = make_tx(len(inputs), scripts)
    spent = [(script, asset, quantity) for asset, quantity, script in inputs]
    return color_outputs(tx, spent)


H_ABCDEF = asset_id(b"abcdef")
A, B, C = "a", "b", "c"  # opaque asset ids in the reference tests
S = b"\x01\x02"  # the reference tests' default previous output script
U = (None, 0)

# (name, inputs (asset, quantity, script), quantities, marker index, output count,
#  expected per-output coloring or None for "invalid: all outputs uncolored").
# Source: reference implementation tests (test_compute_asset_addresses_*) and the spec.
COLORING_CASES: list[
    tuple[
        str,
        list[tuple[str | None, int, bytes]],
        list[int],
        int,
        int,
        list[tuple[str | None, int]] | None,
    ]
] = [
    (
        "issuance",
        [(None, 0, b"abcdef"), (None, 0, b"ghijkl")],
        [1, 3],
        2,
        3,
        [(H_ABCDEF, 1), (H_ABCDEF, 3), U],
    ),
    ("no quantities", [(A, 2, S)], [], 0, 1, [U]),
    ("more quantities than outputs", [(A, 2, S)], [1], 0, 1, None),
    ("single input single output", [(A, 2, S)], [2], 0, 2, [U, (A, 2)]),
    (
        "empty outputs",
        [(A, 2, S)],
        [0, 1, 0, 1],
        0,
        6,
        [U, U, (A, 1), U, (A, 1), U],
    ),
    ("empty inputs", [(None, 0, S), (A, 2, S), (None, 0, S)], [2], 0, 3, [U, (A, 2), U]),
    ("outputs less than inputs", [(A, 3, S), (A, 1, S)], [1, 1], 0, 3, [U, (A, 1), (A, 1)]),
    ("output partially unassigned", [(A, 1, S), (A, 2, S)], [1, 3], 0, 3, None),
    ("entire output unassigned", [(A, 1, S)], [1, 3], 0, 3, None),
    (
        "matching values",
        [(A, 1, S), (B, 2, S), (C, 3, S)],
        [1, 2, 3],
        0,
        4,
        [U, (A, 1), (B, 2), (C, 3)],
    ),
    (
        "mixing same asset",
        [(A, 2, S), (A, 1, S), (A, 2, S)],
        [1, 3, 1],
        0,
        4,
        [U, (A, 1), (A, 3), (A, 1)],
    ),
    ("mixing different assets", [(A, 2, S), (B, 1, S), (C, 2, S)], [1, 3, 1], 0, 4, None),
    (
        "issuance and transfer",
        [(A, 3, b"abcdef"), (A, 2, b"ghijkl")],
        [1, 4, 2, 3],
        2,
        5,
        [(H_ABCDEF, 1), (H_ABCDEF, 4), U, (A, 2), (A, 3)],
    ),
    (
        # The spec's worked example ("Example" under Asset transfer outputs).
        "spec example",
        [(A, 3, b"abcdef"), (A, 2, S), (None, 0, S), (A, 5, S), (A, 3, S), (B, 9, S)],
        [0, 10, 6, 0, 7, 3],
        2,
        7,
        [U, (H_ABCDEF, 10), U, (A, 6), U, (A, 7), (B, 3)],
    ),
    (
        # Issuance outputs beyond the quantity list get quantity 0: uncolored (spec).
        "short list before marker",
        [(None, 0, b"abcdef")],
        [5],
        2,
        3,
        [(H_ABCDEF, 5), U, U],
    ),
]


@pytest.mark.parametrize(
    ("inputs", "quantities", "marker_index", "output_count", "expected"),
    [case[1:] for case in COLORING_CASES],
    ids=[case[0] for case in COLORING_CASES],
)
def test_coloring_cases(
    inputs: list[tuple[str | None, int, bytes]],
    quantities: list[int],
    marker_index: int,
    output_count: int,
    expected: list[tuple[str | None, int]] | None,
) -> None:
    result = color_case(inputs, quantities, marker_index, output_count)
    assert result == (expected if expected is not None else [U] * output_count)


Spent = list[tuple[bytes, str | None, int]]


def reference_transaction(marker_script: bytes) -> tuple[Transaction, Spent]:
    # reference tests: create_test_transaction / create_test_outputs
    tx = make_tx(3, [b"\x10", marker_script, b"\x20"])
    spent: list[tuple[bytes, str | None, int]] = [(b"\x10", A, 6), (b"\x20", A, 2), (b"\x30", B, 1)]
    return tx, spent


def test_color_transaction_reference_cases() -> None:
    tx, spent = reference_transaction(b"\x6a\x08" + b"OA\x01\x00" + b"\x02\x05\x07" + b"\x00")
    assert color_outputs(tx, spent) == [(asset_id(b"\x10"), 5), U, (A, 7)]
    # invalid payload
    tx, spent = reference_transaction(b"\x6a\x04" + b"OA\x01\x00")
    assert color_outputs(tx, spent) == [U, U, U]
    # more asset quantities than outputs
    tx, spent = reference_transaction(b"\x6a\x08" + b"OA\x01\x00" + b"\x03\x05\x09\x08" + b"\x00")
    assert color_outputs(tx, spent) == [U, U, U]


def test_first_valid_marker_is_used() -> None:
    # Output 0 parses as a marker but colors invalidly; output 1 is a valid marker, so
    # OAP (spec: "the first valid marker output"; reference: loop over markers) uses it.
    bad = build_marker([5])  # 5 units but no colored inputs -> invalid
    good = build_marker([0, 2])
    tx = make_tx(1, [bad, good, PLAIN])
    assert color_outputs(tx, [(S, A, 2)]) == [U, U, (A, 2)]
    # Two valid markers: the first one is used, the second is a regular output.
    # The second marker output is a regular output: it even receives units.
    tx = make_tx(1, [build_marker([2]), build_marker([]), PLAIN])
    assert color_outputs(tx, [(S, A, 2)]) == [U, (A, 2), U]


def test_coinbase_is_never_colored() -> None:
    tx = Transaction(
        1,
        (TxIn(OutPoint(bytes(32), 0xFFFFFFFF), b"\x01\x02"),),
        (TxOut(1, PLAIN), TxOut(0, build_marker([1]))),
    )
    assert color_outputs(tx, [(b"", None, 0)]) == [U, U]


# -- property: coloring never creates units ----------------------------------

ASSETS = ["AssetOne", "AssetTwo", "AssetThree"]


@st.composite
def coloring_inputs(draw: st.DrawFn) -> tuple[Transaction, Spent, int]:
    input_count = draw(st.integers(1, 5))
    spent: list[tuple[bytes, str | None, int]] = []
    for i in range(input_count):
        if draw(st.booleans()):
            asset = draw(st.sampled_from(ASSETS))
            spent.append((bytes([0x60 + i]), asset, draw(st.integers(1, 20))))
        else:
            spent.append((bytes([0x60 + i]), None, 0))
    output_count = draw(st.integers(1, 7))
    marker_index = draw(st.integers(0, output_count - 1))
    quantities = draw(st.lists(st.integers(0, 25), max_size=output_count))
    scripts = [PLAIN] * output_count
    scripts[marker_index] = build_marker(quantities)
    return make_tx(input_count, scripts), spent, marker_index


@settings(max_examples=300, deadline=None)
@given(coloring_inputs())
def test_coloring_never_creates_units(
    case: tuple[Transaction, list[tuple[bytes, str | None, int]], int],
) -> None:
    tx, spent, marker_index = case
    result = color_outputs(tx, spent)
    assert len(result) == len(tx.outputs)
    issuer = asset_id(spent[0][0])
    units_in: dict[str, int] = {}
    for _, asset, quantity in spent:
        if asset is not None:
            units_in[asset] = units_in.get(asset, 0) + quantity
    units_out: dict[str, int] = {}
    assert result[marker_index] == U
    for index, (asset, quantity) in enumerate(result):
        assert (asset is None) == (quantity == 0)
        if asset is None:
            continue
        if index < marker_index:
            assert asset == issuer  # issuance outputs carry the issuer's asset id only
        else:
            units_out[asset] = units_out.get(asset, 0) + quantity
    for asset, quantity in units_out.items():
        assert quantity <= units_in.get(asset, 0)


# -- the ledger's stricter rules ---------------------------------------------

ISSUER = b"\x76\xa9\x14" + b"\x11" * 20 + b"\x88\xac"
STRANGER = b"\x76\xa9\x14" + b"\x22" * 20 + b"\x88\xac"


def rule_codes(tx: Transaction, spent: list[tuple[bytes, str | None, int]]) -> str | None:
    try:
        check_asset_rules(tx, spent, issuer_scripts={ISSUER})
    except AssetError as error:
        return error.code
    return None


def test_rules_accept_member_issuance_and_exact_transfer() -> None:
    tx = make_tx(1, [PLAIN, build_marker([100])])
    effects = check_asset_rules(tx, [(ISSUER, None, 0)], issuer_scripts={ISSUER})
    assert effects.issued_asset_id == asset_id(ISSUER)
    assert effects.issued_quantity == 100
    tx = make_tx(2, [build_marker([60, 40]), PLAIN, PLAIN])
    effects = check_asset_rules(tx, [(STRANGER, A, 70), (STRANGER, A, 30)], issuer_scripts=set())
    assert effects.issued_asset_id is None
    assert effects.coloring.outputs == ((None, 0), (A, 60), (A, 40))


@pytest.mark.parametrize(
    ("scripts", "spent", "code"),
    [
        # a non-member issues
        ([PLAIN, build_marker([100])], [(STRANGER, None, 0)], "asset-issuer-not-member"),
        # plain spend of a colored output: units would become uncolored
        ([PLAIN], [(ISSUER, A, 5)], "asset-units-destroyed"),
        # transfer carries fewer units than the inputs hold
        ([build_marker([3]), PLAIN], [(ISSUER, A, 5)], "asset-units-destroyed"),
        # invalid coloring (mixing) while inputs carry units
        ([build_marker([0, 3]), PLAIN], [(S, A, 2), (S, B, 2)], "asset-invalid-coloring"),
        # invalid coloring (list longer than outputs) with no colored input
        ([build_marker([1, 1])], [(ISSUER, None, 0)], "asset-invalid-coloring"),
        # a malformed OAP payload
        ([b"\x6a\x05OA\x01\x00\x05", PLAIN], [(S, None, 0)], "asset-malformed-marker"),
        # units assigned to an unspendable output
        ([build_marker([2]), b"\x6a\x01\x00"], [(S, A, 2)], "asset-units-destroyed"),
        # first marker invalid, second valid: OAP would use the second, the ledger refuses
        ([build_marker([9]), build_marker([0, 2]), PLAIN], [(S, A, 2)], "asset-invalid-coloring"),
    ],
)
def test_rules_refuse(
    scripts: list[bytes], spent: list[tuple[bytes, str | None, int]], code: str
) -> None:
    tx = make_tx(len(spent), scripts)
    assert rule_codes(tx, spent) == code


# -- property: agreement with a unit-by-unit rendering of the spec's text -------------


def spec_oracle(
    tx: Transaction, spent: list[tuple[bytes, str | None, int]]
) -> list[tuple[str | None, int]]:
    """The spec's words taken literally: inputs and outputs as sequences of units."""
    uncolored: list[tuple[str | None, int]] = [U] * len(tx.outputs)
    for marker_index, output in enumerate(tx.outputs):
        marker = parse_marker(output.script_pubkey)
        if marker is None:
            continue
        colorable = [i for i in range(len(tx.outputs)) if i != marker_index]
        if len(marker.quantities) > len(colorable):
            continue  # this marker is invalid; a later one may be valid
        quantity = {i: 0 for i in colorable}
        quantity.update(zip(colorable, marker.quantities, strict=False))
        input_units = [asset for _, asset, q in spent if asset is not None for _ in range(q)]
        result: list[tuple[str | None, int]] = []
        position = 0
        valid = True
        for index in range(len(tx.outputs)):
            if index == marker_index:
                result.append(U)
            elif index < marker_index:
                q = quantity[index]
                result.append((asset_id(spent[0][0]), q) if q else U)
            else:
                q = quantity[index]
                units = input_units[position : position + q]
                position += q
                if len(units) < q or len(set(units)) > 1:
                    valid = False
                    break
                result.append((units[0], q) if q else U)
        if valid:
            return result
    return uncolored


@st.composite
def multi_marker_cases(draw: st.DrawFn) -> tuple[Transaction, Spent]:
    input_count = draw(st.integers(1, 4))
    spent: Spent = []
    for i in range(input_count):
        asset = draw(st.sampled_from([None, *ASSETS[:2]]))
        spent.append((bytes([0x60 + i]), asset, draw(st.integers(1, 6)) if asset else 0))
    output_count = draw(st.integers(1, 6))
    scripts = []
    for _ in range(output_count):
        if draw(st.integers(0, 2)) == 0:
            scripts.append(build_marker(draw(st.lists(st.integers(0, 8), max_size=6))))
        else:
            scripts.append(PLAIN)
    return make_tx(input_count, scripts), spent


@settings(max_examples=500, deadline=None)
@given(multi_marker_cases())
def test_coloring_matches_unit_by_unit_spec(case: tuple[Transaction, Spent]) -> None:
    tx, spent = case
    expected = spec_oracle(tx, spent)
    coloring = color_transaction(tx, spent)
    event("colored" if coloring.is_open_assets else "uncolored")
    if coloring.is_open_assets and coloring.marker_index != coloring.first_marker_index:
        event("a later marker was used")
    assert list(coloring.outputs) == expected == color_outputs(tx, spent)

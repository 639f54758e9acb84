"""The API server without Kafka or PostgreSQL: tokens, scopes, problems, limits, the
JSON-RPC methods that need no chain, and the checked-in OpenAPI document."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from ledger.address import p2pkh_address
from ledger.membership import INSTITUTION_IDS
from ledger.script import p2pkh_script
from ledger.tx import OutPoint, Transaction, TxIn, TxOut
from streams.api.app import create_app, openapi_document
from streams.api.auth import (
    CREDENTIALS_FILE,
    AccessFileError,
    NewIdentity,
    check_secret,
    hash_secret,
    load_access,
    write_access,
)
from streams.api.bitcoin_format import amount, dumps_exact, script_asm
from streams.api.context import ApiDeps
from streams.api.middleware import BODY_BYTES_MAX
from streams.common.genesis_files import build_genesis, seeded_entropy

pytestmark = pytest.mark.unit

OPENAPI_COPY = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
PROBLEM = "application/problem+json"
NOW_S = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.now_s = float(NOW_S)

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def access_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("access")
    write_access(directory, [
        NewIdentity("backoffice", "client", "platform", "koscom"),
        NewIdentity("watcher", "client", "regulator", "surveillance"),
        NewIdentity("alice", "user", "user", "securities-a", ("acct-a",)),
    ], token_ttl_s=60)
    return directory


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(access_dir: Path, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    genesis, _ = build_genesis(chain_id="unit-api", time_ms=1, institutions=INSTITUTION_IDS,
                               entropy=seeded_entropy("api"))
    deps = ApiDeps(dsn="postgresql://unused", bootstrap="unused:1", genesis=genesis,
                   access=load_access(access_dir), clock_s=clock, start_kafka=False)
    transport = httpx.ASGITransport(app=create_app(deps))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http


def secrets_of(access_dir: Path) -> dict[str, dict[str, str]]:
    loaded: dict[str, dict[str, str]] = json.loads((access_dir / CREDENTIALS_FILE).read_text())
    return loaded


def basic(name: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


async def token_for(http: httpx.AsyncClient, access_dir: Path, name: str,
                    path: str = "/oauth2/token") -> str:
    secret = secrets_of(access_dir)["clients"][name]
    answer = await http.post(path, data={"grant_type": "client_credentials"},
                             headers=basic(name, secret))
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def assert_problem(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM), answer.headers
    assert answer.json()["code"] == code, answer.json()


def test_secrets_are_stored_hashed(access_dir: Path) -> None:
    text = (access_dir / "api-access.json").read_text()
    for secret in secrets_of(access_dir)["clients"].values():
        assert secret not in text
    assert (access_dir / "api-token.key").stat().st_mode & 0o777 == 0o600
    assert (access_dir / CREDENTIALS_FILE).stat().st_mode & 0o777 == 0o600
    stored = hash_secret("s3cret")
    assert check_secret("s3cret", stored) and not check_secret("s3cret!", stored)
    assert not check_secret("x", "scrypt$99999999$8$1$00$00")  # hostile cost refused


def test_a_token_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    write_access(tmp_path, [NewIdentity("x", "client", "firm", "securities-a")])
    (tmp_path / "api-token.key").chmod(0o644)
    with pytest.raises(AccessFileError, match="readable by others"):
        load_access(tmp_path)


async def test_client_credentials_on_both_token_paths(client: httpx.AsyncClient,
                                                      access_dir: Path) -> None:
    for path in ("/oauth2/token", "/v1/oauth2/token"):
        token = await token_for(client, access_dir, "backoffice", path)
        answer = await client.get("/api/chain/blocks/missing",
                                  headers={"Authorization": f"Bearer {token}"})
        # authenticated, then refused for the malformed hash (not for the token)
        assert_problem(answer, 400, "block-hash-malformed")
        for cursor in ("9223372036854775808", "-1", "x"):  # past bigint, negative, text
            answer = await client.get(f"/api/chain/blocks?cursor={cursor}",
                                      headers={"Authorization": f"Bearer {token}"})
            assert_problem(answer, 400, "cursor-invalid")


async def test_bad_credentials_and_grants_are_problems(client: httpx.AsyncClient) -> None:
    answer = await client.post("/oauth2/token", data={"grant_type": "client_credentials"},
                               headers=basic("backoffice", "wrong"))
    assert_problem(answer, 401, "credentials-invalid")
    answer = await client.post("/oauth2/token", data={"grant_type": "password"},
                               headers=basic("backoffice", "wrong"))
    assert_problem(answer, 400, "unsupported-grant-type")
    answer = await client.post("/oauth2/token", data={"grant_type": "client_credentials"})
    assert_problem(answer, 401, "credentials-missing")


async def test_tokens_expire_and_forgeries_fail(client: httpx.AsyncClient, access_dir: Path,
                                                clock: Clock) -> None:
    token = await token_for(client, access_dir, "backoffice")
    head, body, signature = token.split(".")
    forged = f"{head}.{body[:-2]}AA.{signature}"
    answer = await client.get("/api/chain/blocks", headers={"Authorization": f"Bearer {forged}"})
    assert_problem(answer, 401, "token-invalid")
    answer = await client.get("/api/chain/blocks")
    assert_problem(answer, 401, "token-missing")
    clock.now_s += 61  # the access file's token_ttl_s is 60
    answer = await client.get("/api/chain/blocks", headers={"Authorization": f"Bearer {token}"})
    assert_problem(answer, 401, "token-expired")


async def test_user_login(client: httpx.AsyncClient, access_dir: Path) -> None:
    password = secrets_of(access_dir)["users"]["alice"]
    answer = await client.post("/api/login", json={"username": "alice", "password": password})
    assert answer.status_code == 200 and answer.json()["scope"] == "user"
    answer = await client.post("/api/login", json={"username": "alice", "password": "no"})
    assert_problem(answer, 401, "credentials-invalid")
    answer = await client.post("/api/login", json={"username": "alice"})
    assert_problem(answer, 422, "request-invalid")


async def test_over_long_bodies_are_refused(client: httpx.AsyncClient, access_dir: Path) -> None:
    auth = basic("backoffice", secrets_of(access_dir)["clients"]["backoffice"])
    answer = await client.post("/rpc", content=b"x" * (BODY_BYTES_MAX + 1))
    assert_problem(answer, 413, "body-too-large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(BODY_BYTES_MAX // 65536 + 2):
            yield b"y" * 65536

    answer = await client.post("/rpc", content=chunks(), headers=auth)
    assert_problem(answer, 413, "body-too-large")


async def test_unknown_paths_and_health(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nothing-here"), 404, "not-found")
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert_problem(await client.get("/readyz"), 503, "not-ready")
    metrics = await client.get("/metrics")
    assert "capledger_api_requests_total" in metrics.text
    page = await client.get("/ui/")
    assert page.status_code == 200 and "게시판" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def sample_tx() -> Transaction:
    spk = p2pkh_script(bytes(range(20)))
    return Transaction(1, (TxIn(OutPoint(bytes(range(32)), 1), b"\x51", 0xFFFFFFFF),),
                       (TxOut(123_456_789, spk),), 0)


async def rpc(http: httpx.AsyncClient, auth: dict[str, str], method: str,
              *params: object) -> httpx.Response:
    return await http.post("/rpc", content=json.dumps(
        {"version": "1.1", "method": method, "params": list(params), "id": 7}), headers=auth)


async def test_json_rpc_without_a_chain(client: httpx.AsyncClient, access_dir: Path) -> None:
    auth = basic("backoffice", secrets_of(access_dir)["clients"]["backoffice"])
    tx = sample_tx()
    answer = await rpc(client, auth, "decoderawtransaction", tx.serialize().hex())
    assert answer.status_code == 200
    decoded = json.loads(answer.text, parse_float=Decimal)
    assert decoded["id"] == 7 and decoded["error"] is None
    result = decoded["result"]
    assert result["txid"] == tx.txid and result["vin"][0]["vout"] == 1
    assert result["vout"][0]["value"] == Decimal("1.23456789")
    assert result["vout"][0]["scriptPubKey"]["type"] == "pubkeyhash"
    assert result["vout"][0]["scriptPubKey"]["address"] == p2pkh_address(bytes(range(20)))
    answer = await rpc(client, auth, "decoderawtransaction", "zz")
    assert answer.status_code == 500 and answer.json()["error"]["code"] == -22
    answer = await rpc(client, auth, "nosuchmethod")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == -32601
    answer = await rpc(client, auth, "validateaddress", p2pkh_address(bytes(20)))
    assert answer.json()["result"]["isvalid"] is True
    answer = await rpc(client, auth, "validateaddress", "1NotAnAddress")
    assert answer.json()["result"]["isvalid"] is False
    for hostile in (b"{not json", b"[" * 200_000):
        answer = await client.post("/rpc", content=hostile, headers=auth)
        assert answer.status_code == 500 and answer.json()["error"]["code"] == -32700
    answer = await rpc(client, {}, "getblockcount")
    assert_problem(answer, 401, "credentials-missing")


async def test_a_regulator_cannot_send(client: httpx.AsyncClient, access_dir: Path) -> None:
    auth = basic("watcher", secrets_of(access_dir)["clients"]["watcher"])
    answer = await rpc(client, auth, "sendrawtransaction", sample_tx().serialize().hex())
    assert answer.json()["error"]["code"] == -32


def test_script_asm_and_exact_amounts() -> None:
    spk = p2pkh_script(bytes(range(20)))
    assert script_asm(spk) == f"OP_DUP OP_HASH160 {bytes(range(20)).hex()} OP_EQUALVERIFY " \
                              "OP_CHECKSIG"
    assert script_asm(b"\x00\x51\x60\x4f") == "0 1 16 -1"
    assert script_asm(b"\x4c\x05ab") == "[error]"
    assert amount(1) == Decimal("0.00000001")
    assert dumps_exact({"v": amount(2_100_000_000_000_000)}) == '{"v":21000000.00000000}'


def test_openapi_copy_is_current() -> None:
    current = json.dumps(openapi_document(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    assert OPENAPI_COPY.read_text(encoding="utf-8") == current, (
        "docs/openapi.json is stale: run `capledger api openapi --out docs/openapi.json`")


def test_plain_and_open_assets_addresses_name_the_same_script() -> None:
    from ledger.base58 import b58check_encode
    from ledger.membership import ChainParams
    from streams.api.addresses import address_script, asset_address
    from streams.api.problems import ApiProblem

    params = ChainParams(quorum=3)
    hash160 = bytes([0x80]) * 20
    plain = p2pkh_address(hash160)
    testnet_oap = b58check_encode(bytes([0x13, 0x6F]) + hash160)
    assert testnet_oap.startswith("bX")  # as the PoC client's (low hashes give "bW")
    for text in (plain, asset_address(plain), testnet_oap):
        assert address_script(text, params) == p2pkh_script(hash160), text
    for bad in ("", "bXnot-base58", plain[:-1] + ("1" if plain[-1] != "1" else "2"),
                b58check_encode(bytes([0x42]) + hash160)):
        with pytest.raises(ApiProblem) as caught:
            address_script(bad, params)
        assert caught.value.code == "address-invalid"


def test_integration_doc_lists_every_schema_fingerprint() -> None:
    from streams.kafka import codec

    text = (OPENAPI_COPY.parent / "integration.md").read_text(encoding="utf-8")
    for version in codec.default_registry().by_fingerprint.values():
        assert version.fingerprint.hex() in text, f"docs/integration.md lacks {version.path}"
        assert version.canonical_form in text, f"docs/integration.md lacks {version.path}"


def test_keyset_pages_cover_a_list_once() -> None:
    from streams.api.market_routes import page
    from streams.api.problems import ApiProblem

    items = [f"order-{n:03d}" for n in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        chosen, cursor = page(items, str, limit=3, cursor=cursor)
        seen.extend(chosen)
        if cursor is None:
            break
    assert seen == items
    assert page(items, str, limit=7, cursor=None) == (items, None)
    with pytest.raises(ApiProblem) as caught:
        page(items, str, limit=3, cursor="order-999")
    assert caught.value.code == "cursor-invalid"


async def test_failed_sign_ins_are_bounded_per_name(client: httpx.AsyncClient, access_dir: Path,
                                                    clock: Clock) -> None:
    from streams.api.auth import SIGN_IN_FAILURES_MAX, SIGN_IN_WINDOW_S

    password = secrets_of(access_dir)["users"]["alice"]
    for _ in range(SIGN_IN_FAILURES_MAX):
        answer = await client.post("/api/login", json={"username": "alice", "password": "x"})
        assert_problem(answer, 401, "credentials-invalid")
    answer = await client.post("/api/login", json={"username": "alice", "password": password})
    assert_problem(answer, 429, "too-many-attempts")
    clock.now_s += SIGN_IN_WINDOW_S
    answer = await client.post("/api/login", json={"username": "alice", "password": password})
    assert answer.status_code == 200, answer.text


def test_an_idempotency_key_runs_one_request_at_a_time() -> None:
    from streams.api.idempotency import IdempotencyStore
    from streams.api.problems import ApiProblem

    store = IdempotencyStore()
    store.begin("alice", "key-0000001")
    with pytest.raises(ApiProblem) as caught:
        store.begin("alice", "key-0000001")
    assert caught.value.code == "idempotency-key-in-flight"
    store.begin("bob", "key-0000001")  # keys are per caller
    store.end("alice", "key-0000001")
    store.begin("alice", "key-0000001")


async def test_deeply_nested_json_is_a_problem(client: httpx.AsyncClient) -> None:
    answer = await client.post("/api/login", content=b"[" * 200_000,
                               headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)

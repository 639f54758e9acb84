"""The Bitcoin JSON-RPC endpoint (``POST /`` and ``POST /rpc``), as Bitcoin Core speaks it.

Owns: JSON-RPC 1.0 request handling (single and batch), HTTP Basic with an API
client's key and secret, and the methods getblockchaininfo, getblockcount,
getbestblockhash, getblockhash, getblock (verbosity 1 and 2), getrawtransaction,
decoderawtransaction, sendrawtransaction, gettxout and validateaddress with Core's
parameter order, result shapes, error codes and HTTP statuses (500 for an RPC
error, 404 for an unknown method, 400 for an invalid request). Reads come from the
projection; ``sendrawtransaction`` writes to ``ledger.tx.v1`` and waits (bounded)
for the outcome, since a committed transaction is this chain's "accepted".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ledger.address import address_to_script
from ledger.errors import ValidationError
from ledger.script import ScriptTemplate, classify
from ledger.tx import TX_BYTES_MAX, Transaction
from streams.api.auth import Principal
from streams.api.bitcoin_format import amount, decode_tx, dumps_exact, script_pubkey_json
from streams.api.context import basic_client, deps_of, projection, services
from streams.api.submission import submit_and_wait

RPC_MISC_ERROR = -1
RPC_TYPE_ERROR = -3
RPC_INVALID_ADDRESS_OR_KEY = -5
RPC_INVALID_PARAMETER = -8
RPC_DESERIALIZATION_ERROR = -22
RPC_VERIFY_ERROR = -25
RPC_VERIFY_REJECTED = -26
RPC_VERIFY_ALREADY_IN_CHAIN = -27
RPC_IN_WARMUP = -28
RPC_FORBIDDEN = -32  # not a Core code: a read-only principal called a write
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_PARSE_ERROR = -32700
BATCH_CALLS_MAX = 100
TX_HEX_CHARS_MAX = 2 * TX_BYTES_MAX
ZERO_CHAINWORK = "0" * 64
INT64_MAX = 2**63 - 1
OUTPUT_INDEX_MAX = 2**31 - 1  # tx_output."index" is a PostgreSQL integer

router = APIRouter(tags=["bitcoin-json-rpc"])


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Handler = Callable[[Request, Principal, list[Any]], Awaitable[Any]]
METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        METHODS[name] = handler
        return handler
    return register


def _param(params: list[Any], index: int, kind: type | tuple[type, ...], name: str,
           default: Any = ...) -> Any:
    if index >= len(params) or params[index] is None:
        if default is ...:
            raise RpcError(RPC_MISC_ERROR, f"missing required parameter {name}")
        return default
    value = params[index]
    if isinstance(value, bool) and kind is int:
        raise RpcError(RPC_TYPE_ERROR, f"JSON value of type bool for {name} is not of "
                                       "expected type number")
    if not isinstance(value, kind):
        raise RpcError(RPC_TYPE_ERROR, f"JSON value of type {type(value).__name__} for {name} "
                                       "is not of expected type")
    return value


def _hash_param(params: list[Any], index: int, name: str) -> str:
    value: str = _param(params, index, str, name)
    if len(value) != 64:
        raise RpcError(RPC_INVALID_PARAMETER,
                       f"{name} must be of length 64 (not {len(value)}, for '{value[:80]}')")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise RpcError(RPC_INVALID_PARAMETER,
                       f"{name} must be hexadecimal string (not '{value}')") from None
    return value.lower()


def _tx_param(params: list[Any], index: int) -> Transaction:
    text = _param(params, index, str, "hexstring")
    if len(text) > TX_HEX_CHARS_MAX:
        raise RpcError(RPC_DESERIALIZATION_ERROR, "TX decode failed")
    try:
        return Transaction.parse(bytes.fromhex(text))
    except (ValueError, ValidationError):
        raise RpcError(RPC_DESERIALIZATION_ERROR, "TX decode failed") from None


async def _head(request: Request) -> Any:
    head = await projection(request).head()
    if head is None:
        raise RpcError(RPC_IN_WARMUP, "Loading block index...")
    return head


@method("getblockcount")
async def getblockcount(request: Request, caller: Principal, params: list[Any]) -> Any:
    return (await _head(request)).height


@method("getbestblockhash")
async def getbestblockhash(request: Request, caller: Principal, params: list[Any]) -> Any:
    return (await _head(request)).hash


@method("getblockchaininfo")
async def getblockchaininfo(request: Request, caller: Principal, params: list[Any]) -> Any:
    head = await _head(request)
    return {"chain": deps_of(request).genesis.chain_id, "blocks": head.height,
            "headers": head.height, "bestblockhash": head.hash, "difficulty": Decimal(1),
            "time": head.time_s, "mediantime": head.time_s,
            "verificationprogress": Decimal(1), "initialblockdownload": False,
            "chainwork": ZERO_CHAINWORK, "size_on_disk": 0, "pruned": False, "warnings": ""}


@method("getblockhash")
async def getblockhash(request: Request, caller: Principal, params: list[Any]) -> Any:
    height = _param(params, 0, int, "height")
    row = await projection(request).block_at(height) if 0 <= height <= INT64_MAX else None
    if row is None:
        raise RpcError(RPC_INVALID_PARAMETER, "Block height out of range")
    return row.hash


async def _tx_json(request: Request, row: Any, head_height: int) -> dict[str, Any]:
    decoded = decode_tx(Transaction.parse(row.raw), deps_of(request).genesis.params)
    return {**decoded, "hex": row.raw.hex(), "blockhash": row.block_hash,
            "confirmations": head_height - row.height + 1,
            "time": int(row.time_at.timestamp()), "blocktime": int(row.time_at.timestamp())}


@method("getblock")
async def getblock(request: Request, caller: Principal, params: list[Any]) -> Any:
    block_hash = _hash_param(params, 0, "blockhash")
    verbosity = params[1] if len(params) > 1 and params[1] is not None else 1
    if isinstance(verbosity, bool):
        verbosity = int(verbosity)
    if not isinstance(verbosity, int) or verbosity not in (1, 2):
        raise RpcError(RPC_INVALID_PARAMETER, "verbosity 1 (JSON) and 2 (with transactions) "
                                              "are served; raw blocks are not")
    found = projection(request)
    row = await found.block_by_hash(block_hash)
    if row is None:
        raise RpcError(RPC_INVALID_ADDRESS_OR_KEY, "Block not found")
    head = await _head(request)
    txids = await found.txids_at(row.height)
    result: dict[str, Any] = {
        "hash": row.hash, "confirmations": head.height - row.height + 1,
        "size": row.size_bytes, "strippedsize": row.size_bytes, "weight": 4 * row.size_bytes,
        "height": row.height, "version": 1, "versionHex": "00000001",
        "merkleroot": row.merkle_root, "tx": txids, "time": row.time_s,
        "mediantime": row.time_s, "nonce": 0, "bits": "00000000", "difficulty": Decimal(1),
        "chainwork": ZERO_CHAINWORK, "nTx": len(txids),
        "proposer": row.proposer, "round": row.round, "voters": list(row.voters),
        "statehash": row.state_hash,
    }
    if row.height > 0:
        result["previousblockhash"] = row.prev_hash
    following = await found.block_at(row.height + 1)
    if following is not None:
        result["nextblockhash"] = following.hash
    if verbosity == 2:
        result["tx"] = [await _tx_json(request, await found.tx(txid), head.height)
                        for txid in txids]
    return result


@method("getrawtransaction")
async def getrawtransaction(request: Request, caller: Principal, params: list[Any]) -> Any:
    txid = _hash_param(params, 0, "parameter 1")
    verbose = params[1] if len(params) > 1 and params[1] is not None else False
    if not isinstance(verbose, bool | int):
        raise RpcError(RPC_TYPE_ERROR, "verbose is a boolean or a number")
    row = await projection(request).tx(txid)
    if row is None:
        raise RpcError(RPC_INVALID_ADDRESS_OR_KEY, "No such mempool or blockchain transaction. "
                                                   "Use gettransaction for wallet transactions.")
    if not verbose:
        return row.raw.hex()
    return await _tx_json(request, row, (await _head(request)).height)


@method("decoderawtransaction")
async def decoderawtransaction(request: Request, caller: Principal, params: list[Any]) -> Any:
    return decode_tx(_tx_param(params, 0), deps_of(request).genesis.params)


@method("sendrawtransaction")
async def sendrawtransaction(request: Request, caller: Principal, params: list[Any]) -> Any:
    if not caller.may_write:
        raise RpcError(RPC_FORBIDDEN, f"scope {caller.scope} may only read")
    tx = _tx_param(params, 0)
    if await projection(request).tx(tx.txid) is not None:
        raise RpcError(RPC_VERIFY_ALREADY_IN_CHAIN, "Transaction already in block chain")
    if services(request).ledger is None:
        raise RpcError(RPC_IN_WARMUP, "the Kafka writer is not started")
    sent = await submit_and_wait(request, tx, idempotency_key=f"rpc-{tx.txid}")
    if sent.decided and not sent.committed:
        raise RpcError(RPC_VERIFY_REJECTED, f"{sent.code}: {sent.message}")
    return tx.txid  # committed, or sent and undecided yet (as Core answers for its mempool)


@method("gettxout")
async def gettxout(request: Request, caller: Principal, params: list[Any]) -> Any:
    txid = _hash_param(params, 0, "txid")
    index = _param(params, 1, int, "n")
    if index < 0:
        raise RpcError(RPC_INVALID_PARAMETER, "Invalid parameter, vout cannot be negative")
    if index > OUTPUT_INDEX_MAX:
        return None
    row = await projection(request).output(txid, index)
    if row is None or row.spent_by_txid is not None:
        return None
    head = await _head(request)
    params_ = deps_of(request).genesis.params
    return {"bestblock": head.hash, "confirmations": head.height - row.height + 1,
            "value": amount(row.value),
            "scriptPubKey": script_pubkey_json(row.script_pubkey, params_),
            "coinbase": row.height == 0}


@method("validateaddress")
async def validateaddress(request: Request, caller: Principal, params: list[Any]) -> Any:
    address = _param(params, 0, str, "address")
    chain = deps_of(request).genesis.params
    try:
        script = address_to_script(address, p2pkh_version=chain.p2pkh_version,
                                   p2sh_version=chain.p2sh_version)
    except ValidationError as error:
        return {"isvalid": False, "error": str(error), "error_locations": []}
    return {"isvalid": True, "address": address, "scriptPubKey": script.hex(),
            "isscript": classify(script) is ScriptTemplate.P2SH, "iswitness": False}


def _status_of(error: dict[str, Any] | None) -> int:
    if error is None:
        return 200
    return {RPC_INVALID_REQUEST: 400, RPC_METHOD_NOT_FOUND: 404}.get(error["code"], 500)


async def _call(request: Request, caller: Principal, call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        return {"result": None, "error": {"code": RPC_INVALID_REQUEST,
                                          "message": "Invalid Request object"}, "id": None}
    call_id = call.get("id")
    name, params = call.get("method"), call.get("params", [])
    try:
        if not isinstance(name, str):
            raise RpcError(RPC_INVALID_REQUEST, "Method must be a string")
        if params is None:
            params = []
        if not isinstance(params, list):
            raise RpcError(RPC_INVALID_REQUEST, "Params must be an array")
        handler = METHODS.get(name)
        if handler is None:
            raise RpcError(RPC_METHOD_NOT_FOUND, "Method not found")
        result = await handler(request, caller, params)
        return {"result": result, "error": None, "id": call_id}
    except RpcError as error:
        return {"result": None, "error": {"code": error.code, "message": error.message},
                "id": call_id}
    except asyncio.CancelledError:
        raise
    except Exception as error:  # never a traceback to the caller, never a crash
        return {"result": None, "error": {"code": RPC_MISC_ERROR,
                                          "message": f"internal error ({type(error).__name__})"},
                "id": call_id}


def _reply(body: Any, status: int) -> Response:
    return Response(dumps_exact(body) + "\n", status_code=status, media_type="application/json")


async def json_rpc(request: Request) -> Response:
    caller = basic_client(request, realm="jsonrpc")
    try:
        payload = json.loads(await request.body(), parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        return _reply({"result": None, "error": {"code": RPC_PARSE_ERROR,
                                                 "message": "Parse error"}, "id": None}, 500)
    if isinstance(payload, list):
        if len(payload) > BATCH_CALLS_MAX:
            return _reply({"result": None, "error": {
                "code": RPC_INVALID_REQUEST,
                "message": f"at most {BATCH_CALLS_MAX} calls in a batch"}, "id": None}, 400)
        return _reply([await _call(request, caller, call) for call in payload], 200)
    answer = await _call(request, caller, payload)
    return _reply(answer, _status_of(answer["error"]))


for _path in ("/", "/rpc"):
    router.post(_path, operation_id=f"json_rpc{_path.replace('/', '_')}",
                summary="Bitcoin Core JSON-RPC 1.0")(json_rpc)

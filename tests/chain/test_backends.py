"""Both chain backends against local servers that answer with the real protocols' shapes."""
from __future__ import annotations

import base64

import pytest
from aiohttp import web

from service.chain.backends import Bitcoind, ChainError, Esplora


@pytest.fixture
async def bitcoind(aiohttp_server, tmp_path):
    """A JSON-RPC 1.0 endpoint with cookie auth, like bitcoind's."""
    calls: list[dict] = []
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:s3cret")
    expected = "Basic " + base64.b64encode(b"__cookie__:s3cret").decode()
    state = {"warming": 1}

    async def rpc(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401)
        body = await request.json()
        calls.append(body)
        method, params = body["method"], body["params"]
        if state["warming"]:
            state["warming"] -= 1
            return web.json_response({"result": None, "error": {"code": -28, "message": "Loading block index..."},
                                      "id": body["id"]}, status=500)
        if method == "getblockcount":
            result = 800_010
        elif method == "scantxoutset":
            result = {"success": True, "unspents": [
                {"txid": "aa" * 32, "vout": 1, "scriptPubKey": "0014", "desc": params[1][0], "amount": 0.00025,
                 "height": 800_008}]}
        elif method == "sendrawtransaction":
            if params[0] == "bad":
                return web.json_response({"result": None, "id": body["id"],
                                          "error": {"code": -22, "message": "TX decode failed"}}, status=500)
            result = "bb" * 32
        elif method == "gettxout":   # unspent outputs only (mempool included with the third param)
            result = {"bestblock": "00" * 32, "confirmations": 2, "value": 0.0006,
                      "scriptPubKey": {"address": "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"}} \
                if (params[0], params[1]) == ("cc" * 32, 0) else None
        elif method == "getrawtransaction":
            if params[0] != "dd" * 32:
                return web.json_response({"result": None, "id": body["id"], "error": {
                    "code": -5, "message": "No such mempool or blockchain transaction"}}, status=500)
            result = {"txid": "dd" * 32, "vout": [{"value": 0.001, "n": 0, "scriptPubKey": {"address": "tb1qspent"}}]}
        else:
            return web.json_response({"result": None, "error": {"code": -32601, "message": "Method not found"},
                                      "id": body["id"]}, status=404)
        return web.json_response({"result": result, "error": None, "id": body["id"]})

    app = web.Application()
    app.router.add_post("/", rpc)
    server = await aiohttp_server(app)
    return Bitcoind(str(server.make_url("/")), cookie_file=str(cookie), timeout=5, retries=2), calls


async def test_bitcoind_retries_warmup_and_reads_utxos(bitcoind):
    node, calls = bitcoind
    [utxo] = await node.received("tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm")
    assert (utxo.txid, utxo.vout, utxo.value, utxo.confirmations) == ("aa" * 32, 1, 25_000, 3)
    assert calls[-1]["params"] == ["start", ["addr(tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm)"]]
    assert await node.broadcast("00" * 60) == "bb" * 32
    with pytest.raises(ChainError, match="TX decode failed"):
        await node.broadcast("bad")
    await node.close()


async def test_esplora_reports_unreachable_after_retries():
    node = Esplora("http://127.0.0.1:9", timeout=1, retries=1)
    with pytest.raises(ChainError) as exc:
        await node.broadcast("00")
    assert exc.value.transient and "unreachable" in exc.value.reason
    await node.close()


async def test_esplora_confirmations_and_mempool(esplora):
    address = "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"
    esplora.deposit(address, 5_000, height=esplora.tip - 2)
    esplora.deposit(address, 7_000, height=None)
    node = Esplora(esplora.url, timeout=5, retries=0)
    got = sorted((r.value, r.confirmations) for r in await node.received(address))
    assert got == [(5_000, 3), (7_000, 0)]
    await node.close()


async def test_prevout_on_both_backends(bitcoind, esplora):
    """Is an input's output there, unspent, worth what? (rules 4-6 of the exact-BTC draft)."""
    from bitcoinlib.transactions import Transaction

    from service.chain.backends import Prevout

    node, _ = bitcoind
    assert await node.prevout("cc" * 32, 0) == Prevout("cc" * 32, 0, 60_000, "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", "")
    assert await node.prevout("dd" * 32, 0) == Prevout("dd" * 32, 0, 100_000, "tb1qspent", "?")   # spent
    assert await node.prevout("ee" * 32, 0) is None                                              # unknown
    await node.close()
    from tests.chain.test_onchain import pay

    prev = esplora.fund(100_000)
    raw, txid = pay(esplora, "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", 5_000, prev=prev)
    web_node = Esplora(esplora.url, timeout=5, retries=0)
    assert (await web_node.prevout(prev[0].hex(), 0)).spent_by == ""
    esplora.accept(Transaction.parse_hex(raw, network="testnet"))
    assert await web_node.prevout(prev[0].hex(), 0) == Prevout(prev[0].hex(), 0, 100_000, esplora.index[prev[0].hex()]
                                                               ["vout"][0]["scriptpubkey_address"], txid)
    assert await web_node.prevout(prev[0].hex(), 7) is None and await web_node.prevout("ab" * 32, 0) is None
    await web_node.close()


async def test_esplora_tx_confirmations_is_a_backend_method(esplora):
    """What reorg re-checks and the chain audit ask: unknown (None), in the mempool (0), or n deep."""
    address = "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"
    deep, loose = esplora.deposit(address, 5_000, height=esplora.tip - 2), esplora.deposit(address, 7_000, height=None)
    node = Esplora(esplora.url, timeout=5, retries=0)
    assert [await node.tx_confirmations(t) for t in (deep, loose, "ab" * 32)] == [3, 0, None]
    await node.close()


def test_one_already_known_rule_for_every_broadcast():
    """The on-chain payment and the withdrawal batch read a node's "I have it" answer the same way."""
    from service.chain.backends import already_known

    for answer in ('sendrawtransaction RPC error: {"code":-27,"message":"Transaction already in block chain"}',
                   "bitcoind: Transaction already in block chain (-27)", "txn-already-known", "txn-already-in-mempool",
                   "Transaction already in the mempool"):
        assert already_known(answer), answer
    assert not already_known('{"code":-25,"message":"bad-txns-inputs-missingorspent"}')

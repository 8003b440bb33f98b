"""A local Esplora server answering with the real API's shapes, and an xpub the operator would configure."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

SEED = "000102030405060708090a0b0c0d0e0f"  # BIP32 test vector 1: public test material, testnet only


@dataclass
class FakeEsplora:
    tip: int = 800_000
    txs: dict[str, list[dict]] = field(default_factory=dict)      # address -> esplora tx objects
    utxos: dict[str, list[dict]] = field(default_factory=dict)    # address -> esplora utxo objects
    broadcasts: list[str] = field(default_factory=list)
    reject: str | None = None
    url: str = ""

    def app(self) -> web.Application:
        async def post_tx(request: web.Request) -> web.Response:
            raw = (await request.text()).strip()
            if self.reject:
                return web.Response(status=400, text=self.reject)
            from bitcoinlib.transactions import Transaction

            txid = Transaction.parse_hex(raw, network="testnet").txid
            if raw in self.broadcasts:
                return web.Response(status=400, text="sendrawtransaction RPC error: "
                                                     '{"code":-27,"message":"Transaction already in block chain"}')
            self.broadcasts.append(raw)
            return web.Response(text=txid)

        async def tip(request: web.Request) -> web.Response:
            return web.Response(text=str(self.tip))

        async def address_txs(request: web.Request) -> web.Response:
            return web.json_response(self.txs.get(request.match_info["a"], []))

        async def address_utxo(request: web.Request) -> web.Response:
            return web.json_response(self.utxos.get(request.match_info["a"], []))

        app = web.Application()
        app.router.add_post("/tx", post_tx)
        app.router.add_get("/blocks/tip/height", tip)
        app.router.add_get("/address/{a}/txs", address_txs)
        app.router.add_get("/address/{a}/utxo", address_utxo)
        return app

    def deposit(self, address: str, value: int, *, height: int | None, txid: str | None = None) -> str:
        """A tx paying `address`, confirmed at `height` (None: in the mempool)."""
        txid = txid or os.urandom(32).hex()
        status: dict[str, Any] = {"confirmed": height is not None}
        if height is not None:
            status["block_height"] = height
        self.txs.setdefault(address, []).append({
            "txid": txid, "status": status,
            "vout": [{"scriptpubkey_address": "tb1qother", "value": 1000},
                     {"scriptpubkey_address": address, "value": value}]})
        self.utxos.setdefault(address, []).append({"txid": txid, "vout": 1, "value": value, "status": status})
        return txid


@pytest.fixture
async def esplora(aiohttp_server) -> FakeEsplora:
    fake = FakeEsplora()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def operator_key():
    """The operator's account key (m/84'/1'/0'); only its vpub goes to the server."""
    from bitcoinlib.keys import HDKey

    return HDKey.from_seed(SEED, network="testnet", witness_type="segwit").subkey_for_path("m/84'/1'/0'")


@pytest.fixture
def chain_app(make_app, esplora, operator_key):
    def make(**overrides: Any) -> Any:
        return make_app(payee_xpub=operator_key.public().wif(), chain="esplora", chain_url=esplora.url, **overrides)
    return make

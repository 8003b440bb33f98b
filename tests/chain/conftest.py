"""A local Esplora server answering with the real API's shapes, and an xpub the operator would configure."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
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
    index: dict[str, dict] = field(default_factory=dict)          # txid -> esplora tx object (GET /tx/:txid)
    spends: dict[tuple[str, int], str] = field(default_factory=dict)  # (txid, vout) -> spending txid
    lose_answers: int = 0   # broadcasts the network takes whose answer is then lost (502)
    stall: Any = None       # an asyncio.Event: a broadcast the network took answers (502) only once it is set

    def app(self) -> web.Application:
        async def post_tx(request: web.Request) -> web.Response:
            raw = (await request.text()).strip()
            if self.reject:
                return web.Response(status=400, text=self.reject)
            from bitcoinlib.transactions import Transaction

            tx = Transaction.parse_hex(raw, network="testnet")
            txid = tx.txid
            if raw in self.broadcasts or txid in self.index:
                if self.lose_answers:
                    self.lose_answers -= 1
                    return web.Response(status=502, text="bad gateway")
                return web.Response(status=400, text="sendrawtransaction RPC error: "
                                                     '{"code":-27,"message":"Transaction already in block chain"}')
            for i in tx.inputs:
                spent = self.spends.get((i.prev_txid.hex(), i.output_n_int))
                if spent and spent != txid:
                    return web.Response(status=400, text="sendrawtransaction RPC error: "
                                                         '{"code":-25,"message":"bad-txns-inputs-missingorspent"}')
            self.broadcasts.append(raw)
            self.accept(tx)
            if self.stall is not None:  # the window between the network taking it and the caller hearing so
                await self.stall.wait()
                return web.Response(status=502, text="bad gateway")
            if self.lose_answers:
                self.lose_answers -= 1
                return web.Response(status=502, text="bad gateway")
            return web.Response(text=txid)

        async def get_tx(request: web.Request) -> web.Response:
            tx = self.index.get(request.match_info["txid"])
            if tx is None:
                return web.Response(status=404, text="Transaction not found")
            return web.json_response(tx)

        async def outspend(request: web.Request) -> web.Response:
            key = (request.match_info["txid"], int(request.match_info["vout"]))
            if key not in self.spends:
                return web.json_response({"spent": False})
            spender = self.spends[key]
            vin = next(n for n, i in enumerate(self.index[spender]["vin"]) if (i["txid"], i["vout"]) == key)
            return web.json_response({"spent": True, "txid": spender, "vin": vin,
                                      "status": self.index[spender]["status"]})

        async def tip(request: web.Request) -> web.Response:
            return web.Response(text=str(self.tip))

        async def address_txs(request: web.Request) -> web.Response:
            return web.json_response(self.txs.get(request.match_info["a"], []))

        async def address_utxo(request: web.Request) -> web.Response:
            return web.json_response(self.utxos.get(request.match_info["a"], []))

        async def tx_status(request: web.Request) -> web.Response:
            for txs in self.txs.values():
                for tx in txs:
                    if tx["txid"] == request.match_info["txid"]:
                        return web.json_response(tx["status"])
            return web.Response(status=404, text="Transaction not found")

        app = web.Application()
        app.router.add_get("/tx/{txid}/status", tx_status)
        app.router.add_post("/tx", post_tx)
        app.router.add_get("/blocks/tip/height", tip)
        app.router.add_get("/address/{a}/txs", address_txs)
        app.router.add_get("/address/{a}/utxo", address_utxo)
        app.router.add_get("/tx/{txid}", get_tx)
        app.router.add_get("/tx/{txid}/outspend/{vout}", outspend)
        return app

    def accept(self, tx: Any, height: int | None = None) -> str:
        """Index a bitcoinlib transaction as Esplora would once it reached the mempool (or a block):
        its inputs become spent, its outputs show under their addresses."""
        status: dict[str, Any] = {"confirmed": height is not None}
        if height is not None:
            status["block_height"] = height
        obj = {"txid": tx.txid, "status": status,
               "vin": [{"txid": i.prev_txid.hex(), "vout": i.output_n_int} for i in tx.inputs],
               "vout": [{"scriptpubkey_address": o.address, "value": int(o.value)} for o in tx.outputs]}
        self.index[tx.txid] = obj
        for i in obj["vin"]:
            self.spends[(i["txid"], i["vout"])] = tx.txid
            for utxos in self.utxos.values():
                utxos[:] = [u for u in utxos if (u["txid"], u["vout"]) != (i["txid"], i["vout"])]
        for n, o in enumerate(obj["vout"]):
            if o["scriptpubkey_address"]:
                self.txs.setdefault(o["scriptpubkey_address"], []).append(obj)
                self.utxos.setdefault(o["scriptpubkey_address"], []).append(
                    {"txid": tx.txid, "vout": n, "value": o["value"], "status": status})
        return tx.txid

    def mine(self, txid: str, confirmations: int = 1) -> None:
        """Confirm a known transaction so that it has `confirmations` now."""
        status = {"confirmed": True, "block_height": self.tip - confirmations + 1}
        self.index[txid]["status"] = status
        for utxos in self.utxos.values():
            for u in utxos:
                if u["txid"] == txid:
                    u["status"] = status

    def fund(self, value: int, address: str = "tb1qfunding0000000000000000000000000000000") -> tuple[bytes, int]:
        """A confirmed output of `value` sat a payer's wallet can spend: (prev txid bytes, vout)."""
        txid = os.urandom(32).hex()
        self.index[txid] = {"txid": txid, "status": {"confirmed": True, "block_height": self.tip - 10}, "vin": [],
                            "vout": [{"scriptpubkey_address": address, "value": value}]}
        return bytes.fromhex(txid), 0

    def deposit(self, address: str, value: int, *, height: int | None, txid: str | None = None) -> str:
        """A tx paying `address`, confirmed at `height` (None: in the mempool)."""
        txid = txid or os.urandom(32).hex()
        status: dict[str, Any] = {"confirmed": height is not None}
        if height is not None:
            status["block_height"] = height
        obj = {"txid": txid, "status": status, "vin": [],
               "vout": [{"scriptpubkey_address": "tb1qother", "value": 1000},
                        {"scriptpubkey_address": address, "value": value}]}
        self.txs.setdefault(address, []).append(obj)
        self.index.setdefault(txid, obj)
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


@dataclass
class ChainRig:
    """The real app with chain rails on the test Redis, its operator CLI (`python -m service` in a
    subprocess, run without blocking the loop that serves the local Esplora), and user helpers."""

    url: str
    env: dict[str, str]
    http: Any
    esplora: FakeEsplora
    ledger: Any
    book: Any
    payouts: Any

    async def cli(self, *args: str, **env: str) -> tuple[int, str, str]:
        import asyncio
        import sys

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *args, env={**self.env, **env}, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    async def user(self, amount: int) -> Any:
        import uuid

        from service.client import PaidSession, Wallet

        wallet = Wallet.generate(f"u{uuid.uuid4().hex[:10]}")
        async with PaidSession(wallet, max_price=0, session=self.http) as s:
            assert (await s.register(self.url))[0] == 201
        if amount:
            async with self.http.post(f"{self.url}/v1/admin/credits", headers={"Authorization": f"Bearer {ADMIN}"},
                                      json={"username": wallet.username, "amount": amount, "reason": "test"}) as r:
                assert r.status == 201, await r.text()
        return wallet

    async def signed(self, wallet: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        from service.client import PaidSession

        async with PaidSession(wallet, session=self.http) as s:
            return await s.signed(method, f"{self.url}{path}", body)

    async def float_coins(self, value: int) -> str:
        """A confirmed output on an address of the operator's wallet (what batches spend): the operator's
        own coins, outside the ledger like batch change (not a deposit: no account is credited)."""
        address = await self.book._new("float")
        self.esplora.deposit(address, value, height=self.esplora.tip - 10)
        return address

    async def sign(self, psbt_b64: str) -> str:
        """The operator's offline signer: signs every input of ours with keys from the test seed."""
        from embit import bip32
        from embit.networks import NETWORKS
        from embit.psbt import PSBT

        psbt = PSBT.from_string(psbt_b64)
        root = bip32.HDKey.from_seed(bytes.fromhex(SEED), version=NETWORKS["test"]["xprv"])
        for address in await self.book.all_addresses():
            psbt.sign_with(root.derive(f"m/84h/1h/0h/0/{int((await self.book.info(address))['index'])}"))
        return psbt.to_string()


ADMIN = "test-admin-token-3f9a"
ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def chain_rig(aiohttp_server, chain_app, esplora, ledger, settings, operator_key, http, tmp_path):
    """make(**settings overrides) → a ChainRig; the CLI gets the same settings through its environment."""
    from service.chain.addresses import AddressBook
    from service.payouts import Payouts

    async def make(**overrides: Any) -> ChainRig:
        server = await aiohttp_server(chain_app(**overrides))
        s = settings.with_(**overrides)
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADMIN_TOKEN")}
        env.update(REDIS_URL=s.redis_url, REDIS_PREFIX=s.redis_prefix, PAYEE_XPUB=operator_key.public().wif(),
                   CHAIN="esplora", CHAIN_URL=esplora.url, NETWORK=s.network, MICROTASKS_VAR=str(tmp_path / "var"),
                   MINIMUM_WITHDRAWAL=str(s.minimum_withdrawal), WITHDRAWAL_HOLD_DAYS=str(s.withdrawal_hold_days),
                   DEPOSIT_CONFIRMATIONS=str(s.deposit_confirmations), LOG_LEVEL="warning")
        if hasattr(s, "reorg_safe_depth"):
            env["REORG_SAFE_DEPTH"] = str(s.reorg_safe_depth)
        for name, value in s.extra.items():
            env[name] = str(value)
        book = AddressBook(ledger.redis, s.redis_prefix, operator_key.public().wif(), s.network)
        payouts = Payouts(ledger.redis, s.redis_prefix, ledger, network=s.network, hold_days=s.withdrawal_hold_days,
                          minimum_withdrawal=s.minimum_withdrawal)
        payouts.owns = book.owns
        return ChainRig(str(server.make_url("")).rstrip("/"), env, http, esplora, ledger, book, payouts)
    return make

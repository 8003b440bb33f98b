"""On-chain payment of one call (21's OnChain): transactions built for real with bitcoinlib."""
from __future__ import annotations

import os

import pytest

from service.ledger import BITCOIN, REVENUE, onchain_account

MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
PRICE = 120


def pay(esplora, address: str, amount: int, *, extra_output: str | None = None, change: int = 90_000,
        fund: int = 100_000, prev: tuple[bytes, int] | None = None, locktime: int = 0,
        sequence: int = 0xFFFFFFFF, outputs: list[tuple[int, str]] | None = None) -> tuple[str, str]:
    """A signed testnet transaction paying `amount` to `address` from a confirmed output the fake Esplora
    knows (`fund` sat, or `prev`); (raw hex, txid)."""
    from bitcoinlib.keys import HDKey
    from bitcoinlib.transactions import Transaction

    payer = HDKey(network="testnet", witness_type="segwit")
    prev_txid, vout = prev or esplora.fund(fund)
    tx = Transaction(network="testnet", witness_type="segwit", locktime=locktime)
    tx.add_input(prev_txid=prev_txid, output_n=vout, keys=payer, value=fund, witness_type="segwit", sequence=sequence)
    tx.add_output(amount, address)
    for value, to in outputs or []:
        tx.add_output(value, to)
    if change:
        tx.add_output(change, extra_output or payer.address())
    tx.sign_and_update()
    return tx.raw_hex(), tx.txid


@pytest.fixture
async def url(aiohttp_server, chain_app) -> str:
    server = await aiohttp_server(chain_app())
    return str(server.make_url("/v1/qa/validate"))


async def invoice_address(http, url) -> str:
    async with http.post(url, data=MANIFEST) as r:
        assert r.status == 402
        body = await r.json()
    methods = {a["extra"]["method"]: a for a in body["accepts"]}
    assert methods["onchain"]["payTo"] == r.headers["Bitcoin-Address"] == body["invoice"]["address"]
    return r.headers["Bitcoin-Address"]


async def test_onchain_payment_is_served_once(http, url, esplora, ledger, operator_key):
    address = await invoice_address(http, url)
    assert address == operator_key.subkey_for_path("0/0").address()  # derived from the vpub, index 0
    raw, txid = pay(esplora, address, 600)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Payment-Receipt"] == f"tx_{txid}"
    assert esplora.broadcasts == [raw]
    # the whole 600 sat entered the books: the price is revenue, the rest waits in the payment's account
    assert (await ledger.balance(REVENUE)).posted == PRICE and (await ledger.balance(BITCOIN)).posted == -600
    assert (await ledger.balance(onchain_account(txid))).available == 600 - PRICE
    assert (await ledger.transfer(f"coin:{txid}:0"))["amount"] == "600"
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert r.status == 409 and body["error"] == "payment_replayed" and f"tx_{txid}" in body["detail"]
    assert (await ledger.balance(REVENUE)).posted == PRICE
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("case,status,code", [
    ("underpaid", 402, "underpaid"),
    ("wrong address", 402, "wrong_address"),
    ("dust", 402, "dust"),
    ("malformed hex", 400, "malformed_transaction"),
    ("not a transaction", 400, "malformed_transaction"),
])
async def test_bad_onchain_payments_change_nothing(http, url, esplora, ledger, case, status, code):
    address = await invoice_address(http, url)
    raw = {
        "underpaid": lambda: pay(esplora, address, 100)[0],
        "wrong address": lambda: pay(esplora, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600)[0],
        "dust": lambda: pay(esplora, address, 300)[0],   # covers the price but is below the dust limit
        "malformed hex": lambda: "zz" * 40,
        "not a transaction": lambda: "00" * 40,
    }[case]()
    journal = await ledger.redis.xlen(ledger.journal_key)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (status, code), body
    assert esplora.broadcasts == [] and await ledger.redis.xlen(ledger.journal_key) == journal


async def test_refused_broadcast_records_nothing_and_the_same_tx_can_be_retried(http, url, esplora, ledger):
    address = await invoice_address(http, url)
    raw, _ = pay(esplora, address, 600)
    esplora.reject = "sendrawtransaction RPC error: {\"code\":-26,\"message\":\"min relay fee not met\"}"
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (400, "broadcast_rejected") and "min relay fee" in body["detail"]
    assert (await ledger.balance(REVENUE)).posted == 0
    esplora.reject = None
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200
    assert (await ledger.reconcile()).ok


async def test_failed_call_keeps_the_coins_on_the_books(http, esplora, ledger, aiohttp_server, chain_app):
    from aiohttp import web

    from service.pricing import priced

    @priced("qa.validate")
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    app = chain_app()
    app.router.add_post("/test/boom", boom)
    server = await aiohttp_server(app)
    url = str(server.make_url("/test/boom"))
    async with http.post(url, data=b"{}") as r:
        address = r.headers["Bitcoin-Address"]
    raw, txid = pay(esplora, address, 600)
    async with http.post(url, data=b"{}", headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 503
    assert (await ledger.balance(REVENUE)).posted == 0
    assert (await ledger.balance(onchain_account(txid))).available == 600   # kept for a refund
    assert (await ledger.balance(BITCOIN)).posted == -600
    assert (await ledger.reconcile()).ok


async def test_price_above_the_zeroconf_limit_offers_no_onchain_payment(http, aiohttp_server, chain_app, esplora):
    server = await aiohttp_server(chain_app(onchain_max_zeroconf=100))
    async with http.post(server.make_url("/v1/qa/validate"), data=MANIFEST) as r:
        methods = [a["extra"]["method"] for a in (await r.json())["accepts"]]
    assert "onchain" not in methods and "bittransfer" in methods
    raw, _ = pay(esplora, r.headers["Bitcoin-Address"], 600)
    async with http.post(server.make_url("/v1/qa/validate"), data=MANIFEST,
                         headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "zeroconf_limit"


async def test_invoices_never_share_an_address_when_the_pool_is_leased(http, url):
    """Attack: 30 anonymous 402s in a row; the 21st+ used to get an address already leased to another
    invoice. Now each address is one invoice's; past the gap limit the 402 offers no on-chain payment."""
    addresses = [await invoice_address(http, url) for _ in range(20)]
    assert len(set(addresses)) == 20  # one per outstanding invoice, up to the gap limit
    for _ in range(10):
        async with http.post(url, data=MANIFEST) as r:
            body = await r.json()
        assert r.status == 402 and "onchain" not in [a["extra"]["method"] for a in body["accepts"]]
        assert body["invoice"]["address"] not in addresses


async def test_client_pays_on_chain_through_a_signer_callback(http, url, esplora, ledger):
    from service.client import PaidSession

    signed: list[tuple[str, int]] = []

    async def signer(address: str, amount: int) -> str:
        signed.append((address, amount))
        return pay(esplora, address, max(amount, 600))[0]

    async with PaidSession(max_price=500, onchain_signer=signer, session=http) as s:
        status, body, headers = await s.request("POST", url, data=MANIFEST)
    assert status == 200 and headers["Payment-Receipt"].startswith("tx_") and signed[0][1] == PRICE
    assert s.payments[0].amount == PRICE and len(esplora.broadcasts) == 1

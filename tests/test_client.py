"""The paying client library against the real server (and a 21-style server)."""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from service import crypto
from service.client import BudgetExceeded, PaidSession, PaymentRejected, Wallet
from service.ledger import user_account

PRICE = 120


async def test_budget_refuses_before_paying(http, base_url, funded, manifest, ledger):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, budget=200, session=http) as s:
        status, _, _ = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
        assert status == 200
        with pytest.raises(BudgetExceeded):
            await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
        assert s.spent == PRICE and len(s.payments) == 1
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE


async def test_rejection_raises_with_the_servers_reason(http, base_url, manifest):
    stranger = Wallet.generate("never-registered")
    async with PaidSession(stranger, max_price=500, session=http) as s:
        with pytest.raises(PaymentRejected) as exc:
            await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
    assert (exc.value.status, exc.value.reason) == (401, "unknown_payer")


async def test_discover_lists_priced_operations(http, base_url):
    async with PaidSession(session=http) as s:
        ops = await s.discover(base_url)
    by_path = {op.path: op for op in ops}
    op = by_path["/v1/qa/validate"]
    assert (op.method, op.price["amount"], op.price["per_unit"]) == ("POST", 100, 20)
    assert op.fixed_price() is None
    assert set(by_path["/v1/qa/runs"].price["variants"]) >= {"schema"}


async def test_pays_a_server_that_speaks_only_21_headers(aiohttp_server, http):
    """A two1-era server: 402 with Price / Bitcoin-Address / Username and no JSON body."""
    seen: list[dict] = []

    async def paid(request: web.Request) -> web.Response:
        transfer = request.headers.get("Bitcoin-Transfer")
        if not transfer:
            return web.Response(status=402, headers={"Price": "250", "Bitcoin-Address": "1Payee", "Username": "bob"})
        body = json.loads(transfer)
        ok = crypto.verify(crypto.parse_pubkey(body["payer_pubkey"]), request.headers["Authorization"], transfer.encode())
        seen.append(body)
        return web.json_response({"ok": ok})

    app = web.Application()
    app.router.add_get("/fortune", paid)
    server = await aiohttp_server(app)
    async with PaidSession(Wallet.generate("alice"), max_price=300, session=http) as s:
        status, body, _ = await s.request("GET", str(server.make_url("/fortune")))
    assert status == 200 and body == {"ok": True}
    assert {k: seen[0][k] for k in ("payer", "payee_username", "payee_address", "amount")} == {
        "payer": "alice", "payee_username": "bob", "payee_address": "1Payee", "amount": 250}
    assert seen[0]["payer_pubkey"].endswith("\n")  # base64 with two1's trailing newline

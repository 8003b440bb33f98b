"""Dollar prices: converted at the current rate, rounded up, recorded on the invoice; no fresh rate → 503."""
from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from aiohttp import web

from service.client import PaidSession
from service.errors import ServiceUnavailable
from service.rates import FixedRate, HttpRate, Rate, parse_usd, usd_to_sats


@pytest.mark.parametrize("usd,rate,sats", [("0.05", "60000", 84), ("1", "100000", 1000), ("$0.01", "99999.99", 11)])
def test_conversion_rounds_up(usd, rate, sats):
    assert usd_to_sats(parse_usd(usd), Rate(Decimal(rate), "t", 0)) == sats


@pytest.mark.parametrize("bad", ["0", "-1", "0.001", "abc", "$"])
def test_bad_dollar_amounts(bad):
    with pytest.raises(ValueError):
        parse_usd(bad)


async def expert_in_usd(http, base_url, funded, usd="0.05"):
    expert = await funded(0)
    async with PaidSession(expert, session=http) as s:
        status, profile = await s.signed("PUT", f"{base_url}/v1/experts/me", {"display_name": "E", "price_usd": usd})
    assert status == 200 and profile["price_usd"] == usd and profile["price"] is None
    return expert


async def test_usd_priced_question_invoice_records_rate_and_source(http, base_url, funded, ledger):
    expert = await expert_in_usd(http, base_url, funded)
    url = f"{base_url}/v1/experts/{expert.username}/questions"
    async with http.post(url, json={"text": "?"}) as r:
        body = await r.json()
    assert r.status == 402 and r.headers["Price"] == "84"
    assert body["invoice"]["fiat"]["amount"] == "0.05" and body["invoice"]["fiat"]["usd_per_btc"] == "60000"
    assert body["invoice"]["fiat"]["rate_source"] == "fixed (USD_RATE)"
    asker = await funded(1000)
    async with PaidSession(asker, max_price=100, session=http) as s:
        status, q, _ = await s.request("POST", url, data=b'{"text": "?"}', headers={"Content-Type": "application/json"})
    assert status == 201 and q["money"]["escrow"] == 84


@pytest.fixture
async def rate_server(aiohttp_server):
    state = {"value": 50000, "fail": False, "calls": 0}

    async def rate(request: web.Request) -> web.Response:
        state["calls"] += 1
        if state["fail"]:
            return web.Response(status=502)
        return web.json_response({"bitcoin": {"usd": state["value"]}})

    app = web.Application()
    app.router.add_get("/price", rate)
    server = await aiohttp_server(app)
    return str(server.make_url("/price")), state


async def test_live_rate_is_cached_and_a_stale_one_is_never_used(rate_server):
    url, state = rate_server
    source = HttpRate(url, "bitcoin.usd", max_age=1)
    assert (await source.current()).usd_per_btc == 50000
    state["value"], state["fail"] = 70000, True
    assert (await source.current()).usd_per_btc == 50000 and state["calls"] == 1  # cached
    await asyncio.sleep(1.1)
    with pytest.raises(ServiceUnavailable) as exc:
        await source.current()
    assert exc.value.code == "rate_unavailable"
    state["fail"] = False
    assert (await source.current()).usd_per_btc == 70000


async def test_usd_route_answers_503_without_a_fresh_rate(http, aiohttp_server, make_app, rate_server, funded):
    url, state = rate_server
    state["fail"] = True
    server = await aiohttp_server(make_app(usd_rate_url=url))
    base = str(server.make_url("")).rstrip("/")
    from service.client import Wallet

    expert = Wallet.generate("usd-expert")
    async with PaidSession(expert, session=http) as s:
        await s.register(base)
        await s.signed("PUT", f"{base}/v1/experts/me", {"display_name": "E", "price_usd": "1.00"})
    async with http.post(f"{base}/v1/experts/{expert.username}/questions", json={"text": "?"}) as r:
        assert r.status == 503 and (await r.json())["error"] == "rate_unavailable"


def test_fixed_rate_is_the_offline_default():
    assert asyncio.run(FixedRate("60000").current()).usd_per_btc == 60000

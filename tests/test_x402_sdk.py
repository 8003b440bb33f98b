"""Coinbase's x402 SDK (PyPI `x402`) pays POST /v1/qa/validate with our plug-in (service/x402_plugin.py),
through its own httpx and requests wrappers: nothing here speaks x402 but the SDK."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from service.keys import REVENUE, user_account
from service.payment_auth import receipt_reference

x402 = pytest.importorskip("x402", reason="the [x402] extra is not installed")

PRICE = 120  # one document


def _settled(headers) -> object:
    from x402.schemas import SettleResponse

    return SettleResponse.model_validate_json(base64.b64decode(headers["PAYMENT-RESPONSE"]))


async def test_the_sdk_pays_through_httpx_once_and_a_replay_is_refused(base_url, funded, ledger, manifest):
    from x402 import x402Client
    from x402.http.clients import wrapHttpxWithPayment

    from service.x402_plugin import register_bittransfer

    import httpx

    wallet = await funded(1000)
    sent = []

    class Recording(httpx.AsyncHTTPTransport):  # what the SDK puts on the wire, under its transport
        async def handle_async_request(self, request):
            if "PAYMENT-SIGNATURE" in request.headers:
                sent.append(request.headers["PAYMENT-SIGNATURE"])
            return await super().handle_async_request(request)

    client = register_bittransfer(x402Client(), wallet, max_sat=500)
    async with wrapHttpxWithPayment(client) as http:
        http._transport = x402.http.clients.httpx.x402AsyncTransport(client, Recording())
        r = await http.post(f"{base_url}/v1/qa/validate", content=manifest)
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True
    settled = _settled(r.headers)
    assert settled.success and settled.payer == wallet.pubkey.hex() and settled.transaction == receipt_reference(r.headers["Payment-Receipt"])
    assert settled.extensions == {"username": wallet.username}
    assert json.loads(base64.b64decode(sent[0]))["accepted"]["scheme"] == "bittransfer"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE
    async with httpx.AsyncClient() as plain:  # the same payment replayed for another request
        r = await plain.post(f"{base_url}/v1/qa/validate", content=manifest.replace(b"settings", b"other"),
                             headers={"PAYMENT-SIGNATURE": sent[0]})
    assert r.status_code in (402, 409, 422) and _settled(r.headers).success is False
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE
    assert (await ledger.balance(REVENUE)).posted == PRICE


async def test_the_sdk_pays_through_requests(base_url, funded, ledger, manifest):
    import requests
    from x402 import x402ClientSync
    from x402.http.clients import wrapRequestsWithPayment

    from service.x402_plugin import register_bittransfer

    wallet = await funded(1000)
    session = wrapRequestsWithPayment(requests.Session(), register_bittransfer(x402ClientSync(), wallet, max_sat=500))
    r = await asyncio.to_thread(session.post, f"{base_url}/v1/qa/validate", data=manifest, timeout=30)
    assert r.status_code == 200, r.text
    assert _settled(r.headers).success
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE


async def test_the_sdk_refuses_a_price_above_the_spend_control(base_url, funded, ledger, manifest):
    from x402 import x402Client
    from x402.http.clients import wrapHttpxWithPayment

    from service.x402_plugin import register_bittransfer

    wallet = await funded(1000)
    client = register_bittransfer(x402Client(), wallet, max_sat=PRICE - 1)
    async with wrapHttpxWithPayment(client) as http:
        with pytest.raises(Exception):
            r = await http.post(f"{base_url}/v1/qa/validate", content=manifest)
            assert r.status_code != 200
            raise RuntimeError("not paid")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000


@pytest.mark.parametrize("path", ["/discovery/resources", "/.well-known/x402"])
async def test_discovery_parses_with_the_sdks_models_and_agrees_with_the_402(http, base_url, manifest, path):
    """The Bazaar list shape: pagination, ISO 8601 lastUpdated, description and service fields at the top,
    concrete URLs only, the amount a 402 asks for the smallest request; every 402 carries extensions.bazaar."""
    from datetime import datetime

    from x402.extensions.bazaar import extract_discovery_info
    from x402.extensions.bazaar.facilitator_client import _parse_list_response

    async with http.get(f"{base_url}{path}?limit=1&offset=1") as r:
        assert r.status == 200
        first = await r.json()
    async with http.get(f"{base_url}{path}") as r:
        listing = _parse_list_response(await r.json())
    assert first["pagination"] == {"limit": 1, "offset": 1, "total": listing.pagination.total}
    assert [i["resource"] for i in first["items"]] == [listing.items[1].resource]
    assert listing.pagination.total == len(listing.items) >= 2
    for item in listing.items:
        assert "{" not in item.resource and item.resource.startswith(base_url)
        assert item.description and item.mime_type == "application/json" and item.service_name and item.tags
        datetime.fromisoformat(item.last_updated.replace("Z", "+00:00"))
        assert all(int(a["amount"]) > 0 for a in item.accepts)
    validate = next(i for i in listing.items if i.resource.endswith("/v1/qa/validate"))
    async with http.post(f"{base_url}/v1/qa/validate", data=manifest) as r:
        required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    assert validate.accepts[0]["amount"] == required["accepts"][0]["amount"] == str(PRICE)
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0],
               "payload": {}, "extensions": required["extensions"]}
    found = extract_discovery_info(payload, required["accepts"][0])
    assert found is not None and found.method == "POST"

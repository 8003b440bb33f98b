"""Spending tokens: issued by the account key, pay within their caveats, never overspent."""
from __future__ import annotations

import asyncio
import time

import pytest

from service.client import PaidSession, PriceTooHigh
from service.ledger import user_account
from service.payment_auth import receipt_reference

PRICE = 120  # one ConfigMap on /v1/qa/validate


async def issue(http, base_url, wallet, **caveats):
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 10_000, **caveats})
    assert status == 201, body
    return body


async def pay_with(http, url, token, data, **headers):
    async with http.post(url, data=data, headers={"Authorization": f"Token {token}", **headers}) as r:
        return r.status, await r.json(), r.headers


async def test_token_pays_within_its_caveats_and_is_listed_without_secret(http, base_url, funded, manifest, ledger):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet, label="ci", max_per_call=500, routes=["/v1/qa/"])
    status, body, headers = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
    assert status == 200 and receipt_reference(headers["Payment-Receipt"]).startswith("tok_")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE
    async with PaidSession(wallet, session=http) as s:
        status, listed = await s.signed("GET", f"{base_url}/v1/accounts/me/tokens")
        status_r, receipt = await s.signed_get(f"{base_url}/v1/receipts/{receipt_reference(headers['Payment-Receipt'])}")
    [t] = listed["tokens"]
    assert (t["id"], t["spent"], t["remaining"], t["label"]) == (token["id"], PRICE, 10_000 - PRICE, "ci")
    secret = token["token"].split(".")[1]
    assert secret not in str(listed) and "secret_hash" not in t
    assert status_r == 200 and receipt["method"] == "token"


@pytest.mark.parametrize("caveats,status,code", [
    ({"routes": ["/v1/experts/"]}, 403, "token_route"),
    ({"max_per_call": PRICE - 1}, 403, "token_max_per_call"),
    ({"max_total": PRICE - 1}, 403, "token_max_total"),
])
async def test_caveats_refuse_and_change_nothing(http, base_url, funded, manifest, ledger, caveats, status, code):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet, **caveats)
    got, body, _ = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
    assert (got, body["error"]) == (status, code)
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000
    assert (await ledger.token(token["id"]))["spent"] == 0


async def test_expired_token_is_refused(http, base_url, funded, manifest, ledger):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet, expires_at=int(time.time()) + 1)
    await asyncio.sleep(2.1)
    status, body, _ = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
    assert (status, body["error"]) == (401, "token_expired")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000


async def test_token_cannot_be_issued_already_expired(http, base_url, funded):
    wallet = await funded(0)
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens",
                                      {"max_total": 5, "expires_at": int(time.time()) - 10})
    assert status == 422 and "expires_at" in body["detail"]


async def test_revoked_or_wrong_secret_is_refused(http, base_url, funded, manifest):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet)
    token_id = token["id"]
    status, body, _ = await pay_with(http, f"{base_url}/v1/qa/validate", f"{token_id}.{'x' * 32}", manifest)
    assert (status, body["error"]) == (401, "token_invalid")
    async with PaidSession(wallet, session=http) as s:
        status, _ = await s.signed("DELETE", f"{base_url}/v1/accounts/me/tokens/{token_id}")
    assert status == 200
    status, body, _ = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
    assert (status, body["error"]) == (401, "token_revoked")


async def test_only_the_owner_can_revoke(http, base_url, funded):
    alice, mallory = await funded(0), await funded(0)
    token = await issue(http, base_url, alice)
    async with PaidSession(mallory, session=http) as s:
        status, body = await s.signed("DELETE", f"{base_url}/v1/accounts/me/tokens/{token['id']}")
    assert status == 404 and body["error"] == "unknown_token"


async def test_token_management_needs_the_account_signature(http, base_url):
    async with http.post(f"{base_url}/v1/accounts/me/tokens", json={"max_total": 5}) as r:
        assert r.status == 401


async def test_50_concurrent_calls_never_overspend_max_total(http, base_url, funded, manifest, ledger):
    wallet = await funded(100_000)
    token = await issue(http, base_url, wallet, max_total=10 * PRICE)
    results = await asyncio.gather(*[pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
                                     for _ in range(50)])
    codes = sorted((status, body.get("error", "")) for status, body, _ in results)
    assert codes.count((200, "")) == 10 and codes.count((403, "token_max_total")) == 40
    assert (await ledger.token(token["id"]))["spent"] == 10 * PRICE
    assert (await ledger.balance(user_account(wallet.username))).posted == 100_000 - 10 * PRICE
    assert (await ledger.reconcile()).ok


async def test_failed_call_gives_the_token_spend_back(http, failing_url, funded, ledger, base_url):
    wallet = await funded(1000)
    async with PaidSession(wallet, session=http) as s:
        status, token = await s.signed("POST", f"{failing_url}/v1/accounts/me/tokens", {"max_total": 1000})
    status, _, _ = await pay_with(http, f"{failing_url}/test/unavailable", token["token"], b"{}")
    assert status == 503
    assert (await ledger.token(token["id"]))["spent"] == 0
    assert (await ledger.balance(user_account(wallet.username))).available == 1000


async def test_idempotency_key_pays_once(http, base_url, funded, manifest, ledger):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet)
    first = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest, **{"Idempotency-Key": "job-42"})
    again = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest, **{"Idempotency-Key": "job-42"})
    assert first[0] == 200 and again[0] == 200 and again[1] == first[1]  # the first result, replayed
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE


async def test_client_session_pays_with_a_token_pay_first(http, base_url, funded, manifest, ledger):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet)
    async with PaidSession(max_price=500, token=token["token"], session=http) as s:
        status, _, _ = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest, price=PRICE)
        assert status == 200 and s.spent == PRICE
    # a wrong guess is refused by the server (Payment-Amount) and the real price then meets the cap
    async with PaidSession(max_price=PRICE - 1, token=token["token"], session=http) as s:
        with pytest.raises(PriceTooHigh):
            await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest, price=PRICE - 1)
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE


@pytest.mark.parametrize("route,allowed", [
    ("/v1/qa/", True), ("/v1/qa", True), ("/v1/qa/validate", True),
    ("/v1/qa/valid", False), ("/v1/q", False), ("/v1/qa/validate/x", False),
])
async def test_token_routes_match_whole_path_segments(http, base_url, funded, manifest, ledger, route, allowed):
    """Second review: a token scoped to /v1/experts/bob paid /v1/experts/bobx/... (a raw string prefix).
    A route caveat names whole path segments: '/v1/qa' covers /v1/qa/validate, '/v1/qa/valid' does not."""
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet, routes=[route])
    status, body, _ = await pay_with(http, f"{base_url}/v1/qa/validate", token["token"], manifest)
    if allowed:
        assert status == 200, body
    else:
        assert (status, body["error"]) == (403, "token_route")
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000


async def test_a_token_for_one_expert_does_not_pay_an_expert_whose_name_extends_it(http, base_url, funded, ledger):
    asker, bob = await funded(100_000), await funded(0)
    bobx = await funded(0, bob.username + "x")
    for expert in (bob, bobx):
        async with PaidSession(expert, session=http) as s:
            status, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                          {"display_name": "E", "tags": ["k8s"], "price": 500, "reply_hours": 24})
        assert status == 200, body
    token = await issue(http, base_url, asker, routes=[f"/v1/experts/{bob.username}"])
    headers = {"Authorization": f"Token {token['token']}", "Payment-Amount": "500"}
    async with http.post(f"{base_url}/v1/experts/{bob.username}x/questions", json={"text": "CNI?"},
                         headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (403, "token_route")
    async with http.post(f"{base_url}/v1/experts/{bob.username}/questions", json={"text": "CNI?"},
                         headers=headers) as r:
        assert r.status == 201, await r.text()
    assert (await ledger.balance(user_account(asker.username))).posted == 100_000 - 500

"""Who may spend, count against, or read on behalf of an account, and which deployment a payment is for:
outsiders cannot lock an account out of its paid calls, a transfer pays one deployment only, a token
pays only the price its holder agreed to, the token cap counts live tokens atomically, and a token
reads only what it paid for within its routes."""
from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest

from service import protocol as P
from service.client import PaidSession, Wallet, transfer_headers
from service.ledger import REVENUE, user_account
from service.tokens import MAX_TOKENS_PER_ACCOUNT
from service.payment_auth import receipt_reference

from tests.conftest import ADMIN_TOKEN

PRICE = 120  # one ConfigMap on /v1/qa/validate


async def served(aiohttp_server, app) -> str:
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def register(http, base: str, amount: int, wallet: Wallet | None = None, origin: str | None = None) -> Wallet:
    """A registered (and credited) account on the deployment at `base` (whose PUBLIC_URL is `origin`, if not `base`)."""
    wallet = wallet or Wallet.generate(f"u{uuid.uuid4().hex[:10]}")
    async with PaidSession(wallet, session=http) as s:
        if origin is None:
            status, body = await s.register(base)
        else:  # the registration signs the deployment's public origin, not the socket the test reaches it on
            raw = json.dumps({"username": wallet.username, "pubkey": wallet.pubkey.hex()}).encode()
            async with http.post(f"{base}/v1/accounts", data=raw, headers={
                    P.AUTHORIZATION: wallet.sign(P.registration_message(origin, raw)),
                    "Content-Type": "application/json"}) as r:
                status, body = r.status, await r.json()
    assert status == 201, body
    if amount:
        async with http.post(f"{base}/v1/admin/credits", json={"username": wallet.username, "amount": amount,
                                                               "reason": "test"},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201, await r.text()
    return wallet


async def issue(http, base_url, wallet, **caveats):
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 10_000, **caveats})
    assert status == 201, body
    return body


async def post(http, url, data, headers):
    async with http.post(url, data=data, headers=headers) as r:
        return r.status, await r.json(), r.headers


# --- 12.6: no per-account accounting before the account's key or the token's secret is verified -------------
async def test_outsider_signing_transfers_as_the_victim_cannot_lock_the_victim_out(
        http, aiohttp_server, make_app, manifest, ledger, settings):
    base = await served(aiohttp_server, make_app(rate_limit_account=3))
    victim = await register(http, base, 1000)
    mallory = Wallet.generate(f"m{uuid.uuid4().hex[:10]}")  # never registered: signs with its own key
    url = f"{base}/v1/qa/validate"
    for _ in range(10):
        forged = transfer_headers(mallory, amount=PRICE, payee_username=settings.payee_username,
                                  payee_address=settings.payee_address, url=url)
        body = json.loads(forged["Bitcoin-Transfer"])
        body["payer"] = victim.username
        transfer = json.dumps(body)
        forged = {"Bitcoin-Transfer": transfer, "Authorization": mallory.sign(transfer.encode())}
        status, answer, _ = await post(http, url, manifest, forged)
        assert (status, answer["error"]) == (401, "pubkey_mismatch")
    async with PaidSession(victim, max_price=500, session=http) as s:
        status, body, _ = await s.request("POST", url, data=manifest)
    assert status == 200, body
    assert (await ledger.balance(user_account(victim.username))).posted == 1000 - PRICE


async def test_token_id_with_a_wrong_secret_never_counts_against_the_owner(
        http, aiohttp_server, make_app, manifest, ledger):
    base = await served(aiohttp_server, make_app(rate_limit_account=3))
    owner = await register(http, base, 1000)
    token = await issue(http, base, owner)
    url = f"{base}/v1/qa/validate"
    for _ in range(10):
        status, body, _ = await post(http, url, manifest, {"Authorization": f"Token {token['id']}.{'x' * 32}"})
        assert (status, body["error"]) == (401, "token_invalid")
    status, body, _ = await post(http, url, manifest, {"Authorization": f"Token {token['token']}"})
    assert status == 200, body
    assert (await ledger.balance(user_account(owner.username))).posted == 1000 - PRICE


async def test_receipts_do_not_reveal_the_token_id_and_idempotency_still_holds(http, base_url, funded, manifest,
                                                                                 ledger):
    wallet = await funded(1000)
    token = await issue(http, base_url, wallet)
    headers = {"Authorization": f"Token {token['token']}", "Idempotency-Key": "ci-run-7"}
    first = await post(http, f"{base_url}/v1/qa/validate", manifest, headers)
    again = await post(http, f"{base_url}/v1/qa/validate", manifest, headers)
    other = await post(http, f"{base_url}/v1/qa/validate", manifest, {"Authorization": f"Token {token['token']}"})
    assert first[0] == 200 and other[0] == 200
    assert again[0] == 200 and again[2]["Idempotent-Replayed"] == "true"  # the first result, not charged again
    assert again[2]["Payment-Receipt"] == first[2]["Payment-Receipt"]
    for receipt in (receipt_reference(first[2]["Payment-Receipt"]), receipt_reference(other[2]["Payment-Receipt"])):
        assert token["id"] not in receipt and token["id"].removeprefix("tk_") not in receipt
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - 2 * PRICE
    async with PaidSession(wallet, session=http) as s:  # the owner still finds the payment by its receipt
        status, receipt = await s.signed_get(f"{base_url}/v1/receipts/{receipt_reference(first[2]['Payment-Receipt'])}")
    assert status == 200 and receipt["method"] == "token" and receipt["amount"] == PRICE


# --- 11.10: a BitTransfer is bound to one deployment; absolute URLs come from PUBLIC_URL -----------------------
async def test_a_transfer_paid_to_one_deployment_does_not_pay_another(http, aiohttp_server, make_app, manifest,
                                                                      settings, ledger):
    one = await served(aiohttp_server, make_app())
    two = await served(aiohttp_server, make_app(redis_prefix=f"{settings.redis_prefix}-two"))
    wallet = await register(http, one, 1000)
    await register(http, two, 1000, wallet)
    headers = transfer_headers(wallet, amount=PRICE, payee_username=settings.payee_username,
                               payee_address=settings.payee_address, url=f"{one}/v1/qa/validate")
    status, body, _ = await post(http, f"{two}/v1/qa/validate", manifest, headers)
    assert (status, body["error"]) == (402, "wrong_deployment")
    status, body, _ = await post(http, f"{one}/v1/qa/validate", manifest, headers)
    assert status == 200, body
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE


async def test_an_invoice_of_one_deployment_does_not_pay_another(http, aiohttp_server, make_app, manifest, settings):
    """Same INVOICE_SECRET on both (as in a copied config): the invoice is still bound to its deployment."""
    one = await served(aiohttp_server, make_app())
    two = await served(aiohttp_server, make_app(redis_prefix=f"{settings.redis_prefix}-two"))
    wallet = await register(http, one, 1000)
    await register(http, two, 1000, wallet)
    async with http.post(f"{one}/v1/qa/validate", data=manifest) as r:
        invoice = (await r.json())["invoice"]
    headers = transfer_headers(wallet, amount=PRICE, payee_username=settings.payee_username,
                               payee_address=invoice["address"], url="", invoice=invoice["id"])
    status, body, _ = await post(http, f"{two}/v1/qa/validate", manifest, headers)
    assert (status, body["error"]) == (402, "invoice_mismatch")
    status, body, _ = await post(http, f"{one}/v1/qa/validate", manifest, headers)
    assert status == 200, body


async def test_a_transfer_naming_neither_resource_nor_invoice_is_refused(http, base_url, funded, manifest, settings):
    wallet = await funded(1000)
    headers = transfer_headers(wallet, amount=PRICE, payee_username=settings.payee_username,
                               payee_address=settings.payee_address, url="")
    status, body, _ = await post(http, f"{base_url}/v1/qa/validate", manifest, headers)
    assert (status, body["error"]) == (402, "wrong_resource")


async def test_the_402_and_discovery_urls_come_from_public_url_not_the_host_header(
        http, aiohttp_server, make_app, manifest, settings):
    base = await served(aiohttp_server, make_app(public_url="https://api.example.org"))
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    async with http.post(f"{base}/v1/qa/validate", data=manifest, headers=evil) as r:
        body = await r.json()
        header = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    assert body["resource"]["url"] == header["resource"]["url"] == "https://api.example.org/v1/qa/validate"
    async with http.get(f"{base}/.well-known/x402", headers=evil) as r:
        items = (await r.json())["items"]
    assert items and all(i["resource"].startswith("https://api.example.org/v1/") for i in items)
    # a client of the public URL pays; a transfer naming the socket's own address is for another origin
    wallet = await register(http, base, 1000, origin="https://api.example.org")
    public = transfer_headers(wallet, amount=PRICE, payee_username=settings.payee_username,
                              payee_address=settings.payee_address, url="https://api.example.org/v1/qa/validate")
    local = transfer_headers(wallet, amount=PRICE, payee_username=settings.payee_username,
                             payee_address=settings.payee_address, url=f"{base}/v1/qa/validate")
    status, body, _ = await post(http, f"{base}/v1/qa/validate", manifest, local)
    assert (status, body["error"]) == (402, "wrong_deployment")
    status, body, _ = await post(http, f"{base}/v1/qa/validate", manifest, public)
    assert status == 200, body


# --- 12.7: a token pays a third party's price only when it names it ----------------------------------------------
async def _expert(http, base_url, wallet, price):
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                      {"display_name": "Expert", "tags": ["networking"], "price": price,
                                       "reply_hours": 24})
    assert status == 200, body


async def test_token_ask_without_the_agreed_amount_is_refused_and_a_price_rise_is_never_charged(
        http, base_url, funded, ledger):
    asker, expert = await funded(100_000), await funded(0)
    await _expert(http, base_url, expert, 100)
    token = await issue(http, base_url, asker, max_total=100_000)
    url = f"{base_url}/v1/experts/{expert.username}/questions"
    question = json.dumps({"text": "Which CNI?"})
    auth = {"Authorization": f"Token {token['token']}", "Content-Type": "application/json"}
    async with http.post(url, data=question, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 402 and r.headers["Price"] == "100"   # the asker reads 100 ...
    await _expert(http, base_url, expert, 90_000)                  # ... and the expert raises it
    status, body, headers = await post(http, url, question, auth)  # no Payment-Amount: refused
    assert (status, body["error"]) == (402, "amount_required") and headers["Price"] == "90000"
    status, body, headers = await post(http, url, question, {**auth, "Payment-Amount": "100"})
    assert (status, body["error"]) == (402, "wrong_amount") and headers["Price"] == "90000"
    assert (await ledger.balance(user_account(asker.username))).posted == 100_000
    assert (await ledger.token(token["id"]))["spent"] == 0
    await _expert(http, base_url, expert, 100)
    status, body, _ = await post(http, url, question, {**auth, "Payment-Amount": "100"})
    assert status == 201, body
    assert (await ledger.balance(user_account(asker.username))).available == 100_000 - 100


async def test_token_list_question_needs_the_agreed_amount(http, base_url, funded, ledger):
    owner, asker = await funded(0), await funded(10_000)
    async with PaidSession(owner, session=http) as s:
        status, lst = await s.signed("POST", f"{base_url}/v1/lists",
                                     {"name": f"k8s-{owner.username}", "price": 100, "description": "Kubernetes"})
    assert status == 201, lst
    member = await funded(0)
    async with PaidSession(member, session=http) as s:
        status, body = await s.signed("POST", f"{base_url}/v1/lists/{lst['name']}/members/me")
    assert status in (200, 201), body
    token = await issue(http, base_url, asker)
    url = f"{base_url}/v1/lists/{lst['name']}/questions"
    question = json.dumps({"text": "HPA?", "max_responses": 3})
    auth = {"Authorization": f"Token {token['token']}", "Content-Type": "application/json"}
    status, body, headers = await post(http, url, question, auth)
    assert (status, body["error"]) == (402, "amount_required") and headers["Price"] == "300"
    status, body, _ = await post(http, url, question, {**auth, "Payment-Amount": "300"})
    assert status == 201, body
    # the project's client names the amount itself
    async with PaidSession(token=token["token"], max_price=300, session=http) as s:
        status, body, _ = await s.request("POST", url, data=question, headers={"Content-Type": "application/json"})
    assert status == 201, body
    assert (await ledger.balance(user_account(asker.username))).available == 10_000 - 600


# --- 12.8: the token cap counts live tokens, atomically -------------------------------------------------------------
async def test_token_cap_holds_under_concurrency_and_counts_only_live_tokens(http, base_url, funded, ledger):
    wallet = await funded(0)
    url = f"{base_url}/v1/accounts/me/tokens"

    async def create() -> tuple[int, dict]:
        async with PaidSession(wallet, session=http) as s:
            return await s.signed("POST", url, {"max_total": 5, "label": uuid.uuid4().hex})

    results = await asyncio.gather(*[create() for _ in range(150)])
    codes = sorted((status, body.get("error", "")) for status, body in results)
    assert codes.count((201, "")) == MAX_TOKENS_PER_ACCOUNT
    assert codes.count((422, "too_many_tokens")) == 150 - MAX_TOKENS_PER_ACCOUNT
    async with PaidSession(wallet, session=http) as s:
        status, listed = await s.signed("GET", url)
        assert len(listed["tokens"]) == MAX_TOKENS_PER_ACCOUNT
        revoked = await asyncio.gather(*[s.signed("DELETE", f"{url}/{t['id']}") for t in listed["tokens"]])
        assert {status for status, _ in revoked} == {200}
        status, body = await s.signed("POST", url, {"max_total": 5})
    assert status == 201, body


async def test_expired_tokens_do_not_count_against_the_cap(http, base_url, funded, ledger):
    import time

    wallet = await funded(0)
    url = f"{base_url}/v1/accounts/me/tokens"
    async with PaidSession(wallet, session=http) as s:
        for _ in range(MAX_TOKENS_PER_ACCOUNT):
            status, body = await s.signed("POST", url, {"max_total": 5, "expires_at": int(time.time()) + 2})
            assert status == 201, body
        status, body = await s.signed("POST", url, {"max_total": 5})
        assert (status, body["error"]) == (422, "too_many_tokens")
        await asyncio.sleep(2.5)
        status, body = await s.signed("POST", url, {"max_total": 5})
    assert status == 201, body


# --- 12.5: a token reads only what it paid for, within its routes ----------------------------------------------------
async def _buy_run(http, base_url, manifest, auth: dict[str, str]) -> str:
    body = json.dumps({"suite": "schema", "manifests": manifest.decode()})
    async with http.post(f"{base_url}/v1/qa/runs", data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 402
        price = r.headers["Price"]
    status, created, _ = await post(http, f"{base_url}/v1/qa/runs", body,
                                    {**auth, "Content-Type": "application/json", "Payment-Amount": price})
    assert status == 202, created
    return created["id"]


async def test_a_token_reads_only_the_runs_it_paid_for_and_only_within_its_routes(http, base_url, funded,
                                                                                   manifest):
    owner = await funded(10_000)
    payer = await issue(http, base_url, owner, routes=["/v1/qa/"])
    sibling = await issue(http, base_url, owner, routes=["/v1/qa/"])
    experts_only = await issue(http, base_url, owner, routes=["/v1/experts/"])
    run_id = await _buy_run(http, base_url, manifest, {"Authorization": f"Token {payer['token']}"})
    for _ in range(200):  # until it has results (JUnit exists then)
        async with http.get(f"{base_url}/v1/qa/runs/{run_id}", headers={"Authorization": f"Token {payer['token']}"}) as r:
            if (await r.json())["status"] in ("passed", "failed"):
                break
        await asyncio.sleep(0.05)
    for path in (f"/v1/qa/runs/{run_id}", f"/v1/qa/runs/{run_id}/junit.xml"):
        async with http.get(f"{base_url}{path}", headers={"Authorization": f"Token {payer['token']}"}) as r:
            assert r.status == 200, await r.text()
        async with http.get(f"{base_url}{path}", headers={"Authorization": f"Token {sibling['token']}"}) as r:
            assert r.status == 404, await r.text()
        async with http.get(f"{base_url}{path}", headers={"Authorization": f"Token {experts_only['token']}"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "token_route"
    async with PaidSession(owner, session=http) as s:  # the owner's signature reads every run of the account
        status, run = await s.owner_get(f"{base_url}/v1/qa/runs/{run_id}")
    assert status == 200 and run["id"] == run_id


async def test_a_token_cannot_read_a_run_paid_by_the_owners_signature(http, base_url, funded, manifest):
    owner = await funded(10_000)
    token = await issue(http, base_url, owner)
    body = json.dumps({"suite": "schema", "manifests": manifest.decode()})
    async with PaidSession(owner, max_price=5000, session=http) as s:
        status, created, _ = await s.request("POST", f"{base_url}/v1/qa/runs", data=body,
                                             headers={"Content-Type": "application/json"})
    assert status == 202, created
    async with http.get(f"{base_url}/v1/qa/runs/{created['id']}",
                        headers={"Authorization": f"Token {token['token']}"}) as r:
        assert r.status == 404


@pytest.mark.parametrize("value", ["tk_0123456789abcdef.wrongwrongwrongwrongwrong", "garbage", ""])
async def test_a_run_read_with_a_bad_token_is_401(http, base_url, value):
    async with http.get(f"{base_url}/v1/qa/runs/run_x", headers={"Authorization": f"Token {value}"}) as r:
        assert r.status == 401

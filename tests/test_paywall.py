"""The paid call end to end over HTTP: 402 → BitTransfer → hold → handler → capture/void → receipt."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest
from aiohttp import web

from service.client import PaidSession, PaymentRejected, PriceTooHigh, transfer_headers
from service.ledger import REVENUE, user_account
from service.pricing import priced
from service.payment_auth import receipt_reference

PRICE_ONE_DOC = 100 + 20
REPLAYED = "Idempotent-Replayed"


async def snapshot(ledger: Any, username: str) -> tuple[int, int, int, int]:
    """(payer balance, payer pending, revenue balance, journal length): what a rejection must not change."""
    payer = await ledger.balance(user_account(username))
    revenue = await ledger.balance(REVENUE)
    return payer.posted, payer.pending_debits, revenue.posted, await ledger.redis.xlen(ledger.journal_key)


async def test_unpaid_call_gets_402_with_invoice(http, base_url, manifest, settings):
    async with http.post(f"{base_url}/v1/qa/validate", data=manifest) as r:
        assert r.status == 402
        body = await r.json()
        assert r.headers["Price"] == str(PRICE_ONE_DOC)
        assert r.headers["Username"] == settings.payee_username
        assert r.headers["Bitcoin-Address"] == settings.payee_address
        assert r.headers["Cache-Control"] == "no-store"
        assert json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"])) == body
    assert body["x402Version"] == 2 and body["error"] == "payment_required"
    assert body["resource"]["url"] == f"{base_url}/v1/qa/validate"
    invoice = body["invoice"]
    assert invoice["amount"] == PRICE_ONE_DOC and invoice["currency"] == "sat"
    assert invoice["resource"] == "POST /v1/qa/validate" and len(invoice["request_hash"]) == 64
    [accept] = body["accepts"]  # our ledger transfer, as its own scheme; tokens are not sold by a 402
    assert accept["scheme"] == "bittransfer" and accept["amount"] == str(PRICE_ONE_DOC) and accept["asset"] == "sat"
    assert accept["network"] == "bip122:000000000933ea01ad0ee984209779ba"
    assert accept["extra"] == {"method": "bittransfer", "username": settings.payee_username, "invoice": invoice["id"]}


async def test_price_grows_with_documents(http, base_url, manifest):
    three = b"---\n".join([manifest] * 3)
    async with http.post(f"{base_url}/v1/qa/validate", data=three) as r:
        assert r.status == 402 and r.headers["Price"] == str(100 + 3 * 20)


async def test_pay_then_served_with_receipt_and_exact_charge(http, base_url, manifest, funded, ledger):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, body, headers = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
        assert status == 200, body
        assert body["valid"] is True and body["documents"][0]["kind"] == "ConfigMap"
        receipt_id = receipt_reference(headers["Payment-Receipt"])
        assert s.payments[0].amount == PRICE_ONE_DOC
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC
        assert (await ledger.balance(REVENUE)).posted == PRICE_ONE_DOC
        status, receipt = await s.signed_get(f"{base_url}/v1/receipts/{receipt_id}")
        assert status == 200 and receipt["amount"] == PRICE_ONE_DOC and receipt["state"] == "posted"
        assert receipt["resource"] == "POST /v1/qa/validate"
        status, account = await s.signed_get(f"{base_url}/v1/accounts/{wallet.username}")
        assert account["balance"] == 1000 - PRICE_ONE_DOC
        assert account["journal"][0]["id"] == receipt_id and account["journal"][0]["amount"] == -PRICE_ONE_DOC
    report = await ledger.reconcile()
    assert report.ok, report.mismatches


async def test_pay_first_without_a_402(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(1000)
    headers = transfer_headers(wallet, amount=PRICE_ONE_DOC, payee_username=settings.payee_username,
                               payee_address=settings.payee_address, url=f"{base_url}/v1/qa/validate")
    async with http.post(f"{base_url}/v1/qa/validate", data=manifest, headers=headers) as r:
        assert r.status == 200 and receipt_reference(r.headers["Payment-Receipt"]).startswith("bt_")


async def test_max_price_refuses_before_paying(http, base_url, manifest, funded, ledger):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=PRICE_ONE_DOC - 1, session=http) as s:
        with pytest.raises(PriceTooHigh):
            await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000


def _headers(wallet, settings, url, **changes):
    """A valid two1-style transfer for one document, with some fields changed before signing."""
    body = {"payer": wallet.username, "payer_pubkey": base64.b64encode(wallet.pubkey).decode() + "\n",
            "payee_address": settings.payee_address, "payee_username": settings.payee_username,
            "amount": PRICE_ONE_DOC, "timestamp": time.time(), "description": url}
    body.update(changes)
    transfer = json.dumps(body)
    return {"Bitcoin-Transfer": transfer, "Authorization": wallet.sign(transfer.encode())}


REJECTIONS = [
    # (name, how to spoil the payment, expected status, expected error code)
    ("wrong amount", lambda w, o, s, h: _headers(w, s, h, amount=PRICE_ONE_DOC - 1), 402, "wrong_amount"),
    ("wrong payee", lambda w, o, s, h: _headers(w, s, h, payee_username="mallory"), 402, "wrong_payee"),
    ("wrong address", lambda w, o, s, h: _headers(w, s, h, payee_address="tb1qnotours"), 402, "wrong_payee"),
    ("stale timestamp", lambda w, o, s, h: _headers(w, s, h, timestamp=1_500_000_000.0), 402, "stale_transfer"),
    ("future timestamp", lambda w, o, s, h: _headers(w, s, h, timestamp=4_000_000_000.0), 402, "stale_transfer"),
    ("other resource", lambda w, o, s, h: _headers(w, s, h, description="http://x/v1/qa/runs"), 402, "wrong_resource"),
    ("forged invoice", lambda w, o, s, h: _headers(w, s, h, invoice="inv_9999999999_abc_00"), 402, "invoice_mismatch"),
    ("unknown payer", lambda w, o, s, h: _headers(w, s, h, payer="nobody-here"), 401, "unknown_payer"),
    ("pubkey not the payer's", lambda w, o, s, h: _headers(o, s, h, payer=w.username), 401, "pubkey_mismatch"),
    ("bad signature", lambda w, o, s, h: {**_headers(w, s, h), "Authorization": _headers(o, s, h)["Authorization"]},
     401, "bad_signature"),
    ("signature of another transfer", lambda w, o, s, h: {**_headers(w, s, h, amount=PRICE_ONE_DOC),
     "Authorization": w.sign(b"something else")}, 401, "bad_signature"),
    ("malformed JSON", lambda w, o, s, h: {"Bitcoin-Transfer": "{not json", "Authorization": "AAAA"}, 400,
     "malformed_transfer"),
    ("missing field", lambda w, o, s, h: {"Bitcoin-Transfer": json.dumps({"payer": w.username}),
     "Authorization": "AAAA"}, 400, "malformed_transfer"),
    ("amount as float", lambda w, o, s, h: _headers(w, s, h, amount=120.0), 400, "malformed_transfer"),
    ("malformed base64 signature", lambda w, o, s, h: {**_headers(w, s, h), "Authorization": "%%%"}, 400,
     "malformed_signature"),
    ("malformed pubkey", lambda w, o, s, h: _headers(w, s, h, payer_pubkey="AAAA"), 400, "malformed_pubkey"),
    ("no signature", lambda w, o, s, h: {"Bitcoin-Transfer": _headers(w, s, h)["Bitcoin-Transfer"]}, 400,
     "malformed_signature"),
]


@pytest.mark.parametrize("name,spoil,status,code", REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejected_payment_changes_nothing(http, base_url, manifest, funded, ledger, settings,
                                                name, spoil, status, code):
    wallet, other = await funded(1000), await funded(1000)
    before = await snapshot(ledger, wallet.username)
    url = f"{base_url}/v1/qa/validate"
    async with http.post(url, data=manifest, headers=spoil(wallet, other, settings, url)) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (status, code), body
        assert body["detail"]
        if status == 402:
            assert r.headers["Price"] == str(PRICE_ONE_DOC) and body["invoice"]["amount"] == PRICE_ONE_DOC
    assert await snapshot(ledger, wallet.username) == before


async def test_insufficient_funds_is_402_and_changes_nothing(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(PRICE_ONE_DOC - 1)
    before = await snapshot(ledger, wallet.username)
    url = f"{base_url}/v1/qa/validate"
    async with http.post(url, data=manifest, headers=_headers(wallet, settings, url)) as r:
        assert r.status == 402 and (await r.json())["error"] == "insufficient_funds"
    assert await snapshot(ledger, wallet.username) == before


async def test_replayed_transfer_gets_the_first_response_and_settles_once(http, base_url, manifest, funded, ledger,
                                                                          settings):
    """Finding 7: a retry with the same signed transfer (its response was lost) gets the same result,
    uncharged; the same transfer for a different request is refused and changes nothing."""
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    headers = _headers(wallet, settings, url)
    async with http.post(url, data=manifest, headers=headers) as r:
        assert r.status == 200 and REPLAYED not in r.headers
        first, receipt = await r.read(), receipt_reference(r.headers["Payment-Receipt"])
    assert 0 < await ledger.redis.ttl(ledger.keys.response(receipt)) <= settings.hold_timeout  # bounded memory
    before = await snapshot(ledger, wallet.username)
    for _ in range(2):
        async with http.post(url, data=manifest, headers=headers) as r:
            assert (r.status, r.headers[REPLAYED], receipt_reference(r.headers["Payment-Receipt"])) == (200, "true", receipt)
            assert r.headers["Content-Type"].startswith("application/json") and await r.read() == first
    other = manifest.replace(b"settings", b"other")
    async with http.post(url, data=other, headers=headers) as r:
        assert r.status == 422 and (await r.json())["error"] == "idempotency_key_reused"
    assert await snapshot(ledger, wallet.username) == before


async def test_a_voided_transfer_is_not_replayed(http, failing_url, funded, ledger, settings):
    wallet = await funded(1000)
    url = f"{failing_url}/test/unavailable"
    headers = _headers(wallet, settings, url, amount=100)
    async with http.post(url, data=b"{}", headers=headers) as r:
        assert r.status == 503
    async with http.post(url, data=b"{}", headers=headers) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (409, "payment_replayed") and "not charged" in body["detail"]
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000


async def test_high_s_twin_of_a_used_signature_is_still_a_replay(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    headers = _headers(wallet, settings, url)
    async with http.post(url, data=manifest, headers=headers) as r:
        assert r.status == 200
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    sig = base64.b64decode(headers["Authorization"])
    twin = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    async with http.post(url, data=manifest, headers={**headers, "Authorization": base64.b64encode(twin).decode()}) as r:
        assert r.status == 200 and r.headers[REPLAYED] == "true"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


async def test_same_transfer_sent_20_times_concurrently_settles_once(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(10_000)
    url = f"{base_url}/v1/qa/validate"
    headers = _headers(wallet, settings, url)

    async def send() -> tuple[int, str]:
        async with http.post(url, data=manifest, headers=headers) as r:
            if r.status == 200:
                return 200, r.headers.get(REPLAYED, "first")
            return r.status, (await r.json())["error"]

    results = await asyncio.gather(*[send() for _ in range(20)])
    assert results.count((200, "first")) == 1
    assert set(results) <= {(200, "first"), (200, "true"), (409, "request_in_progress")}, results
    assert (await ledger.balance(user_account(wallet.username))).posted == 10_000 - PRICE_ONE_DOC
    assert (await ledger.reconcile()).ok


async def test_200_concurrent_calls_with_funds_for_100(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(100 * PRICE_ONE_DOC)
    url = f"{base_url}/v1/qa/validate"

    async def send() -> tuple[int, str]:
        async with http.post(url, data=manifest, headers=_headers(wallet, settings, url)) as r:
            return r.status, (await r.json()).get("error", "")

    results = await asyncio.gather(*[send() for _ in range(200)])
    assert results.count((200, "")) == 100
    assert results.count((402, "insufficient_funds")) == 100
    balance = await ledger.balance(user_account(wallet.username))
    assert (balance.posted, balance.pending_debits) == (0, 0)
    assert (await ledger.balance(REVENUE)).posted == 100 * PRICE_ONE_DOC
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("path,status", [("/test/boom", 500), ("/test/unavailable", 503)])
async def test_failed_handler_voids_the_hold(http, failing_url, funded, ledger, path, status):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        code, body, headers = await s.request("POST", f"{failing_url}{path}", data=b"{}")
    assert code == status and "Payment-Receipt" not in headers
    balance = await ledger.balance(user_account(wallet.username))
    assert (balance.posted, balance.pending_debits) == (1000, 0)
    assert (await ledger.balance(REVENUE)).posted == 0
    history = await ledger.history(user_account(wallet.username))
    assert history[0]["state"] == "voided"
    assert (await ledger.reconcile()).ok


async def test_x402_payment_signature_header(http, base_url, manifest, funded, ledger, settings):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    async with http.post(url, data=manifest) as r:
        required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    accepted = required["accepts"][0]
    bt = transfer_headers(wallet, amount=int(accepted["amount"]), payee_username=accepted["extra"]["username"],
                          payee_address=accepted["payTo"], url=url, invoice=accepted["extra"]["invoice"])
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": accepted,
               "payload": {"transfer": bt["Bitcoin-Transfer"], "signature": bt["Authorization"]}}
    header = base64.b64encode(json.dumps(payload).encode()).decode()
    async with http.post(url, data=manifest, headers={"PAYMENT-SIGNATURE": header}) as r:
        assert r.status == 200
        receipt = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
        assert receipt == {"success": True, "transaction": receipt_reference(r.headers["Payment-Receipt"]),
                           "network": settings.caip2, "payer": wallet.pubkey.hex(),
                           "extensions": {"username": wallet.username}}
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


async def test_invoice_is_bound_to_its_request(http, base_url, manifest, funded, ledger, settings):
    """An invoice issued for one body cannot pay for another body of the same price."""
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    async with http.post(url, data=manifest) as r:
        invoice = (await r.json())["invoice"]["id"]
    other = manifest.replace(b"settings", b"other")
    headers = _headers(wallet, settings, url, invoice=invoice)
    async with http.post(url, data=other, headers=headers) as r:
        assert r.status == 402 and (await r.json())["error"] == "invoice_mismatch"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000


async def test_receipt_is_visible_only_to_its_payer(http, base_url, manifest, funded):
    payer, other = await funded(1000), await funded(1000)
    async with PaidSession(payer, max_price=500, session=http) as s:
        _, _, headers = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
    receipt = receipt_reference(headers["Payment-Receipt"])
    async with PaidSession(other, max_price=0, session=http) as s:
        status, body = await s.signed_get(f"{base_url}/v1/receipts/{receipt}")
    assert status == 404 and body["error"] == "unknown_receipt"
    async with http.get(f"{base_url}/v1/receipts/{receipt}") as r:
        assert r.status == 401


@pytest.mark.parametrize("body,status,code", [
    (b"a" * (1024 * 1024 + 1), 413, "payload_too_large"),
    (b"", 400, "no_documents"),
])  # malformed YAML is found by the paid request, uncharged: tests/test_quotes.py
async def test_bad_input_is_refused_before_any_invoice(http, base_url, body, status, code):
    async with http.post(f"{base_url}/v1/qa/validate", data=body) as r:
        got = await r.json()
        assert (r.status, got["error"]) == (status, code)
        assert "Price" not in r.headers and "invoice" not in got


async def ledger_state(ledger: Any) -> dict[str, Any]:
    """Every ledger key under the prefix (accounts, transfers, histories, tokens, pending set) and the
    journal's length: what a refused payment must leave exactly as it was."""
    out: dict[str, Any] = {"journal": await ledger.redis.xlen(ledger.journal_key)}
    for kind in ("acct", "xfer", "hist", "token", "accounts", "pending"):
        async for key in ledger.redis.scan_iter(match=ledger.keys.of(kind) + "*", count=1000):
            ktype = await ledger.redis.type(key)
            if ktype == "hash":
                out[key] = await ledger.redis.hgetall(key)
            elif ktype == "set":
                out[key] = sorted(await ledger.redis.smembers(key))
            elif ktype == "zset":
                out[key] = await ledger.redis.zrange(key, 0, -1, withscores=True)
            elif ktype == "list":
                out[key] = await ledger.redis.lrange(key, 0, -1)
    return out


async def _issue_token(http, base_url, wallet, **caveats) -> str:
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 10_000, **caveats})
    assert status == 201, body
    return body["token"]


async def test_50_refused_asks_from_an_empty_account_leave_no_ledger_state(http, base_url, funded, ledger, settings):
    """Finding 8: a refused payment changes nothing on the ledger (no escrow opened, no journal entry)."""
    asker, expert = await funded(0), await funded(0)
    async with PaidSession(expert, session=http) as s:
        status, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                      {"display_name": "E", "tags": ["x"], "price": 500, "reply_hours": 24})
    assert status == 200, body
    url = f"{base_url}/v1/experts/{expert.username}/questions"
    before = await ledger_state(ledger)

    async def ask_once() -> tuple[int, str]:
        headers = transfer_headers(asker, amount=500, payee_username=settings.payee_username,
                                   payee_address=settings.payee_address, url=url)
        async with http.post(url, json={"text": "Which CNI?"}, headers=headers) as r:
            return r.status, (await r.json())["error"]

    results = await asyncio.gather(*[ask_once() for _ in range(50)])
    assert results == [(402, "insufficient_funds")] * 50
    assert await ledger_state(ledger) == before


@pytest.mark.parametrize("caveats,status,code", [
    ({}, 402, "insufficient_funds"),
    ({"max_per_call": 499}, 403, "token_max_per_call"),
    ({"routes": ["/v1/qa/"]}, 403, "token_route"),
    ({"max_total": 499}, 403, "token_max_total"),
], ids=["insufficient", "max_per_call", "route", "max_total"])
async def test_refused_token_payments_for_an_ask_leave_no_ledger_state(http, base_url, funded, ledger, caveats,
                                                                       status, code):
    asker, expert = await funded(0), await funded(0)
    async with PaidSession(expert, session=http) as s:
        got, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                   {"display_name": "E", "tags": ["x"], "price": 500, "reply_hours": 24})
    assert got == 200, body
    token = await _issue_token(http, base_url, asker, **caveats)
    before = await ledger_state(ledger)
    for _ in range(3):
        async with http.post(f"{base_url}/v1/experts/{expert.username}/questions", json={"text": "CNI?"},
                             headers={"Authorization": f"Token {token}", "Payment-Amount": "500"}) as r:
            assert (r.status, (await r.json())["error"]) == (status, code)
    assert await ledger_state(ledger) == before


async def test_admin_credits_stop_below_2_53_with_a_clear_refusal(http, base_url, funded, admin_post, ledger):
    """Finding 12 through the API: MAX_AMOUNT credits pile up until a counter would pass 2^53 - 1; that
    credit is refused (409 counter_limit) and the balance stays exact."""
    from service.schemas import MAX_AMOUNT

    wallet = await funded(0)
    for _ in range(4):
        status, body = await admin_post("/v1/admin/credits", {"username": wallet.username, "amount": MAX_AMOUNT,
                                                              "reason": "t"})
        assert status == 201, body
    status, body = await admin_post("/v1/admin/credits", {"username": wallet.username, "amount": MAX_AMOUNT,
                                                          "reason": "t"})
    assert (status, body["error"]) == (409, "counter_limit")
    assert (await ledger.balance(user_account(wallet.username))).posted == 4 * MAX_AMOUNT
    assert (await ledger.reconcile()).ok


async def _expert(http, base_url, wallet, price: int = 500) -> None:
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                      {"display_name": "E", "tags": ["x"], "price": price, "reply_hours": 24})
    assert status == 200, body


async def _inbox(http, base_url, wallet) -> list[str]:
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.signed("GET", f"{base_url}/v1/experts/me/questions")
    assert status == 200, body
    return [q["id"] for q in body["questions"]]


async def test_an_ask_that_outlives_its_hold_is_not_charged_and_not_delivered(aiohttp_server, make_app, http,
                                                                               funded, ledger, settings):
    """Finding 6, other direction: HOLD_TIMEOUT shorter than a slow handler used to answer 503 hold_expired
    ("not charged", true) while the question was stored and delivered. Now the handler captures before
    storing: an ask that is not charged has no effects."""

    @web.middleware
    async def slow(request: web.Request, handler: Any) -> Any:  # a slow handler: runs after the hold
        if "X-Test-Slow" in request.headers:
            await asyncio.sleep(float(request.headers["X-Test-Slow"]))
        return await handler(request)

    app = make_app(hold_timeout=1)
    app.middlewares.append(slow)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    asker, expert = await funded(5000), await funded(0)
    await _expert(http, url, expert)
    ask_url = f"{url}/v1/experts/{expert.username}/questions"
    for delay in ("1.3", "0"):
        headers = transfer_headers(asker, amount=500, payee_username=settings.payee_username,
                                   payee_address=settings.payee_address, url=ask_url)
        async with http.post(ask_url, json={"text": "Which CNI?"}, headers={**headers, "X-Test-Slow": delay}) as r:
            body = await r.json()
            if delay != "0":
                assert (r.status, body["error"]) == (503, "hold_expired") and "not charged" in body["detail"]
                assert await _inbox(http, url, expert) == []       # not stored, not delivered
                balance = await ledger.balance(user_account(asker.username))
                assert (balance.posted, balance.pending_debits) == (5000, 0)
            else:
                assert r.status == 201, body                        # a timely ask is paid and delivered
                assert await _inbox(http, url, expert) == [body["id"]]
    assert (await ledger.balance(user_account(asker.username))).posted == 4500
    assert (await ledger.reconcile()).ok


async def test_a_retried_ask_gets_its_question_once_and_pays_once(http, base_url, funded, ledger, settings):
    """Finding 7 on a route with effects: the retry gets the first 201 (same question), nothing is asked twice."""
    asker, expert = await funded(5000), await funded(0)
    await _expert(http, base_url, expert)
    url = f"{base_url}/v1/experts/{expert.username}/questions"
    headers = transfer_headers(asker, amount=500, payee_username=settings.payee_username,
                               payee_address=settings.payee_address, url=url)
    async with http.post(url, json={"text": "Which CNI?"}, headers=headers) as r:
        first = await r.json()
        assert r.status == 201 and REPLAYED not in r.headers
    async with http.post(url, json={"text": "Which CNI?"}, headers=headers) as r:
        assert (r.status, r.headers[REPLAYED]) == (201, "true") and await r.json() == first
        assert r.headers["Location"] == f"/v1/questions/{first['id']}"
    assert await _inbox(http, base_url, expert) == [first["id"]]
    assert (await ledger.balance(user_account(asker.username))).posted == 4500


async def test_token_idempotency_key_replays_refuses_other_requests_and_needs_the_secret(
        http, base_url, funded, manifest, ledger):
    """Finding 7 with tokens (Stripe's model): same key + same request → the first result, uncharged;
    same key + other request → 422; the token id and key without the secret → 401."""
    wallet = await funded(1000)
    token = await _issue_token(http, base_url, wallet)
    url = f"{base_url}/v1/qa/validate"

    async def pay(body: bytes, auth: str) -> tuple[int, Any, Any]:
        async with http.post(url, data=body, headers={"Authorization": f"Token {auth}",
                                                      "Idempotency-Key": "job-42"}) as r:
            return r.status, await r.json(), r.headers

    status, first, _ = await pay(manifest, token)
    assert status == 200
    status, again, headers = await pay(manifest, token)
    assert (status, again, headers[REPLAYED]) == (200, first, "true")
    status, body, _ = await pay(manifest.replace(b"settings", b"other"), token)
    assert (status, body["error"]) == (422, "idempotency_key_reused")
    token_id = token.split(".")[0]
    status, body, _ = await pay(manifest, f"{token_id}.{'x' * 32}")
    assert (status, body["error"]) == (401, "token_invalid")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


async def test_a_retry_while_the_first_is_running_is_409_request_in_progress(aiohttp_server, make_app, http,
                                                                             funded, ledger, settings):
    running, release = asyncio.Event(), asyncio.Event()

    @priced("qa.validate")
    async def slow(request: web.Request) -> web.Response:
        running.set()  # the hold is taken: the retry below meets a call in progress, however loaded the machine
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"done": True})

    app = make_app()
    app.router.add_post("/test/slow", slow)
    server = await aiohttp_server(app)
    url = f"{str(server.make_url('')).rstrip('/')}/test/slow"
    wallet = await funded(1000)
    headers = _headers(wallet, settings, url, amount=100)

    async def send() -> tuple[int, Any, Any]:
        async with http.post(url, data=b"{}", headers=headers) as r:
            return r.status, await r.json(), r.headers

    first = asyncio.ensure_future(send())
    await asyncio.wait_for(running.wait(), 10)
    status, body, got = await send()
    release.set()
    assert (status, body["error"], got["Retry-After"]) == (409, "request_in_progress", "1")
    assert (await first)[:2] == (200, {"done": True})
    status, body, got = await send()
    assert (status, body, got[REPLAYED]) == (200, {"done": True}, "true")
    assert (await ledger.balance(user_account(wallet.username))).posted == 900


async def test_idempotency_key_finds_the_first_result_for_a_re_signed_transfer(http, base_url, manifest, funded,
                                                                               ledger, settings):
    """Finding 7 with BitTransfer: the client lost the response and signs a new transfer for the retry;
    with the same Idempotency-Key it gets the first result and pays once. Only the payer's own key may
    read it: a transfer naming the payer but signed by another key is refused (401 pubkey_mismatch)."""
    wallet, mallory = await funded(1000), await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    key = {"Idempotency-Key": "deploy-7"}
    async with http.post(url, data=manifest, headers={**_headers(wallet, settings, url), **key}) as r:
        assert r.status == 200
        first, receipt = await r.json(), receipt_reference(r.headers["Payment-Receipt"])
    assert await ledger.redis.ttl(ledger.keys.response(receipt)) > settings.hold_timeout  # IDEMPOTENCY_TTL
    async with http.post(url, data=manifest, headers={**_headers(wallet, settings, url), **key}) as r:
        assert (r.status, r.headers[REPLAYED], receipt_reference(r.headers["Payment-Receipt"])) == (200, "true", receipt)
        assert await r.json() == first
    other = manifest.replace(b"settings", b"other")
    async with http.post(url, data=other, headers={**_headers(wallet, settings, url), **key}) as r:
        assert (r.status, (await r.json())["error"]) == (422, "idempotency_key_reused")
    forged = _headers(mallory, settings, url, payer=wallet.username)  # mallory's key, the victim's name
    async with http.post(url, data=manifest, headers={**forged, **key}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "pubkey_mismatch")
    async with http.post(url, data=manifest, headers={**_headers(wallet, settings, url),
                                                      "Idempotency-Key": "deploy-8"}) as r:
        assert r.status == 200 and REPLAYED not in r.headers   # a new key is a new call
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - 2 * PRICE_ONE_DOC
    assert (await ledger.balance(user_account(mallory.username))).posted == 1000
    async with http.post(url, data=manifest, headers={**_headers(wallet, settings, url),
                                                      "Idempotency-Key": "bad key"}) as r:
        assert (r.status, (await r.json())["error"]) == (400, "malformed_idempotency_key")


async def test_a_handler_that_refuses_after_committing_refunds_the_payer(aiohttp_server, make_app, http, funded,
                                                                         ledger, settings):
    """commit() captures before the effects; a handler that then refuses (an ApiError, no effect) gets the
    payer's money back by a compensating transfer: charged only if served."""
    from service.errors import Conflict
    from service.paywall import commit

    @priced("qa.validate")
    async def refuses(request: web.Request) -> web.Response:
        await commit(request)
        raise Conflict("too_late", "refused after the capture")

    app = make_app()
    app.router.add_post("/test/refuses", refuses)
    server = await aiohttp_server(app)
    url = f"{str(server.make_url('')).rstrip('/')}/test/refuses"
    wallet = await funded(1000)
    headers = _headers(wallet, settings, url, amount=100)
    async with http.post(url, data=b"{}", headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (409, "too_late") and "Payment-Receipt" not in r.headers
    balance = await ledger.balance(user_account(wallet.username))
    assert (balance.posted, balance.pending_debits) == (1000, 0)
    assert (await ledger.balance(REVENUE)).posted == 0
    history = await ledger.history(user_account(wallet.username))
    assert [h["id"].split("_")[0] for h in history[:2]] == ["refund", "bt"]
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("case", ["ask_yourself", "list_of_only_the_asker", "empty_list"])
async def test_an_ask_nobody_can_answer_is_refused_before_any_ledger_state(http, base_url, funded, ledger, case):
    """Finding 8, found again by the simulator: asking oneself (or a list whose only member is the asker)
    answered 403 no_recipient after the hold had opened the question's escrow account: refused before it."""
    asker = await funded(10_000)
    ask = {"text": "anyone?"} if case == "ask_yourself" else {"text": "anyone?", "max_responses": 1}
    async with PaidSession(asker, max_price=1000, session=http) as s:
        if case == "ask_yourself":
            status, body = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                          {"display_name": "E", "tags": ["x"], "price": 500, "reply_hours": 24})
            url = f"{base_url}/v1/experts/{asker.username}/questions"
        else:
            name = f"l{asker.username}"
            status, body = await s.signed("POST", f"{base_url}/v1/lists",
                                          {"name": name, "description": "d", "price": 100})
            if status == 201 and case == "list_of_only_the_asker":
                status, body = await s.signed("POST", f"{base_url}/v1/lists/{name}/members/me")
            url = f"{base_url}/v1/lists/{name}/questions"
        assert status in (200, 201), body
        before = await ledger_state(ledger)
        with pytest.raises(PaymentRejected) as refused:
            await s.request("POST", url, data=json.dumps(ask), headers={"Content-Type": "application/json"})
    assert (refused.value.status, refused.value.reason) == (403, "no_recipient")
    assert await ledger_state(ledger) == before


def _x402_header(required: dict, accepted: dict, bt: dict) -> str:
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": accepted,
               "payload": {"transfer": bt["Bitcoin-Transfer"], "signature": bt["Authorization"]}}
    return base64.b64encode(json.dumps(payload).encode()).decode()


async def test_x402_payment_failures_say_why_in_payment_response(http, base_url, manifest, funded, ledger, settings):
    """A refused x402 payment answers PAYMENT-RESPONSE success:false with the reason (a fresh 402 for the
    payable ones); the payer is named by key, the username aside."""
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    async with http.post(url, data=manifest) as r:
        required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    [accepted] = required["accepts"]
    bt = transfer_headers(wallet, amount=PRICE_ONE_DOC + 1, payee_username=accepted["extra"]["username"],
                          payee_address=accepted["payTo"], url=url, invoice=accepted["extra"]["invoice"])
    async with http.post(url, data=manifest, headers={"PAYMENT-SIGNATURE": _x402_header(required, accepted, bt)}) as r:
        assert r.status == 402 and "PAYMENT-REQUIRED" in r.headers
        failure = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert failure == {"success": False, "transaction": "", "network": settings.caip2, "errorReason": "wrong_amount"}
    bt = transfer_headers(wallet, amount=PRICE_ONE_DOC, payee_username=accepted["extra"]["username"],
                          payee_address=accepted["payTo"], url=url, invoice=accepted["extra"]["invoice"])
    header = _x402_header(required, accepted, bt)
    async with http.post(url, data=manifest, headers={"PAYMENT-SIGNATURE": header}) as r:
        assert r.status == 200
    async with http.post(url, data=manifest.replace(b"settings", b"other"), headers={"PAYMENT-SIGNATURE": header}) as r:
        assert r.status in (402, 409, 422)
        failure = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert failure["success"] is False and failure["errorReason"]
    exact = {**accepted, "scheme": "exact"}  # no chain configured: the exact scheme is not taken here
    async with http.post(url, data=manifest, headers={"PAYMENT-SIGNATURE": _x402_header(required, exact, bt)}) as r:
        assert r.status == 402 and (await r.json())["error"] == "unsupported_scheme"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


async def test_a_402_raised_by_a_handler_is_rendered_like_every_402(http, base_url, funded):
    """A balance too low for a withdrawal (or a crowd job's escrow, a stake) is a 402 in the one shape:
    PAYMENT-REQUIRED equal to the body, nothing to pay at this URL (accepts empty), the reason."""
    from service.client import signed_headers

    wallet = await funded(100)
    url = f"{base_url}/v1/accounts/me/withdrawals"
    body = json.dumps({"amount": 20_000, "address": "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"}).encode()
    headers = {**signed_headers(wallet, "POST", url, body), "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as r:
        assert r.status == 402 and r.headers["Cache-Control"] == "no-store"
        answer = await r.json()
        assert json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"])) == answer
    assert answer["error"] == "insufficient_funds" and answer["accepts"] == [] and answer["x402Version"] == 2
    assert answer["resource"]["url"] == url

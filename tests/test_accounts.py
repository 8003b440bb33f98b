"""Registration with proof of key, the admin API, credits, and signed account reads."""
from __future__ import annotations

import json
import time

import pytest

from service import protocol as P
from service.client import PaidSession, Wallet, signed_headers
from service.ledger import GRANTS, user_account


async def register(http, base_url, wallet, *, sign_with=None, body=None):
    raw = body if body is not None else json.dumps({"username": wallet.username, "pubkey": wallet.pubkey.hex()}).encode()
    headers = {"Authorization": (sign_with or wallet).sign(P.registration_message(P.origin_of(base_url), raw))}
    async with http.post(f"{base_url}/v1/accounts", data=raw, headers=headers) as r:
        return r.status, await r.json()


async def test_register_then_name_is_taken(http, base_url, ledger):
    alice = Wallet.generate("alice")
    status, body = await register(http, base_url, alice)
    assert status == 201 and body == {"username": "alice", "pubkey": alice.pubkey.hex(), "balance": 0}
    status, body = await register(http, base_url, Wallet.generate("alice"))
    assert status == 409 and body["error"] == "username_taken"
    assert await ledger.account_meta(user_account("alice"), "pubkey") == alice.pubkey.hex()


async def test_register_accepts_base64_pubkey_like_two1(http, base_url):
    w = Wallet.generate("b64user")
    import base64
    raw = json.dumps({"username": w.username, "pubkey": base64.b64encode(w.pubkey).decode() + "\n"}).encode()
    status, body = await register(http, base_url, w, body=raw)
    assert status == 201 and body["pubkey"] == w.pubkey.hex()


@pytest.mark.parametrize("case,status,code", [
    ("signed by another key", 401, "bad_signature"),
    ("no signature", 401, "signature_required"),
    ("bad username", 422, "validation_error"),
    ("bad pubkey", 422, "validation_error"),
    ("not json", 400, "invalid_json"),
])
async def test_register_rejections_create_nothing(http, base_url, ledger, case, status, code):
    w = Wallet.generate("carol")
    body = {"username": "carol", "pubkey": w.pubkey.hex()}
    if case == "bad username":
        body["username"] = "Carol!"
    if case == "bad pubkey":
        body["pubkey"] = "02" + "00" * 32
    raw = b"{nope" if case == "not json" else json.dumps(body).encode()
    headers = {} if case == "no signature" else {"Authorization": (Wallet.generate("x") if case == "signed by another key" else w).sign(
        P.registration_message(P.origin_of(base_url), raw))}
    async with http.post(f"{base_url}/v1/accounts", data=raw, headers=headers) as r:
        got = await r.json()
        assert (r.status, got["error"]) == (status, code), got
        assert got["detail"]
    if case == "bad username":
        assert "username" in got["detail"]
    assert await ledger.balance(user_account("carol")) is None


async def test_admin_api_is_404_without_a_configured_token(aiohttp_server, make_app, http):
    server = await aiohttp_server(make_app(admin_token=None))
    async with http.post(server.make_url("/v1/admin/credits"), json={"username": "a", "amount": 1, "reason": "x"},
                         headers={"Authorization": "Bearer anything"}) as r:
        assert r.status == 404


async def test_admin_api_needs_the_token(http, base_url):
    async with http.post(f"{base_url}/v1/admin/credits", json={"username": "a", "amount": 1, "reason": "x"},
                         headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401 and (await r.json())["error"] == "admin_token_required"


async def test_admin_creates_account_without_proof_and_credits_idempotently(admin_post, ledger):
    w = Wallet.generate("dave")
    status, _ = await admin_post("/v1/admin/accounts", {"username": "dave", "pubkey": w.pubkey.hex()})
    assert status == 201
    credit = {"username": "dave", "amount": 5000, "reason": "grant", "id": "grant-dave-1"}
    status, first = await admin_post("/v1/admin/credits", credit)
    assert status == 201 and first["replayed"] is False
    status, again = await admin_post("/v1/admin/credits", credit)
    assert status == 200 and again["replayed"] is True
    status, body = await admin_post("/v1/admin/credits", {**credit, "amount": 6000})
    assert status == 409 and body["error"] == "id_reused"
    assert (await ledger.balance(user_account("dave"))).posted == 5000
    assert (await ledger.balance(GRANTS)).posted == -5000


@pytest.mark.parametrize("body,field", [
    ({"username": "dave", "amount": 1.5, "reason": "x"}, "amount"),
    ({"username": "dave", "amount": -5, "reason": "x"}, "amount"),
    ({"username": "dave", "amount": "5", "reason": "x"}, "amount"),
    ({"username": "dave", "amount": 5}, "reason"),
])
async def test_bad_credit_names_the_field_and_moves_nothing(admin_post, ledger, body, field):
    status, got = await admin_post("/v1/admin/credits", body)
    assert status == 422 and field in got["detail"]
    assert (await ledger.balance(GRANTS)).posted == 0


async def test_credit_to_unknown_account_is_404(admin_post):
    status, got = await admin_post("/v1/admin/credits", {"username": "ghost", "amount": 5, "reason": "x"})
    assert status == 404 and got["error"] == "unknown_account"


async def test_account_is_readable_by_its_owner_only(http, base_url, funded):
    alice, bob = await funded(700), await funded(0)
    async with PaidSession(alice, max_price=0, session=http) as s:
        status, body = await s.signed_get(f"{base_url}/v1/accounts/{alice.username}")
    assert status == 200 and body["balance"] == 700 and body["journal"][0]["amount"] == 700
    async with PaidSession(bob, max_price=0, session=http) as s:
        status, body = await s.signed_get(f"{base_url}/v1/accounts/{alice.username}")
    assert status == 403


async def test_signed_request_must_be_fresh_and_for_this_request(http, base_url, funded):
    alice = await funded(10)
    url = f"{base_url}/v1/accounts/{alice.username}"
    ts = str(int(time.time()) - 3600)
    stale = f"{P.SIG_SCHEME} {alice.username}:{ts}:{alice.sign(P.request_message('GET', f'/v1/accounts/{alice.username}', ts, b'', origin=P.origin_of(base_url)))}"
    async with http.get(url, headers={"Authorization": stale}) as r:
        assert r.status == 401 and (await r.json())["error"] == "stale_auth"
    moved = signed_headers(alice, "GET", f"{base_url}/v1/receipts/x")
    async with http.get(url, headers=moved) as r:
        assert r.status == 401 and (await r.json())["error"] == "bad_signature"
    async with http.get(url) as r:
        assert r.status == 401 and (await r.json())["error"] == "auth_required"

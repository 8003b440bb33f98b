"""Signed requests are single-use when they change state: the same MT-Sig request re-sent within
AUTH_WINDOW is 409 `request_replayed` and changes nothing (it created a second token and queued
withdrawals before). GETs may be repeated; the project's client signs a fresh nonce into each request."""
from __future__ import annotations

import json

from service.client import PaidSession, signed_headers
from service.config import DEFAULT_TESTNET_ADDRESS


async def _send(http, method, url, headers, body: bytes):
    async with http.request(method, url, data=body or None, headers=headers) as r:
        return r.status, await r.json()


async def test_a_replayed_token_creation_is_409_and_creates_nothing(http, base_url, funded):
    wallet = await funded(1000)
    url = f"{base_url}/v1/accounts/me/tokens"
    body = json.dumps({"max_total": 100}).encode()
    headers = {**signed_headers(wallet, "POST", url, body), "Content-Type": "application/json"}
    first = await _send(http, "POST", url, headers, body)
    assert first[0] == 201, first
    for _ in range(3):
        status, payload = await _send(http, "POST", url, headers, body)
        assert status == 409 and payload["error"] == "request_replayed", payload
    async with PaidSession(wallet, session=http) as s:
        status, listing = await s.signed("GET", url)
    assert [t["id"] for t in listing["tokens"]] == [first[1]["id"]]


async def test_a_replayed_withdrawal_is_409_and_queues_one(http, base_url, funded):
    wallet = await funded(200_000)
    url = f"{base_url}/v1/accounts/me/withdrawals"
    body = json.dumps({"amount": 50_000, "address": DEFAULT_TESTNET_ADDRESS}).encode()
    headers = {**signed_headers(wallet, "POST", url, body), "Content-Type": "application/json"}
    assert (await _send(http, "POST", url, headers, body))[0] == 201
    for _ in range(3):
        status, payload = await _send(http, "POST", url, headers, body)
        assert status == 409 and payload["error"] == "request_replayed", payload
    async with PaidSession(wallet, session=http) as s:
        status, me = await s.signed("GET", f"{base_url}/v1/accounts/me")
    assert len(me["withdrawals"]) == 1 and me["available"] == 150_000, me


async def test_a_replayed_revocation_and_profile_change_are_409(http, base_url, funded):
    wallet = await funded(1000)
    async with PaidSession(wallet, session=http) as s:
        status, token = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 100})
    url = f"{base_url}/v1/accounts/me/tokens/{token['id']}"
    headers = signed_headers(wallet, "DELETE", url)
    assert (await _send(http, "DELETE", url, headers, b""))[0] == 200
    assert (await _send(http, "DELETE", url, headers, b""))[1]["error"] == "request_replayed"
    url = f"{base_url}/v1/experts/me"
    body = json.dumps({"display_name": "E", "price": 5}).encode()
    headers = {**signed_headers(wallet, "PUT", url, body), "Content-Type": "application/json"}
    assert (await _send(http, "PUT", url, headers, body))[0] == 200
    assert (await _send(http, "PUT", url, headers, body))[0] == 409


async def test_signed_reads_may_be_repeated(http, base_url, funded):
    wallet = await funded(0)
    url = f"{base_url}/v1/accounts/me"
    headers = signed_headers(wallet, "GET", url)
    assert (await _send(http, "GET", url, headers, b""))[0] == 200
    assert (await _send(http, "GET", url, headers, b""))[0] == 200


async def test_the_client_can_send_the_same_request_twice_in_one_second(http, base_url, funded):
    wallet = await funded(1000)
    async with PaidSession(wallet, session=http) as s:
        results = [await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 100}) for _ in range(3)]
    assert [status for status, _ in results] == [201, 201, 201]

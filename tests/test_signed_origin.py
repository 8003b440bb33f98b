"""A signed request (MT-Sig) and a registration signature are bound to one deployment's origin (PUBLIC_URL,
or http://<loopback>:<port> on a local run): a request Alice signed for deployment A, replayed byte for
byte to deployment B (same Redis, another REDIS_PREFIX and PUBLIC_URL), is refused and changes nothing;
the server checks against its own origin, never the Host header."""
from __future__ import annotations

import json
import uuid

import aiohttp
import pytest

from service import protocol as P
from service.client import PaidSession, Wallet, signed_headers
from service.ledger import Ledger, user_account
from service.redis_server import free_port

from tests.conftest import ADMIN_TOKEN


async def deployment(aiohttp_server, make_app, settings, name: str, *, public: bool) -> str:
    """A deployment on its own port and prefix; with `public`, PUBLIC_URL names it as clients address it."""
    port = free_port()
    overrides = {"redis_prefix": f"{settings.redis_prefix}-{name}"}
    if public:
        overrides["public_url"] = f"http://127.0.0.1:{port}"
    server = await aiohttp_server(make_app(**overrides), port=port)
    return str(server.make_url("")).rstrip("/")


async def register(http, base: str, wallet: Wallet, amount: int = 0) -> None:
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.register(base)
    assert status == 201, body
    if amount:
        async with http.post(f"{base}/v1/admin/credits", json={"username": wallet.username, "amount": amount,
                                                               "reason": "test"},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 201, await r.text()


async def send(http, method: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with http.request(method, url, data=body or None, headers=headers) as r:
        return r.status, await r.json()


async def balance(http, base: str, wallet: Wallet) -> int:
    async with PaidSession(wallet, session=http) as s:
        status, me = await s.signed("GET", f"{base}/v1/accounts/me")
    assert status == 200, me
    return me["balance"]


@pytest.mark.parametrize("public", [True, False], ids=["PUBLIC_URL", "local"])
async def test_a_signed_request_to_one_deployment_does_not_replay_on_another(http, aiohttp_server, make_app,
                                                                             settings, manifest, public):
    one = await deployment(aiohttp_server, make_app, settings, "a", public=public)
    two = await deployment(aiohttp_server, make_app, settings, "b", public=public)
    alice = Wallet.generate(f"alice{uuid.uuid4().hex[:8]}")
    await register(http, one, alice)
    await register(http, two, alice, 5000)
    body = json.dumps({"max_total": 3000, "label": "ci"}).encode()
    headers = {**signed_headers(alice, "POST", f"{one}/v1/accounts/me/tokens", body), "Content-Type": "application/json"}
    status, token = await send(http, "POST", f"{one}/v1/accounts/me/tokens", body, headers)
    assert status == 201, token
    status, replayed = await send(http, "POST", f"{two}/v1/accounts/me/tokens", body, headers)  # the same bytes
    assert (status, replayed["error"]) == (401, "bad_signature"), replayed
    async with PaidSession(alice, session=http) as s:
        status, listing = await s.signed("GET", f"{two}/v1/accounts/me/tokens")
    assert status == 200 and listing["tokens"] == []
    assert await balance(http, two, alice) == 5000
    # her own requests to B (signed for B) work as before
    async with PaidSession(alice, session=http) as s:
        status, created = await s.signed("POST", f"{two}/v1/accounts/me/tokens", {"max_total": 100})
    assert status == 201, created


async def test_the_signature_covers_this_deployments_origin_not_the_host_header(http, aiohttp_server, make_app,
                                                                                settings):
    """Behind a proxy the Host header may say anything: the server verifies against PUBLIC_URL only."""
    port = free_port()
    server = await aiohttp_server(make_app(public_url="https://api.example.org"), port=port)
    local = str(server.make_url("")).rstrip("/")
    alice = Wallet.generate(f"alice{uuid.uuid4().hex[:8]}")
    register_body = json.dumps({"username": alice.username, "pubkey": alice.pubkey.hex()}).encode()
    status, body = await send(http, "POST", f"{local}/v1/accounts", register_body,
                              {P.AUTHORIZATION: alice.sign(P.registration_message("https://api.example.org",
                                                                                   register_body)),
                               "Content-Type": "application/json"})
    assert status == 201, body
    for signed_for, host in [("https://api.example.org", "evil.example"), ("http://evil.example", "evil.example"),
                             (local, None)]:
        headers = signed_headers(alice, "GET", f"{signed_for}/v1/accounts/me")
        if host:
            headers["Host"] = host
        status, body = await send(http, "GET", f"{local}/v1/accounts/me", b"", headers)
        assert status == (200 if signed_for == "https://api.example.org" else 401), (signed_for, body)


async def test_a_local_run_accepts_the_loopback_name_the_client_called(http, aiohttp_server, make_app, settings):
    """Without PUBLIC_URL, http://127.0.0.1:<port> and http://localhost:<port> both name this deployment
    (as for BitTransfers); another port does not."""
    server = await aiohttp_server(make_app())
    port = server.port
    alice = Wallet.generate(f"alice{uuid.uuid4().hex[:8]}")
    await register(http, f"http://localhost:{port}", alice)
    for base in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        async with PaidSession(alice, session=http) as s:
            status, body = await s.signed("POST", f"{base}/v1/accounts/me/tokens", {"max_total": 10})
        assert status == 201, (base, body)
    headers = signed_headers(alice, "GET", f"http://127.0.0.1:{port + 1}/v1/accounts/me")
    status, body = await send(http, "GET", f"http://127.0.0.1:{port}/v1/accounts/me", b"", headers)
    assert (status, body["error"]) == (401, "bad_signature")


@pytest.mark.parametrize("public", [True, False], ids=["PUBLIC_URL", "local"])
async def test_a_registration_sent_to_one_deployment_does_not_register_the_key_on_another(
        http, aiohttp_server, make_app, settings, ledger, public):
    one = await deployment(aiohttp_server, make_app, settings, "a", public=public)
    two = await deployment(aiohttp_server, make_app, settings, "b", public=public)
    alice = Wallet.generate(f"alice{uuid.uuid4().hex[:8]}")
    sent: dict = {}

    async def on_request_start(_session, _ctx, params) -> None:  # what the client put on the wire to A
        sent["authorization"] = params.headers[P.AUTHORIZATION]

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as wire, PaidSession(alice, session=wire) as s:
        status, body = await s.register(one)
    assert status == 201, body
    register_body = json.dumps({"username": alice.username, "pubkey": alice.pubkey.hex()}).encode()  # as sent
    status, body = await send(http, "POST", f"{two}/v1/accounts", register_body,
                              {P.AUTHORIZATION: sent["authorization"], "Content-Type": "application/json"})
    assert (status, body["error"]) == (401, "bad_signature"), body
    assert await Ledger(ledger.redis, f"{settings.redis_prefix}-b").account_meta(
        user_account(alice.username), "pubkey") is None
    async with PaidSession(alice, session=http) as s:  # she can still register there herself
        status, body = await s.register(two)
    assert status == 201, body

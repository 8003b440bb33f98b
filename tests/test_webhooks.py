"""SSRF: webhook targets are checked when saved (422 naming the field) and again when sent, after DNS
resolution, against the address actually connected to; no redirects; https only unless allowed."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from service.client import PaidSession
from service.keys import Keys

BAD_TARGETS = [
    "https://127.0.0.1/hook", "https://127.8.9.10:8080/hook", "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:10.0.0.1]/hook", "https://10.0.0.1/hook", "https://172.16.3.4/hook", "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data/", "https://[fd00:ec2::254]/latest", "https://[fe80::1]/hook",
    "https://100.100.100.200/", "https://224.0.0.1/hook", "https://[ff02::1]/hook", "https://0.0.0.0/hook",
    "https://[::]/hook", "https://240.0.0.1/hook", "https://255.255.255.255/hook", "https://[64:ff9b::7f00:1]/hook",
    "https://[2002:7f00:1::]/hook", "https://2130706433/hook", "https://0x7f.1/hook", "https://127.1/hook",
    "https://017700000001/hook", "https://localhost/hook", "https://localhost./hook", "http://93.184.216.34/hook",
    "ftp://93.184.216.34/hook", "https://user:pw@93.184.216.34/hook", "gopher://127.0.0.1:6379/_FLUSHALL",
]


async def _signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_an_internal_webhook_is_refused_when_saved(http, base_url, funded, target):
    expert = await funded(0)
    status, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                 {"display_name": "E", "price": 100, "webhook": target})
    assert status == 422 and body["error"] == "validation_error" and "webhook" in body["detail"], body


@pytest.mark.parametrize("target", ["https://127.0.0.1/hook", "https://[::ffff:169.254.169.254]/", "http://93.184.216.34/"])
async def test_a_qa_run_with_an_internal_webhook_is_refused_before_payment(http, base_url, funded, ledger, target):
    wallet = await funded(1000)
    journal = await ledger.redis.xlen(ledger.journal_key)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, body, _ = await s.request("POST", f"{base_url}/v1/qa/runs", data=json.dumps(
            {"suite": "schema", "manifests": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n", "webhook": target}),
            headers={"Content-Type": "application/json"})
    assert status == 422 and "webhook" in body["detail"], body
    assert await ledger.redis.xlen(ledger.journal_key) == journal


async def _receiver(aiohttp_server):
    hits: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/redirect":
            raise web.HTTPTemporaryRedirect("/second")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    return await aiohttp_server(app), hits


async def _ask(http, base_url, asker, expert):
    async with PaidSession(asker, max_price=10_000, session=http) as s:
        status, q, _ = await s.request("POST", f"{base_url}/v1/experts/{expert.username}/questions",
                                       data=json.dumps({"text": "ping"}), headers={"Content-Type": "application/json"})
    assert status == 201, q
    return q


async def test_dns_rebinding_to_loopback_is_refused_at_send_time(http, make_app, aiohttp_server, funded, monkeypatch):
    """The name resolves to a public address when saved and to loopback when the question is sent."""
    receiver, hits = await _receiver(aiohttp_server)
    answers = iter(["93.184.216.34"] + ["127.0.0.1"] * 20)
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    base_url = str((await aiohttp_server(make_app(webhook_allow_http=True))).make_url("")).rstrip("/")
    asker, expert = await funded(0), await funded(0)
    status, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me", {
        "display_name": "E", "price": 100, "webhook": f"http://rebind.example:{receiver.port}/hook"})
    assert status == 200, body
    await _credit(http, base_url, asker, 1000)
    await _ask(http, base_url, asker, expert)
    await asyncio.sleep(1.0)
    assert hits == []


async def test_redirects_are_not_followed(http, make_app, aiohttp_server, funded):
    receiver, hits = await _receiver(aiohttp_server)
    base_url = str((await aiohttp_server(make_app(webhook_allow=("127.0.0.0/8",), webhook_allow_http=True)))
                   .make_url("")).rstrip("/")
    asker, expert = await funded(0), await funded(0)
    status, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me", {
        "display_name": "E", "price": 100, "webhook": str(receiver.make_url("/redirect"))})
    assert status == 200, body
    await _credit(http, base_url, asker, 1000)
    await _ask(http, base_url, asker, expert)
    for _ in range(40):
        if hits:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert hits == ["/redirect"]


async def test_the_allow_list_admits_a_private_network_and_nothing_else(http, make_app, aiohttp_server, funded):
    base_url = str((await aiohttp_server(make_app(webhook_allow=("10.0.0.0/8", "hooks.internal"))))
                   .make_url("")).rstrip("/")
    expert = await funded(0)
    for target, status in [("https://10.1.2.3/hook", 200), ("https://hooks.internal/x", 200),
                           ("https://127.0.0.1/hook", 422), ("http://10.1.2.3/hook", 422)]:
        got, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                  {"display_name": "E", "price": 100, "webhook": target})
        assert got == status, (target, body)


async def _credit(http, base_url, wallet, amount):
    from tests.conftest import ADMIN_TOKEN  # noqa: PLC0415

    async with http.post(f"{base_url}/v1/admin/credits", json={"username": wallet.username, "amount": amount,
                                                               "reason": "test"},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        assert r.status == 201, await r.text()


async def test_a_webhook_saved_before_the_rules_is_refused_at_send_time(http, make_app, funded, aiohttp_server, ledger,
                                                                        settings):
    """Profiles stored by an older release may hold a loopback URL: the sender checks it again."""
    receiver, hits = await _receiver(aiohttp_server)
    base_url = str((await aiohttp_server(make_app(webhook_allow_http=True))).make_url("")).rstrip("/")
    asker, expert = await funded(0), await funded(0)
    status, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me", {"display_name": "E", "price": 100})
    assert status == 200, body
    key = Keys(settings.redis_prefix).of("xp", "profile", expert.username)
    await ledger.redis.hset(key, "webhook", str(receiver.make_url("/hook")))  # as an older release saved it
    await _credit(http, base_url, asker, 1000)
    await _ask(http, base_url, asker, expert)
    await asyncio.sleep(1.0)
    assert hits == []


@pytest.mark.parametrize("address,forbidden", [
    ("93.184.216.34", False), ("2606:2800:220:1:248:1893:25c8:1946", False), ("8.8.8.8", False),
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.31.255.255", True), ("192.168.0.1", True), ("169.254.169.254", True),
    ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.251", True), ("239.255.255.250", True), ("240.0.0.1", True),
    ("255.255.255.255", True), ("192.0.0.170", True), ("198.18.0.1", True), ("::1", True), ("::", True),
    ("fe80::1", True), ("fc00::1", True), ("fd00:ec2::254", True), ("ff02::1", True), ("::ffff:127.0.0.1", True),
    ("::ffff:10.0.0.1", True), ("::ffff:93.184.216.34", False), ("64:ff9b::a00:1", True), ("2002:7f00:1::", True),
    ("2001:db8::1", True), ("fec0::1", True),
])
def test_address_ranges(address, forbidden):
    import ipaddress

    from service.webhooks import forbidden_address

    assert forbidden_address(ipaddress.ip_address(address)) is forbidden

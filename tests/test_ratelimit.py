"""Rate limits: per client IP on /v1, per account on paid calls; 429 with Retry-After, and a refused call
charges nothing."""
from __future__ import annotations

from typing import Any

from service.client import PaidSession
from service.keys import Keys
from service.ledger import REVENUE, user_account


async def served(aiohttp_server: Any, app: Any) -> str:
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_per_ip_limit_answers_429_with_retry_after(aiohttp_server, make_app, http, manifest):
    url = await served(aiohttp_server, make_app(rate_limit_ip=3))
    statuses = []
    for _ in range(5):
        async with http.post(f"{url}/v1/qa/validate", data=manifest) as r:
            statuses.append(r.status)
            last, headers = await r.json(), r.headers
    assert statuses == [402, 402, 402, 429, 429]
    assert last["error"] == "rate_limited" and "3 requests per minute from this IP address" in last["detail"]
    assert 1 <= int(headers["Retry-After"]) <= 61
    async with http.get(f"{url}/healthz") as r:  # probes are never throttled
        assert r.status == 200


async def test_forwarded_for_is_used_only_behind_a_trusted_proxy(aiohttp_server, make_app, http):
    url = await served(aiohttp_server, make_app(rate_limit_ip=2))
    for i in range(3):  # a spoofed header does not buy an untrusted client a fresh allowance
        async with http.get(f"{url}/v1/experts", headers={"X-Forwarded-For": f"10.0.0.{i}"}) as r:
            status = r.status
    assert status == 429
    url = await served(aiohttp_server, make_app(rate_limit_ip=2, trust_proxy=True))
    for i in range(3):  # our proxy (one hop) appended the address it saw: that one is the client
        async with http.get(f"{url}/v1/experts", headers={"X-Forwarded-For": f"127.0.0.1, 10.0.0.{i}"}) as r:
            assert r.status == 200


async def test_rotating_forwarded_for_written_by_the_client_does_not_escape_the_limit(aiohttp_server, make_app, http):
    """Behind a proxy that appends (nginx $proxy_add_x_forwarded_for), the client's own entries are on the left."""
    url = await served(aiohttp_server, make_app(rate_limit_ip=3, trust_proxy=True))
    statuses = []
    for i in range(8):
        async with http.get(f"{url}/v1/experts", headers={"X-Forwarded-For": f"1.2.{i}.4, 203.0.113.7"}) as r:
            statuses.append(r.status)
    assert statuses == [200] * 3 + [429] * 5


async def test_garbage_forwarded_for_never_becomes_a_key(aiohttp_server, make_app, http, ledger, settings):
    url = await served(aiohttp_server, make_app(rate_limit_ip=2, trust_proxy=True))
    statuses = []
    for value in ["x" * 6000, "203.0.113.7:8080", "not-an-ip", "999.1.1.1", "::ffff:zz", "", " , ,"]:
        async with http.get(f"{url}/v1/experts", headers={"X-Forwarded-For": value}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200] + [429] * 5  # all counted against the socket's peer
    keys = [k async for k in ledger.redis.scan_iter(match=Keys(settings.redis_prefix).of("rl", "ip", "*"))]
    assert keys and all(k.split(":")[3] == "127.0.0.1" for k in keys), keys


async def test_trusted_proxy_networks_are_skipped_from_the_right(aiohttp_server, make_app, http, ledger, settings):
    url = await served(aiohttp_server, make_app(rate_limit_ip=2, trust_proxy=True,
                                                trusted_proxies=("127.0.0.0/8", "10.0.0.0/8")))
    for i in range(3):  # client spoof, the real client, then two hops of our own proxies
        async with http.get(f"{url}/v1/experts", headers={"X-Forwarded-For": f"6.6.6.{i}, 198.51.100.9, 10.1.1.1"}) as r:
            status = r.status
    assert status == 429
    keys = [k async for k in ledger.redis.scan_iter(match=Keys(settings.redis_prefix).of("rl", "ip", "*"))]
    assert {k.split(":")[3] for k in keys} == {"198.51.100.9"}


async def test_per_account_limit_refuses_before_any_charge(aiohttp_server, make_app, http, manifest, ledger, funded):
    wallet = await funded(1000)  # registered through another server process on the same ledger
    url = await served(aiohttp_server, make_app(rate_limit_account=2))
    async with PaidSession(wallet, max_price=500, session=http) as s:
        for _ in range(2):
            status, body, _ = await s.request("POST", f"{url}/v1/qa/validate", data=manifest)
            assert status == 200, body
        journal = await ledger.redis.xlen(ledger.journal_key)
        status, body, headers = await s.request("POST", f"{url}/v1/qa/validate", data=manifest)
    assert status == 429 and body["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    payer = await ledger.balance(user_account(wallet.username))
    assert payer.posted == 1000 - 2 * 120 and payer.pending_debits == 0
    assert (await ledger.balance(REVENUE)).posted == 2 * 120
    assert await ledger.redis.xlen(ledger.journal_key) == journal

"""The invoice address pool under attack: its bound holds under any concurrency (one Lua script reserves
the index and the lease together), and one client cannot lease the whole pool (a per-client-IP cap)."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from service.config import DEFAULT_TESTNET_ADDRESS
from service.keys import Keys

MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"


async def _serve(aiohttp_server, chain_app, **overrides) -> str:
    server = await aiohttp_server(chain_app(trust_proxy=True, trusted_proxy_hops=1, **overrides))
    return str(server.make_url("/v1/qa/validate"))


async def _offer(http, url: str, client: str) -> str | None:
    """The on-chain address a 402 offers to `client` (an IP, as our proxy reports it), or None."""
    async with http.post(url, data=MANIFEST, headers={"X-Forwarded-For": client}) as r:
        body = await r.json()
        assert r.status == 402, body
    address = body["invoice"]["address"]  # an invoice's own address, or the static one (no on-chain payment)
    return address if address != DEFAULT_TESTNET_ADDRESS else None


async def _derived(settings) -> tuple[int, int]:
    """(indexes ever derived, addresses ever recorded) for this deployment."""
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        keys = Keys(settings.redis_prefix)
        return int(await redis.get(keys.of("addr", "next")) or 0), await redis.scard(keys.of("addr", "all"))
    finally:
        await redis.aclose()


async def test_concurrent_402s_never_lease_more_than_the_pool(aiohttp_server, chain_app, settings):
    """Attack: 200 concurrent unpaid 402s on a fresh deployment (from 200 clients) used to derive 200
    addresses (the pool check and the derivation were two steps): past the gap limit of the wallet."""
    import aiohttp

    url = await _serve(aiohttp_server, chain_app, invoice_address_pool=20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        offers = await asyncio.gather(*[_offer(http, url, f"10.1.{i // 250}.{i % 250}") for i in range(200)])
    leased = [a for a in offers if a]
    assert len(set(leased)) == len(leased) == 20  # every address one invoice's; the whole pool, no more
    assert await _derived(settings) == (20, 20)   # not one index past the pool was ever derived


async def test_one_client_cannot_lease_the_pool(aiohttp_server, chain_app, http):
    """Attack: 25 anonymous 402s from one IP took every pooled address; the next client's 402 then
    offered no on-chain payment. Now one client holds at most INVOICE_ADDRESSES_PER_CLIENT of them."""
    url = await _serve(aiohttp_server, chain_app, invoice_address_pool=20, invoice_addresses_per_client=3)
    attacker = [await _offer(http, url, "203.0.113.7") for _ in range(25)]
    assert len({a for a in attacker if a}) == 3 and attacker[3:] == [None] * 22  # still a 402, without on-chain
    victims = [await _offer(http, url, f"198.51.100.{i}") for i in range(1, 6)]
    assert all(victims) and len(set(victims) | set(attacker)) == 3 + 5 + 1  # (+ the attacker's None)


async def test_a_paid_invoice_frees_its_clients_share(aiohttp_server, chain_app, http, esplora):
    """Paying releases the client's share at once (a paying client is not locked out of on-chain)."""
    from tests.chain.test_onchain import pay

    url = await _serve(aiohttp_server, chain_app, invoice_addresses_per_client=1)
    address = await _offer(http, url, "192.0.2.1")
    assert address and await _offer(http, url, "192.0.2.1") is None
    raw, _ = pay(esplora, address, 600)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw, "X-Forwarded-For": "192.0.2.1"}) as r:
        assert r.status == 200, await r.text()
    assert await _offer(http, url, "192.0.2.1") not in (None, address)


async def test_an_ipv6_client_is_capped_by_its_64(aiohttp_server, chain_app, http):
    """One host holds a whole IPv6 /64: its addresses share one cap."""
    url = await _serve(aiohttp_server, chain_app, invoice_addresses_per_client=2)
    offers = [await _offer(http, url, f"2001:db8:1:2::{i:x}") for i in range(1, 6)]
    assert len([a for a in offers if a]) == 2
    assert await _offer(http, url, "2001:db8:1:3::1")  # the next /64 is another client

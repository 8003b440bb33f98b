"""Redis-backed rate limits (fixed one-minute windows, shared by every server process): per client IP on
the API, per account on paid calls. Over the limit: 429 with Retry-After. 0 disables a limit."""
from __future__ import annotations

import functools
import ipaddress
import time
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import web

from .config import Settings
from .errors import TooManyRequests
from .keys import Keys
from .redis_client import ScriptBatcher
from .scripts import register
from .state import HEALTH, LIMITER, SETTINGS

__all__ = ["RateLimiter", "rate_limit_middleware", "client_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str, timeout: float) -> None:
        self.keys = Keys(prefix)
        self._hit = register(redis, "ratelimit_hit")
        self._batch = ScriptBatcher(redis, timeout)  # pipelined with the other calls of the moment

    async def check(self, scope: str, key: str, per_minute: int) -> None:
        """One more hit for (scope, key); TooManyRequests once the window's allowance is used up."""
        if per_minute <= 0:
            return
        window = int(time.time() // 60)
        count, ttl = await self._batch.call(self._hit, [self.keys.rate(scope, key, window)], [60_000])
        if int(count) > per_minute:
            retry = max(1, int(ttl) // 1000 + 1)
            who = "from this IP address" if scope == "ip" else "for this account"
            raise TooManyRequests("rate_limited", f"more than {per_minute} requests per minute {who}; retry in {retry} s",
                                  headers={"Retry-After": str(retry)})


def _ip(text: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


def client_ip(request: web.Request, settings: Settings) -> str:
    """The client's address as an IP (never raw client text: it becomes part of a Redis key).

    Without TRUST_PROXY: the socket's peer. With it, X-Forwarded-For is read from the right, where our own
    proxies appended what they saw (a client can only write on the left): the TRUSTED_PROXY_HOPS-th entry
    from the right, or, with TRUSTED_PROXIES, the first entry from the right outside those networks (as
    werkzeug's ProxyFix and nginx's real_ip_recursive do). Anything that is not an IP address: the peer."""
    peer = _ip(request.remote)
    fallback = str(peer) if peer else "unknown"
    if not settings.trust_proxy:
        return fallback
    entries = [e.strip() for value in request.headers.getall("X-Forwarded-For", []) for e in value.split(",")]
    if settings.trusted_proxies:
        networks = _networks(settings.trusted_proxies)
        if peer is None or not any(peer in n for n in networks if n.version == peer.version):
            return fallback  # a direct client, not one of our proxies: its header means nothing
        for entry in reversed(entries):
            address = _ip(entry)
            if address is None:
                return fallback
            if not any(address in n for n in networks if n.version == address.version):
                return str(address)
        return fallback
    hops = max(1, settings.trusted_proxy_hops)
    if len(entries) < hops:
        return fallback
    address = _ip(entries[-hops])
    return str(address) if address else fallback


@functools.lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


@web.middleware
async def rate_limit_middleware(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Per-IP limit on every /v1 route (health, metrics and discovery stay free of it)."""
    s = request.app[SETTINGS]
    if s.rate_limit_ip and request.path.startswith("/v1/") and request.app[HEALTH].ok:
        await request.app[LIMITER].check("ip", client_ip(request, s), s.rate_limit_ip)
    return await handler(request)

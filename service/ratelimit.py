"""Redis-backed rate limits (fixed one-minute windows, shared by every server process): per client IP on
the API, per account on paid calls. Over the limit: 429 with Retry-After. 0 disables a limit."""
from __future__ import annotations

import time
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import web

from .errors import TooManyRequests
from .redis_client import ScriptBatcher
from .state import HEALTH, LIMITER, SETTINGS

__all__ = ["RateLimiter", "rate_limit_middleware"]

_HIT = """
-- KEYS: counter. ARGV: window ms. Returns {count, ms left in the window}.
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str, timeout: float) -> None:
        self.tag = "{" + prefix + "}"
        self._hit = redis.register_script(_HIT)
        self._batch = ScriptBatcher(redis, timeout)  # pipelined with the other calls of the moment

    async def check(self, scope: str, key: str, per_minute: int) -> None:
        """One more hit for (scope, key); TooManyRequests once the window's allowance is used up."""
        if per_minute <= 0:
            return
        window = int(time.time() // 60)
        count, ttl = await self._batch.call(self._hit, [f"{self.tag}:rl:{scope}:{key}:{window}"], [60_000])
        if int(count) > per_minute:
            retry = max(1, int(ttl) // 1000 + 1)
            who = "from this IP address" if scope == "ip" else "for this account"
            raise TooManyRequests("rate_limited", f"more than {per_minute} requests per minute {who}; retry in {retry} s",
                                  headers={"Retry-After": str(retry)})


def client_ip(request: web.Request, trust_proxy: bool) -> str:
    if trust_proxy and request.headers.get("X-Forwarded-For"):
        return request.headers["X-Forwarded-For"].split(",")[0].strip()
    return request.remote or "unknown"


@web.middleware
async def rate_limit_middleware(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Per-IP limit on every /v1 route (health, metrics and discovery stay free of it)."""
    s = request.app[SETTINGS]
    if s.rate_limit_ip and request.path.startswith("/v1/") and request.app[HEALTH].ok:
        await request.app[LIMITER].check("ip", client_ip(request, s.trust_proxy), s.rate_limit_ip)
    return await handler(request)

"""Liveness (process up) and readiness (Redis reachable) probes, and Prometheus metrics."""
import asyncio

from aiohttp import web

from service import metrics
from service.state import HEALTH, REDIS


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    health = request.app[HEALTH]
    if not health.ok:
        state = "unreachable" if not health.reachable else "starting"
        return web.json_response({"status": "unavailable", "redis": state}, status=503)
    try:
        async with asyncio.timeout(1):
            await request.app[REDIS].ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach Redis means not ready
        return web.json_response({"status": "unavailable", "redis": type(exc).__name__}, status=503)
    return web.json_response({"status": "ready", "redis": "ok"})


async def prometheus(request: web.Request) -> web.Response:
    body, content_type = await metrics.exposition(request)
    return web.Response(body=body, headers={"Content-Type": content_type})

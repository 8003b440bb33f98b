"""Liveness (process up) and readiness (Redis reachable) probes."""
from aiohttp import web

from service.state import REDIS


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[REDIS].ping()
    except Exception as exc:  # any failure to reach Redis means not ready
        return web.json_response({"status": "unavailable", "redis": type(exc).__name__}, status=503)
    return web.json_response({"status": "ready", "redis": "ok"})

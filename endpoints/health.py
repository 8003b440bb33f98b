"""Liveness (process up) and readiness (Redis reachable) probes, and Prometheus metrics."""
import asyncio
import hmac
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service import metrics
from service.chain.reorgs import reversed_deposits
from service.errors import Unauthorized
from service.state import CROWD, EXPERTS, HEALTH, LEDGER, REDIS, RUNS, SETTINGS


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
    body, content_type = await exposition(request)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def exposition(request: web.Request) -> tuple[bytes, str]:
    """Refresh the Redis-read gauges, then the exposition text (this process's, or every worker's). Lives
    here, its only caller, so service.metrics imports nothing of the app (no metrics -> state cycle)."""
    app = request.app
    token = app[SETTINGS].metrics_token
    sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if token and not hmac.compare_digest(sent, f"Bearer {token}".encode()):
        raise Unauthorized("metrics_token_required", "Authorization: Bearer <METRICS_TOKEN> is required",
                           headers={"WWW-Authenticate": "Bearer"})
    metrics.READY.set(1 if app[HEALTH].ok else 0)
    if app[HEALTH].ok:
        holds, oldest = await app[LEDGER].pending_summary()
        metrics.HOLDS.set(holds)
        metrics.HOLD_AGE.set(oldest)
        metrics.QUEUE.labels("qa_runs").set(await app[RUNS].depth())
        metrics.QUEUE.labels("crowd_jobs_open").set(await app[CROWD].open_jobs())
        metrics.QUEUE.labels("questions_open").set(await app[EXPERTS].open_questions())
        metrics.REVERSED.set(len(await reversed_deposits(app[LEDGER].redis, app[SETTINGS].redis_prefix)))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415 - only in multiprocess mode

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST
